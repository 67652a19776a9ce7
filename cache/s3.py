"""A store on S3 (or anything speaking its API): ``s3://bucket/prefix``.

botocore with the default credential chain; the endpoint comes from ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL`` (both read by botocore itself) or the explicit *endpoint_url*. Large files
go up as multipart uploads; a reader (:meth:`S3Store.open`, what hydrate streams from) is one
GET stream, resumed from the first missing byte when it breaks, or N parallel ranged GETs (the
streams the caller asks for, or ``ENVMGR_S3_PARTS=N``). Requests are retried with backoff
(botocore's ``standard`` mode, and :mod:`envmgr.cache.s3_errors` for reads).
``put_if_absent`` is a conditional ``PutObject`` with ``If-None-Match: *``, which S3 and
SeaweedFS enforce atomically.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import IO, Any, TypeVar, cast
from urllib.parse import urlsplit

from envmgr.cache.s3_errors import (
    ShortReadError,
    back_off,
    changed,
    error_code,
    explain,
    missing,
    retries,
    setting_hint,
    transient,
)
from envmgr.cache.store import RECORD_BYTES, Entry, StoreError, check_key, too_large
from envmgr.knobs import env_int

__all__ = ["S3Store"]

_MiB = 1024 * 1024
_T = TypeVar("_T")


def _s3_loader(session: Any) -> Any:
    """botocore's data loader for *session* (its ``AWS_DATA_PATH`` included), except that
    asking whether ``s3`` is a service looks at ``s3`` alone: botocore's own answer lists
    every service it knows first, twice per client (400 directories and 2,800 ``stat`` calls,
    11 ms of a worker's start with a warm page cache, more on a fresh node's disk)."""
    import botocore.loaders  # noqa: PLC0415
    from botocore.exceptions import DataNotFoundError  # noqa: PLC0415

    class S3Loader(botocore.loaders.Loader):  # type: ignore[misc]
        def list_available_services(self, type_name: str) -> list[str]:
            try:
                self.list_api_versions("s3", type_name)
            except DataNotFoundError:
                return []
            return ["s3"]

    extra = session.get_config_variable("data_path")  # AWS_DATA_PATH, as botocore reads it
    if not extra:
        return S3Loader()
    paths = [str(Path(os.path.expandvars(path)).expanduser()) for path in extra.split(os.pathsep)]
    return S3Loader(extra_search_paths=paths)


class S3Store:
    """The :class:`~envmgr.cache.store.Store` interface over an S3 bucket and prefix."""

    def __init__(
        self, url: str, *, endpoint_url: str | None = None, client: Any = None, threads: int = 8
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(url, "-", "not an s3://bucket/prefix URL")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self._url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.threads = threads
        self._client = client
        self._own_client = client is not None
        self._endpoint = endpoint_url
        self._session: Any = None
        retries(), _parts()  # their variables checked now: a bad value is a clear error

    @property
    def url(self) -> str:
        return self._url

    def reopen_args(self) -> dict[str, Any] | None:
        """What opens this store in another process (its URL, endpoint and threads; the
        AWS settings come from the environment there too), or ``None`` when it was given a
        client of its own."""
        if self._own_client:
            return None
        return {"url": self._url, "endpoint": self._endpoint, "threads": self.threads}

    def forked(self) -> S3Store:
        """This store in a child process forked from this one: the connections the child
        inherited are closed there (the parent's, whose bytes it must not read), and it
        makes a client of its own from this one's session, whose S3 model is loaded (0.03 s
        against 0.15 s for a new session). Only where :meth:`reopen_args` can."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = None
        return self

    @property
    def client(self) -> Any:
        if self._client is None:
            # botocore's own session rather than boto3's: boto3 adds nothing a store uses
            # but its transfer methods (put_file and get_file call s3transfer themselves),
            # and importing it costs a worker 0.1 s of every cold start (s3transfer).
            import botocore.session  # noqa: PLC0415
            from botocore.config import Config  # noqa: PLC0415

            config = Config(
                # Few attempts here: get() resumes broken downloads itself, and a store
                # that is down should be reported in seconds, not minutes.
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=max(10, self.threads * 2),
                s3={"addressing_style": os.environ.get("ENVMGR_S3_ADDRESSING", "path")},
            )
            try:
                if self._session is None:
                    session = botocore.session.Session()
                    session.register_component("data_loader", _s3_loader(session))
                    self._session = session
                self._client = self._session.create_client(
                    "s3", endpoint_url=self._endpoint, config=config
                )
            except Exception as exc:
                # The AWS settings themselves: no request was sent, so none is retried.
                text = " ".join(str(exc).split())[:200]
                raise StoreError(
                    self.url, "-", f"cannot make an S3 client: {text}", hint=setting_hint(exc)
                ) from None
        return self._client

    def _key(self, key: str) -> str:
        """The object key under the prefix; called before any request, so that an invalid
        key raises ``ValueError`` rather than looking like a store failure."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, key: str, exc: Exception, detail: str = "") -> StoreError:
        if isinstance(exc, StoreError):  # the client could not be made: said already
            return exc
        cause, hint = explain(exc)
        endpoint = getattr(getattr(self._client, "meta", None), "endpoint_url", "?")
        return StoreError(
            self.url,
            key,
            f"S3 error {cause}{detail} (endpoint {endpoint}, credentials from "
            f"{self._credential_source()})",
            hint=hint,
        )

    def _credential_source(self) -> str:
        """Which link of boto3's credential chain answered (never the secret itself)."""
        try:
            credentials = self.client._request_signer._credentials
        except (AttributeError, StoreError):
            return "unknown"
        if credentials is None:
            return "nowhere (no credentials found)"
        return str(getattr(credentials, "method", "unknown"))

    def _transfer(self) -> Any:
        """boto3's managed transfer (multipart, parallel parts) over this store's client."""
        from boto3.s3.transfer import S3Transfer, TransferConfig  # noqa: PLC0415

        config = TransferConfig(
            multipart_threshold=16 * _MiB,
            multipart_chunksize=16 * _MiB,
            max_concurrency=self.threads,
            use_threads=True,
        )
        return S3Transfer(self.client, config)

    def get(
        self,
        key: str,
        byte_range: tuple[int, int] | None = None,
        *,
        limit: int | None = RECORD_BYTES,
    ) -> bytes | None:
        """The object (or bytes *byte_range*, inclusive). A transfer that breaks is resumed
        with a ranged GET for what is still missing, pinned to the first answer's ETag, up to
        ``ENVMGR_S3_RETRIES`` (default 5) times with backoff; then ``StoreError``. A whole
        object of more than *limit* bytes is refused before its body is read, or as soon as
        more arrives than its declared length said."""
        return self._get(key, byte_range, limit, None)

    def _get(
        self,
        key: str,
        byte_range: tuple[int, int] | None,
        limit: int | None,
        watch: _RangedReader | None,
    ) -> bytes | None:
        """:meth:`get`, each body it reads shown to *watch* (a ranged reader, whose
        :meth:`~_RangedReader.abort` shuts it down); once *watch* is aborted, a read that
        fails raises ``StoreError`` at once."""
        full = self._key(key)
        first, last = byte_range if byte_range else (0, None)
        wanted = None if last is None else last - first + 1
        # Chunks are joined once at the end: growing one bytearray copied each 8 MB part of
        # a ranged download several times over (0.4 s of GIL time in a throttled torch hydrate).
        chunks: list[bytes] = []
        got = 0
        etag: str | None = None
        attempt = 0
        while True:
            start = first + got
            extra: dict[str, str] = {}
            if start or last is not None:
                extra["Range"] = f"bytes={start}-{'' if last is None else last}"
            if etag:
                extra["IfMatch"] = etag
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=full, **extra)
                etag = etag or answer.get("ETag")
                body = answer["Body"]
                if watch is not None:
                    watch.reading(body)
                declared = int(answer.get("ContentLength") or 0)
                if wanted is None and limit is not None and declared > limit:
                    body.close()
                    raise too_large(self.url, key, limit)
                bound = wanted if wanted is not None else limit
                # A whole object in 64 KiB reads: a cut loses at most the read in progress, and
                # the retry resumes from the bytes in hand (1 MiB reads often had none). A
                # ranged part in one read, into one bytes object that is handed on as it is: in
                # 1 MiB reads joined at the end, 175 MB of torch's layer took 0.48 s of CPU on
                # loopback against one stream's 0.22 s. A cut loses the part's bytes in hand
                # (at most 8 MiB).
                step = 1 << 16 if wanted is None else max(1, wanted - got)
                for chunk in body.iter_chunks(step):
                    chunks.append(chunk)
                    got += len(chunk)
                    if bound is not None and got > bound:
                        body.close()
                        if wanted is None and limit is not None:
                            raise too_large(self.url, key, limit)
                        raise StoreError(
                            self.url, key, f"the store sent more than the {wanted} bytes asked for"
                        )
                if wanted is None or got == wanted:
                    return b"".join(chunks)
                raise ShortReadError(f"{got} of {wanted} bytes")
            except StoreError:
                raise
            except Exception as exc:
                if watch is not None and watch.aborted:
                    raise StoreError(self.url, key, "the read was stopped") from None
                if missing(exc) and etag is None:
                    return None
                if changed(exc):
                    raise StoreError(
                        self.url, key, "the object changed while it was read"
                    ) from None
                if not transient(exc) or attempt >= retries():
                    detail = f" after {attempt + 1} attempts ({got} bytes read)" if attempt else ""
                    raise self._fail(key, exc, detail) from None
                attempt += 1
                back_off(attempt)

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except Exception as exc:
            raise self._fail(key, exc) from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        full = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
        except Exception as exc:
            code = error_code(exc, "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise self._fail(key, exc) from None
        return True

    def put_file(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        full = self._key(key)
        try:
            with self._transfer() as transfer:
                transfer.upload_file(str(path), self.bucket, full, callback=on_bytes)
        except Exception as exc:
            raise self._fail(key, exc) from None

    def get_file(self, key: str, path: Path) -> bool:
        full = self._key(key)
        try:
            with self._transfer() as transfer:
                transfer.download_file(self.bucket, full, str(path))
        except Exception as exc:
            if missing(exc):
                return False
            raise self._fail(key, exc) from None
        return True

    def open(self, key: str, *, streams: int = 0) -> IO[bytes] | None:
        parts = _parts() or (streams if streams > 1 else 0)
        if parts:
            size = self.size(key)
            if size is None:
                return None
            return cast(IO[bytes], _RangedReader(self, key, size, threads=parts))
        # One stream needs no HEAD first: the GET's answer says the size (one request fewer
        # per layer, each a round trip on a slow link).
        reader = _StreamReader(self, key)
        if not reader.start():
            return None
        return cast(IO[bytes], reader)

    def size(self, key: str) -> int | None:
        """The object's size, ``None`` when absent; a transient error (a 5xx while the
        server restarts, a dropped connection) is retried like a read, with backoff."""
        full = self._key(key)
        attempt = 0
        while True:
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])
            except Exception as exc:
                if missing(exc):
                    return None
                if not transient(exc) or attempt >= retries():
                    detail = f" after {attempt + 1} attempts" if attempt else ""
                    raise self._fail(key, exc, detail) from None
                attempt += 1
                back_off(attempt)

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            if not missing(exc):
                raise self._fail(key, exc) from None

    def list(self, prefix: str) -> Iterator[str]:
        for entry in self.entries(prefix):
            yield entry.key

    def entries(self, prefix: str) -> Iterator[Entry]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            found = [
                Entry(item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp())
                for page in pages
                for item in page.get("Contents", [])
            ]
        except Exception as exc:
            raise self._fail(prefix, exc) from None
        yield from sorted(found)


