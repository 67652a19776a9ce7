"""The host's layer cache and env assembly: each layer fetched once, envs made of links.

``<cache>/layers/<layer_id>/`` holds one package layer unpacked (still against the placeholder
prefix), published like an env: a temp directory beside it, verified, its files read-only, marked
complete and renamed into place under a per-layer ``flock``, so concurrent hydrates on one host
fetch each layer once and a killed one leaves only a temp directory the next one removes.

:class:`Assembly` makes an env from its layers: every file is a hard link to the layer's copy
(read-only: a task cannot change another env's files through its own), except the files that
hold the prefix, which are copied and relocated, and everything when links are impossible
(another file system) or not wanted (``link=False``). A layer this hydrate fetches tells of
each file as it is unpacked, and its files are linked once it is published (by a helper
process when there are many); one the host had is walked. The env layer, unpacked apart, goes
last and wins; the manifest's ``removes`` are taken away.

Standard library only (with the archive and store packages): workers import it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, NamedTuple, Protocol

from envmgr.archive.extract import write_file
from envmgr.archive.frames import workers
from envmgr.archive.manifest import ArchiveError, LayerRef, Manifest, Relocation
from envmgr.cache.layout import layer_manifest_key
from envmgr.cache.store import Store
from envmgr.fs import file_lock, read_small
from envmgr.ids import check_under, is_env_id, parse_layer_id
from envmgr.worker.env_cache import COMPLETE, layer_use_lock

__all__ = [
    "FAR",
    "LAYER_MANIFEST",
    "Assembly",
    "Child",
    "LayerCheck",
    "LayerLookups",
    "check_layers",
    "end_child",
    "fetch_layer_manifests",
    "held_layer",
    "layer_dir",
    "layer_streams",
    "published_layer",
    "read_layer_manifest",
    "using_layers",
    "with_layer",
]

#: Store reads in flight while layer manifests are looked up.
_LOOKUPS = 16
#: Errors of ``link(2)`` that mean "copy instead": another file system, too many links, a
#: file system without hard links.
_NO_LINK = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})


#: A store whose fastest manifest read took this long is far: its streams spend most of
#: their time waiting, so more of them run at once (loopback answers in 2-4 ms, S3 from
#: within its region in 10-30 ms).
FAR = 0.015


def layer_streams(far: bool = False) -> int:
    """``ENVMGR_LAYER_STREAMS``: layers fetched at once, at least 1; by default one per core
    (at most 8), four per core from a *far* store. Unpacking keeps the cores busy on a
    near store, where more streams only contend; a far store's streams mostly wait. Torch
    on 2 cores from loopback, 8 rounds interleaved: 2 at once took 0.96x the time of 4, and
    1 took 1.09x the time of 2; at 15 MB/s and 30 ms per connection 8 took 0.83x the time
    of 4."""
    with contextlib.suppress(ValueError):
        return max(1, int(os.environ.get("ENVMGR_LAYER_STREAMS", "")))
    return min(8, (4 if far else 1) * workers())


def layer_dir(cache_dir: Path, layer_id: str) -> Path:
    """``<cache>/layers/<layer_id>``; raises ``BadIdError`` unless *layer_id* is one."""
    return cache_dir / "layers" / parse_layer_id(layer_id, where="layer id")


def read_layer_manifest(raw: bytes | None, ref: LayerRef, url: str) -> Manifest | None:
    """The layer manifest *raw* read for *ref*, checked against it; ``None`` when absent.
    Raises ``ArchiveError`` when it is unreadable or describes another package or layer."""
    if raw is None:
        return None
    key = layer_manifest_key(ref.layer_id)
    try:
        data = json.loads(raw)
    except ValueError:
        raise ArchiveError(f"{url}/{key} is not JSON") from None
    manifest = Manifest.from_dict(data, where=f"{url}/{key}")
    if manifest.layer != ref or manifest.env_id != ref.layer_id:
        held = manifest.layer.package if manifest.layer is not None else "no package"
        raise ArchiveError(
            f"{url}/{key} describes {held[:80]}, not the layer of {ref.package[:80]}; "
            "the store was altered",
            hint=f"delete {url}/layers/{ref.layer_id}/ and build the env again",
        )
    return manifest


class LayerLookups:
    """The manifests of *refs* read from *store* in parallel, in the order given (:meth:`get`
    waits for one): a hydrate starts a layer's download as soon as its own manifest is in,
    not when all are (torch's 31 took 0.1 s on loopback, most of it boto3's CPU). Only the
    first *ahead* reads start at once (default: all), the rest with the first :meth:`get`
    of one of them: a hydrate reads its largest layer's manifest alone and starts its
    download before the others' reads crowd the GIL (among them torch's 1.2 MB came in
    last, 0.14 s after the env manifest). Use it as a context manager: leaving it drops
    the reads not yet started."""

    def __init__(self, store: Store, refs: Iterable[LayerRef], *, ahead: int | None = None) -> None:
        self._store = store
        self._wanted = list(refs)
        #: How long each finished read took (``list.append`` is atomic under the GIL).
        self.seconds: list[float] = []
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(_LOOKUPS, len(self._wanted))), thread_name_prefix="envmgr-look"
        )
        self._reads: dict[str, Future[Manifest | None]] = {}
        self._start(len(self._wanted) if ahead is None else ahead)

    def _start(self, count: int) -> None:
        while len(self._reads) < min(count, len(self._wanted)):
            ref = self._wanted[len(self._reads)]
            self._reads[ref.layer_id] = self._pool.submit(self._read, ref)

    def _read(self, ref: LayerRef) -> Manifest | None:
        start = time.monotonic()
        raw = self._store.get(layer_manifest_key(ref.layer_id))
        self.seconds.append(time.monotonic() - start)
        return read_layer_manifest(raw, ref, self._store.url)

    def get(self, layer_id: str) -> Manifest | None:
        """The manifest of layer *layer_id* (``None`` when the store lacks it), once read;
        raises what :func:`read_layer_manifest` or the store raised."""
        if layer_id not in self._reads:
            self._start(len(self._wanted))
        return self._reads[layer_id].result()

    def far(self) -> bool:
        """Whether the fastest read finished so far took :data:`FAR` or longer."""
        return bool(self.seconds) and min(self.seconds) >= FAR

    def __enter__(self) -> LayerLookups:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def fetch_layer_manifests(store: Store, refs: Iterable[LayerRef]) -> dict[str, Manifest | None]:
    """Each layer's manifest from *store* (``None`` when absent), read in parallel and
    checked by :func:`read_layer_manifest`."""
    wanted = list(refs)
    with LayerLookups(store, wanted) as lookups:
        return {ref.layer_id: lookups.get(ref.layer_id) for ref in wanted}


@contextlib.contextmanager
def using_layers(cache_dir: Path, layer_ids: Iterable[str]) -> Iterator[None]:
    """Hold the shared use lock of each layer for the block, so ``gc`` leaves them alone
    while an env is assembled from them (it takes each exclusively, without waiting)."""
    with contextlib.ExitStack() as held:
        for layer_id in layer_ids:
            path = layer_use_lock(cache_dir, layer_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            held.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield


#: The manifest a layer on this host was checked against, kept in its directory: an env
#: assembled from layers the host holds reads theirs here, not from the store (ds + tabulate
#: on a host that holds ds: 22 store reads fewer).
LAYER_MANIFEST = ".envmgr-manifest.json"
#: A kept manifest longer than this is not read (torch's is 1.2 MB): a file of the host's
#: cache can be replaced by anything, a link to ``/dev/zero`` or a FIFO included.
_KEPT_MANIFEST_BYTES = 64 << 20


def held_layer(cache_dir: Path, ref: LayerRef) -> Manifest | None:
    """The manifest of the layer *ref* when this host has that layer complete (and marks it
    used), read from its directory; ``None`` when it has not, or the copy is unreadable or
    names another layer (then the store's is read, as for a layer published by an envmgr
    that kept none)."""
    final = layer_dir(cache_dir, ref.layer_id)
    try:
        raw = read_small(final / LAYER_MANIFEST, _KEPT_MANIFEST_BYTES)
        manifest = read_layer_manifest(raw, ref, str(final))
    except (OSError, ArchiveError):
        return None
    if manifest is None or published_layer(cache_dir, manifest) is None:
        return None
    return manifest


class LayerCheck(NamedTuple):
    """What :func:`check_layers` found of one layer on this host."""

    layer_id: str
    package: str  #: as its kept manifest names it; "" when that is unreadable
    changed: tuple[str, ...]  #: files written since the layer was published
    missing: tuple[str, ...]  #: files and links of its manifest it no longer has
    added: tuple[str, ...]  #: files and links its manifest does not list
    unreadable: bool = False  #: its kept manifest is unreadable: nothing could be checked

    @property
    def intact(self) -> bool:
        return not (self.changed or self.missing or self.added or self.unreadable)


def check_layers(cache_dir: Path) -> list[LayerCheck]:
    """Each published layer on this host checked against the manifest kept in its
    directory, which was written after every file of it: a file whose modification time is
    later was written since (root ignores the read-only modes, so a task running as root
    that writes into its env's files writes into the layer, and into every env linking to
    it); a file or link the manifest lists must be there, and nothing else. A layer whose
    kept manifest is unreadable cannot be checked and is said so."""
    found = []
    root = cache_dir / "layers"
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        if is_env_id(directory.name) and (directory / COMPLETE).is_file():
            found.append(_check_layer(directory))
    return found


def _check_layer(directory: Path) -> LayerCheck:
    kept = directory / LAYER_MANIFEST
    try:
        written = os.lstat(kept).st_mtime_ns
        manifest = Manifest.from_dict(
            json.loads(read_small(kept, _KEPT_MANIFEST_BYTES)), where=str(kept)
        )
    except (OSError, ValueError, ArchiveError):
        return LayerCheck(directory.name, "", (), (), (), unreadable=True)
    if manifest.layer is None or manifest.env_id != directory.name:
        return LayerCheck(directory.name, "", (), (), (), unreadable=True)
    changed: list[str] = []
    present: set[str] = set()
    for key, entry in _layer_entries(directory):
        if entry.is_dir(follow_symlinks=False):
            continue
        present.add(key)
        written_since = entry.stat(follow_symlinks=False).st_mtime_ns > written
        if written_since and entry.is_file(follow_symlinks=False):
            changed.append(key)
    listed = set(manifest.paths)
    return LayerCheck(
        directory.name,
        manifest.layer.package,
        tuple(sorted(changed)),
        tuple(sorted(listed - present)),
        tuple(sorted(present - listed)),
    )


def published_layer(cache_dir: Path, manifest: Manifest) -> Path | None:
    """The layer's directory when this host has it complete (and marks it used), else
    ``None``."""
    final = layer_dir(cache_dir, manifest.env_id)
    marker = final / COMPLETE
    try:  # a sha256 and a newline
        held = read_small(marker, 128).decode(errors="replace").strip()
    except OSError:
        return None
    if held != manifest.sha256:
        return None  # another archive under this id: fetch it again
    with contextlib.suppress(OSError):
        os.utime(marker)
    return final


def with_layer(
    cache_dir: Path, manifest: Manifest, fetch: Callable[[Manifest, Path], None]
) -> tuple[Path, bool]:
    """The published directory of the layer *manifest* describes, and whether this call
    fetched it: *fetch* (manifest, temp dir) unpacks and verifies it into a temp directory,
    with its files read-only (directories keep write permission, so the next publisher can
    replace the layer), which is then marked and renamed into place under the layer's lock."""
    done = published_layer(cache_dir, manifest)
    if done is not None:
        return done, False
    final = layer_dir(cache_dir, manifest.env_id)
    locks = final.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with file_lock(locks / f"{manifest.env_id}.hydrate"):
        done = published_layer(cache_dir, manifest)
        if done is not None:
            return done, False
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(check_under(stale, final.parent), ignore_errors=True)
        if final.is_symlink():
            final.unlink()
        elif final.exists():
            doomed = final.with_name(f".tmp-{final.name}-old-{os.getpid()}")
            final.rename(doomed)
            shutil.rmtree(check_under(doomed, final.parent), ignore_errors=True)
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        try:
            fetch(manifest, tmp)
            (tmp / LAYER_MANIFEST).write_text(json.dumps(manifest.to_dict()))
            (tmp / COMPLETE).write_text(manifest.sha256 + "\n")
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


