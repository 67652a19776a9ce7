"""Build-once leases that survive preemption: ``leases/<env_id>`` in the store.

A builder takes the lease with a conditional put (``If-None-Match: *``) before it builds an env
and deletes it when done. The lease is short (:data:`LEASE_SECONDS`, about a minute) and a
heartbeat thread rewrites it every third of that while the builder works, so a builder that is
killed without a chance to clean up (SIGKILL, a lost node, a lost network) blocks the next one
for about one lease period. A lease whose holder ran on this host (same host name and boot)
and whose pid is gone is taken over at once.

Staleness never trusts another host's clock: the ``expires`` a holder writes is for people. A
waiter watches the lease object (:class:`LeaseWatch`) and takes it over once its bytes have not
changed for one lease period by the waiter's own monotonic clock; a one-shot reader (``store
gc``) calls a lease stale when the store's own last-modified time of the object is
:data:`STALE_PERIODS` periods old. The body is JSON::

    {"holder": "host:pid:nonce", "host": "...", "boot": "...", "pid": 123,
     "expires": 1767225600.0, "taken": "2026-...Z", "seconds": 60}
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from envmgr.cache.layout import lease_key
from envmgr.cache.store import NotARecordError, Store, head
from envmgr.fs import pid_alive

__all__ = [
    "LEASE_SECONDS",
    "STALE_PERIODS",
    "LeaseInfo",
    "LeaseWatch",
    "held_lease",
    "lease_bytes",
    "new_holder",
    "read_lease",
    "try_take",
]

#: How long a lease lasts without renewal: the worst-case delay after a builder is killed.
LEASE_SECONDS = 60.0
#: The longest period a lease may claim (its ``seconds``), so a bad value cannot block forever.
MAX_LEASE_SECONDS = 600.0
#: Periods without a write, by the store's clock, after which a one-shot reader calls it stale.
STALE_PERIODS = 5
#: The most of a lease object read (a lease is about 250 bytes).
LEASE_BYTES = 64 << 10


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


@dataclass(frozen=True, kw_only=True, slots=True)
class LeaseInfo:
    """Who holds a lease and until when (parsed from the store; unknown fields are empty)."""

    holder: str
    host: str
    boot: str
    pid: int
    expires: float
    taken: str
    seconds: float = LEASE_SECONDS  # the holder's period, within (0, MAX_LEASE_SECONDS]
    readable: bool = True

    @classmethod
    def from_bytes(cls, raw: bytes) -> LeaseInfo:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError
            return cls(
                holder=str(data.get("holder", ""))[:200],
                host=str(data.get("host", ""))[:200],
                boot=str(data.get("boot", ""))[:64],
                pid=int(data.get("pid", 0)),
                expires=float(data.get("expires", 0.0)),
                taken=str(data.get("taken", ""))[:40],
                seconds=_period(data.get("seconds", LEASE_SECONDS)),
            )
        except (ValueError, TypeError, OverflowError):
            # Unreadable: stale at once, so a broken object never blocks builds.
            return cls(holder="?", host="", boot="", pid=0, expires=0.0, taken="", readable=False)

    def stale_at_once(self) -> bool:
        """Known stale without watching: unreadable, or its same-host holder is gone."""
        return not self.readable or self.dead_here()

    def dead_here(self) -> bool:
        """The holder ran on this host (same name and boot) and its process is gone."""
        if not self.pid or self.host != socket.gethostname() or self.boot != _boot_id():
            return False
        return not pid_alive(self.pid)  # another user's process counts as alive

    def describe(self) -> str:
        return (
            f"{self.holder} (taken {self.taken or '?'} by its clock, renewed every "
            f"{self.seconds / 3:.0f} s while it builds)"
        )


def _period(value: object) -> float:
    seconds = float(value)  # type: ignore[arg-type]
    if not 0 < seconds <= MAX_LEASE_SECONDS:  # also refuses nan
        raise ValueError(f"lease period {value!r}")
    return seconds


def lease_bytes(store: Store, key: str) -> bytes | None:
    """The lease object at *key*, ``None`` when there is none. One that cannot be a lease
    (too large, or not a regular file) reads as a marker and what can be read of its first
    KiB: unreadable, so stale at once like any broken lease (a broken object never blocks
    builds), and the same bytes each time it is read, so it is taken over only while it
    has not changed."""
    try:
        return store.get(key, limit=LEASE_BYTES)
    except NotARecordError:
        return b"\0not a lease: " + head(store, key, 1024)


def read_lease(store: Store, env_id: str) -> LeaseInfo | None:
    raw = lease_bytes(store, lease_key(env_id))
    return None if raw is None else LeaseInfo.from_bytes(raw)


class LeaseWatch:
    """Whether a lease has a live holder, judged by this process alone: a holder rewrites its
    lease every third of its period, so bytes unchanged for a whole period (the holder's or
    *seconds*, whichever is longer) on this process's monotonic clock mean nobody renews it.
    One watch per env a waiter waits for."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._raw: bytes | None = None
        self._since = 0.0

    def stale(self, raw: bytes, info: LeaseInfo) -> bool:
        if info.stale_at_once():
            return True
        now = self.clock()
        if raw != self._raw:
            self._raw, self._since = raw, now
            return False
        return now - self._since >= max(self.seconds, info.seconds)


