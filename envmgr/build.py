"""Build an env from its lock once, pack it, and store it; other builders wait for it.

:func:`create_prefix` installs a :class:`~envmgr.lock.PlatformLock` of *any* supported platform
into a prefix, on any host, and executes nothing from the target: conda packages with
py-rattler's installer for the lock's platform (shared package cache, hardlinks where it can,
link scripts never run: the packages that ship one are named in the manifest), then the PyPI
wheels (downloaded once into a cache by sha256, hashes checked) with PyPA's ``installer`` into
the target's scheme, scripts pointing at the env's python, and last the checked-hash bytecode
of the target's Python, written by an interpreter of that version that runs on the host (see
:mod:`envmgr.bytecode`). A native build is the same path with target = host. The build prefix
is long (240 characters) so the env can be relocated to any shorter path.

:func:`build_and_store` makes that happen once across machines: a lease object taken with a
conditional put (``If-None-Match: *``) names the builder and an expiry; others poll for the
manifest instead of building, take over an expired lease, and a failed build releases its
lease. The archive is uploaded first, then the env's conda-lock file, then the manifest, which
is the only thing readers trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from envmgr import __version__
from envmgr.archive import Codec, Manifest, pack, scan_relocations
from envmgr.bytecode import BytecodeSource, bytecode_python, compile_tree, python_xy
from envmgr.cache import Store
from envmgr.cache.layout import archive_key, env_lock_key, lease_key, manifest_key
from envmgr.cache.lease import (
    LEASE_SECONDS,
    LeaseInfo,
    held_lease,
    new_holder,
    read_lease,
    try_take,
)
from envmgr.errors import EnvmgrError
from envmgr.hydrate import file_lock
from envmgr.local_envs import pack_dir_prefix, sweep_dead_pack_dirs
from envmgr.lock import (
    Lock,
    LockedPackage,
    LockError,
    PlatformLock,
    read_conda_lock,
    strip_credentials,
    write_conda_lock,
)
from envmgr.platforms import Platform, host_platform
from envmgr.progress import NULL, Progress, Task

__all__ = [
    "BUILD_PREFIX_LENGTH",
    "BuildError",
    "BuildInterrupted",
    "BuildOptions",
    "BuildOutcome",
    "Prefix",
    "build_and_store",
    "build_prefix",
    "conda_records",
    "create_prefix",
    "offer_lock",
    "read_manifest",
    "read_stored_lock",
]

#: Length of every build prefix; envs relocate to any path up to this long.
BUILD_PREFIX_LENGTH = 240
_SITE = "lib/python{xy}/site-packages"
_NOARCH: dict[str, Literal["python", "generic"]] = {"python": "python", "generic": "generic"}


class BuildError(EnvmgrError):
    """An env could not be built, packed or stored; names the env and what failed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildOptions:
    """How to build: where, with which codec, and how long to wait for other builders."""

    store: Store
    cache_dir: Path
    codec: Codec = "zst"
    level: int = 3
    #: The build-once lease's period (renewed by a heartbeat): the longest a killed
    #: builder can hold others up.
    lease_seconds: float = LEASE_SECONDS
    wait_timeout: float = 3600.0
    poll_seconds: float = 0.5
    holder: str = ""
    #: Called with what a person must see even off a terminal (whom a build waits for).
    notify: Callable[[str], None] | None = None
    progress: Progress = NULL
    #: The build host's platform (a value, so tests can build "as if" on another host);
    #: ``None``: this machine's.
    host: Platform | None = None
    #: Which interpreter writes the target's bytecode (see :mod:`envmgr.bytecode`).
    bytecode: BytecodeSource = "auto"


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildOutcome:
    env_id: str
    platform: str
    status: Literal["built", "present", "waited"]
    manifest: Manifest
    seconds: float


def build_prefix(env_id: str, root: str | None = None) -> Path:
    """``<root>/<env_id>_ppp…``, exactly :data:`BUILD_PREFIX_LENGTH` characters.

    The root is the same on every machine (``ENVMGR_BUILD_ROOT``, default
    ``/tmp/envmgr-builds``): the build prefix is written into the env's files, so a
    machine-independent prefix makes two builds of one lock give the same archive.
    """
    if root is None:
        from envmgr.config import load  # noqa: PLC0415

        root = str(load()["build_root"])
    base = f"{root.rstrip('/')}/{env_id}_"
    if not root.startswith("/") or len(base) >= BUILD_PREFIX_LENGTH:
        raise BuildError(
            f"build root {root!r} must be an absolute path shorter than "
            f"{BUILD_PREFIX_LENGTH - 34} characters",
            hint="set ENVMGR_BUILD_ROOT",
        )
    return Path(base + "p" * (BUILD_PREFIX_LENGTH - len(base)))