#: Once a hydrate has fetched this many files to link, their links are made by a helper
#: process (:class:`_LinkHelper`).
_HELPER_FILES = 2048
#: Links per message to the helper.
_HELPER_BATCH = 1024
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


class _LinkHelper:
    """A child process that makes an env's links to the host's layers, while this process
    unpacks the layers it fetches or walks the ones the host held (ds + tabulate on a host
    holding ds, 8 rounds: 0.44 s against 0.48 s with ds's 15,400 links made here, 0.54 s
    against 0.61 s on a journaled ext4).

    Each ``link(2)`` made here gives up the GIL and takes it back, a handover whenever a
    thread unpacking another layer waits for it: torch's 35,000 links cost 107,000 futex
    calls against one archive's 47,000. The helper makes them off this process's GIL while
    the other layers unpack (torch from loopback on 2 cores, 6 rounds: 2.84 s against
    3.00 s, one archive 2.75 s). It only links; what it could not link (another file system,
    a full disk) is placed here, by :class:`_Linker`, with its errors."""

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
    def start(cls) -> _LinkHelper | None:
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
        for at in range(0, len(names), _HELPER_BATCH):
            if self.broken:
                return
            data = os.fsencode("\0".join([source, dest, *names[at : at + _HELPER_BATCH]]))
            try:
                self.proc.stdin.write(len(data).to_bytes(4, "little") + data)  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
            except OSError:
                self.broken = True  # it died: finish() says to place them all here

    def finish(self) -> tuple[int, list[tuple[str, str]]]:
        """Wait for the helper; returns (links it made, the pairs still to place). A helper
        that died or said nothing readable leaves every pair to place again (placing a link
        that is there already replaces it)."""
        said = b""
        with contextlib.suppress(OSError):
            self.proc.stdin.write(bytes(4))  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
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
    close its pipes."""
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            if stream is not None:
                stream.close()


def _copy(source: str, target: str) -> None:
    shutil.copyfile(source, target, follow_symlinks=False)
    os.chmod(target, stat.S_IMODE(os.lstat(source).st_mode) | 0o200)


class _Linker:
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


def _layer_entries(directory: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every directory, file and link below the layer *directory* with its path relative to
    it, a directory before what it holds; not the layer's own markers. str paths and
    scandir (its entries know their type): this runs once per file of an env, 35,000 times
    for torch."""
    todo = [(str(directory), "")]
    while todo:
        here, rel = todo.pop()
        with os.scandir(here) as entries:
            for entry in entries:
                key = f"{rel}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    yield key, entry
                    todo.append((entry.path, f"{key}/"))
                elif rel or entry.name not in (COMPLETE, LAYER_MANIFEST):
                    yield key, entry


