"""Build an env as package layers (format 3): only the layers the store lacks.

A *layer* is one locked package installed for one target, packed against
:data:`~envmgr.build.placeholder.PLACEHOLDER` in format 2's verified frames; its id is a
hash of what decides its bytes (:func:`layer_id`), so every env, team and host that locks
the same package for the same target shares it. An env's manifest lists its layers in install
order; its own small archive, the *env layer*, holds what no single package owns.

:func:`build_layers` does two things:

1. **Every layer in the store.** The layers the store lacks are taken under build-once leases
   (one per layer, as :mod:`envmgr.cache.lease` gives envs), installed together into a staging
   prefix with every other package left out, rewritten to the placeholder, byte-compiled,
   split by owner (:mod:`envmgr.build.owners`), packed and uploaded, manifest last. A package
   that shares a path with another in that install is installed again on its own, so a
   layer never depends on its neighbours. Layers another builder holds are waited for.
2. **The env layer.** Paths that two layers hold are resolved as one install into one prefix
   resolves them: the packages involved are installed together (the others left out), and
   the env layer takes their shared paths and their conda records as that install left them,
   with what the install has besides its packages (``conda-meta/history``). Paths a layer
   holds that such an install does not have are listed as ``removes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from envmgr import __version__
from envmgr.archive.manifest import LayerRef, Manifest
from envmgr.archive.pack import pack
from envmgr.build.bytecode import bytecode_python, python_xy
from envmgr.build.options import BuildOptions, Stored
from envmgr.build.owners import Owners, find_owners, package_key
from envmgr.build.placeholder import PLACEHOLDER
from envmgr.build.prefix import create_prefix, tree_size
from envmgr.cache.layout import archive_key, layer_archive_key, layer_manifest_key, lease_key
from envmgr.cache.lease import (
    LeaseInfo,
    LeaseWatch,
    held_lease,
    lease_bytes,
    new_holder,
    try_take,
)
from envmgr.cuda import manifest_cuda
from envmgr.errors import BuildError
from envmgr.fs import file_lock
from envmgr.locks.lock import LockedPackage, PlatformLock
from envmgr.platforms import host_platform
from envmgr.progress import NULL, tracked
from envmgr.worker.layers import fetch_layer_manifests

__all__ = ["LAYER_FORMAT", "build_layers", "bytecode_tag", "layer_id", "layer_refs"]

#: Bumped whenever a change of envmgr changes what a layer holds for the same inputs.
LAYER_FORMAT = 1


def layer_id(package: LockedPackage, lock: PlatformLock, bytecode: str) -> str:
    """The id of *package*'s layer for *lock*'s target: a hash of the package file (sha256;
    for conda also its URL, which its record keeps), the target platform and Python, the
    interpreter that writes its bytecode (*bytecode*, see :func:`bytecode_tag`) and
    :data:`LAYER_FORMAT`. Never the env it is built for."""
    fields = {
        "layer_format": LAYER_FORMAT,
        "manager": package.manager,
        "name": package_key(package),
        "version": package.version,
        "build": package.build,
        "sha256": package.sha256,
        "url": package.url if package.manager == "conda" else "",
        "platform": lock.platform,
        "python": python_xy(lock) or "",
        "bytecode": bytecode,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def bytecode_tag(lock: PlatformLock, options: BuildOptions) -> str:
    """Which interpreter writes *lock*'s bytecode: implementation, version and magic
    number (``cpython 3.11.7 a70d0d0a``); empty when the lock has no conda python."""
    python = bytecode_python(
        lock,
        host=options.host or host_platform(),
        cache_dir=options.cache_dir,
        source=options.bytecode,
    )
    if python is None:
        return ""
    probe = (
        "import sys, importlib.util; "
        "print(sys.implementation.name, sys.version.split()[0], importlib.util.MAGIC_NUMBER.hex())"
    )
    if python == Path(sys.executable):
        import importlib.util  # noqa: PLC0415

        version = sys.version.split()[0]
        return f"{sys.implementation.name} {version} {importlib.util.MAGIC_NUMBER.hex()}"
    done = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise BuildError(f"env {lock.env_id}: cannot run {python}: {done.stderr.strip()[-200:]}")
    return done.stdout.strip()


def _describe(package: LockedPackage) -> str:
    return f"{package.manager} {package.name} {package.version}"


def layer_refs(lock: PlatformLock, bytecode: str) -> list[tuple[LockedPackage, LayerRef]]:
    """Each package of *lock* with its layer, in install order (conda, then wheels, each in
    lock order)."""
    ordered = sorted(lock.packages, key=lambda p: p.manager != "conda")
    return [
        (
            package,
            LayerRef(
                layer_id=layer_id(package, lock, bytecode),
                package=_describe(package),
                sha256=package.sha256,
            ),
        )
        for package in ordered
    ]


def build_layers(lock: PlatformLock, options: BuildOptions, staging: Path) -> Stored:
    """Store every layer of *lock* that the store lacks and the env layer; the env's
    format-3 manifest (the caller stores it last) and what was uploaded. *staging* is this
    env's build prefix (the caller holds its file lock); it is removed on the way out.

    Raises ``BuildError``, ``ArchiveError`` (a stored layer manifest that lies) or a store
    error."""
    store = options.store
    tag = bytecode_tag(lock, options)
    pairs = layer_refs(lock, tag)
    known = fetch_layer_manifests(store, [ref for _pkg, ref in pairs])
    built = _ensure_layers(lock, options, pairs, known, staging)
    layers = {layer: manifest for layer, manifest in known.items() if manifest is not None}
    manifest = _store_env_layer(lock, options, pairs, layers, staging)
    return Stored(
        manifest=manifest,
        layer_bytes=sum(layers[ref.layer_id].size for _p, ref in pairs),
        built=len(built),
        uploaded=manifest.size + sum(layer.size for layer in built.values()),
    )


def _ensure_layers(
    lock: PlatformLock,
    options: BuildOptions,
    pairs: list[tuple[LockedPackage, LayerRef]],
    known: dict[str, Manifest | None],
    staging: Path,
) -> dict[str, Manifest]:
    """Fill *known* until every layer is in the store: build those whose lease this builder
    takes, wait for those another builder holds (taking over a lease nobody renews). Returns
    the manifests of the layers built here, by layer id."""
    store = options.store
    holder = options.holder or new_holder()
    built: dict[str, Manifest] = {}
    watches: dict[str, LeaseWatch] = {}
    deadline = time.monotonic() + options.wait_timeout
    delay = options.poll_seconds
    told = ""
    while missing := [(p, r) for p, r in pairs if known[r.layer_id] is None]:
        mine = []
        for package, ref in missing:
            watch = watches.setdefault(ref.layer_id, LeaseWatch(options.lease_seconds))
            if try_take(
                store, ref.layer_id, holder=holder, seconds=options.lease_seconds, watch=watch
            ):
                mine.append((package, ref))
        if mine:
            with contextlib.ExitStack() as leases:
                for _package, ref in mine:
                    leases.enter_context(
                        held_lease(
                            store, ref.layer_id, holder=holder, seconds=options.lease_seconds
                        )
                    )
                known.update(fetch_layer_manifests(store, [r for _p, r in mine]))
                todo = [(p, r) for p, r in mine if known[r.layer_id] is None]
                if todo:
                    made = _build_batch(lock, options, todo, staging)
                    built.update(made)
                    known.update(made)
            continue
        if time.monotonic() > deadline:
            raise BuildError(
                f"env {lock.env_id}: waited {options.wait_timeout:.0f}s for another builder's "
                f"layer of {missing[0][1].package}",
                hint=f"check {store.url}/{lease_key(missing[0][1].layer_id)}; delete it if its "
                "builder is gone",
            )
        raw = lease_bytes(store, lease_key(missing[0][1].layer_id))
        info = LeaseInfo.from_bytes(raw) if raw is not None else None
        if info is not None and info.holder != told:
            told = info.holder
            message = (
                f"env {lock.env_id} ({lock.platform}): waiting for {info.describe()}, which is "
                f"building the layers of {len(missing)} of its packages"
            )
            options.progress.note(message)
            if options.notify is not None:
                options.notify(message)
        time.sleep(delay)
        delay = min(delay * 1.5, 10.0, max(options.lease_seconds / 6, 0.05))
        known.update(fetch_layer_manifests(store, [r for _p, r in missing]))
    return built


def _install(
    lock: PlatformLock,
    options: BuildOptions,
    prefix: Path,
    only: Iterable[LockedPackage],
    *,
    quiet: bool = False,
) -> Owners:
    """Install *only* these packages of *lock* into the new *prefix*, rewritten to the
    placeholder and byte-compiled; returns who owns what there. *quiet*: no progress (a
    small install inside a phase already shown)."""
    keep = {p.name for p in only}
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    create_prefix(
        lock,
        prefix,
        options.cache_dir,
        options.store,
        progress=NULL if quiet else options.progress,
        host=options.host,
        bytecode=options.bytecode,
        credentials=options.credentials,
        skip=frozenset(p.name for p in lock.packages if p.name not in keep),
        placeholder=PLACEHOLDER,
    )
    return find_owners(prefix, lock)


@contextlib.contextmanager
def _alone(ref: LayerRef, staging: Path) -> Iterator[Path]:
    """A build prefix of *ref*'s own beside *staging* (its file lock held), removed after."""
    prefix = staging.parent / f"{ref.layer_id}_{'p' * (len(staging.name) - 33)}"
    with file_lock(staging.parent / f"{ref.layer_id}.lock", remove=True):
        try:
            yield prefix
        finally:
            shutil.rmtree(prefix, ignore_errors=True)


