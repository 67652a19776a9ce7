"""Reading S3 objects as streams: one GET resumed where it broke, or parallel ranged GETs.

:class:`StreamReader` is one GET stream that goes on from the first missing byte, pinned to
the first answer's ETag, when it breaks; :class:`RangedReader` reads an object in order while
a pool fetches its next parts with ranged GETs, in bounded memory. Both are what
:meth:`envmgr.cache.s3.S3Store.open` returns, and both can be stopped from another thread
(``abort``), which wakes a read waiting on the network. :func:`back_off` and :func:`retries`
are the retry policy every S3 read shares (``ENVMGR_S3_RETRIES``).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, TypeVar

from envmgr.cache.store import StoreError

if TYPE_CHECKING:
    from envmgr.cache.s3 import S3Store

__all__ = ["RangedReader", "ShortReadError", "StreamReader", "back_off", "retries", "shut"]

_MiB = 1024 * 1024
_T = TypeVar("_T")


class ShortReadError(Exception):
    """The server ended the body early."""


def back_off(attempt: int) -> None:
    """The pause before try *attempt* (1, 2, …) of a read or HEAD: 0.5 s doubling, at most 4 s."""
    time.sleep(min(4.0, 0.25 * 2**attempt))


def retries() -> int:
    try:
        return max(0, int(os.environ.get("ENVMGR_S3_RETRIES", "5")))
    except ValueError:
        return 5


class RangedReader(io.RawIOBase):
    """Reads an object in order while a pool fetches the next parts with ranged GETs.

    At most ``window`` parts are in flight or buffered, so memory stays bounded; each part is
    retried by botocore. Closing it cancels what is still pending.
    """

    def __init__(
        self,
        store: S3Store,
        key: str,
        size: int,
        *,
        part: int = 8 * _MiB,
        window: int = 0,
        threads: int = 0,
    ) -> None:
        super().__init__()
        self.store, self.key, self.total, self.part = store, key, size, part
        threads = threads or store.threads
        self.window = window or threads * 2
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="envmgr-s3-get")
        self.parts = [(start, min(start + part, size) - 1) for start in range(0, size, part)]
        self.pending: dict[int, Future[bytes]] = {}
        self.next_submit = 0
        self.next_read = 0
        self.data = b""  # the part being read, from self.offset on
        self.view = memoryview(self.data)
        self.offset = 0
        self.aborted = False
        self._bodies: dict[int, Any] = {}  # being read by the pool, by thread
        self._guard = threading.Lock()

    def readable(self) -> bool:
        return True

    def reading(self, body: Any) -> None:
        """A part's body is being read (shut down at once if this reader is aborted)."""
        with self._guard:
            self._bodies[threading.get_ident()] = body
        if self.aborted:
            shut(body)

    def _fetch(self, index: int) -> bytes:
        try:
            data = self.store._get(self.key, self.parts[index], None, self)
        finally:
            with self._guard:
                self._bodies.pop(threading.get_ident(), None)
        if data is None or len(data) != self.parts[index][1] - self.parts[index][0] + 1:
            raise StoreError(self.store.url, self.key, "object changed or vanished while read")
        return data

    def _fill(self) -> None:
        while (
            self.next_submit < len(self.parts) and self.next_submit - self.next_read < self.window
        ):
            self.pending[self.next_submit] = self.pool.submit(self._fetch, self.next_submit)
            self.next_submit += 1

    def readinto(self, target: Any) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while data := self.read(1 << 30):
            parts.append(data)
        return b"".join(parts)

    def read(self, size: int | None = -1) -> bytes:
        """Up to *size* bytes of the current part, uncopied: the whole part as it came, or a
        memoryview of it (``RawIOBase.read`` would copy it twice)."""
        if size is None or size < 0:
            return self.readall()
        if self.offset >= len(self.data):
            if self.next_read >= len(self.parts) or size == 0:
                return b""
            self._fill()
            self.data, self.offset = self._part(self.pending.pop(self.next_read)), 0
            self.view = memoryview(self.data)
            self.next_read += 1
            self._fill()
        if self.offset == 0 and size >= len(self.data):
            self.offset = len(self.data)
            return self.data
        data = self.view[self.offset : self.offset + size]
        self.offset += len(data)
        return data  # type: ignore[return-value]

    def _part(self, future: Future[bytes]) -> bytes:
        """The part *future* fetches; ``StoreError`` soon after the reader is aborted."""
        while True:
            try:
                return future.result(timeout=0.1)
            except FutureTimeout:
                if self.aborted:
                    raise StoreError(self.store.url, self.key, "the read was stopped") from None

    def abort(self) -> None:
        """Stop this reader from another thread: no part is fetched from now on, and the
        parts being fetched are woken (their sockets shut down, see :func:`shut`)."""
        self.aborted = True
        with self._guard:
            bodies = list(self._bodies.values())
        for body in bodies:
            shut(body)
        for future in list(self.pending.values()):
            future.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if not self.closed:
            self.abort()
        super().close()


