"""Pack an environment prefix into a relocatable archive, and unpack it safely elsewhere.

:func:`pack` streams a deterministic tar (members sorted, owner root, fixed mtime, no pax
timestamps) into any binary writer, hashing as it goes: no temporary copy of the env. With
zstd it writes format 2 (see :mod:`envmgr.chunked`): the tar cut into independently decodable
frames, compressed on all cores, listed with their hashes in the manifest, so a worker decodes
and writes them on all cores while the download goes on; ``chunk_size=None`` (and gzip) writes
format 1, one stream. While it reads each file, pack also finds the files that hold the build
prefix (text or binary), which the :class:`Manifest` lists with the archive's size and sha256;
:func:`scan_relocations` does that alone.

:func:`unpack` refuses members that would escape the target (absolute paths, ``..``, links
pointing outside, devices) and more bytes than the manifest declares, in either format;
:func:`relocate` rewrites the listed files for the new prefix: text files by replacement,
binary files by replacing inside each NUL-terminated string and padding with NULs (so the new
prefix must not be longer than the build prefix; the build prefix is long on purpose).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, cast

from envmgr.errors import EnvmgrError
from envmgr.ids import BadIdError, parse_env_id, parse_platform

__all__ = [
    "CHUNK_SIZE",
    "MANIFEST_FORMAT",
    "MANIFEST_FORMATS",
    "ArchiveError",
    "Chunk",
    "ChunkDigestError",
    "Codec",
    "Manifest",
    "PackResult",
    "Relocation",
    "WriteError",
    "pack",
    "relocate",
    "scan_relocations",
    "unpack",
]

MANIFEST_FORMAT = 2
#: The manifest formats this reader accepts: 1 (one stream), 2 (indexed frames).
MANIFEST_FORMATS = (1, 2)
Codec = Literal["zst", "gz"]
RelocationMode = Literal["text", "binary", "symlink"]

#: Every member's mtime: a fixed point, so packing the same tree twice gives the same bytes.
ARCHIVE_MTIME = 946684800  # 2000-01-01T00:00:00Z
#: Uncompressed bytes per frame of a format-2 archive (a frame may run to twice this).
CHUNK_SIZE = 8 << 20
#: The most one frame may decode to: bounds what a hostile index can make a reader allocate.
MAX_CHUNK_RAW = 64 << 20
_CHUNK = 1 << 20
_SMALL = 4 << 20  # files up to this size are written by the unpack pool
_IN_FLIGHT = 256  # at most this many files (so at most 1 GiB) wait for the pool


class ArchiveError(EnvmgrError):
    """An archive is unsafe, damaged or cannot be relocated to the asked prefix."""


class ChunkDigestError(ArchiveError):
    """A downloaded frame of a format-2 archive does not match its hash in the manifest."""


class WriteError(EnvmgrError):
    """The target filesystem refused a write (full, over quota, file too large, read-only);
    the archive itself may be fine."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


#: Errors that say "this disk", not "this archive".
_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EMFILE}
)


@dataclass(frozen=True, kw_only=True, slots=True, order=True)
class Relocation:
    path: str  # relative to the prefix, POSIX separators
    mode: RelocationMode


@dataclass(frozen=True, kw_only=True, slots=True)
class Chunk:
    """One independently decodable zstd frame of a format-2 archive."""

    offset: int  # where its compressed bytes start in the archive
    size: int  # compressed bytes
    raw: int  # the tar bytes it decodes to
    sha256: str  # of the compressed bytes
    #: It goes on with the last member of the chunk before (a file larger than a chunk).
    cont: bool

    def to_list(self) -> list[Any]:
        return [self.offset, self.size, self.raw, self.sha256, self.cont]


