"""Builds that survive preemption: short leases renewed by a heartbeat, signals that stop a
build cleanly, dead same-host holders taken over at once, waiting builders that say whom they
wait for. The kill loop runs 2 trials by default and 20 with ``-m slow``."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from envmgr.build.once import BuildOptions, build_and_store
from envmgr.cache.layout import lease_key, manifest_key
from envmgr.cache.lease import LeaseInfo, held_lease, read_lease, try_take
from envmgr.cache.local import LocalStore
from envmgr.locks.lock import Lock, write_conda_lock

LEASE = 3  # seconds: the period the kill tests run with


def test_a_held_lease_is_renewed_until_released(tmp_path):
    store = LocalStore(tmp_path / "store")
    env_id = "a" * 32
    assert try_take(store, env_id, holder="me", seconds=0.6)
    assert not try_take(store, env_id, holder="you", seconds=0.6)  # alive: our own pid
    with held_lease(store, env_id, holder="me", seconds=0.6):
        first = read_lease(store, env_id)
        time.sleep(1.5)  # more than two periods: only renewals keep it alive
        later = read_lease(store, env_id)
        assert first is not None and later is not None
        assert later.expires > first.expires and later.expires > time.time()
        assert later.holder == "me"
    assert read_lease(store, env_id) is None  # released


def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    store = LocalStore(tmp_path / "store")
    env_id = "b" * 32
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert try_take(store, env_id, holder="dead", seconds=600)
    raw = json.loads(store.get(lease_key(env_id)) or b"")
    store.put(lease_key(env_id), json.dumps({**raw, "pid": int(gone.stdout)}).encode())
    assert LeaseInfo.from_bytes(store.get(lease_key(env_id)) or b"").dead_here()
    assert try_take(store, env_id, holder="next", seconds=600)  # 600 s left, taken anyway
    assert (read_lease(store, env_id) or LeaseInfo.from_bytes(b"")).holder == "next"
    # Another host's live-looking lease is respected; a garbage object is not.
    store.put(lease_key(env_id), json.dumps({**raw, "host": "elsewhere"}).encode())
    assert not try_take(store, env_id, holder="third", seconds=600)
    store.put(lease_key(env_id), b"\x00not json")
    assert try_take(store, env_id, holder="third", seconds=600)


def test_a_waiting_builder_says_whom_it_waits_for_then_takes_over(mixed_lock, tmp_path):
    store = LocalStore(tmp_path / "store")
    other = {
        "holder": "gpu-node-7:4242:abcd",
        "host": "gpu-node-7",
        "pid": 4242,
        "expires": time.time() + 3600,  # that builder died; its clock runs an hour ahead
        "taken": "2026-12-01T10:00:00Z",
        "seconds": LEASE,  # its period (one without waits the default: see the test below)
    }
    store.put(lease_key(mixed_lock.env_id), json.dumps(other).encode())
    told: list[str] = []
    options = BuildOptions(store=store, cache_dir=tmp_path / "c", notify=told.append,
                           poll_seconds=0.1, lease_seconds=LEASE)  # fmt: skip
    start = time.monotonic()
    outcome = build_and_store(mixed_lock, options)
    assert outcome.status == "built"
    assert time.monotonic() - start >= LEASE  # the lease stayed unchanged for a period
    assert len(told) == 1
    assert (
        "gpu-node-7:4242:abcd" in told[0] and "taken 2026-12-01T10:00:00Z by its clock" in told[0]
    )
    assert f"{store.url}/{lease_key(mixed_lock.env_id)}" in told[0]  # how to clear it
    assert not store.exists(lease_key(mixed_lock.env_id))


def _lock_file(lock, tmp_path: Path) -> Path:
    path = tmp_path / "env.conda-lock.yml"
    write_conda_lock(Lock(platforms=(lock,), spec_id=lock.spec_id), path)
    return path


def _start_build(
    lock_file: Path, store: LocalStore, cache: Path, index_url: str
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PIP_INDEX_URL": index_url,  # the lock's PyPI files come from there (a local address)
        "ENVMGR_STORE": store.url,
        "ENVMGR_CACHE_DIR": str(cache),
        "ENVMGR_LEASE_SECONDS": str(LEASE),
    }
    return subprocess.Popen(
        [sys.executable, "-c", "from envmgr.cli.app import main; main()", "build",
         "--from-lock", str(lock_file), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _kill_trials(mixed_lock, tmp_path: Path, trials: int, index_url: str) -> None:
    """Kill a builder in its lease window (SIGKILL and SIGTERM in turn, at a varying
    moment); the next build must finish within one lease period plus a build."""
    lock_file = _lock_file(mixed_lock, tmp_path)
    key = lease_key(mixed_lock.env_id)
    killed = 0
    for trial in range(trials):
        store = LocalStore(tmp_path / f"store-{trial}")
        store.root.mkdir()  # an existing store: a new one is announced on stderr
        cache = tmp_path / "cache"  # shared, like one host's
        victim = _start_build(lock_file, store, cache, index_url)
        _wait_for(lambda store=store: store.exists(key))
        time.sleep((trial % 5) * 0.3)  # somewhere in install, bytecode, pack or upload
        signum = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
        victim.send_signal(signum)
        _out, err = victim.communicate(timeout=60)
        if store.exists(manifest_key("linux-64", mixed_lock.env_id)):
            continue  # it finished before the signal landed
        killed += 1
        if signum == signal.SIGTERM:
            assert victim.returncode == 143, err
            assert "stopped by SIGTERM" in err and len(err.strip().splitlines()) == 1, err
            assert not store.exists(key)  # released on the way out
            assert not list(cache.glob(".pack-*"))  # its temp files are gone
        start = time.monotonic()
        nxt = _start_build(lock_file, store, cache, index_url)
        out, err = nxt.communicate(timeout=120)
        assert nxt.returncode == 0, err
        rows = json.loads(out)["envs"]
        assert rows[0]["status"] == "built"
        assert time.monotonic() - start < LEASE + 60  # never an hour
        assert not store.exists(key)
        assert not list(cache.glob(".pack-*"))  # a killed builder's pack dir is swept
    assert killed >= max(1, trials // 2)  # the signals landed inside builds


def test_killed_builders_never_block_the_next_one(mixed_lock, pypi_index, tmp_path):
    _kill_trials(mixed_lock, tmp_path, trials=2, index_url=pypi_index.url)


@pytest.mark.slow
def test_kill_loop_twenty_trials(mixed_lock, pypi_index, tmp_path):
    _kill_trials(mixed_lock, tmp_path, trials=20, index_url=pypi_index.url)


# SIGINT lands between any two bytecodes; one that lands between os.scandir() returning and
# its `with` (pathlib's glob in temp_beside, as the lease is released) leaves the iterator to
# the collector: a ResourceWarning, once in many runs, and nothing left open after it. One that
# lands inside asyncio.run (rattler's install) can leave its loop and coroutine in a cycle:
# the test collects them itself, or the next test on its worker fails with their warnings.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_stops_a_build_in_process_and_releases_the_lease(mixed_lock, tmp_path):
    """SIGINT while build_and_store runs in the main thread: the lease is released and the
    exception says which signal; nothing is published."""
    from envmgr.build.once import BuildInterrupted

    store = LocalStore(tmp_path / "store")
    key = lease_key(mixed_lock.env_id)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    timer = threading.Thread(
        target=lambda: (_wait_for(lambda: store.exists(key)), os.kill(os.getpid(), signal.SIGINT))
    )
    timer.start()
    with pytest.raises(BuildInterrupted) as info:
        build_and_store(mixed_lock, BuildOptions(store=store, cache_dir=tmp_path / "c"))
    timer.join()
    assert info.value.exit_code == 130
    assert not store.exists(key)
    assert not store.exists(manifest_key("linux-64", mixed_lock.env_id))
    assert signal.getsignal(signal.SIGINT) is before  # restored
    gc.collect()


def test_a_failed_upload_is_the_error_even_when_the_lease_cannot_be_released(mixed_lock, tmp_path):
    """The store broke mid-build: the upload's error is what the user sees, not the failed
    release of the lease after it (which used to mask it)."""
    from envmgr.cache.store import StoreError

    class Breaking(LocalStore):
        def put_file(self, key, path, on_bytes=None):
            raise StoreError(self.url, key, "upload refused: SlowDown")

        def delete(self, key):
            raise StoreError(self.url, key, "connection reset while releasing")

    store = Breaking(tmp_path / "store")
    with pytest.raises(StoreError, match="upload refused: SlowDown"):
        build_and_store(mixed_lock, BuildOptions(store=store, cache_dir=tmp_path / "c"))


def test_a_lease_that_declares_no_period_is_watched_for_the_default_one(tmp_path):
    """A lease written without its period (another tool, an older envmgr) is judged by
    LEASE_SECONDS, however short the waiter's own period is."""
    from envmgr.cache.lease import LEASE_SECONDS, LeaseWatch

    store, env_id = LocalStore(tmp_path / "store"), "d" * 32
    body = {"holder": "old:1:x", "host": "elsewhere", "pid": 1, "expires": time.time() + 3600}
    store.put(lease_key(env_id), json.dumps(body).encode())
    now = [0.0]
    watch = LeaseWatch(1.0, clock=lambda: now[0])
    seen = []
    for step in (0.0, 1.0, LEASE_SECONDS - 2.0, 1.0):  # at 0, 1, LEASE_SECONDS - 1, LEASE_SECONDS
        now[0] += step
        seen.append(try_take(store, env_id, holder="me", seconds=1.0, watch=watch))
    assert seen == [False, False, False, True]


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["ahead", "behind"])
def test_a_lease_is_judged_by_the_waiters_clock_not_the_holders(any_store, skew):
    """A lease from a host whose clock runs an hour ahead blocked every builder for the hour;
    one from a host an hour behind looked expired while its holder renewed it. Now: taken over
    exactly one period after it stops changing, by the waiter's clock (a fake one here, so a
    loaded machine cannot make the holder look late), on local and S3 stores alike."""
    from envmgr.cache.lease import LeaseWatch

    env_id, period = "c" * 32, 60.0
    now = [0.0]
    watch = LeaseWatch(period, clock=lambda: now[0])

    def beat(n: int) -> None:  # the other host's heartbeat, with its clock off by *skew*
        body = {"holder": "skewed:1:x", "host": "skewed", "pid": 1, "seconds": period,
                "expires": time.time() + skew + period, "beat": n}  # fmt: skip
        any_store.put(lease_key(env_id), json.dumps(body).encode())

    for n in range(9):  # renewed every third of a period: never taken, whatever its clock says
        beat(n)
        assert not try_take(any_store, env_id, holder="me", seconds=period, watch=watch)
        now[0] += period / 3
    taken = []  # the holder is gone: no more beats
    while not any(taken) and len(taken) < 6:
        taken.append(try_take(any_store, env_id, holder="me", seconds=period, watch=watch))
        now[0] += period / 3
    assert taken == [False, False, True]  # one period after the last beat it saw
    assert (read_lease(any_store, env_id) or LeaseInfo.from_bytes(b"")).holder == "me"