def _body(holder: str, seconds: float) -> bytes:
    return json.dumps(
        {
            "holder": holder,
            "host": socket.gethostname(),
            "boot": _boot_id(),
            "pid": os.getpid(),
            "expires": time.time() + seconds,
            "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": seconds,
        }
    ).encode()


def new_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def try_take(
    store: Store, env_id: str, *, holder: str, seconds: float, watch: LeaseWatch | None = None
) -> bool:
    """Take the lease (True), or find it held by a live holder (False). An unreadable lease,
    one whose same-host holder died, and one that *watch* has seen unchanged for a period are
    taken over (never one that changed since it was judged)."""
    key = lease_key(env_id)
    if store.put_if_absent(key, _body(holder, seconds)):
        return True
    raw = lease_bytes(store, key)
    if raw is not None:
        info = LeaseInfo.from_bytes(raw)
        stale = watch.stale(raw, info) if watch is not None else info.stale_at_once()
        if not stale or lease_bytes(store, key) != raw:
            return False
        store.delete(key)  # its holder is gone: race for it once more
    return store.put_if_absent(key, _body(holder, seconds))


class _Heartbeat(threading.Thread):
    """Renews a held lease every third of its period until stopped."""

    def __init__(self, store: Store, env_id: str, holder: str, seconds: float) -> None:
        super().__init__(name=f"envmgr-lease-{env_id[:12]}", daemon=True)
        self.store, self.env_id, self.holder, self.seconds = store, env_id, holder, seconds
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(max(self.seconds / 3, 0.2)):
            try:
                info = read_lease(self.store, self.env_id)
                if info is None or info.holder != self.holder:
                    self.lost = True  # taken over: the build goes on (archives are
                    return  # reproducible), the new holder's lease is left alone
                self.store.put(lease_key(self.env_id), _body(self.holder, self.seconds))
            except Exception:  # noqa: S112 - a store hiccup: try again next beat
                continue


@contextlib.contextmanager
def held_lease(store: Store, env_id: str, *, holder: str, seconds: float) -> Iterator[None]:
    """Keep the lease taken by :func:`try_take` renewed while the block runs, then release
    it (unless it was taken over). The original error of the block wins over a failure to
    release."""
    beat = _Heartbeat(store, env_id, holder, seconds)
    beat.start()
    try:
        yield
    finally:
        beat.stopped.set()
        beat.join()
        if not beat.lost:
            with contextlib.suppress(Exception):
                store.delete(lease_key(env_id))