def _chunks_from(data: Any, size: int, codec: str) -> tuple[Chunk, ...]:
    """The chunk index of a format-2 manifest, checked: the chunks tile the archive from
    byte 0 to *size* in order (no gap, overlap or byte past the end), each decodes to at most
    :data:`MAX_CHUNK_RAW`, the first starts a member. Raises ``ValueError`` naming the entry."""
    if codec != "zst":
        raise ValueError(f"format 2 needs codec zst, not {codec!r}")
    if not isinstance(data, list) or not data:
        raise ValueError("format 2 needs a non-empty chunk list")
    chunks = []
    end = 0
    for number, entry in enumerate(data):
        offset, length, raw, sha256, cont = entry
        if type(offset) is not int or type(length) is not int or type(raw) is not int:
            raise ValueError(f"chunk {number}: offsets and sizes must be integers")
        if offset != end:
            what = "overlaps the one before" if offset < end else "leaves a gap before it"
            raise ValueError(f"chunk {number} starts at byte {offset} and {what} (want {end})")
        if length <= 0 or not 0 < raw <= MAX_CHUNK_RAW:
            raise ValueError(f"chunk {number}: size {length} or raw size {raw} out of range")
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"chunk {number}: bad sha256")
        if not isinstance(cont, bool) or (cont and number == 0):
            raise ValueError(f"chunk {number}: bad continuation flag")
        end = offset + length
        if end > size:
            raise ValueError(f"chunk {number} ends at byte {end}, past the archive's {size}")
        chunks.append(Chunk(offset=offset, size=length, raw=raw, sha256=sha256, cont=cont))
    if end != size:
        raise ValueError(f"the chunks cover {end} of the archive's {size} bytes")
    return tuple(chunks)


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """What readers of a stored env trust; written to the store after the archive."""

    env_id: str
    platform: str
    build_prefix: str
    codec: Codec
    size: int
    sha256: str
    files: int
    unpacked_size: int
    relocations: tuple[Relocation, ...]
    envmgr_version: str = ""
    created: str = ""
    #: Packages whose conda link scripts the builder did not run (it runs no target code).
    link_scripts: tuple[str, ...] = ()
    #: Format 2: the frames, in order, that tile the archive; empty for format 1.
    chunks: tuple[Chunk, ...] = ()
    #: Each package's installed bytes (name, bytes), for ``envmgr show``; may be empty.
    package_sizes: tuple[tuple[str, int], ...] = ()

    @property
    def format(self) -> int:
        return 2 if self.chunks else 1

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": self.format,
            "env_id": self.env_id,
            "platform": self.platform,
            "build_prefix": self.build_prefix,
            "codec": self.codec,
            "size": self.size,
            "sha256": self.sha256,
            "files": self.files,
            "unpacked_size": self.unpacked_size,
            "relocations": [[r.path, r.mode] for r in self.relocations],
            "envmgr_version": self.envmgr_version,
            "created": self.created,
            "link_scripts": list(self.link_scripts),
        }
        if self.package_sizes:
            out["package_sizes"] = dict(self.package_sizes)
        if self.chunks:
            out["chunks"] = [chunk.to_list() for chunk in self.chunks]
        return out

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "manifest") -> Manifest:
        """Read :meth:`to_dict` output; raises ``ArchiveError`` on anything else."""
        try:
            if data["format"] not in MANIFEST_FORMATS:
                raise ValueError(
                    f"format {data['format']!r}; this envmgr reads formats 1 and 2 "
                    "(a newer envmgr wrote it?)"
                )
            codec = data["codec"]
            if codec not in ("zst", "gz"):
                raise ValueError(f"unknown codec {codec!r}")
            relocations = []
            for path, mode in data["relocations"]:
                if mode not in ("text", "binary", "symlink"):
                    raise ValueError(f"unknown relocation mode {mode!r}")
                relocations.append(Relocation(path=_safe_name(str(path)), mode=mode))
            manifest = cls(
                env_id=parse_env_id(data["env_id"], where="env_id"),
                platform=parse_platform(data["platform"], where="platform"),
                build_prefix=str(data["build_prefix"]),
                codec=codec,
                size=int(data["size"]),
                sha256=str(data["sha256"]),
                files=int(data["files"]),
                unpacked_size=int(data["unpacked_size"]),
                relocations=tuple(relocations),
                envmgr_version=str(data.get("envmgr_version", "")),
                created=str(data.get("created", "")),
                link_scripts=tuple(str(name) for name in data.get("link_scripts", ())),
                package_sizes=tuple(
                    (str(name), int(size)) for name, size in data.get("package_sizes", {}).items()
                ),
                chunks=_chunks_from(data["chunks"], int(data["size"]), codec)
                if data["format"] == 2
                else (),
            )
        except (KeyError, TypeError, ValueError, ArchiveError, BadIdError) as exc:
            raise ArchiveError(f"{where}: not an envmgr manifest ({exc})") from None
        if not re.fullmatch(r"[0-9a-f]{64}", manifest.sha256) or manifest.size < 0:
            raise ArchiveError(f"{where}: bad sha256 or size")
        if not manifest.build_prefix.startswith("/"):
            raise ArchiveError(f"{where}: build prefix must be absolute")
        return manifest


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


