"""Pack an environment prefix into a relocatable archive, and unpack it safely elsewhere.

:func:`pack` streams a deterministic tar (members sorted, owner root, fixed mtime, no pax
timestamps) through multi-threaded zstd (or gzip) into any binary writer, hashing as it goes:
no temporary copy of the env. :func:`scan_relocations` lists every file that contains the
build prefix (text or binary) and every symlink pointing into it; the :class:`Manifest` carries
that list with the archive's size and sha256.

:func:`unpack` refuses members that would escape the target (absolute paths, ``..``, links
pointing outside, devices) and more bytes than the manifest declares; :func:`relocate`
rewrites the listed files for the new prefix: text files by replacement, binary files by
replacing inside each NUL-terminated string and padding with NULs (so the new prefix must not be
longer than the build prefix; the build prefix is long on purpose).
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
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, cast

from envmgr.errors import EnvmgrError
from envmgr.ids import BadIdError, parse_env_id, parse_platform

__all__ = [
    "MANIFEST_FORMAT",
    "ArchiveError",
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

MANIFEST_FORMAT = 1
Codec = Literal["zst", "gz"]
RelocationMode = Literal["text", "binary", "symlink"]

#: Every member's mtime: a fixed point, so packing the same tree twice gives the same bytes.
ARCHIVE_MTIME = 946684800  # 2000-01-01T00:00:00Z
_CHUNK = 1 << 20
_SMALL = 4 << 20  # files up to this size are written by the unpack pool
_IN_FLIGHT = 256  # at most this many files (so at most 1 GiB) wait for the pool


class ArchiveError(EnvmgrError):
    """An archive is unsafe, damaged or cannot be relocated to the asked prefix."""


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
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

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "manifest") -> Manifest:
        """Read :meth:`to_dict` output; raises ``ArchiveError`` on anything else."""
        try:
            if data["format"] != MANIFEST_FORMAT:
                raise ValueError(f"format {data['format']!r}, want {MANIFEST_FORMAT}")
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
    (``.pyc`` files excepted: see below)."""
    needle = str(prefix).encode()
    found = []
    for path in _members(prefix):
        rel = path.relative_to(prefix).as_posix()
        if path.is_symlink():
            continue  # pack makes links into the prefix relative
        if path.suffix == ".pyc":
            # The prefix in a .pyc is only co_filename (for tracebacks), stored as a
            # length-prefixed string: NUL padding would corrupt it; the bytecode stays valid.
            continue
        if path.is_file():
            data = path.read_bytes()
            if needle in data:
                found.append(Relocation(path=rel, mode="binary" if b"\0" in data else "text"))
    return tuple(found)


def pack(
    prefix: Path,
    out: IO[bytes],
    *,
    codec: Codec = "zst",
    level: int = 3,
    threads: int = 0,
    on_bytes: Callable[[int], None] | None = None,
) -> PackResult:
    """Stream a deterministic archive of *prefix* into *out*; returns size and sha256.

    *threads* is zstd's worker count (0: all cores); *on_bytes* is called with the size of
    each file packed. Cost: one read of every file.
    """
    hashing = _HashingWriter(out)
    if codec == "zst":
        import zstandard  # noqa: PLC0415

        compressor = zstandard.ZstdCompressor(level=level, threads=threads or -1)
        stream: Any = compressor.stream_writer(cast(IO[bytes], hashing), closefd=False)
    else:
        stream = gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=min(level, 9), mtime=0)
    files = unpacked = 0
    with stream, tarfile.open(fileobj=stream, mode="w|", format=tarfile.GNU_FORMAT) as tar:
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
                if target.startswith(str(prefix)):  # keep links inside the env relative
                    target = os.path.relpath(target, path.parent)
                info.linkname = target
                info.mode = 0o777
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                info.mode = stat.S_IMODE(st.st_mode) | 0o700
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                info.mode = stat.S_IMODE(st.st_mode) | 0o600
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
                files += 1
                unpacked += st.st_size
                if on_bytes is not None:
                    on_bytes(st.st_size)
            else:
                raise ArchiveError(f"{path}: not a file, directory or symlink; cannot pack it")
    return PackResult(
        size=hashing.size, sha256=hashing.digest.hexdigest(), files=files, unpacked_size=unpacked
    )


