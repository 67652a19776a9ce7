"""Pack a prefix into a deterministic archive, finding the files that hold the prefix.

:func:`pack` streams a tar (members sorted, owner root, fixed mtime, no pax timestamps) into
any binary writer, hashing as it goes: no temporary copy of the env. With zstd it writes
format 2 (see :mod:`envmgr.archive.frames`): the tar cut into independently decodable frames,
compressed on all cores, listed with their hashes in the manifest; ``chunk_size=None`` (and
gzip) writes format 1, one stream. While it reads each file, pack also finds the files that
hold the build prefix (text or binary); :func:`scan_relocations` does that alone.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from envmgr.archive.frames import ChunkWriter
from envmgr.archive.manifest import (
    CHUNK_SIZE,
    READ_SIZE,
    ArchiveError,
    Chunk,
    Codec,
    Manifest,
    Relocation,
)

__all__ = ["ARCHIVE_MTIME", "PackResult", "pack", "scan_relocations"]

#: Every member's mtime: a fixed point, so packing the same tree twice gives the same bytes.
ARCHIVE_MTIME = 946684800  # 2000-01-01T00:00:00Z


@dataclass(frozen=True, kw_only=True, slots=True)
class PackResult:
    size: int
    sha256: str
    files: int
    unpacked_size: int
    #: Format 2's frames (empty for format 1).
    chunks: tuple[Chunk, ...] = ()
    #: The files holding the prefix that pack was asked to find (``find_prefix``).
    relocations: tuple[Relocation, ...] = ()
    codec: Codec = "zst"

    def manifest(self, *, env_id: str, platform: str, build_prefix: str, **more: Any) -> Manifest:
        """The manifest of this archive for *env_id*; *more* sets the other fields
        (``envmgr_version``, ``created``, ``link_scripts``, ``package_sizes``)."""
        return Manifest(
            env_id=env_id,
            platform=platform,
            build_prefix=build_prefix,
            codec=self.codec,
            size=self.size,
            sha256=self.sha256,
            files=self.files,
            unpacked_size=self.unpacked_size,
            relocations=self.relocations,
            chunks=self.chunks,
            **more,
        )


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through to *target*."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.digest.update(chunk)
        self.size += len(chunk)
        self.target.write(chunk)
        return len(chunk)


def _walk(prefix: Path) -> Iterator[Path]:
    """Every path under *prefix*, directories before their contents, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(prefix):
        real = [d for d in dirnames if not Path(dirpath, d).is_symlink()]
        links = [d for d in dirnames if Path(dirpath, d).is_symlink()]
        dirnames[:] = sorted(real)
        for name in sorted(filenames + links):
            yield Path(dirpath, name)
        for name in dirnames:
            yield Path(dirpath, name)


def _members(prefix: Path, only: Iterable[str] | None = None) -> list[Path]:
    """What to pack, in archive order: the whole tree, or the files and links *only* names
    (relative POSIX paths) with the directories above them."""
    if only is None:
        return sorted(_walk(prefix), key=lambda p: p.relative_to(prefix).as_posix())
    names = set()
    for rel in only:
        names.add(rel)
        parent = rel.rpartition("/")[0]
        while parent and parent not in names:
            names.add(parent)
            parent = parent.rpartition("/")[0]
    return [prefix / rel for rel in sorted(names)]


def scan_relocations(prefix: Path) -> tuple[Relocation, ...]:
    """Files containing *prefix*: ``text`` if they hold no NUL byte, else ``binary``
    (``.pyc`` files excepted: see :class:`_PrefixFinder`). :func:`pack` finds the same list
    while it reads the files (``find_prefix``); this reads them once more."""
    finder = _PrefixFinder(str(prefix))
    for path in _members(prefix):
        if path.is_symlink() or not path.is_file():
            continue  # pack makes links into the prefix relative
        rel = path.relative_to(prefix).as_posix()
        finder.start(rel)
        with path.open("rb") as handle:
            while piece := handle.read(READ_SIZE):
                finder.feed(piece)
        finder.end()
    return tuple(finder.found)


class _PrefixFinder:
    """Finds the build prefix in a file fed in pieces (it may straddle two): ``binary``
    when the file holds a NUL byte anywhere, else ``text``. ``.pyc`` files are skipped: the
    prefix in one is only co_filename (for tracebacks), stored as a length-prefixed string
    that NUL padding would corrupt; the bytecode stays valid."""

    def __init__(self, prefix: str) -> None:
        self.needle = prefix.encode()
        self.found: list[Relocation] = []
        self.path = ""
        self.skip = False
        self.hit = self.nul = False
        self.tail = b""

    def start(self, rel: str) -> None:
        self.path = rel
        self.skip = rel.endswith(".pyc")
        self.hit = self.nul = False
        self.tail = b""

    def feed(self, piece: bytes) -> None:
        if self.skip:
            return
        if not self.nul and b"\0" in piece:
            self.nul = True
        if not self.hit:
            window = self.tail + piece if self.tail else piece
            self.hit = self.needle in window
            keep = len(self.needle) - 1
            self.tail = window[len(window) - keep :] if keep else b""
        elif self.nul:
            self.skip = True  # the answer cannot change: binary

    def end(self) -> None:
        if self.hit and self.path:
            self.found.append(Relocation(path=self.path, mode="binary" if self.nul else "text"))
        self.path = ""