def _members(prefix: Path) -> list[Path]:
    return sorted(_walk(prefix), key=lambda p: p.relative_to(prefix).as_posix())


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
            while piece := handle.read(_CHUNK):
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
) -> PackResult:
    """Stream a deterministic archive of *prefix* into *out*; returns size and sha256.

    With zstd and a *chunk_size*, the archive is format 2: frames of about *chunk_size* tar
    bytes compressed on *threads* threads (0: all cores), their index in the result;
    otherwise format 1, one stream. *on_bytes* is called with the size of each file packed;
    *find_prefix* lists the files holding that string (see :func:`scan_relocations`).
    Cost: one read of every file; the same tree gives the same bytes on any machine.
    """
    from envmgr.chunked import ChunkWriter  # noqa: PLC0415

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
            files, unpacked = _write_tar(prefix, sink, finder, on_bytes)
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
) -> tuple[int, int]:
    """The tar stream of *prefix* into *sink*, as ``tarfile``'s GNU format writes it (header,
    data, NUL padding to 512 bytes; two zero blocks and padding to 10 KiB at the end).
    Returns (files, bytes of the files)."""
    files = unpacked = 0
    offset = 0
    root = str(prefix)
    for path in _members(prefix):
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
                    piece = handle.read(min(left, _CHUNK))
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


#: What a plain relative name cannot hold (anything else takes the careful path).
_UNPLAIN = re.compile(r"^/|^\./|/\./|//|\.\.|\\|/\.?$|^\.?$")


def _safe_name(name: str) -> str:
    if not _UNPLAIN.search(name):
        return name  # nothing to normalise: the common case, without a PurePosixPath
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise ArchiveError(f"unsafe member name {name!r}")
    return pure.as_posix()


def _inside(dest: Path, path: Path) -> bool:
    """True when *path*, its links followed, stays under *dest*; a link loop counts as
    outside (it cannot be shown to stay inside)."""
    try:
        path.resolve().relative_to(dest.resolve())
    except (ValueError, RuntimeError, OSError):  # RuntimeError: a symlink loop (3.10-3.12)
        return False
    return True


def _loops(link: Path) -> bool:
    """True when following *link* comes back to a link already followed. A link that
    dangles (its target is extracted later) does not loop."""
    try:
        link.resolve(strict=True)
    except RuntimeError:  # pathlib's "Symlink loop" (3.10-3.12)
        return True
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def unpack(source: IO[bytes], dest: Path, manifest: Manifest) -> None:
    """Extract the archive stream *source* into the empty or new directory *dest*.

    Raises ``ArchiveError`` for unsafe members (absolute or ``..`` names, links pointing out
    of *dest*, devices, FIFOs), and when the members exceed the manifest's declared size or
    file count; for format 2 also ``ChunkDigestError`` when a frame does not match its hash
    (each frame is checked before it is decoded; format 1's hash is the caller's to check).
    Modes are capped at 0755 and the process umask: a shared cache never gets group- or
    world-writable files from an archive.
    """
    dest.mkdir(parents=True, exist_ok=True)
    parallel = bool(manifest.chunks) and _has_zstandard()
    extractor = _Extractor(dest, manifest, defer_links=parallel)
    try:
        if parallel:
            from envmgr.chunked import unpack_chunks  # noqa: PLC0415

            unpack_chunks(source, extractor, manifest)
            extractor.make_links()
        elif manifest.chunks:  # no zstandard here: the zstd program, one stream, frames checked
            from envmgr.chunked import CheckedFrames  # noqa: PLC0415

            checked = CheckedFrames(source, manifest)
            failures: tuple[type[BaseException], ...] = (*_stream_errors(), ArchiveError)
            try:  # the zstd feeder reads every frame (and checks for more) before it ends
                _unpack_stream(checked, extractor, manifest, program=True)  # type: ignore[arg-type]
            except failures:
                if checked.error is not None:  # the cause, not the broken stream it made
                    raise checked.error from None
                raise
        else:
            _unpack_stream(source, extractor, manifest)
        extractor.tree.check_links()
        extractor.unpacked = True
    except _stream_errors() as exc:
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise WriteError(f"cannot write under {dest}: {exc.strerror}", code=exc.errno) from None
        if isinstance(exc, FileExistsError):
            raise ArchiveError(f"archive repeats a member ({exc.filename})") from None
        raise ArchiveError(f"damaged archive: {exc}") from None
    finally:
        if not extractor.unpacked:  # a refused or broken archive leaves no link for a loose reader
            extractor.tree.drop_links()
    extractor.set_dir_modes()


