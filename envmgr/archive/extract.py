"""Writing an archive's members safely: names, links and modes checked, files created once.

An :class:`Extractor` admits each member against the manifest's totals (files, bytes, a bound
on directories and links), refuses names that leave the target (absolute, ``..``, through a
link made earlier) and links that point outside, caps modes at 0755 and the umask, and writes
files with one ``open``. :mod:`.unpack` and :mod:`.frames` feed it tar members.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from envmgr.archive.manifest import READ_SIZE, ArchiveError, Manifest, safe_name

__all__ = ["SMALL_FILE", "Extractor", "Mirror", "inside", "write_file"]

#: Files up to this size are read whole and written by a pool of threads.
SMALL_FILE = 4 << 20
#: The most an unpacked member may be: no group or world write, whatever the archive says.
_MODE_CAP = 0o755


def inside(dest: Path, path: Path) -> bool:
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


class Mirror(Protocol):
    """Places each member an extractor wrote into a second tree as well (a host's layer is
    unpacked into its cache and into the env being assembled from it in one pass)."""

    def file(self, name: str, source: str, data: bytes | memoryview | None) -> None:
        """*name* was written at *source*; *data* is its content when it was read whole."""

    def symlink(self, name: str, link: str) -> None:
        """*name* is a checked symlink to *link*."""


class Extractor:
    """Writes the members of one tar stream, or (format 2) of several at once from threads,
    into *dest*, checking each against the manifest's totals and the target's bounds.

    With *defer_links*, symlinks are recorded and made by :meth:`make_links` after every file
    is written: no file is ever written through a link, so streams extracted in parallel need
    not see each other's links (a member under a link's name then fails as a repeat). A
    *mirror* is told of every file as it is written (by the format-2 job extractor only) and
    of the links once :meth:`mirror_links` is called after they were all checked.
    """

    def __init__(
        self,
        dest: Path,
        manifest: Manifest,
        *,
        defer_links: bool,
        read_only: bool = False,
        mirror: Mirror | None = None,
    ) -> None:
        self.dest = dest
        self.root = str(dest)
        self.tree = _Tree(dest)
        self.cap = _MODE_CAP & ~_umask()
        # Files are created with their final mode: a read-only one still takes the writes of
        # the descriptor that creates it, and no chmod pass over 35,000 files follows.
        self.owner_bits, self.cap_files = (
            (0o400, self.cap & ~0o222) if read_only else (0o600, self.cap)
        )
        self.defer_links = defer_links
        self.lock = threading.Lock()
        self.files_left = manifest.files
        # Directories and links are not counted in the manifest: a generous bound on them.
        self.members_left = 2 * manifest.files + 10_000
        self.budget = manifest.unpacked_size
        self.declared_files = manifest.files
        self.dirs: list[tuple[str, int]] = []
        self.links: list[tuple[tuple[int, int], str, str]] = []
        self.mirror = mirror
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
                mode = self.file_mode(member.mode)
                handle = tar.extractfile(member)
                if handle is None:
                    raise ArchiveError(f"cannot read member {name!r}")
                if member.size <= SMALL_FILE:
                    data = handle.read()
                    if write_later is not None:
                        write_later(target, data, mode)
                    else:
                        write_file(target, data, mode)
                else:
                    write_file(target, handle, mode)
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
        name = safe_name(raw_name)
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
        return (mode & self.cap_files) | self.owner_bits

    def make_link(self, name: str, link: str) -> None:
        target = self.dest / name
        if link.startswith("/") or not inside(self.dest, target.parent / link):
            raise ArchiveError(f"symlink {name!r} -> {link!r} points outside the env")
        target.symlink_to(link)
        self.tree.links.append(str(target))
        if _loops(target):  # e.g. a -> a/..: a checker that resolves loosely escapes
            raise ArchiveError(f"symlink {name!r} -> {link!r} makes a link loop")

    def make_links(self) -> None:
        """The deferred links, in archive order, each checked as :meth:`make_link` does."""
        for _order, name, link in sorted(self.links):
            self.make_link(name, link)

    def mirror_links(self) -> None:
        """The deferred links, checked, to the mirror (in archive order)."""
        if self.mirror is not None:
            for _order, name, link in sorted(self.links):
                self.mirror.symlink(name, link)

    def set_dir_modes(self) -> None:
        """Last: a directory's own mode may forbid writing into it. Deepest first."""
        for directory, mode in sorted(self.dirs, reverse=True):
            os.chmod(directory, mode)  # noqa: PTH101 - str paths, thousands of them


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
        if self._through_link(directory) and not inside(self.dest, Path(directory)):
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
        if self._through_link(parent) and not inside(self.dest, Path(parent)):
            raise ArchiveError(f"member {name!r} would be written outside the env")
        self.make_dir(parent)


def write_file(target: Path | str, data: bytes | memoryview | IO[bytes], mode: int) -> None:
    """Create *target* with its final *mode* and write *data*: one open, the writes, one
    close (no buffered file object, whose isatty/lseek probes and a chmod after would cost
    three more system calls per file; *mode* is already within the umask and owner-rw)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        if isinstance(data, bytes | memoryview):
            _write_all(fd, data)
        else:
            while chunk := data.read(READ_SIZE):
                _write_all(fd, chunk)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