def _build_batch(
    lock: PlatformLock,
    options: BuildOptions,
    todo: list[tuple[LockedPackage, LayerRef]],
    staging: Path,
) -> dict[str, Manifest]:
    """Install the packages of *todo* together, pack each one's layer, upload them, then
    their manifests; a package involved in a clobber there is installed again on its own
    first. Returns the stored manifests by layer id."""
    packed: list[tuple[Manifest, Path]] = []
    with tempfile.TemporaryDirectory(dir=_scratch(options), prefix=".layers-") as tmp:
        try:
            owners = _install(lock, options, staging, [p for p, _r in todo])
            total = tree_size(staging)
            label = f"pack {lock.env_id[:12]}"
            with tracked(options.progress, label, total=total) as task:
                for package, ref in todo:
                    key = package_key(package)
                    out = Path(tmp) / f"{ref.layer_id}.tar.zst"
                    if key in owners.involved:
                        with _alone(ref, staging) as prefix:
                            alone = _install(lock, options, prefix, [package], quiet=True)
                            paths = alone.paths.get(key, ())
                            manifest = _pack(options, prefix, paths, out, task.advance)
                    else:
                        paths = owners.paths.get(key, ())
                        manifest = _pack(options, staging, paths, out, task.advance)
                    manifest = dataclasses.replace(
                        manifest,
                        env_id=ref.layer_id,
                        platform=lock.platform,
                        link_scripts=_link_scripts(paths),
                        layer=ref,
                        paths=paths,
                    )
                    packed.append((manifest, out))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        total = sum(manifest.size for manifest, _out in packed)
        with tracked(options.progress, f"upload {lock.env_id[:12]}", total=total) as task:
            for manifest, out in packed:
                options.store.put_file(layer_archive_key(manifest.env_id), out, task.advance)
        for manifest, _out in packed:  # each manifest after every archive: the commit points
            options.store.put(
                layer_manifest_key(manifest.env_id),
                json.dumps(manifest.to_dict(), sort_keys=True).encode(),
            )
    return {manifest.env_id: manifest for manifest, _out in packed}