def _unpack_stream(
    source: IO[bytes], extractor: _Extractor, manifest: Manifest, *, program: bool = False
) -> None:
    """One stream, decoded here (with the ``zstd`` program when *program*); small files are
    written by a pool of threads while the stream goes on (file creation is slow on many
    filesystems and releases the GIL)."""
    if manifest.codec == "zst":
        stream: Any = _ZstdProcess(source) if program else _zstd_reader(source)
    else:
        stream = gzip.GzipFile(fileobj=source, mode="rb")
    with (
        ThreadPoolExecutor(max_workers=8, thread_name_prefix="envmgr-unpack") as pool,
        stream,
        tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 16) as tar,
    ):
        writes: list[Future[None]] = []

        def write_later(target: str, data: bytes, mode: int) -> None:
            writes.append(pool.submit(_write_file, target, data, mode))
            if len(writes) >= _IN_FLIGHT:  # bound the memory held by the pool
                for write in writes:
                    write.result()
                writes.clear()

        extractor.extract(tar, write_later)
        for write in writes:
            write.result()


class _Extractor:
    """Writes the members of one tar stream, or (format 2) of several at once from threads,
    into *dest*, checking each against the manifest's totals and the target's bounds.

    With *defer_links*, symlinks are recorded and made by :meth:`make_links` after every file
    is written: no file is ever written through a link, so streams extracted in parallel need
    not see each other's links (a member under a link's name then fails as a repeat).
    """

    def __init__(self, dest: Path, manifest: Manifest, *, defer_links: bool) -> None:
        self.dest = dest
        self.root = str(dest)
        self.tree = _Tree(dest)
        self.cap = _MODE_CAP & ~_umask()
        self.defer_links = defer_links
        self.lock = threading.Lock()
        self.files_left = manifest.files
        # Directories and links are not counted in the manifest: a generous bound on them.
        self.members_left = 2 * manifest.files + 10_000
        self.budget = manifest.unpacked_size
        self.declared_files = manifest.files
        self.dirs: list[tuple[str, int]] = []
        self.links: list[tuple[tuple[int, int], str, str]] = []
        self.unpacked = False

    def extract(
        self,
        tar: tarfile.TarFile,
        write_later: Callable[[str, bytes, int], None] | None = None,
        order: int = 0,
    ) -> None:
        """Every member of *tar*; small files through *write_later* when given. *order*
        sorts this stream's deferred links among the others'."""
        for number, member in enumerate(tar):
            is_file = member.isfile()
            name, target = self.admit(member.name, is_file=is_file, size=member.size)
            if member.isdir():
                self.add_dir(target, member.mode)
            elif member.issym():
                self.add_link((order, number), name, member.linkname)
            elif is_file:
                mode = (member.mode & self.cap) | 0o600
                handle = tar.extractfile(member)
                if handle is None:
                    raise ArchiveError(f"cannot read member {name!r}")
                if member.size <= _SMALL:
                    data = handle.read()
                    if write_later is not None:
                        write_later(target, data, mode)
                    else:
                        _write_file(target, data, mode)
                else:
                    _write_file(target, handle, mode)
            else:
                raise ArchiveError(f"member {name!r} is a link, device or FIFO; refused")

    def admit(self, raw_name: str, *, is_file: bool, size: int) -> tuple[str, str]:
        """Count one member against the manifest, check its name, make its parent; returns
        (name, target path)."""
        with self.lock:
            self.members_left -= 1
            if self.members_left < 0:
                raise ArchiveError("archive holds far more members than its manifest's files")
            if is_file:
                self.budget -= size
                self.files_left -= 1
                if self.budget < 0:
                    raise ArchiveError("archive holds more data than its manifest declares")
                if self.files_left < 0:
                    raise ArchiveError(
                        f"archive holds more files than its manifest declares "
                        f"({self.declared_files})"
                    )
        name = _safe_name(raw_name)
        target = self.root + "/" + name
        self.tree.make_parent(target, name)
        return name, target

    def add_dir(self, target: str, mode: int) -> None:
        self.tree.make_dir(target)
        self.dirs.append((target, (mode & self.cap) | 0o700))

    def add_link(self, order: tuple[int, int], name: str, link: str) -> None:
        if self.defer_links:
            self.links.append((order, name, link))
        else:
            self.make_link(name, link)

    def file_mode(self, mode: int) -> int:
        return (mode & self.cap) | 0o600

    def make_link(self, name: str, link: str) -> None:
        target = self.dest / name
        if link.startswith("/") or not _inside(self.dest, target.parent / link):
            raise ArchiveError(f"symlink {name!r} -> {link!r} points outside the env")
        target.symlink_to(link)
        self.tree.links.append(str(target))
        if _loops(target):  # e.g. a -> a/..: a checker that resolves loosely escapes
            raise ArchiveError(f"symlink {name!r} -> {link!r} makes a link loop")

    def make_links(self) -> None:
        """The deferred links, in archive order, each checked as :meth:`make_link` does."""
        for _order, name, link in sorted(self.links):
            self.make_link(name, link)

    def set_dir_modes(self) -> None:
        """Last: a directory's own mode may forbid writing into it. Deepest first."""
        for directory, mode in sorted(self.dirs, reverse=True):
            os.chmod(directory, mode)  # noqa: PTH101 - str paths, thousands of them


