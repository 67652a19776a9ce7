"""Env assembly: an env made from its layers in the host's cache, mostly of hard links.

:class:`Assembly` makes an env from its layers: every file is a hard link to the layer's copy
(read-only: a task cannot change another env's files through its own), except the files that
hold the prefix, which are copied and relocated, and everything when links are impossible
(another file system) or not wanted (``link=False``). A layer this hydrate fetches tells of
each file as it is unpacked (its :class:`EnvMirror`), and its files are linked once it is
published (by a helper process when there are many, :class:`LinkHelper`); one the host had
is walked. The env layer, unpacked apart, goes last and wins; the manifest's ``removes`` are
taken away.

Standard library only (with the archive package): workers import it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import sys
import threading
from pathlib import Path
from typing import IO, Protocol

from envmgr.archive.extract import write_file
from envmgr.archive.manifest import ArchiveError, Manifest, Relocation
from envmgr.worker.layers import layer_entries

__all__ = [
    "HELPER_BATCH",
    "HELPER_FILES",
    "Assembly",
    "Child",
    "EnvMirror",
    "LinkHelper",
    "Linker",
    "end_child",
]

#: Errors of ``link(2)`` that mean "copy instead": another file system, too many links, a
#: file system without hard links.
_NO_LINK = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})

#: Once a hydrate has fetched this many files to link, their links are made by a helper
#: process (:class:`LinkHelper`).
HELPER_FILES = 2048
#: Links per message to the helper.
HELPER_BATCH = 1024
#: The pipe to the helper holds this much (Linux's default most for a process that is not
#: root, ``/proc/sys/fs/pipe-max-size``).
_PIPE_BYTES = 1 << 20

#: The helper: reads batches (a 4-byte length, then NUL-separated: a layer's directory, the
#: env's, and names in them), links each name (one already in the env is replaced: a later
#: layer wins), and at the end (a zero length) writes how many it made and, if one failed,
#: that one's errno; after a failure it makes no more. It stops when the process that
#: started it is gone.
_HELPER = r"""
import os, sys
parent, read, made, failed = int(sys.argv[1]), sys.stdin.buffer.read, 0, None
while True:
    head = read(4)
    size = int.from_bytes(head, "little") if len(head) == 4 else 0
    if not size or os.getppid() != parent:
        break
    source, dest, *names = read(size).split(b"\0")
    for name in names:
        if failed is not None:
            break
        target = dest + b"/" + name
        try:
            try:
                os.link(source + b"/" + name, target)
            except FileExistsError:
                os.unlink(target)
                os.link(source + b"/" + name, target)
            made += 1
        except OSError as exc:
            failed = (made, exc.errno or 0)
try:
    sys.stdout.write(f"{made} {failed[0]} {failed[1]}" if failed else f"{made}")
    sys.stdout.flush()
except OSError:
    pass