class _Sink:
    """Where :func:`pack` writes tar bytes: one compressed stream (format 1)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    def member_end(self) -> None:
        """A member is whole: the only places format 2 starts a frame that is no
        continuation."""


def pack(
    prefix: Path,
    out: IO[bytes],
    *,
    codec: Codec = "zst",
    level: int = 3,
    threads: int = 0,
    on_bytes: Callable[[int], None] | None = None,
    chunk_size: int | None = CHUNK_SIZE,
    find_prefix: str | None = None,
    members: Iterable[str] | None = None,
) -> PackResult:
    """Stream a deterministic archive of *prefix* into *out*; returns size and sha256.

    With zstd and a *chunk_size*, the archive is format 2: frames of about *chunk_size* tar
    bytes compressed on *threads* threads (0: all cores), their index in the result;
    otherwise format 1, one stream. *on_bytes* is called with the size of each file packed;
    *find_prefix* lists the files holding that string (see :func:`scan_relocations`);
    *members* packs only those files and links (relative paths) and the directories above
    them. Cost: one read of every file; the same tree gives the same bytes on any machine.
    """
    hashing = _HashingWriter(out)
    writer: ChunkWriter | None = None
    if codec == "zst" and chunk_size is not None:
        writer = ChunkWriter(hashing, level=level, threads=threads, chunk_size=chunk_size)
        sink: Any = writer
        stream: Any = contextlib.nullcontext()
    elif codec == "zst":
        import zstandard  # noqa: PLC0415

        compressor = zstandard.ZstdCompressor(level=level, threads=threads or -1)
        stream = compressor.stream_writer(cast(IO[bytes], hashing), closefd=False)
        sink = _Sink(stream)
    else:
        stream = gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=min(level, 9), mtime=0)
        sink = _Sink(stream)
    finder = _PrefixFinder(find_prefix) if find_prefix else None
    with stream:
        try:
            files, unpacked = _write_tar(prefix, sink, finder, on_bytes, members)
            chunks = writer.close() if writer is not None else ()
        finally:
            if writer is not None:
                writer.abandon()
    return PackResult(
        size=hashing.size,
        sha256=hashing.digest.hexdigest(),
        files=files,
        unpacked_size=unpacked,
        chunks=chunks,
        relocations=tuple(finder.found) if finder is not None else (),
        codec=codec,
    )


def _write_tar(
    prefix: Path,
    sink: Any,
    finder: _PrefixFinder | None,
    on_bytes: Callable[[int], None] | None,
    members: Iterable[str] | None = None,
) -> tuple[int, int]:
    """The tar stream of *prefix* into *sink*, as ``tarfile``'s GNU format writes it (header,
    data, NUL padding to 512 bytes; two zero blocks and padding to 10 KiB at the end).
    Returns (files, bytes of the files)."""
    files = unpacked = 0
    offset = 0
    root = str(prefix)
    for path in _members(prefix, members):
        rel = path.relative_to(prefix).as_posix()
        info = tarfile.TarInfo(rel)
        info.mtime = ARCHIVE_MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            target = str(path.readlink())
            if target.startswith(root):  # keep links inside the env relative
                target = os.path.relpath(target, path.parent)
            info.linkname = target
            info.mode = 0o777
        elif stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            info.mode = stat.S_IMODE(st.st_mode) | 0o700
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            info.mode = stat.S_IMODE(st.st_mode) | 0o600
        else:
            raise ArchiveError(f"{path}: not a file, directory or symlink; cannot pack it")
        header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
        sink.write(header)
        offset += len(header)
        if info.isreg():
            if finder is not None:
                finder.start(rel)
            left = info.size
            with path.open("rb", buffering=0) as handle:
                while left > 0:
                    piece = handle.read(min(left, READ_SIZE))
                    if not piece:
                        raise ArchiveError(f"{path} shrank while it was packed")
                    left -= len(piece)
                    if finder is not None:
                        finder.feed(piece)
                    sink.write(piece)
            if finder is not None:
                finder.end()
            padding = -info.size % tarfile.BLOCKSIZE
            if padding:
                sink.write(tarfile.NUL * padding)
            offset += info.size + padding
            files += 1
            unpacked += info.size
            if on_bytes is not None:
                on_bytes(info.size)
        sink.member_end()
    end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
    end += tarfile.NUL * (-(offset + len(end)) % tarfile.RECORDSIZE)
    sink.write(end)
    return files, unpacked