def _parts() -> int:
    """``ENVMGR_S3_PARTS``: parallel ranged GETs per reader, 0 to 64 (0, the default: one
    stream, or what the caller asks for; on loopback one stream was faster than 8 parts with
    half the CPU)."""
    return env_int("ENVMGR_S3_PARTS", 0, low=0, high=64)


class _RangedReader(io.RawIOBase):
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
            _shut(body)

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
        parts being fetched are woken (their sockets shut down, see :func:`_shut`)."""
        self.aborted = True
        with self._guard:
            bodies = list(self._bodies.values())
        for body in bodies:
            _shut(body)
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


def _shut(body: Any) -> None:
    """Wake a read of *body* that waits on the network in another thread: its socket is
    shut down for reading (urllib3 2.3 and later can; with an older one the read ends when
    its bytes come)."""
    shutdown = getattr(getattr(body, "_raw_stream", body), "shutdown", None)
    if callable(shutdown):
        with contextlib.suppress(Exception):
            shutdown()


class _StreamReader(io.RawIOBase):
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
        _shut(self.body)

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
                if missing(exc) and self.etag is None:
                    raise _Absent from None
                if missing(exc) or changed(exc):
                    raise StoreError(
                        store.url, self.key, "the object changed or vanished while it was read"
                    ) from None
                if not transient(exc) or self.attempt >= retries():
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