def conda_records(lock: PlatformLock) -> list[Any]:
    import rattler  # noqa: PLC0415

    records = []
    for pkg in lock.packages:
        if pkg.manager != "conda":
            continue
        build_number = pkg.build.rsplit("_", 1)[-1]
        record = rattler.PackageRecord(
            name=pkg.name,
            version=pkg.version,
            build=rattler.BuildString(pkg.build),
            build_number=int(build_number) if build_number.isdigit() else 0,
            subdir=pkg.subdir,
            noarch=_NOARCH.get(pkg.noarch),
            depends=list(pkg.depends),
            sha256=bytes.fromhex(pkg.sha256),
            md5=bytes.fromhex(pkg.md5) if pkg.md5 else None,
            size=pkg.size or None,
        )
        channel = pkg.url.rsplit("/", 2)[0] + "/"
        records.append(rattler.RepoDataRecord(record, pkg.url.rsplit("/", 1)[-1], pkg.url, channel))
    return records


def _fetch_wheel(url: str, sha256: str, cache: Path) -> Path:
    """The wheel at *url*, from the wheel cache or downloaded and checked against *sha256*."""
    import hashlib  # noqa: PLC0415
    from urllib.parse import unquote, urlsplit  # noqa: PLC0415

    import requests  # noqa: PLC0415

    # installer needs the real file name (it carries the wheel's tags).
    target = cache / sha256 / unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".dl-")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            if url.startswith("file://"):
                with Path(unquote(urlsplit(url).path)).open("rb") as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            else:
                with requests.get(url, stream=True, timeout=60) as answer:
                    if answer.status_code != 200:
                        raise BuildError(
                            f"download {strip_credentials(url)}: HTTP {answer.status_code}"
                        )
                    for chunk in answer.iter_content(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise BuildError(
                f"{strip_credentials(url)} does not match its locked sha256",
                hint="the index serves a different file than when it was locked",
            )
        Path(tmp).replace(target)
    except requests.RequestException as exc:
        raise BuildError(f"download {strip_credentials(url)}: {type(exc).__name__}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _built_wheel(package: LockedPackage, store: Store | None, cache_dir: Path) -> Path:
    """The wheel built from a locked sdist: from the store's ``wheels/``, else built here."""
    from envmgr.resolvers.pypi.index import DistFile  # noqa: PLC0415
    from envmgr.resolvers.pypi.sdist import SdistBuilder, stored_wheel  # noqa: PLC0415

    if store is None:
        raise BuildError(
            f"{package.name} {package.version} is locked as a source "
            "distribution; building it needs the store its wheel is kept in"
        )
    local = cache_dir / "pypi" / "built" / package.sha256
    local.mkdir(parents=True, exist_ok=True)
    found = stored_wheel(store, package.sha256, local)
    if found is not None:
        return found
    filename = package.url.split("#")[0].rsplit("/", 1)[-1]
    dist = DistFile(
        project=package.name,
        version=package.version,
        filename=filename,
        url=package.url,
        sha256=package.sha256,
        requires_python=None,
        yanked=None,
        metadata_sha256=None,
    )
    builder = SdistBuilder(store=store, cache_dir=cache_dir / "pypi", index_urls=())
    return builder.wheel_for(dist)


def _install_wheels(
    lock: PlatformLock,
    prefix: Path,
    cache_dir: Path,
    store: Store | None,
    task: Task,
    host: Platform,
) -> None:
    from installer import install  # noqa: PLC0415
    from installer.destinations import SchemeDictionaryDestination  # noqa: PLC0415
    from installer.sources import WheelFile  # noqa: PLC0415

    wheels = [p for p in lock.packages if p.manager == "pypi"]
    if not wheels:
        return
    xy = python_xy(lock)
    if xy is None:
        raise BuildError(f"env {lock.env_id}: PyPI packages need a conda python in the lock")
    site = prefix / _SITE.format(xy=xy)
    scheme = {
        "purelib": str(site),
        "platlib": str(site),
        "scripts": str(prefix / "bin"),
        "data": str(prefix),
        "headers": str(prefix / "include" / f"python{xy}"),
    }
    destination = SchemeDictionaryDestination(
        scheme,
        interpreter=str(prefix / "bin" / f"python{xy}"),
        script_kind="posix",
        # The whole tree is byte-compiled for the target afterwards (compile_tree).
        bytecode_optimization_levels=(),
    )
    for wheel in wheels:
        if wheel.url.split("#")[0].endswith(".whl"):
            path = _fetch_wheel(wheel.url, wheel.sha256, cache_dir / "wheels")
        else:
            path = _built_wheel(wheel, store, cache_dir)
            if host != lock.platform and not path.name.endswith("-none-any.whl"):
                raise BuildError(
                    f"env {lock.env_id}: {wheel.name} {wheel.version} is locked as a source "
                    f"distribution whose wheel ({path.name}) is native: it must be compiled "
                    f"on a {lock.platform} machine",
                    hint=f"pin a version of {wheel.name} that has a {lock.platform} wheel, "
                    f"or run `envmgr build --platform {lock.platform}` on such a machine",
                )
        try:
            with WheelFile.open(path) as source:
                install(source, destination, additional_metadata={"INSTALLER": b"envmgr\n"})
            task.advance()
        except Exception as exc:
            raise BuildError(
                f"env {lock.env_id}: installing {wheel.name} {wheel.version} failed: {exc}"
            ) from None


def _install_reporter(task: Task) -> Any:
    """py-rattler's installer callbacks, counted as installed packages."""
    import rattler  # noqa: PLC0415

    class Reporter(rattler.InstallerReporter):
        def on_transaction_operation_complete(self, operation: int) -> None:
            task.advance()

    # The protocol's other callbacks are no-ops; mypy reads their bodies as abstract.
    return Reporter()  # type: ignore[abstract]


def _tree_size(prefix: Path) -> int:
    """Bytes in the regular files under *prefix* (what :func:`pack` reports)."""
    total = 0
    for root, _dirs, files in os.walk(prefix):
        for name in files:
            info = os.lstat(os.path.join(root, name))  # noqa: PTH118 - hot loop
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _normalise_metadata(prefix: Path) -> None:
    """Drop machine-specific paths (the package cache) from conda-meta, for a reproducible
    archive; ``conda``/``rattler`` do not need them to read the env."""
    meta = prefix / "conda-meta"
    for path in sorted(meta.glob("*.json")):
        data = json.loads(path.read_text())
        for key in ("extracted_package_dir", "package_tarball_full_path"):
            data.pop(key, None)
        link = data.get("link")
        if isinstance(link, dict) and "source" in link:
            # Where the package cache was on the build machine; conda-pack needs the key.
            link["source"] = f"pkgs/{Path(str(link['source'])).name}"
            # How files reached the build prefix (hardlink, copy, clone) depends on the
            # build host's file systems; an unpacked archive holds copies.
            link["type"] = 3
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True, kw_only=True, slots=True)
class Prefix:
    """What :func:`create_prefix` made: the packages whose link scripts were not run, and
    how many ``.pyc`` files the target's Python finds."""

    link_scripts: tuple[str, ...]
    bytecode_files: int


def _link_scripts(prefix: Path) -> tuple[str, ...]:
    """Packages that ship conda link scripts (``bin/.<name>-post-link.sh`` and friends)."""
    names = set()
    for path in (prefix / "bin").glob(".*-*.sh"):
        for action in ("-pre-link.sh", "-post-link.sh", "-pre-unlink.sh"):
            if path.name.endswith(action):
                names.add(path.name[1 : -len(action)])
    return tuple(sorted(names))


def create_prefix(
    lock: PlatformLock,
    prefix: Path,
    cache_dir: Path,
    store: Store | None = None,
    *,
    progress: Progress = NULL,
    host: Platform | None = None,
    bytecode: BytecodeSource = "auto",
) -> Prefix:
    """Install *lock* (any supported platform) into the new *prefix* as built on *host*
    (default: this machine), running nothing from the target; *progress* counts installed
    packages. Raises ``BuildError`` (or ``BytecodeError``)."""
    import rattler  # noqa: PLC0415

    host = host or host_platform()
    # Checked-hash .pyc files do not depend on file times: the archive stays reproducible
    # and the unpacked env's bytecode stays valid.
    os.environ.setdefault("SOURCE_DATE_EPOCH", "946684800")
    task = progress.task(f"install {lock.env_id[:12]}", total=len(lock.packages), unit="items")
    try:
        asyncio.run(
            rattler.install(
                conda_records(lock),
                target_prefix=prefix,
                cache_dir=cache_dir / "pkgs",
                platform=rattler.Subdir(lock.platform),
                execute_link_scripts=False,
                show_progress=False,
                reporter=_install_reporter(task),
            )
        )
    except Exception as exc:
        text = " ".join(str(exc).split())[:500]
        raise BuildError(
            f"env {lock.env_id}: installing conda packages failed: {strip_credentials(text)}"
        ) from None
    _install_wheels(lock, prefix, cache_dir, store, task, host)
    task.close()
    _normalise_metadata(prefix)
    link_scripts = _link_scripts(prefix)
    if link_scripts:
        progress.note(f"env {lock.env_id}: link scripts of {', '.join(link_scripts)} were not run")
    pyc = 0
    python = bytecode_python(lock, host=host, cache_dir=cache_dir, source=bytecode)
    xy = python_xy(lock)
    if python is not None and xy is not None:
        task = progress.task(f"bytecode {lock.env_id[:12]}", total=None, unit="items")
        pyc = compile_tree(python, [prefix / "lib" / f"python{xy}"], env_id=lock.env_id)
        task.close()
    return Prefix(link_scripts=link_scripts, bytecode_files=pyc)


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
        lock = read_conda_lock(path).for_platform(platform)
    if lock.env_id != env_id:
        raise LockError(f"{store.url}/{key} describes env {lock.env_id}, not {env_id}")
    return lock


def offer_lock(store: Store, lock: PlatformLock) -> bool:
    """Store *lock* beside where its env will be, so any worker of its platform can build the
    env (see :mod:`envmgr.hydrate`); ``False`` when it was there already."""
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class BuildInterrupted(BaseException):
    """SIGTERM, SIGHUP or SIGINT arrived during a build: the lease is released and the
    build's temp files removed on the way out; the CLI exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


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


def _wait_for_manifest(lock: PlatformLock, options: BuildOptions) -> Manifest | None:
    """Poll (with backoff) until the manifest appears or the lease is free to take; ``None``
    means the caller should try to take it. Says who it waits for through ``notify``."""
    deadline = time.monotonic() + options.wait_timeout
    delay = options.poll_seconds
    told = ""
    while time.monotonic() < deadline:
        manifest = read_manifest(options.store, lock.platform, lock.env_id)
        if manifest is not None:
            return manifest
        info = read_lease(options.store, lock.env_id)
        if info is None or info.expires <= time.time() or info.dead_here():
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

    def done(status: Literal["built", "present", "waited"], manifest: Manifest) -> BuildOutcome:
        return BuildOutcome(
            env_id=lock.env_id,
            platform=lock.platform,
            status=status,
            manifest=manifest,
            seconds=time.monotonic() - start,
        )

    with _signals_stop_the_build():
        while True:
            manifest = read_manifest(store, lock.platform, lock.env_id)
            if manifest is not None:
                return done("present", manifest)
            if try_take(store, lock.env_id, holder=holder, seconds=options.lease_seconds):
                break
            manifest = _wait_for_manifest(lock, options)
            if manifest is not None:
                return done("waited", manifest)
        with held_lease(store, lock.env_id, holder=holder, seconds=options.lease_seconds):
            manifest = read_manifest(store, lock.platform, lock.env_id)  # built while we raced
            if manifest is not None:
                return done("present", manifest)
            return done("built", _build(lock, options))


def _build(lock: PlatformLock, options: BuildOptions) -> Manifest:
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
    with file_lock(prefix.parent / f"{lock.env_id}.lock"):
        return _build_in(lock, options, prefix)


def _build_in(lock: PlatformLock, options: BuildOptions, prefix: Path) -> Manifest:
    if prefix.exists():
        shutil.rmtree(prefix)
    try:
        made = create_prefix(
            lock,
            prefix,
            options.cache_dir,
            options.store,
            progress=options.progress,
            host=options.host,
            bytecode=options.bytecode,
        )
        relocations = scan_relocations(prefix)
        options.cache_dir.mkdir(parents=True, exist_ok=True)
        sweep_dead_pack_dirs(options.cache_dir)  # of builders killed before they cleaned up
        with tempfile.TemporaryDirectory(dir=options.cache_dir, prefix=pack_dir_prefix()) as tmp:
            archive = Path(tmp) / f"env.tar.{options.codec}"
            task = options.progress.task(f"pack {lock.env_id[:12]}", total=_tree_size(prefix))
            with archive.open("wb") as out:
                result = pack(
                    prefix, out, codec=options.codec, level=options.level, on_bytes=task.advance
                )
            task.close()
            manifest = Manifest(
                env_id=lock.env_id,
                platform=lock.platform,
                build_prefix=str(prefix),
                codec=options.codec,
                size=result.size,
                sha256=result.sha256,
                files=result.files,
                unpacked_size=result.unpacked_size,
                relocations=relocations,
                envmgr_version=__version__,
                created=_now(),
                link_scripts=made.link_scripts,
            )
            task = options.progress.task(f"upload {lock.env_id[:12]}", total=result.size)
            options.store.put_file(
                archive_key(lock.platform, lock.env_id, options.codec), archive, task.advance
            )
            task.close()
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
            # The manifest goes last: it is the commit point readers trust.
            options.store.put(
                manifest_key(lock.platform, lock.env_id),
                json.dumps(manifest.to_dict(), sort_keys=True).encode(),
            )
        return manifest
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
