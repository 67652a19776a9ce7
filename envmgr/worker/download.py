"""One archive from the store into a directory: streamed, checked, unpacked.

:func:`download` reads an archive (an env's, or one package layer's) as the store gives it,
checks each format-2 frame against its manifest before it is decoded (a format-1 archive as a
whole), and unpacks it into a new directory; a :class:`Stop` set by the hydrate it serves makes
it give up at once. The hydrate (:mod:`envmgr.worker.hydrate`) and its layer process
(:mod:`envmgr.worker.layer_process`) both call it.

Standard library only (with the archive and store packages): workers import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path
from typing import IO, Any

from envmgr.archive.extract import Mirror
from envmgr.archive.manifest import ArchiveError, ChunkDigestError, Manifest
from envmgr.archive.unpack import unpack
from envmgr.cache.store import Store
from envmgr.errors import EnvmgrError
from envmgr.progress import Task

__all__ = ["HashMismatchError", "HydrateError", "Stop", "StoppedError", "download"]


class HydrateError(EnvmgrError):
    """An env could not be hydrated; names the env, the store and what to do."""


class HashMismatchError(HydrateError):
    """The downloaded archive does not match its manifest's sha256."""


class StoppedError(Exception):
    """A download given up because the hydrate it serves failed or was interrupted."""


class Stop(threading.Event):
    """Set when a hydrate failed or was interrupted: its downloads give up at their next
    read, and a read that waits on the network is woken (its source's ``abort``, where it
    has one): at 100 kB/s, one 8 MiB frame would keep Ctrl-C waiting 80 s."""

    def __init__(self) -> None:
        super().__init__()
        self._sources: set[Any] = set()
        self._guard = threading.Lock()

    def watch(self, source: Any) -> None:
        with self._guard:
            self._sources.add(source)
        if self.is_set():
            _abort(source)

    def forget(self, source: Any) -> None:
        with self._guard:
            self._sources.discard(source)

    def set(self) -> None:
        super().set()
        with self._guard:
            sources = list(self._sources)
        for source in sources:
            _abort(source)


def _abort(source: Any) -> None:
    abort = getattr(source, "abort", None)
    if callable(abort):
        abort()


class _Hashing:
    """Counts (and for format 1, hashes) what the extractor reads; format 2's frames are
    each checked against their own hash, which covers every byte."""

    def __init__(
        self,
        source: IO[bytes],
        task: Task | None,
        *,
        digest: bool = True,
        stop: Stop | None = None,
    ) -> None:
        self.source = source
        self.digest = hashlib.sha256()
        self.hashing = digest
        self.size = 0
        self.task = task
        self.stop = stop

    def read(self, size: int = -1) -> bytes:
        if self.stop is not None and self.stop.is_set():
            raise StoppedError
        data = self.source.read(size)
        if self.hashing:
            self.digest.update(data)
        self.size += len(data)
        if self.task is not None:
            self.task.advance(len(data))
        return data

    def readinto(self, target: Any) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)


def download(
    store: Store,
    key: str,
    manifest: Manifest,
    dest: Path,
    task: Task | None,
    what: str,
    *,
    streams: int = 0,
    read_only: bool = False,
    stop: Stop | None = None,
    mirror: Mirror | None = None,
) -> bool:
    """Stream the archive *key* through its checks into *dest* (made here), over *streams*
    ranged reads where the store has them, its files *read_only* if asked, giving up at the
    next read once *stop* is set; *what* names it in errors ("env …", "layer …"). Returns
    whether *mirror* was told of every file (see :func:`envmgr.archive.unpack.unpack`).
    Raises ``HydrateError`` (absent), ``HashMismatchError``, ``ArchiveError``,
    ``StoreError``, ``WriteError``."""
    source = store.open(key, streams=streams)
    if source is None:
        raise HydrateError(
            f"{what}: the manifest is in {store.url} but the archive {key} is not",
            hint="run `envmgr build` again",
        )
    if stop is not None:
        stop.watch(source)
    with contextlib.ExitStack() as scope:
        scope.enter_context(source)
        if stop is not None:
            scope.callback(stop.forget, source)
        hashing = _Hashing(source, task, digest=not manifest.chunks, stop=stop)
        mirrored = False
        try:
            mirrored = unpack(
                hashing,  # type: ignore[arg-type]
                dest,
                manifest,
                read_only=read_only,
                mirror=mirror,
            )
        except ChunkDigestError as exc:
            raise HashMismatchError(
                f"{what}: the archive {key} in {store.url} does not match "
                f"its manifest ({exc.message}); nothing was published",
                hint="rebuild it with `envmgr build` or restore the object",
            ) from None
        except ArchiveError:
            if manifest.chunks:  # each frame was checked before it was decoded
                raise
            # A damaged download usually breaks the stream first: say so if the bytes
            # do not match, which is the actionable cause.
            while hashing.read(1 << 20):
                pass
            if hashing.digest.hexdigest() == manifest.sha256:
                raise
        while hashing.read(1 << 20):  # the tar end padding the extractor left unread
            pass
        got = hashing.digest.hexdigest() if hashing.hashing else manifest.sha256
        if got != manifest.sha256 or hashing.size != manifest.size:
            differs = (
                f"sha256 {got[:16]}…, want {manifest.sha256[:16]}…"
                if got != manifest.sha256
                else f"{hashing.size} bytes, want {manifest.size}"
            )
            raise HashMismatchError(
                f"{what}: the archive {key} in {store.url} does not match "
                f"its manifest ({differs}); nothing was published",
                hint="rebuild it with `envmgr build` or restore the object",
            )
    return mirrored