#: The most an unpacked member may be: no group or world write, whatever the archive says.
_MODE_CAP = 0o755


def _umask() -> int:
    """The process umask (read without a window where it is changed, where /proc has it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Tree:
    """Directories made while unpacking, so each is made (and checked) once.

    Member names are already free of ``..`` and absolute paths, so only a path through a
    symlink made by an earlier member can lead outside: only those are resolved.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.dirs = {str(dest)}
        self.links: list[str] = []

    def _through_link(self, path: str) -> bool:
        return any(path == link or path.startswith(link + "/") for link in self.links)

    def make_dir(self, directory: str) -> None:
        if directory in self.dirs:
            return
        if self._through_link(directory) and not _inside(self.dest, Path(directory)):
            raise ArchiveError(f"directory {directory!r} would be made outside the env")
        os.makedirs(directory, exist_ok=True)  # noqa: PTH103 - str paths, a hot loop
        key = directory
        while key not in self.dirs and key != "/":
            self.dirs.add(key)
            key = os.path.dirname(key)  # noqa: PTH120 - a str op, for thousands of members

    def check_links(self) -> None:
        """After the last member, every link stays inside however loosely it is read.

        Each link was checked when it was made, against what existed then; a link that
        names itself (``b -> a/../b/..``) or a later member can change that. A loose reader
        (``os.path.realpath``) goes on past loops and missing parts, and ends at different
        places for the link and for its target: both must be inside."""
        root = os.path.realpath(self.dest)
        for link in self.links:
            points_to = str(Path(link).readlink())
            beside = os.path.join(os.path.dirname(link), points_to)  # noqa: PTH118,PTH120
            for resolved in (os.path.realpath(link), os.path.realpath(beside)):
                if resolved != root and not resolved.startswith(root + "/"):
                    name = os.path.relpath(link, self.dest)
                    raise ArchiveError(f"symlink {name!r} -> {points_to!r} points outside the env")

    def drop_links(self) -> None:
        """Best effort: the caller is already failing with the error that matters."""
        for link in self.links:
            with contextlib.suppress(OSError):
                Path(link).unlink()

    def make_parent(self, target: str, name: str) -> None:
        parent = os.path.dirname(target)  # noqa: PTH120 - a str op, for thousands of members
        if parent in self.dirs:
            return
        if self._through_link(parent) and not _inside(self.dest, Path(parent)):
            raise ArchiveError(f"member {name!r} would be written outside the env")
        self.make_dir(parent)