def _safe_name(name: str) -> str:
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
    file count. Modes are capped at 0755 and the process umask: a shared cache never gets
    group- or world-writable files from an archive.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cap = _MODE_CAP & ~_umask()
    files_left = manifest.files
    # Directories and links are not counted in the manifest: a generous bound on them.
    members_left = 2 * manifest.files + 10_000
    if manifest.codec == "zst":
        stream: Any = _zstd_reader(source)
    else:
        stream = gzip.GzipFile(fileobj=source, mode="rb")
    budget = manifest.unpacked_size
    deferred_dirs: list[tuple[Path, int]] = []
    writes: list[Future[None]] = []
    tree = _Tree(dest)
    unpacked = False
    try:
        with (
            ThreadPoolExecutor(max_workers=8, thread_name_prefix="envmgr-unpack") as pool,
            stream,
            tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 16) as tar,
        ):
            for member in tar:
                members_left -= 1
                if members_left < 0:
                    raise ArchiveError("archive holds far more members than its manifest's files")
                name = _safe_name(member.name)
                target = dest / name
                tree.make_parent(target, name)
                if member.isdir():
                    tree.make_dir(target)
                    deferred_dirs.append((target, (member.mode & cap) | 0o700))
                elif member.issym():
                    link = member.linkname
                    if link.startswith("/") or not _inside(dest, target.parent / link):
                        raise ArchiveError(f"symlink {name!r} -> {link!r} points outside the env")
                    target.symlink_to(link)
                    tree.links.append(str(target))
                    if _loops(target):  # e.g. a -> a/..: a checker that resolves loosely escapes
                        raise ArchiveError(f"symlink {name!r} -> {link!r} makes a link loop")
                elif member.isfile():
                    budget -= member.size
                    files_left -= 1
                    if budget < 0:
                        raise ArchiveError("archive holds more data than its manifest declares")
                    if files_left < 0:
                        raise ArchiveError(
                            f"archive holds more files than its manifest declares "
                            f"({manifest.files})"
                        )
                    mode = (member.mode & cap) | 0o600
                    handle = tar.extractfile(member)
                    if handle is None:
                        raise ArchiveError(f"cannot read member {name!r}")
                    if member.size <= _SMALL:
                        # File creation is slow on many filesystems and releases the GIL:
                        # small files are written by a pool while the stream goes on.
                        writes.append(pool.submit(_write_file, target, handle.read(), mode))
                        if len(writes) >= _IN_FLIGHT:  # bound the memory held by the pool
                            for write in writes:
                                write.result()
                            writes.clear()
                    else:
                        _write_file(target, handle, mode)
                else:
                    raise ArchiveError(f"member {name!r} is a link, device or FIFO; refused")
        for write in writes:
            write.result()
        tree.check_links()
        unpacked = True
    except _stream_errors() as exc:
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise WriteError(f"cannot write under {dest}: {exc.strerror}", code=exc.errno) from None
        if isinstance(exc, FileExistsError):
            raise ArchiveError(f"archive repeats a member ({exc.filename})") from None
        raise ArchiveError(f"damaged archive: {exc}") from None
    finally:
        if not unpacked:  # a refused or broken archive leaves no link for a loose reader
            tree.drop_links()
    for directory, mode in reversed(deferred_dirs):
        directory.chmod(mode)


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

    def make_dir(self, directory: Path) -> None:
        key = str(directory)
        if key in self.dirs:
            return
        if self._through_link(key) and not _inside(self.dest, directory):
            raise ArchiveError(f"directory {key!r} would be made outside the env")
        directory.mkdir(parents=True, exist_ok=True)
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

    def make_parent(self, target: Path, name: str) -> None:
        parent = target.parent
        if str(parent) in self.dirs:
            return
        if self._through_link(str(parent)) and not _inside(self.dest, parent):
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
        self.process.stdout.read()  # type: ignore[union-attr]
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