def _merge(
    source: Path, dest: Path, linker: _Linker, copy: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Every directory and link of *source* into *dest*, and its files in *copy* copied (or
    every file, when *linker* does not link); returns the files and links placed (relative
    paths) and, of those, the files still to link."""
    placed: list[str] = []
    to_link: list[str] = []
    for key, entry in _layer_entries(source):
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


class _Mirror:
    """Hears of a layer's files while the layer is unpacked into the host's cache (an
    :class:`envmgr.archive.extract.Mirror`), so a layer fetched by this hydrate is never
    walked again (torch's 14,600 files took 0.3-0.4 s to walk after its layer arrived): a
    file to copy (see :class:`Assembly`) is copied the moment it is written, by the thread
    that wrote it; a file to link is noted in :attr:`names` and linked once the layer is
    published, by :meth:`Assembly.add`."""

    def __init__(self, root: str, linker: _Linker, copy: frozenset[str]) -> None:
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
        self.linker = _Linker(link)
        self.relocations: dict[str, Relocation] = {}
        self._mirrors: dict[str, _Mirror] = {}
        self._helper: _LinkHelper | None = None
        self._settled = False
        self._to_link = 0  # files of layers linked or to link

    def mirror(self, layer: Manifest) -> _Mirror:
        """What the unpack of *layer* into the host's cache tells of each file it writes."""
        made = _Mirror(str(self.dest), self.linker, frozenset(r.path for r in layer.relocations))
        self._mirrors[layer.env_id] = made
        return made

    def add(self, layer: Manifest, directory: Path, *, mirrored: bool = False) -> None:
        """*layer* (published in *directory*) into the env: the files its :meth:`mirror`
        noted, or when it was not mirrored the files its directory holds, are linked (by a
        helper process once this env has :data:`_HELPER_FILES` of them to link, see
        :class:`_LinkHelper`; call :meth:`settle` before the env layer)."""
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
            and self._to_link >= _HELPER_FILES
        ):
            self._helper = _LinkHelper.start()
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
