"""Hydrate an env at task start: from the store to ``<cache>/envs/<env_id>``, once per host.

A warm call is one ``stat``: the env directory exists only when complete, because it is
published by renaming a finished temp directory into place. A cold call takes a per-env
``flock`` (the kernel releases it if the holder dies), streams the archive once through sha256
and the decompressor into a safe extractor writing a temp directory beside the final one,
checks the hash, relocates the listed files for the final path, writes the completion marker
and renames the directory into place. Concurrent callers wait on the lock and return the
published env; temp directories of killed callers are removed by the next one.

If the store has the env's lock but no archive for this platform, the error names the
``envmgr build`` command that makes one (any host can: builds are cross-platform). A caller
with a full envmgr install may opt in to building here by passing a :data:`BuildMissing`
callback (:func:`envmgr.build.once.build_missing`; the build-once lease keeps other workers
waiting): this module never imports the builder.

This module imports only the standard library, the archive and store packages and, for an S3
store, boto3; it sits on every task's start path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NamedTuple

from envmgr.archive.frames import workers
from envmgr.archive.manifest import (
    LayerRef,
    Manifest,
    WriteError,
)
from envmgr.archive.relocate import relocate, relocate_files
from envmgr.cache.layout import (
    archive_key,
    env_lock_key,
    layer_archive_key,
    layer_manifest_key,
    manifest_key,
)
from envmgr.cache.store import Store, StoreError
from envmgr.cache.usage import record_use
from envmgr.fs import file_lock
from envmgr.ids import EnvId, check_under, parse_env_id, parse_platform
from envmgr.knobs import env_choice
from envmgr.platforms import host_platform
from envmgr.progress import Progress, tracked
from envmgr.worker.assembly import Assembly
from envmgr.worker.download import HashMismatchError, HydrateError, Stop, StoppedError, download
from envmgr.worker.env_cache import (
    COMPLETE,
    LAYERS,
    complete_marker,
    env_dir,
    lock_path,
    touch,
)
from envmgr.worker.layer_process import LayerJob, LayerProcess, process_mode, wanted
from envmgr.worker.layers import (
    LayerLookups,
    held_layer,
    layer_streams,
    published_layer,
    using_layers,
    with_layer,
)

__all__ = ["BuildMissing", "HashMismatchError", "HydrateError", "Hydrated", "hydrate"]

#: Builds the env (platform, env id) the store has only the lock of, stores it and returns its
#: manifest; *progress* sees the build. A caller with a full envmgr passes one to
#: :func:`hydrate` (see :func:`envmgr.build.once.build_missing`); workers normally only hydrate.
BuildMissing = Callable[[str, EnvId, "Progress | None"], Manifest]


class Hydrated(NamedTuple):
    """A published env (a named tuple: ``dataclasses`` costs the worker's start ~15 ms)."""

    prefix: Path
    env_id: str
    downloaded: bool  # this call fetched the archive (False: it was already here)
    seconds: float
    #: Format 3: layers this call fetched into the host's layer cache, and the env's files
    #: it linked from there or copied (relocated files, or links impossible or off).
    layers_fetched: int = 0
    linked: int = 0
    copied: int = 0

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"


def _check_gpu(manifest: Manifest, env_id: str) -> None:
    """Refuse an env that needs CUDA on a node that cannot run it (see :mod:`envmgr.cuda`)."""
    if not manifest.cuda or os.environ.get("ENVMGR_ALLOW_CPU", "") not in ("", "0"):
        return
    from envmgr.cuda import CudaNeed, check_node, node_cuda  # noqa: PLC0415

    try:
        have, source = node_cuda()
    except ValueError as exc:
        raise HydrateError(f"env {env_id}: {exc}", hint="unset it to read the driver") from None
    refused = check_node(CudaNeed(*manifest.cuda), have, source)
    if refused is not None:
        why, todo = refused
        raise HydrateError(
            f"env {env_id} ({manifest.platform}) {why}; nothing was downloaded", hint=todo
        )


def hydrate(
    env_id: str,
    store: Store,
    cache_dir: Path,
    *,
    platform: str | None = None,
    build_missing: BuildMissing | None = None,
    progress: Progress | None = None,
    link: bool | None = None,
    check_gpu: bool = False,
) -> Hydrated:
    """Return the published env *env_id* under *cache_dir*, fetching it if needed;
    *progress* sees the download (and a build, when this worker must build). An env whose
    store has only its lock is built by *build_missing* when given, else refused with the
    command that builds it. A format-3 env is assembled from the host's layer cache by hard
    links unless *link* is false (default: true unless ``ENVMGR_LINK=copy``). With
    *check_gpu*, an env that needs CUDA is refused before any download on a node whose driver
    cannot run it (no GPU, or too old), unless ``ENVMGR_ALLOW_CPU=1``.

    Raises ``BadIdError`` (before touching anything) when *env_id* or *platform* is not one,
    ``SettingError`` (before reading or writing anything, unless the env is here) when a
    variable that tunes the fetch holds a value it does not take,
    ``HydrateError`` (no archive and no lock, relocation impossible, a manifest of another
    env), ``HashMismatchError``, ``ArchiveError`` (unsafe archive) or ``StoreError``.
    """
    start = time.monotonic()
    env_id = parse_env_id(env_id, where="hydrate")
    if platform is not None:
        platform = parse_platform(platform, where="hydrate")
    final = env_dir(cache_dir, env_id)
    if (final / COMPLETE).is_file():
        touch(final)
        return Hydrated(
            prefix=final, env_id=env_id, downloaded=False, seconds=time.monotonic() - start
        )
    # What tunes the fetch is checked before anything is read or written, not halfway.
    if link is None:
        link = env_choice("ENVMGR_LINK", ("hardlink", "copy"), "hardlink") == "hardlink"
    layer_streams(), process_mode()
    _check_writable(cache_dir, lock_path(cache_dir, env_id))
    with file_lock(lock_path(cache_dir, env_id)):
        if (final / COMPLETE).is_file():  # published while we waited for the lock
            return Hydrated(
                prefix=final, env_id=env_id, downloaded=False, seconds=time.monotonic() - start
            )
        _remove_leftovers(final)
        if platform is None:
            platform = host_platform()

        try:
            manifest = _manifest(store, platform, env_id, build_missing, progress)
        except StoreError as exc:
            raise HydrateError(
                f"env {env_id}: cannot read it from the store: {exc.message}", hint=exc.hint
            ) from None
        if check_gpu:
            _check_gpu(manifest, env_id)
        # A cold start here: `store gc` keeps used envs. The marker goes up while the env
        # comes down (written after the publish, it was one more round trip per cold start),
        # its thread started once the layer process is forked (a fork wants no threads).
        marking = threading.Thread(
            target=record_use, args=(store, platform, env_id), name="envmgr-use", daemon=True
        )
        fetched, linked, copied = _fetch_and_publish(
            store, manifest, final, progress, link=link, started=marking.start
        )

    marking.join()
    return Hydrated(
        prefix=final,
        env_id=env_id,
        downloaded=True,
        seconds=time.monotonic() - start,
        layers_fetched=fetched,
        linked=linked,
        copied=copied,
    )


def _check_writable(cache_dir: Path, lock: Path) -> None:
    """One clear error, before anything else, when the env cache cannot be written."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a+b"):
            pass
    except OSError as exc:
        raise HydrateError(
            f"cannot write the env cache {cache_dir}: {exc.strerror} ({exc.filename})",
            hint="point ENVMGR_CACHE_DIR (or --cache-dir) at a writable directory",
        ) from None


def _remove_leftovers(final: Path) -> None:
    """Temp dirs of callers that died, and an env dir without its marker (not ours)."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(check_under(stale, final.parent), ignore_errors=True)
    if final.is_symlink():
        final.unlink()  # never followed: it could point anywhere
    elif final.exists():
        shutil.rmtree(check_under(final, final.parent))


def _manifest(
    store: Store,
    platform: str,
    env_id: EnvId,
    build_missing: BuildMissing | None,
    progress: Progress | None,
) -> Manifest:

    key = manifest_key(platform, env_id)
    raw = store.get(key)
    if raw is not None:
        try:
            data = json.loads(raw)
        except ValueError:
            raise HydrateError(f"env {env_id}: {store.url}/{key} is not JSON") from None
        manifest = Manifest.from_dict(data, where=f"{store.url}/{key}")
        if manifest.env_id != env_id or manifest.platform != platform:
            raise HydrateError(
                f"env {env_id}: {store.url}/{key} describes env {manifest.env_id[:40]} for "
                f"{manifest.platform[:20]}, not the one under its key; nothing was published",
                hint="the store was altered: rebuild the env with `envmgr build`",
            )
        return manifest
    lock_key = env_lock_key(platform, env_id)
    if not store.exists(lock_key):
        raise HydrateError(
            f"env {env_id} has no archive and no lock for {platform} in {store.url}",
            hint="run `envmgr build` for this platform, or check the env id and the store",
        )
    if build_missing is None:
        raise HydrateError(
            f"env {env_id} has no archive for {platform} in {store.url}; its lock is there, "
            f"so any machine with envmgr can build it: envmgr build --env {env_id} "
            f"--platform {platform} --store {store.url}"
        )
    return build_missing(platform, env_id, progress)


def _check_length(manifest: Manifest, final: Path) -> None:
    binary = any(r.mode == "binary" for r in manifest.relocations)
    if binary and len(str(final)) > len(manifest.build_prefix):
        raise HydrateError(
            f"env {manifest.env_id}: {final} is longer than its build prefix "
            f"({len(manifest.build_prefix)} characters)",
            hint="use a shorter ENVMGR_CACHE_DIR",
        )


def _fetch_and_publish(
    store: Store,
    manifest: Manifest,
    final: Path,
    progress: Progress | None = None,
    *,
    link: bool = True,
    started: Callable[[], None] = lambda: None,
) -> tuple[int, int, int]:
    """Fetch, verify, relocate and publish the env at *final*; returns (layers fetched,
    files linked, files copied), all 0 for format 1 and 2. *started* is called once, before
    the download, when other threads may start."""
    _check_length(manifest, final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = (0, 0, 0)
    try:
        if manifest.layers:
            counts = _from_layers(store, manifest, final, tmp, progress, link=link, started=started)
        else:
            started()
            key = archive_key(manifest.platform, manifest.env_id, manifest.codec)
            task = _tracking(progress, f"hydrate {manifest.env_id[:12]}", manifest.size)
            with task as tracker:
                download(store, key, manifest, tmp, tracker, f"env {manifest.env_id}")
            relocate(tmp, manifest, str(final))
        (tmp / COMPLETE).write_text(complete_marker(manifest.sha256, manifest.cuda))
        tmp.rename(final)
    except StoreError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HydrateError(
            f"env {manifest.env_id}: download failed: {exc.message}; nothing was published",
            hint=exc.hint,
        ) from None
    except (WriteError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) else exc.message
        raise HydrateError(
            f"env {manifest.env_id}: cannot write it under {final.parent}: {reason}; "
            "nothing was published",
            hint="free space there (`envmgr gc`) or point ENVMGR_CACHE_DIR at a larger disk",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _from_layers(
    store: Store,
    manifest: Manifest,
    final: Path,
    tmp: Path,
    progress: Progress | None,
    *,
    link: bool,
    started: Callable[[], None],
) -> tuple[int, int, int]:
    """Assemble the format-3 env *manifest* in *tmp* for *final*: its layers from the host's
    layer cache (fetched there first when missing, several at once), then its env layer;
    returns (layers fetched, files linked, files copied). *started* is called once the
    layer process is forked."""
    cache_dir = final.parent.parent
    hints = _size_hints(manifest)
    ids = [ref.layer_id for ref in manifest.layers]
    # Set when the assembly fails or Ctrl-C arrives: the downloads still running stop at
    # their next read instead of finishing a layer nobody waits for.
    stop = Stop()
    assembly = Assembly(tmp, link=link)
    mirrored: set[str] = set()  # layers placed in the env while this hydrate unpacked them
    env_layer = tmp.with_name(f"{tmp.name}-envlayer")
    shutil.rmtree(env_layer, ignore_errors=True)
    child: LayerProcess | None = None  # a second process for the largest layers
    with contextlib.ExitStack() as scope:
        scope.enter_context(using_layers(cache_dir, ids))  # gc leaves them alone from here
        # A layer this host holds comes with the manifest it was checked against; only the
        # others' are read from the store. The largest layers start first (torch's is 44% of
        # its env: started in install order, it began last and ended 1.5 s after the rest).
        # The env manifest's package sizes say which are largest, so each manifest is read in
        # that order and its download starts once its own manifest is in; without them every
        # manifest is read first. The largest's and the smallest's manifests are read first,
        # alone: the smallest's time says whether the store is far (the largest's, 1.2 MB for
        # torch, took 9 ms on loopback).
        held = {
            ref.layer_id: layer
            for ref in manifest.layers
            if (layer := held_layer(cache_dir, ref)) is not None
        }
        missing = [ref for ref in manifest.layers if ref.layer_id not in held]
        installed = sum(hints.get(ref.layer_id, 0) for ref in missing)
        if wanted(len(missing), installed):  # first: forked before any thread starts
            child = LayerProcess.start(store)
            if child is not None:  # ended however this hydrate ends (kill() first on errors)
                scope.callback(child.close)
        started()
        # After the fork: off a terminal, the CLI's progress line waits on a timer thread,
        # and with it running the layer process would be a new interpreter (0.3 s of CPU).
        task = scope.enter_context(
            _tracking(progress, f"hydrate {manifest.env_id[:12]}", manifest.size)
        )
        refs = sorted(missing, key=lambda ref: -hints[ref.layer_id]) if hints else []
        probes = list(dict.fromkeys([refs[0], refs[-1]])) if refs else []
        reads = [*probes, *(ref for ref in refs if ref not in probes)] or missing
        lookups = scope.enter_context(LayerLookups(store, reads, ahead=len(probes) or None))

        def checked(ref: LayerRef) -> Manifest:
            found = held[ref.layer_id] if ref.layer_id in held else lookups.get(ref.layer_id)
            return _layer(found, ref, manifest, final, store.url)

        if not refs:
            sizes = {ref.layer_id: checked(ref).size for ref in missing}
            refs = sorted(missing, key=lambda ref: -sizes[ref.layer_id])
        for ref in probes:
            checked(ref)
        far = lookups.far()
        refs += [ref for ref in manifest.layers if ref.layer_id in held]

        def fetch(layer: Manifest, into: Path) -> None:
            ref = layer.layer
            what = f"env {manifest.env_id}: layer of {ref.package if ref else layer.env_id}"
            key = layer_archive_key(layer.env_id)
            streams = _streams_for(layer.size, far=far)
            mirror = assembly.mirror(layer)
            if child is not None:
                placed = child.fetch(LayerJob(layer, key, into, tmp, what, streams), task)
                if placed is not None:
                    mirror.names.extend(placed.names)
                    assembly.linker.count(placed.linked, placed.copied)
                    if placed.mirrored:
                        mirrored.add(layer.env_id)
                    return
                if stop.is_set():
                    raise StoppedError
            if download(
                store,
                key,
                layer,
                into,
                task,
                what,
                streams=streams,
                read_only=True,
                stop=stop,
                mirror=mirror,
            ):
                mirrored.add(layer.env_id)

        def fetch_env_layer() -> Path:
            key = archive_key(manifest.platform, manifest.env_id, manifest.codec)
            download(store, key, manifest, env_layer, task, f"env {manifest.env_id}", stop=stop)
            return env_layer

        pool = ThreadPoolExecutor(
            max_workers=min(layer_streams(far), len(refs) + 1), thread_name_prefix="envmgr-layer"
        )
        # A layer fetched here is placed in the env file by file as it is unpacked; one the
        # host had is linked in as its turn comes while the others download. The env layer
        # goes last.
        jobs: dict[Future[tuple[Path, bool]], Manifest] = {}
        last: Future[Path] | None = None
        fetched = 0
        try:
            total = manifest.size
            for ref in refs:
                layer = checked(ref)
                if ref.layer_id not in held and published_layer(cache_dir, layer) is None:
                    total += layer.size
                jobs[pool.submit(with_layer, cache_dir, layer, fetch)] = layer
            if task is not None:
                task.set_total(total)
            last = pool.submit(fetch_env_layer)
            for job in as_completed(jobs):
                directory, new = job.result()
                fetched += new
                layer = jobs[job]
                assembly.add(layer, directory, mirrored=new and layer.env_id in mirrored)
            assembly.settle()
            assembly.add(manifest, last.result())
            relocations, linked, copied = assembly.finish(manifest)
        except BaseException:
            # The error raised is the one that stopped the hydrate, whatever stopping the
            # rest raises (a pipe closed under a thread that writes to it, in CI once).
            _quietly(
                stop.set,
                assembly.abandon,
                *([child.kill] if child is not None else []),
                *([last.cancel] if last is not None else []),
                *(pending.cancel for pending in jobs),
            )
            raise
        finally:
            pool.shutdown(wait=True)
            shutil.rmtree(env_layer, ignore_errors=True)
        (tmp / LAYERS).write_text("".join(f"{layer}\n" for layer in ids))
        relocate_files(
            tmp, relocations, manifest.build_prefix, str(final), f"env {manifest.env_id}"
        )
    return fetched, linked, copied


def _quietly(*steps: Callable[[], object]) -> None:
    """Run each of *steps* whatever those before it raised: cleanup after an error, which
    must never replace that error."""
    for step in steps:
        with contextlib.suppress(Exception):
            step()


def _size_hints(manifest: Manifest) -> dict[str, int]:
    """Each layer's installed bytes by layer id, from the env manifest's package sizes: the
    order its downloads start in, a hint only (each layer's own manifest says what it is);
    empty unless every layer has one."""
    sizes = dict(manifest.package_sizes)
    hints = {}
    for ref in manifest.layers:
        name = ref.package.split(" ")[1] if ref.package.count(" ") >= 2 else ""
        if name in sizes:
            hints[ref.layer_id] = sizes[name]
    return hints if len(hints) == len(manifest.layers) else {}


def _layer(
    layer: Manifest | None, ref: LayerRef, manifest: Manifest, final: Path, url: str
) -> Manifest:
    """*layer*, the manifest of *ref* (a layer of the env *manifest*), checked: there
    (``None``: the store at *url* lacks it), for the env's platform, its prefix no shorter
    than *final*. Raises ``HydrateError``."""
    if layer is None:
        raise HydrateError(
            f"env {manifest.env_id}: its layer of {ref.package} "
            f"({layer_manifest_key(ref.layer_id)}) is not in {url}; nothing was published",
            hint="run `envmgr build` again: it stores the layers the store lacks",
        )
    if layer.platform != manifest.platform:
        raise HydrateError(
            f"env {manifest.env_id}: its layer of {ref.package} is for {layer.platform}, "
            f"not {manifest.platform}; the store was altered",
            hint=f"delete {url}/layers/{ref.layer_id}/ and build the env again",
        )
    _check_length(layer, final)
    return layer


def _tracking(progress: Progress | None, label: str, total: int) -> Any:
    if progress is None:
        return contextlib.nullcontext(None)
    return tracked(progress, label, total=total)


#: A layer this large comes down over several ranged streams, one per this many bytes (at
#: most the second number), from a near / a far store: one connection's speed must not
#: decide a task's start (torch's layer is 175 MB), and on a fast network each stream costs
#: CPU that unpacking needs.
_BYTES_PER_STREAM = {False: (64 << 20, 4), True: (16 << 20, 8)}


def _streams_for(size: int, *, far: bool) -> int:
    """Ranged streams for a layer of *size* bytes (0: one plain stream). From a near store
    at most one per two cores: there one stream outruns a core's unpacking, and each more
    is a thread and a copy of every byte (torch on 2 cores from loopback, 8 rounds
    interleaved, with one layer per core at once: one stream for its 175 MB layer took
    0.91x the time of two)."""
    step, most = _BYTES_PER_STREAM[far]
    if not far:
        most = min(most, workers() // 2)
    streams = min(most, size // step) if size >= 2 * step else 0
    return streams if streams > 1 else 0
