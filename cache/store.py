"""The ``Store`` interface: a flat key space of objects, each written once and atomically.

Keys are ``/``-separated relative paths (see :mod:`envmgr.cache.layout`). Readers see a whole
object or none; the manifest of an env is written last and is the only thing readers trust.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NamedTuple, Protocol

from envmgr.errors import EnvmgrError

__all__ = [
    "RECORD_BYTES",
    "Entry",
    "NotARecordError",
    "RecordTooLargeError",
    "Store",
    "StoreError",
    "check_key",
    "get_record",
    "head",
    "too_large",
]

#: The most :meth:`Store.get` reads of a whole object unless told otherwise: what envmgr reads
#: whole is a record (an env or layer manifest, a lease, a name, a build record; torch's layer
#: manifest, the largest seen, is 1.2 MB). A store is another host's word, so an object that
#: is far larger is refused rather than held in memory; archives are streamed, never read whole.
RECORD_BYTES = 64 << 20


class StoreError(EnvmgrError):
    """A store could not be reached, read or written; names the store URL and the key."""

    def __init__(self, url: str, key: str, cause: str, *, hint: str | None = None) -> None:
        where = f"store {url}" if key == "-" else f"store {url}: {key}"
        super().__init__(f"{where}: {cause}", hint=hint)
        self.url = url
        self.key = key
        self.cause = cause


class Entry(NamedTuple):
    """One object of a listing: its key, size in bytes and last write (epoch seconds)."""

    key: str
    size: int
    modified: float


class NotARecordError(StoreError):
    """An object that cannot be an envmgr record: larger than its reader's limit, or (in a
    local store) not a regular file. Readers treat it as a damaged object of its kind."""


class RecordTooLargeError(NotARecordError):
    """An object read whole holds more than the reader's limit."""


def too_large(url: str, key: str, limit: int) -> RecordTooLargeError:
    """The error for an object read whole that holds more than *limit* bytes."""
    return RecordTooLargeError(
        url,
        key,
        f"more than {limit:,} bytes, far more than an envmgr record can be",
        hint="something other than envmgr wrote it; delete the object or fix the store URL",
    )


def get_record(store: Store, key: str) -> bytes | None:
    """A record whose reader copes with a damaged one (a cached lock, a wheel's metadata, a
    use marker, an env manifest for gc), or ``None`` when it is absent or cannot be
    envmgr's: the reader then does what it does for a damaged one (makes it again, or
    judges without it) instead of failing the command on one hostile object."""
    try:
        return store.get(key)
    except NotARecordError:
        return None


def head(store: Store, key: str, size: int) -> bytes:
    """What can be read of the first *size* bytes of an object that is not a record, for
    the readers that keep it as evidence (``b""`` when nothing can: a device, a pipe)."""
    try:
        return store.get(key, (0, size - 1)) or b""
    except NotARecordError:
        return b""


def check_key(key: str) -> str:
    """Reject keys that could escape the store root (absolute, ``..``, empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}")
    return key


class Store(Protocol):
    """What envmgr needs from a store; a local directory and S3 implement it."""

    @property
    def url(self) -> str:
        """The store's URL (``file:///…`` or ``s3://bucket/prefix``), without credentials."""
        ...

    def get(
        self,
        key: str,
        byte_range: tuple[int, int] | None = None,
        *,
        limit: int | None = RECORD_BYTES,
    ) -> bytes | None:
        """The object's bytes (or the inclusive *byte_range* of them); ``None`` if absent.
        A whole object of more than *limit* bytes raises :class:`RecordTooLargeError`
        (``None``: no limit); the bytes are counted as they arrive, whatever size the store
        declares. An object that cannot be read as one (a local key that is a FIFO) raises
        :class:`NotARecordError`, which both are."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Write the object atomically, replacing any previous version."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has the key; ``False`` when one does."""
        ...

    def put_file(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        """Upload a (large) file atomically (multipart where the store has it); *on_bytes*
        is called with the size of each part sent."""
        ...

    def get_file(self, key: str, path: Path) -> bool:
        """Download to *path* (parallel ranges where the store has them); ``False`` if absent."""
        ...

    def open(self, key: str, *, streams: int = 0) -> IO[bytes] | None:
        """A sequential reader of the object, or ``None`` when it does not exist; where the
        store has ranged reads, *streams* of them run in parallel (0: the store's default).
        The caller closes it."""
        ...

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or ``None`` when it does not exist."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object; absent objects are fine."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with *prefix*, sorted."""
        ...

    def entries(self, prefix: str) -> Iterator[Entry]:
        """Like :meth:`list`, with each object's size and time of last write (one listing,
        no request per object)."""
        ...