"""


class LinkHelper:
    """A child process that makes an env's links to the host's layers, while this process
    unpacks the layers it fetches or walks the ones the host held (ds + tabulate on a host
    holding ds, 8 rounds: 0.44 s against 0.48 s with ds's 15,400 links made here, 0.54 s
    against 0.61 s on a journaled ext4).

    Each ``link(2)`` made here gives up the GIL and takes it back, a handover whenever a
    thread unpacking another layer waits for it: torch's 35,000 links cost 107,000 futex
    calls against one archive's 47,000. The helper makes them off this process's GIL while
    the other layers unpack (torch from loopback on 2 cores, 6 rounds: 2.84 s against
    3.00 s, one archive 2.75 s). It only links; what it could not link (another file system,
    a full disk) is placed here, by :class:`Linker`, with its errors."""

    def __init__(self) -> None:
        import subprocess  # noqa: PLC0415 - only a large hydrate needs it, not a worker's start

        self.sent: list[tuple[str, str, list[str]]] = []
        self.broken = False
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _HELPER, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        # Room for every name of a large env: with the default 64 KiB, a batch waited for
        # the helper's links before this process could walk the next layer (ds + tabulate
        # on a host holding ds: 0.054 s of its 0.44 s in the writes).
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)  # type: ignore[union-attr]

    @classmethod
    def start(cls) -> LinkHelper | None:
        """A helper, or ``None`` when none can start: no interpreter to run it (this process
        may be embedded in a program that is no python, whose ``sys.executable`` is that
        program)."""
        if not Path(sys.executable or "-").name.startswith(("python", "pypy")):
            return None
        try:
            return cls()
        except (OSError, ValueError):
            return None

    def send(self, source: str, dest: str, names: list[str]) -> None:
        """Link ``source/NAME`` as ``dest/NAME`` for each of *names* (one join and one
        encode here per batch: building 35,000 path pairs here held the GIL for 0.2 s)."""
        self.sent.append((source, dest, names))
        for at in range(0, len(names), HELPER_BATCH):
            if self.broken:
                return
            data = os.fsencode("\0".join([source, dest, *names[at : at + HELPER_BATCH]]))
            try:
                self.proc.stdin.write(len(data).to_bytes(4, "little") + data)  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
            except (OSError, ValueError):  # it died, or kill() closed its pipe under us
                self.broken = True  # finish() says to place them all here

    def finish(self) -> tuple[int, list[tuple[str, str]]]:
        """Wait for the helper; returns (links it made, the pairs still to place). A helper
        that died or said nothing readable leaves every pair to place again (placing a link
        that is there already replaces it)."""
        said = b""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(bytes(4))  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError, ValueError):
            said = self.proc.stdout.read(256)  # type: ignore[union-attr]
            self.proc.stdout.close()  # type: ignore[union-attr]
        code = self.proc.wait()
        words = said.split()
        made = 0
        if code == 0 and 1 <= len(words) <= 3 and all(word.isdigit() for word in words):
            total = sum(len(names) for _source, _dest, names in self.sent)
            made = min(int(words[0]), total)
            if len(words) == 1 and made == total:
                return made, []
        pairs = [(f"{s}/{n}", f"{d}/{n}") for s, d, names in self.sent for n in names]
        return made, pairs[made:]

    def kill(self) -> None:
        """Stop it now (the hydrate failed or was interrupted)."""
        end_child(self.proc)


class Child(Protocol):
    """What :func:`end_child` needs of a child: a ``subprocess.Popen``, or a forked one."""

    stdin: IO[bytes] | None
    stdout: IO[bytes] | None

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def end_child(proc: Child) -> None:
    """Kill the child process *proc* (the link helper, the layer process), reap it and
    close its pipes. Another thread may be writing to them or closing them too: a buffered
    pipe closed under a thread's flush says ``ValueError`` (CPython frees its buffer), which
    is no error here."""
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError, ValueError):
            if stream is not None:
                stream.close()


def _copy(source: str, target: str) -> None:
    shutil.copyfile(source, target, follow_symlinks=False)
    os.chmod(target, stat.S_IMODE(os.lstat(source).st_mode) | 0o200)


class Linker:
    """Puts a layer's files into an env: links, or copies once links fail (or are off).
    Threads that unpack layers share it."""

    def __init__(self, link: bool) -> None:
        self.link = link
        self.linked = 0
        self.copied = 0
        self._count = threading.Lock()

    def count(self, linked: int, copied: int) -> None:
        """*linked* and *copied* more files were placed in the env (by a helper, by a layer
        process)."""
        with self._count:
            self.linked += linked
            self.copied += copied

    def place(
        self, source: str, target: str, copy: bool, data: bytes | memoryview | None = None
    ) -> None:
        """*target* becomes a link to *source*, or a writable copy of it (of *data*, its
        content, when given) when *copy* or links fail."""
        if self.link and not copy:
            try:
                os.link(source, target)
            except FileExistsError:  # a later layer (or the env layer) wins: rare
                os.unlink(target)
                self.place(source, target, copy, data)
                return
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                self.link = False  # one failure says the file systems differ: copy the rest
            else:
                with self._count:
                    self.linked += 1
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        if data is None:
            _copy(source, target)
        else:
            write_file(target, data, stat.S_IMODE(os.lstat(source).st_mode) | 0o200)
        with self._count:
            self.copied += 1


def _replace_with_symlink(link: str, target: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
    os.symlink(link, target)


def _merge(
    source: Path, dest: Path, linker: Linker, copy: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Every directory and link of *source* into *dest*, and its files in *copy* copied (or
    every file, when *linker* does not link); returns the files and links placed (relative
    paths) and, of those, the files still to link."""
    placed: list[str] = []
    to_link: list[str] = []
    for key, entry in layer_entries(source):
        target = f"{dest}/{key}"
        if entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(FileExistsError):
                os.mkdir(target, 0o755)
            continue
        placed.append(key)
        if entry.is_symlink():
            _replace_with_symlink(os.readlink(entry.path), target)
        elif linker.link and key not in copy:
            to_link.append(key)
        else:
            linker.place(entry.path, target, key in copy)
    return placed, to_link