class _Absent(Exception):  # noqa: N818 - internal signal: the first GET found no object
    pass


class _Aborted(Exception):  # noqa: N818 - internal signal: the reader was stopped
    pass


def shut(body: Any) -> None:
    """Wake a read of *body* that waits on the network in another thread: its socket is
    shut down for reading (urllib3 2.3 and later can; with an older one the read ends when
    its bytes come)."""
    shutdown = getattr(getattr(body, "_raw_stream", body), "shutdown", None)
    if callable(shutdown):
        with contextlib.suppress(Exception):
            shutdown()


class StreamReader(io.RawIOBase):
    """Reads an object with one GET stream; :meth:`start` sends the GET, whose answer gives
    the object's size. When the stream breaks (a reset, a timeout, a short body, a 5xx), it
    goes on from the first byte not yet read with a ranged GET pinned to the first answer's
    ETag, up to ``ENVMGR_S3_RETRIES`` times with backoff, as :meth:`S3Store.get` does; an
    object that changes meanwhile is an error, never a mix."""

    def __init__(self, store: S3Store, key: str) -> None:
        super().__init__()
        self.store, self.key = store, key
        self.total = 0  # set by the first answer
        self.offset = 0
        self.etag: str | None = None
        self.body: Any = None
        self.attempt = 0
        self.aborted = False

    def readable(self) -> bool:
        return True

    def abort(self) -> None:
        """Stop this reader from another thread: a read waiting on the network ends at
        once, and this and every later read raises ``StoreError`` (never retried)."""
        self.aborted = True
        shut(self.body)

    def _open(self) -> None:
        extra: dict[str, str] = {}
        if self.offset:
            extra["Range"] = f"bytes={self.offset}-"
        if self.etag:
            extra["IfMatch"] = self.etag
        answer = self.store.client.get_object(
            Bucket=self.store.bucket, Key=self.store._key(self.key), **extra
        )
        if self.etag is None:
            self.total = int(answer["ContentLength"])
            self.etag = answer.get("ETag") or ""
        self.body = answer["Body"]

    def start(self) -> bool:
        """Send the first GET (retried like a read); ``False`` when there is no object."""
        try:
            self._retrying(self._open)
        except _Absent:
            return False
        return True

    def _drop_body(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            with contextlib.suppress(Exception):  # a broken stream may fail to close too
                body.close()

    def _retrying(self, step: Callable[[], _T]) -> _T:
        while True:
            try:
                if self.aborted:
                    raise _Aborted
                return step()
            except Exception as exc:
                self._drop_body()
                store = self.store
                if self.aborted:
                    raise StoreError(store.url, self.key, "the read was stopped") from None
                if store._missing(exc) and self.etag is None:
                    raise _Absent from None
                if store._missing(exc) or store._changed(exc):
                    raise StoreError(
                        store.url, self.key, "the object changed or vanished while it was read"
                    ) from None
                if not store._transient(exc) or self.attempt >= retries():
                    detail = f" after {self.attempt + 1} attempts ({self.offset} bytes read)"
                    raise store._fail(self.key, exc, detail if self.attempt else "") from None
                self.attempt += 1
                back_off(self.attempt)

    def _read(self, size: int) -> bytes:
        if self.body is None:
            self._open()
        data: bytes = self.body.read(min(size, self.total - self.offset))
        if not data:
            raise ShortReadError(f"{self.offset} of {self.total} bytes")
        return data

    def readinto(self, target: Any) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        """Up to *size* bytes as the stream gives them, without the two copies of
        ``RawIOBase.read`` (into a buffer, then out of it)."""
        if size is None or size < 0:
            return self.readall()
        if self.offset >= self.total or size == 0:
            return b""
        data = self._retrying(lambda: self._read(size))
        self.offset += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self._drop_body()
        super().close()