def _write_file(target: Path | str, data: bytes | IO[bytes], mode: int) -> None:
    """Create *target* with its final *mode* and write *data*: one open, the writes, one
    close (no buffered file object, whose isatty/lseek probes and a chmod after would cost
    three more system calls per file; *mode* is already within the umask and owner-rw)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        if isinstance(data, bytes):
            _write_all(fd, data)
        else:
            while chunk := data.read(_CHUNK):
                _write_all(fd, chunk)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _has_zstandard() -> bool:
    try:
        import zstandard  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a damaged stream raises while it is decompressed and read as a tar."""
    errors: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, zlib.error)
    try:
        import zstandard  # noqa: PLC0415
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


def _zstd_reader(source: IO[bytes]) -> Any:
    """A decompressing reader: the zstandard module, else the ``zstd`` program (workers
    may bootstrap with the standard library and boto3 only)."""
    try:
        import zstandard  # noqa: PLC0415
    except ImportError:
        return _ZstdProcess(source)
    return zstandard.ZstdDecompressor().stream_reader(source, closefd=False)


class _ZstdProcess:
    """``zstd -dc`` fed from *source* by a thread; reads its stdout."""

    def __init__(self, source: IO[bytes]) -> None:
        import shutil as _shutil  # noqa: PLC0415
        import subprocess  # noqa: PLC0415
        import threading  # noqa: PLC0415

        program = _shutil.which("zstd")
        if program is None:
            raise ArchiveError(
                "cannot decompress a .tar.zst: neither the zstandard module nor "
                "the zstd program is installed",
                hint="pip install zstandard",
            )
        self.process = subprocess.Popen(
            [program, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        stdin = self.process.stdin
        self.error: BaseException | None = None

        def feed() -> None:
            try:
                while chunk := source.read(_CHUNK):
                    stdin.write(chunk)  # type: ignore[union-attr]
            except BaseException as exc:  # reported when the reader finishes
                self.error = exc
            finally:
                stdin.close()  # type: ignore[union-attr]

        self.thread = threading.Thread(target=feed, daemon=True)
        self.thread.start()

    def read(self, size: int = -1) -> bytes:
        return self.process.stdout.read(size)  # type: ignore[union-attr]

    def __enter__(self) -> _ZstdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.process.stdout.read()  # type: ignore[union-attr]
        finally:
            self.process.stdout.close()  # type: ignore[union-attr]
            self.thread.join()
            code = self.process.wait()
        if self.error is not None:
            raise self.error
        if code != 0:
            raise ArchiveError(f"zstd failed with exit code {code} (damaged archive?)")


def _replace_binary(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace *old* by *new* inside NUL-terminated strings, padding each with NULs."""
    pattern = re.compile(re.escape(old) + rb"([^\0]*?)\0")

    def swap(match: re.Match[bytes]) -> bytes:
        whole = match.group(0)
        inner = whole[:-1].replace(old, new)
        return inner + b"\0" * (len(whole) - len(inner))

    return pattern.sub(swap, data)


def relocate(dest: Path, manifest: Manifest, new_prefix: str | None = None) -> None:
    """Rewrite the manifest's relocation list for the env now at *dest* (or *new_prefix*,
    where it will be published). Raises ``ArchiveError`` if binary files cannot hold it."""
    new = (new_prefix or str(dest)).encode()
    old = manifest.build_prefix.encode()
    binary = [r for r in manifest.relocations if r.mode == "binary"]
    if binary and len(new) > len(old):
        raise ArchiveError(
            f"cannot relocate env {manifest.env_id} to {new.decode()}: {len(binary)} binary "
            f"files hold the {len(old)}-character build prefix and the new prefix is longer",
            hint="use a shorter ENVMGR_CACHE_DIR",
        )
    for item in manifest.relocations:
        path = dest / item.path
        if not _inside(dest, path.parent):
            raise ArchiveError(f"relocation entry {item.path!r} points outside the env")
        if item.mode == "symlink":
            if path.is_symlink():
                target = str(path.readlink()).replace(old.decode(), new.decode())
                path.unlink()
                path.symlink_to(target)
            continue
        if path.is_symlink() or not path.is_file():
            raise ArchiveError(f"relocation entry {item.path!r} is not a file in the env")
        data = path.read_bytes()
        changed = data.replace(old, new) if item.mode == "text" else _replace_binary(data, old, new)
        if changed != data:
            mode = stat.S_IMODE(path.stat().st_mode)
            path.chmod(mode | 0o200)
            path.write_bytes(changed)
            path.chmod(mode)