class EnvMirror:
    """Hears of a layer's files while the layer is unpacked into the host's cache (an
    :class:`envmgr.archive.extract.Mirror`), so a layer fetched by this hydrate is never
    walked again (torch's 14,600 files took 0.3-0.4 s to walk after its layer arrived): a
    file to copy (see :class:`Assembly`) is copied the moment it is written, by the thread
    that wrote it; a file to link is noted in :attr:`names` and linked once the layer is
    published, by :meth:`Assembly.add`."""

    def __init__(self, root: str, linker: Linker, copy: frozenset[str]) -> None:
        self.root = root
        self.linker = linker
        self.copy = copy
        self.dirs = {root}
        #: The files to link, by their names in the layer (made after it is published).
        self.names: list[str] = []

    def _parent(self, target: str) -> None:
        parent = target.rpartition("/")[0]
        if parent not in self.dirs:
            os.makedirs(parent, 0o755, exist_ok=True)
            self.dirs.add(parent)

    def file(self, name: str, source: str, data: bytes | memoryview | None) -> None:
        target = f"{self.root}/{name}"
        self._parent(target)
        copy = name in self.copy
        if self.linker.link and not copy:
            # Linked once the layer is published: by the helper, or by Assembly.add.
            self.names.append(name)  # list.append is atomic
            return
        self.linker.place(source, target, copy, data if copy else None)

    def symlink(self, name: str, link: str) -> None:
        target = f"{self.root}/{name}"
        self._parent(target)
        _replace_with_symlink(link, target)


class Assembly:
    """The env a manifest describes, made in the new directory *dest* from its layers.

    Every file is a hard link to the layer's copy in the host's cache (read-only: a task
    cannot change another env's files through its own), except the files that hold the
    prefix, which are copied (and relocated by the caller), and everything when links are
    impossible (another file system) or not wanted (*link* false). Layers come in any order
    (a path two of them hold is the env layer's or one of its ``removes``): one this host
    already had through :meth:`add`, which walks it; one being unpacked now through the
    :meth:`mirror` given to its unpack, then :meth:`add` with ``mirrored=True``. The env
    layer comes last (it wins); :meth:`finish` takes the ``removes`` away."""

    def __init__(self, dest: Path, *, link: bool = True) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self.dest = dest
        self.linker = Linker(link)
        self.relocations: dict[str, Relocation] = {}
        self._mirrors: dict[str, EnvMirror] = {}
        self._helper: LinkHelper | None = None
        self._settled = False
        self._to_link = 0  # files of layers linked or to link

    def mirror(self, layer: Manifest) -> EnvMirror:
        """What the unpack of *layer* into the host's cache tells of each file it writes."""
        made = EnvMirror(str(self.dest), self.linker, frozenset(r.path for r in layer.relocations))
        self._mirrors[layer.env_id] = made
        return made

    def add(self, layer: Manifest, directory: Path, *, mirrored: bool = False) -> None:
        """*layer* (published in *directory*) into the env: the files its :meth:`mirror`
        noted, or when it was not mirrored the files its directory holds, are linked (by a
        helper process once this env has :data:`HELPER_FILES` of them to link, see
        :class:`LinkHelper`; call :meth:`settle` before the env layer)."""
        own = {r.path: r for r in layer.relocations}
        mirror = self._mirrors.pop(layer.env_id, None)
        if mirrored and mirror is not None and mirror.names:
            self._link(str(directory), mirror.names)
        if not mirrored:
            # What a layer places replaces what came before, relocation entry included: a
            # relocation must never write through a link into a shared file.
            placed, to_link = _merge(directory, self.dest, self.linker, frozenset(own))
            for key in placed:
                self.relocations.pop(key, None)
            if to_link:
                self._link(str(directory), to_link)
        self.relocations.update(own)

    def _link(self, source: str, names: list[str]) -> None:
        self._to_link += len(names)
        if (
            self._helper is None
            and not self._settled
            and self.linker.link
            and self._to_link >= HELPER_FILES
        ):
            self._helper = LinkHelper.start()
        if self._helper is not None:
            self._helper.send(source, str(self.dest), names)
            return
        for name in names:
            self.linker.place(f"{source}/{name}", f"{self.dest}/{name}", False)

    def settle(self) -> None:
        """Wait for the helper's links; place here what it could not link (a link across
        file systems is a copy, a full disk an ``OSError``)."""
        helper, self._helper = self._helper, None
        self._settled = True  # what comes after (the env layer) is linked here, in order
        if helper is None:
            return
        made, left = helper.finish()
        self.linker.linked += made
        for source, target in left:
            self.linker.place(source, target, False)

    def abandon(self) -> None:
        """The hydrate failed or was interrupted: stop the helper before the env's temp
        directory goes."""
        helper, self._helper = self._helper, None
        if helper is not None:
            helper.kill()

    def finish(self, manifest: Manifest) -> tuple[tuple[Relocation, ...], int, int]:
        """The env's ``removes`` taken away; returns the relocations to apply (each file
        they name is a copy of its own) and how many files were linked and copied. Raises
        ``ArchiveError`` for a remove that leaves the env."""
        dest = self.dest
        for rel in manifest.removes:
            path = dest / rel
            if not os.path.realpath(path.parent).startswith(os.path.realpath(dest)):
                raise ArchiveError(f"env {manifest.env_id}: remove {rel!r} points outside the env")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.relocations.pop(rel, None)
        relocations = tuple(sorted(self.relocations.values()))
        return relocations, self.linker.linked, self.linker.copied
