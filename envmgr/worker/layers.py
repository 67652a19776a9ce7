"""The host's layer cache: each layer fetched once, kept for the envs made of it.

``<cache>/layers/<layer_id>/`` holds one package layer unpacked (still against the placeholder
prefix), published like an env: a temp directory beside it, verified, its files read-only, marked
complete and renamed into place under a per-layer ``flock``, so concurrent hydrates on one host
fetch each layer once and a killed one leaves only a temp directory the next one removes. The
envs are made of the layers' files by :mod:`envmgr.worker.assembly`.

Standard library only (with the archive and store packages): workers import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from envmgr.archive.frames import workers
from envmgr.archive.manifest import ArchiveError, LayerRef, Manifest
from envmgr.cache.layout import layer_manifest_key
from envmgr.cache.store import Store
from envmgr.fs import file_lock, read_small
from envmgr.ids import check_under, is_env_id, parse_layer_id
from envmgr.knobs import env_int
from envmgr.worker.env_cache import COMPLETE, layer_use_lock

__all__ = [
    "FAR",
    "LAYER_MANIFEST",
    "LayerCheck",
    "LayerLookups",
    "check_layers",
    "fetch_layer_manifests",
    "held_layer",
    "layer_dir",
    "layer_entries",
    "layer_streams",
    "published_layer",
    "read_layer_manifest",
    "using_layers",
    "with_layer",
]

#: Store reads in flight while layer manifests are looked up.
_LOOKUPS = 16


#: A store whose fastest manifest read took this long is far: its streams spend most of
#: their time waiting, so more of them run at once (loopback answers in 2-4 ms, S3 from
#: within its region in 10-30 ms).
FAR = 0.015


def layer_streams(far: bool = False) -> int:
    """``ENVMGR_LAYER_STREAMS``: layers fetched at once, 1 to 64; by default one per core
    (at most 8), four per core from a *far* store. Unpacking keeps the cores busy on a
    near store, where more streams only contend; a far store's streams mostly wait. Torch
    on 2 cores from loopback, 8 rounds interleaved: 2 at once took 0.96x the time of 4, and
    1 took 1.09x the time of 2; at 15 MB/s and 30 ms per connection 8 took 0.83x the time
    of 4."""
    default = min(8, (4 if far else 1) * workers())
    return env_int("ENVMGR_LAYER_STREAMS", default, low=1, high=64)


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
    for key, entry in layer_entries(directory):
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


def layer_entries(directory: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
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
