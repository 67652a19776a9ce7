"""A store in a local directory: ``file:///path``.

Every write goes to a temp file in the same directory and is renamed into place, so a reader
never sees half an object and a crash leaves at most a stray ``.tmp-*`` file; ``put_if_absent``
links the temp file to the key, which fails if the key exists (atomic on POSIX filesystems).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from envmgr.cache.store import (
    RECORD_BYTES,
    Entry,
    NotARecordError,
    StoreError,
    check_key,
    too_large,
)
from envmgr.fs import NotRegularFileError, open_regular, temp_beside

__all__ = ["LocalStore"]


class LocalStore:
    """The :class:`~envmgr.cache.store.Store` interface over a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(
        self,
        key: str,
        byte_range: tuple[int, int] | None = None,
        *,
        limit: int | None = RECORD_BYTES,
    ) -> bytes | None:
        try:
            with self._reader(key) as handle:
                if byte_range is None:
                    # Read one byte past the limit rather than trust stat's size.
                    data = handle.read() if limit is None else handle.read(limit + 1)
                    if limit is not None and len(data) > limit:
                        raise too_large(self.url, key, limit)
                    return data
                handle.seek(byte_range[0])
                return handle.read(byte_range[1] - byte_range[0] + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(self.url, key, f"cannot read: {exc.strerror}") from None

    def _reader(self, key: str) -> IO[bytes]:
        """The object's file, opened for reading; only a regular file is an object (a key
        that is, or links to, a FIFO would block its reader forever, a device has no end):
        anything else is a :class:`NotARecordError` at once. ``FileNotFoundError`` when
        absent."""
        try:
            return open_regular(self._path(key))
        except NotRegularFileError:
            raise NotARecordError(
                self.url,
                key,
                "not a regular file (a device, a pipe or a directory)",
                hint="something other than envmgr put it there; remove it",
            ) from None

    def _write(
        self,
        key: str,
        data: bytes | Path,
        *,
        exclusive: bool,
        on_bytes: Callable[[int], None] | None = None,
    ) -> bool:
        path = self._path(key)
        try:
            tmp = temp_beside(path)
            try:
                if isinstance(data, Path) and on_bytes is not None:
                    with data.open("rb") as source, tmp.open("wb") as target:
                        while chunk := source.read(1 << 22):
                            target.write(chunk)
                            on_bytes(len(chunk))
                elif isinstance(data, Path):
                    shutil.copyfile(data, tmp)
                else:
                    tmp.write_bytes(data)
                with tmp.open("rb") as handle:
                    os.fsync(handle.fileno())
                if exclusive:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                else:
                    tmp.replace(path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        except OSError as exc:
            raise StoreError(self.url, key, f"cannot write: {exc.strerror}") from None
        return True

    def put(self, key: str, data: bytes) -> None:
        self._write(key, data, exclusive=False)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._write(key, data, exclusive=True)

    def put_file(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        self._write(key, path, exclusive=False, on_bytes=on_bytes)

    def get_file(self, key: str, path: Path) -> bool:
        try:
            with self._reader(key) as source, path.open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(self.url, key, f"cannot read: {exc.strerror}") from None
        return True

    def open(self, key: str, *, streams: int = 0) -> IO[bytes] | None:
        del streams  # a local file has no network to wait on
        try:
            return self._reader(key)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(self.url, key, f"cannot read: {exc.strerror}") from None

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def list(self, prefix: str) -> Iterator[str]:
        for entry in self.entries(prefix):
            yield entry.key

    def entries(self, prefix: str) -> Iterator[Entry]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        found = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if ".tmp-" in name:
                    continue
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        stat = path.stat()
                    except FileNotFoundError:
                        continue  # deleted while we walked
                    found.append(Entry(key, stat.st_size, stat.st_mtime))
        yield from sorted(found)
