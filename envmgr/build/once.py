"""Build an env from its lock once, pack it, and store it; other builders wait for it.

:func:`~envmgr.build.prefix.create_prefix` installs the lock, for any platform on any host, into a
build prefix that is long (240 characters), so the env can be relocated to any shorter path.

:func:`build_and_store` makes that happen once across machines: a short lease (see
:mod:`envmgr.cache.lease`) taken with a conditional put (``If-None-Match: *``) and renewed while
the build runs names the builder; others poll for the manifest instead of building and take
over a lease whose holder is gone; a failed or interrupted build releases it. The archive is
uploaded first, then the env's conda-lock file, then the manifest, which is the only thing
readers trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from envmgr import __version__
from envmgr.archive.manifest import Manifest
from envmgr.build.options import BuildOptions, Stored
from envmgr.build.placeholder import BUILD_PREFIX_LENGTH
from envmgr.cache import Store, StoreError
from envmgr.cache.layout import archive_key, env_lock_key, lease_key, manifest_key
from envmgr.cache.lease import (
    LeaseInfo,
    LeaseWatch,
    held_lease,
    lease_bytes,
    new_holder,
    try_take,
)
from envmgr.cache.usage import record_use
from envmgr.config import load
from envmgr.cuda import manifest_cuda
from envmgr.errors import BuildError, BuildInterrupted, EnvmgrError
from envmgr.fs import file_lock
from envmgr.ids import EnvId
from envmgr.locks.lock import (
    Lock,
    LockError,
    PlatformLock,
    read_conda_lock,
    write_conda_lock,
)
from envmgr.progress import Progress, tracked
from envmgr.worker.env_cache import pack_dir_prefix, sweep_dead_pack_dirs
from envmgr.worker.hydrate import BuildMissing
from envmgr.worker.layers import fetch_layer_manifests

if TYPE_CHECKING:
    from envmgr.build.prefix import Prefix, conda_records, create_prefix

__all__ = [
    "BUILD_PREFIX_LENGTH",
    "BuildError",
    "BuildInterrupted",
    "BuildOptions",
    "BuildOutcome",
    "Prefix",
    "build_and_store",
    "build_missing",
    "build_prefix",
    "conda_records",
    "create_prefix",
    "offer_lock",
    "read_manifest",
    "read_stored_lock",
]

#: Re-exported from :mod:`envmgr.build.prefix`, imported on first use: installing a prefix
#: pulls in asyncio, py-rattler and the wheel installer, which a resolve never needs.
_FROM_PREFIX = ("Prefix", "conda_records", "create_prefix", "tree_size")


def __getattr__(name: str) -> Any:
    if name in _FROM_PREFIX:
        from envmgr.build import prefix  # noqa: PLC0415

        return getattr(prefix, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildOutcome:
    env_id: str
    platform: str
    status: Literal["built", "present", "waited"]
    manifest: Manifest
    seconds: float
    #: Bytes a host holding nothing of the env downloads: its archive, or (format 3) its env
    #: layer and every package layer it lists.
    size: int = 0
    #: Archive bytes this call put into the store (0 unless built), and (format 3) the
    #: package layers it built of the env's ``len(manifest.layers)``.
    uploaded: int = 0
    layers_built: int = 0


def build_prefix(env_id: str, root: str | None = None) -> Path:
    """``<root>/<env_id>_ppp…``, exactly :data:`BUILD_PREFIX_LENGTH` characters.

    The root is the same on every machine (``ENVMGR_BUILD_ROOT``, default
    ``/tmp/envmgr-builds``): the build prefix is written into the env's files, so a
    machine-independent prefix makes two builds of one lock give the same archive.
    """
    if root is None:
        root = str(load()["build_root"])
    base = f"{root.rstrip('/')}/{env_id}_"
    if not root.startswith("/") or len(base) >= BUILD_PREFIX_LENGTH:
        raise BuildError(
            f"build root {root!r} must be an absolute path shorter than "
            f"{BUILD_PREFIX_LENGTH - 34} characters",
            hint="set ENVMGR_BUILD_ROOT",
        )
    return Path(base + "p" * (BUILD_PREFIX_LENGTH - len(base)))


def read_manifest(store: Store, platform: str, env_id: str) -> Manifest | None:
    """The stored manifest of an env, or ``None``; raises if it is there but unreadable."""
    key = manifest_key(platform, env_id)
    raw = store.get(key)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        raise BuildError(f"{store.url}/{key} is not JSON") from None
    return Manifest.from_dict(data, where=f"{store.url}/{key}")


def read_stored_lock(store: Store, platform: str, env_id: str) -> PlatformLock | None:
    """The lock stored beside an env (``envs/<platform>/<env_id>/conda-lock.yml``), or
    ``None``; raises ``LockError`` if it is unreadable or describes another env."""
    key = env_lock_key(platform, env_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conda-lock.yml"
        if not store.get_file(key, path):
            return None
        try:
            lock = read_conda_lock(path).for_platform(platform)
        except EnvmgrError as exc:  # named by its store key, not the temp file it was read from
            raise LockError(exc.message.replace(str(path), f"{store.url}/{key}")) from None
    if lock.env_id != env_id:
        raise LockError(f"{store.url}/{key} describes env {lock.env_id}, not {env_id}")
    return lock


def offer_lock(store: Store, lock: PlatformLock) -> bool:
    """Store *lock* beside where its env will be, so any worker of its platform can build the
    env (see :mod:`envmgr.worker.hydrate`); ``False`` when it was there already."""
    key = env_lock_key(lock.platform, lock.env_id)
    if store.exists(key):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conda-lock.yml"
        write_conda_lock(
            Lock(platforms=(lock,), spec_id=lock.spec_id, envmgr_version=__version__), path
        )
        store.put_file(key, path)
    return True


def build_missing(options: BuildOptions) -> BuildMissing:
    """What :func:`~envmgr.worker.hydrate.hydrate` calls, on a host with a full envmgr that
    opted in, for an env whose store (``options.store``) has the lock but no archive: build
    it here from that lock with *options*, store it, and return its manifest.

    Raises ``LockError`` (the stored lock is unreadable or of another env) and ``BuildError``
    (the lock vanished, the store refuses writes, the build failed)."""
    store = options.store

    def build(platform: str, env_id: EnvId, progress: Progress | None) -> Manifest:
        lock = read_stored_lock(store, platform, env_id)
        if lock is None:
            raise BuildError(f"env {env_id}: {store.url}/{env_lock_key(platform, env_id)} vanished")
        chosen = options if progress is None else dataclasses.replace(options, progress=progress)
        try:
            return build_and_store(lock, chosen).manifest
        except StoreError as exc:
            raise BuildError(
                f"env {env_id} has no archive for {platform} in {store.url}, so this host must "
                f"build it, but it cannot write to the store: {exc.message}",
                hint="run `envmgr build` where the store is writable, or give this host write "
                "access",
            ) from None

    return build


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def _signals_stop_the_build() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP/SIGINT (what Kubernetes, Batch and Slurm send on preemption)
    into :class:`BuildInterrupted` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise BuildInterrupted(signum)

    wanted = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {signum: signal.signal(signum, stop) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _waiting(lock: PlatformLock, options: BuildOptions, info: LeaseInfo | None) -> str:
    key = lease_key(lock.env_id)
    holder = info.describe() if info is not None else "a builder"
    return (
        f"env {lock.env_id} ({lock.platform}): waiting for {holder}, which is building it; "
        f"if that builder is gone, delete {options.store.url}/{key} or wait for it to expire"
    )


def _wait_for_manifest(
    lock: PlatformLock, options: BuildOptions, watch: LeaseWatch
) -> Manifest | None:
    """Poll (with backoff) until the manifest appears or the lease is free to take (released,
    or stale by *watch*); ``None`` means the caller should try to take it. Says who it waits
    for through ``notify``."""
    deadline = time.monotonic() + options.wait_timeout
    delay = options.poll_seconds
    told = ""
    while time.monotonic() < deadline:
        manifest = read_manifest(options.store, lock.platform, lock.env_id)
        if manifest is not None:
            return manifest
        raw = lease_bytes(options.store, lease_key(lock.env_id))
        info = LeaseInfo.from_bytes(raw) if raw is not None else None
        if raw is None or info is None or watch.stale(raw, info):
            return read_manifest(options.store, lock.platform, lock.env_id)
        if info.holder != told:
            told = info.holder
            message = _waiting(lock, options, info)
            options.progress.note(message)
            if options.notify is not None:
                options.notify(message)
        time.sleep(delay)
        delay = min(delay * 1.5, 10.0, max(options.lease_seconds / 6, 0.05))
    raise BuildError(
        f"env {lock.env_id}: waited {options.wait_timeout:.0f}s for another builder's manifest",
        hint=f"check {options.store.url}/"
        f"{lease_key(lock.env_id)}; delete it if its builder is gone",
    )


def build_and_store(lock: PlatformLock, options: BuildOptions) -> BuildOutcome:
    """Make sure the store has the packed env of *lock*, building it here only if no one else
    has or is. Raises ``BuildError`` (or a store error), or ``BuildInterrupted`` when a signal
    stops it (the lease released, temp files removed)."""
    start = time.monotonic()
    store = options.store
    holder = options.holder or new_holder()

    def done(
        status: Literal["built", "present", "waited"], made: Stored | Manifest
    ) -> BuildOutcome:
        if isinstance(made, Manifest):
            if status == "present":
                record_use(store, lock.platform, lock.env_id)  # asked for again: keep it in gc
            made = Stored(manifest=made, layer_bytes=_layer_bytes(store, made))
        return BuildOutcome(
            env_id=lock.env_id,
            platform=lock.platform,
            status=status,
            manifest=made.manifest,
            seconds=time.monotonic() - start,
            size=made.manifest.size + made.layer_bytes,
            uploaded=made.uploaded,
            layers_built=made.built,
        )

    watch = LeaseWatch(options.lease_seconds)
    with _signals_stop_the_build():
        while True:
            manifest = read_manifest(store, lock.platform, lock.env_id)
            if manifest is not None:
                return done("present", manifest)
            if try_take(
                store, lock.env_id, holder=holder, seconds=options.lease_seconds, watch=watch
            ):
                break
            manifest = _wait_for_manifest(lock, options, watch)
            if manifest is not None:
                return done("waited", manifest)
        with held_lease(store, lock.env_id, holder=holder, seconds=options.lease_seconds):
            manifest = read_manifest(store, lock.platform, lock.env_id)  # built while we raced
            if manifest is not None:
                return done("present", manifest)
            return done("built", _build(lock, options))


def _layer_bytes(store: Store, manifest: Manifest) -> int:
    """Bytes of the package layers *manifest* lists (0 for one archive), from their
    manifests in the store."""
    if not manifest.layers:
        return 0
    found = fetch_layer_manifests(store, manifest.layers).values()
    return sum(layer.size for layer in found if layer is not None)


def _build(lock: PlatformLock, options: BuildOptions) -> Stored:
    prefix = build_prefix(lock.env_id)
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(
            f"cannot create the build root {prefix.parent}: {exc.strerror}",
            hint="set ENVMGR_BUILD_ROOT to a writable absolute path",
        ) from None
    # Two builders of one env on one host (different stores) share the prefix path: take
    # turns. The kernel drops the lock if the holder dies.
    with file_lock(prefix.parent / f"{lock.env_id}.lock", remove=True):
        return _build_in(lock, options, prefix)


def _build_in(lock: PlatformLock, options: BuildOptions, prefix: Path) -> Stored:
    if prefix.exists():
        shutil.rmtree(prefix)
    if options.layers and options.codec == "zst":
        from envmgr.build.layers import build_layers  # noqa: PLC0415 - builds only

        stored = build_layers(lock, options, prefix)
        _store_lock_and_manifest(lock, options, stored.manifest)
        return stored
    try:
        from envmgr.archive.pack import pack  # noqa: PLC0415 - builds only
        from envmgr.build.prefix import create_prefix, tree_size  # noqa: PLC0415

        made = create_prefix(
            lock,
            prefix,
            options.cache_dir,
            options.store,
            progress=options.progress,
            host=options.host,
            bytecode=options.bytecode,
            credentials=options.credentials,
        )
        options.cache_dir.mkdir(parents=True, exist_ok=True)
        sweep_dead_pack_dirs(options.cache_dir)  # of builders killed before they cleaned up
        with tempfile.TemporaryDirectory(dir=options.cache_dir, prefix=pack_dir_prefix()) as tmp:
            archive = Path(tmp) / f"env.tar.{options.codec}"
            label = f"pack {lock.env_id[:12]}"
            with (
                tracked(options.progress, label, total=tree_size(prefix)) as task,
                archive.open("wb") as out,
            ):
                result = pack(
                    prefix,
                    out,
                    codec=options.codec,
                    level=options.level,
                    on_bytes=task.advance,
                    find_prefix=str(prefix),
                )
            manifest = result.manifest(
                env_id=lock.env_id,
                platform=lock.platform,
                build_prefix=str(prefix),
                envmgr_version=__version__,
                created=_now(),
                link_scripts=made.link_scripts,
                package_sizes=made.sizes,
                cuda=manifest_cuda(lock),
            )
            label = f"upload {lock.env_id[:12]}"
            with tracked(options.progress, label, total=result.size) as task:
                options.store.put_file(
                    archive_key(lock.platform, lock.env_id, options.codec), archive, task.advance
                )
        _store_lock_and_manifest(lock, options, manifest)
        return Stored(manifest=manifest, uploaded=manifest.size)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def _store_lock_and_manifest(lock: PlatformLock, options: BuildOptions, manifest: Manifest) -> None:
    """The env's conda-lock file, then its manifest: the commit point readers trust."""
    with tempfile.TemporaryDirectory(dir=options.cache_dir, prefix=".lock-") as tmp:
        lock_file = Path(tmp) / "conda-lock.yml"
        write_conda_lock(
            Lock(
                platforms=(lock,),
                spec_id=lock.spec_id,
                envmgr_version=__version__,
                created=manifest.created,
            ),
            lock_file,
        )
        options.store.put_file(env_lock_key(lock.platform, lock.env_id), lock_file)
    options.store.put(
        manifest_key(lock.platform, lock.env_id),
        json.dumps(manifest.to_dict(), sort_keys=True).encode(),
    )