def _scratch(options: BuildOptions) -> Path:
    options.cache_dir.mkdir(parents=True, exist_ok=True)
    return options.cache_dir


def _link_scripts(paths: Iterable[str]) -> tuple[str, ...]:
    """Packages whose conda link scripts (``bin/.<name>-post-link.sh`` …) are in *paths*."""
    names = set()
    for path in paths:
        directory, _, name = path.rpartition("/")
        if directory != "bin" or not name.startswith("."):
            continue
        for action in ("-pre-link.sh", "-post-link.sh", "-pre-unlink.sh"):
            if name.endswith(action):
                names.add(name[1 : -len(action)])
    return tuple(sorted(names))


def _pack(
    options: BuildOptions,
    prefix: Path,
    members: tuple[str, ...],
    out: Path,
    on_bytes: Callable[[int], None] | None = None,
) -> Manifest:
    """Pack *members* of *prefix* into *out* against the placeholder; a manifest whose ids
    the caller sets."""
    with out.open("wb") as handle:
        result = pack(
            prefix,
            handle,
            level=options.level,
            on_bytes=on_bytes,
            find_prefix=PLACEHOLDER,
            members=members,
        )
    return result.manifest(
        env_id="0" * 32,
        platform="linux-64",
        build_prefix=PLACEHOLDER,
        envmgr_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _store_env_layer(
    lock: PlatformLock,
    options: BuildOptions,
    pairs: list[tuple[LockedPackage, LayerRef]],
    layers: dict[str, Manifest],
    staging: Path,
) -> Manifest:
    """Store the env layer of *lock* and return the env's manifest (not yet stored)."""
    holders: dict[str, list[str]] = {}
    for package, ref in pairs:
        for path in layers[ref.layer_id].paths:
            holders.setdefault(path, []).append(package_key(package))
    shared = {path for path, keys in holders.items() if len(keys) > 1}
    involved = {key for path in shared for key in holders[path]}
    chosen = [p for p, _r in pairs if package_key(p) in involved]
    try:
        owners = _install(lock, options, staging, chosen, quiet=not chosen)
        present = set(owners.unowned) | owners.shared
        for paths in owners.paths.values():
            present.update(paths)
        members = set(owners.unowned) | owners.shared | (shared & present)
        for package in chosen:
            if package.manager == "conda":  # as the install with its neighbours wrote it
                members.update(
                    p
                    for p in owners.paths.get(package_key(package), ())
                    if p.startswith("conda-meta/")
                )
        removes = sorted(
            {
                path
                for package, ref in pairs
                if package in chosen
                for path in layers[ref.layer_id].paths
                if path not in present
            }
        )
        with tempfile.TemporaryDirectory(dir=_scratch(options), prefix=".layers-") as tmp:
            archive = Path(tmp) / "env.tar.zst"
            packed = _pack(options, staging, tuple(sorted(members)), archive)
            options.store.put_file(archive_key(lock.platform, lock.env_id), archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    refs = tuple(ref for _p, ref in pairs)
    scripts = sorted({name for ref in refs for name in layers[ref.layer_id].link_scripts})
    return dataclasses.replace(
        packed,
        env_id=lock.env_id,
        platform=lock.platform,
        layers=refs,
        removes=tuple(removes),
        link_scripts=tuple(scripts),
        package_sizes=tuple(
            (package.name, layers[ref.layer_id].unpacked_size) for package, ref in pairs
        ),
        cuda=manifest_cuda(lock),
    )
