"""Install a lock into a prefix, for any target platform, on any host, running nothing of it.

:func:`create_prefix` installs a :class:`~envmgr.lock.PlatformLock` of *any* supported platform:
conda packages with py-rattler's installer for the lock's platform (shared package cache,
hardlinks where it can, link scripts never run: the packages that ship one are named), then the
PyPI wheels (downloaded once into a cache by sha256, hashes checked) with PyPA's ``installer``
into the target's scheme, scripts pointing at the env's python, and last the checked-hash
bytecode of the target's Python, written by an interpreter of that version that runs on the
host (see :mod:`envmgr.bytecode`). A native build is the same path with target = host.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from envmgr.auth import Credentials, rattler_client
from envmgr.bytecode import BytecodeSource, bytecode_python, compile_tree, python_xy
from envmgr.cache import Store
from envmgr.errors import EnvmgrError
from envmgr.lock import LockedPackage, PlatformLock, strip_credentials
from envmgr.platforms import Platform, host_platform
from envmgr.progress import NULL, Progress, Task, tracked

__all__ = [
    "BuildError",
    "Prefix",
    "conda_records",
    "create_prefix",
    "installed_sizes",
    "tree_size",
]

_SITE = "lib/python{xy}/site-packages"
_NOARCH: dict[str, Literal["python", "generic"]] = {"python": "python", "generic": "generic"}


class BuildError(EnvmgrError):
    """An env could not be built, packed or stored; names the env and what failed."""


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
    """The wheel built from a locked sdist: from the store's ``wheels/``, else built here with
    the build dependencies from the indexes it was locked with (else pip's own)."""
    import json  # noqa: PLC0415

    from envmgr.resolvers.pypi.index import DistFile, IndexClient, pip_index_urls  # noqa: PLC0415
    from envmgr.resolvers.pypi.sdist import Sdists, stored_wheel  # noqa: PLC0415

    if store is None:
        raise BuildError(
            f"{package.name} {package.version} is locked as a source "
            "distribution; building it needs the store its wheel is kept in"
        )
    local = cache_dir / "pypi" / "sdist" / "built" / package.sha256
    local.mkdir(parents=True, exist_ok=True)
    found = stored_wheel(store, package.sha256, local)
    if found is not None:
        return found
    record = store.get(f"wheels/{package.sha256}/build.json")
    try:
        indexes = tuple(json.loads(record)["index_urls"]) if record else ()
    except (ValueError, KeyError, TypeError):
        indexes = ()
    if not indexes:
        index, extra = pip_index_urls()
        indexes = (index, *(u for u in extra if not u.startswith("file:")))
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
    client = IndexClient(indexes, cache_dir / "pypi")
    builder = Sdists(store=store, cache_dir=cache_dir / "pypi", client=client, index_urls=indexes)
    return builder.wheel_for(dist)


def _install_wheels(
    lock: PlatformLock,
    prefix: Path,
    cache_dir: Path,
    store: Store | None,
    task: Task,
    host: Platform,
) -> None:
    """Every locked wheel into *prefix*: fetched (or built) here, then installed by one
    worker process per core, the largest wheels first, when there is enough to share."""
    from envmgr.resolvers.pypi.sdist import host_python_xy, wheel_is_pure  # noqa: PLC0415

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
    jobs: list[tuple[str, str, str]] = []
    for wheel in wheels:
        if wheel.url.split("#")[0].endswith(".whl"):
            path = _fetch_wheel(wheel.url, wheel.sha256, cache_dir / "wheels")
        else:
            path = _built_wheel(wheel, store, cache_dir)
            foreign = host != lock.platform or xy != host_python_xy()
            if foreign and not wheel_is_pure(path):
                raise BuildError(
                    f"env {lock.env_id}: {wheel.name} {wheel.version} is locked as a source "
                    f"distribution whose wheel ({path.name}) is native: it must be compiled "
                    f"on a {lock.platform} machine",
                    hint=f"pin a version of {wheel.name} that has a {lock.platform} wheel, "
                    f"or run `envmgr build --platform {lock.platform}` on such a machine",
                )
        jobs.append((str(path), wheel.name, wheel.version))
    job = _WheelJob(
        env_id=lock.env_id,
        scheme=scheme,
        interpreter=str(prefix / "bin" / f"python{xy}"),
        wheels=tuple(jobs),
    )
    groups = _share(job, _install_workers(jobs))
    if len(groups) == 1:
        install_wheel_job(job)
    else:
        _install_in_workers(groups)
    task.advance(len(jobs))


@dataclass(frozen=True, kw_only=True, slots=True)
class _WheelJob:
    """Wheels for one installer: what :func:`install_wheel_job` takes, in a process or here."""

    env_id: str
    scheme: dict[str, str]
    interpreter: str
    wheels: tuple[tuple[str, str, str], ...]  # (file, name, version)

    def to_json(self) -> str:
        return json.dumps(
            {
                "env_id": self.env_id,
                "scheme": self.scheme,
                "interpreter": self.interpreter,
                "wheels": self.wheels,
            }
        )


#: Below this many bytes of wheels, starting worker processes costs more than it saves.
_SHARE_BYTES = 16 << 20


def _install_workers(jobs: list[tuple[str, str, str]]) -> int:
    total = sum(os.path.getsize(path) for path, _n, _v in jobs)  # noqa: PTH202
    if len(jobs) < 2 or total < _SHARE_BYTES:
        return 1
    from envmgr.chunked import workers  # noqa: PLC0415

    return min(workers(), len(jobs))


def _share(job: _WheelJob, count: int) -> list[_WheelJob]:
    """*job* split into *count* jobs of about equal bytes, the largest wheels placed first."""
    if count <= 1:
        return [job]
    bins: list[list[tuple[str, str, str]]] = [[] for _ in range(count)]
    sizes = [0] * count
    by_size = sorted(job.wheels, key=lambda w: os.path.getsize(w[0]), reverse=True)  # noqa: PTH202
    for wheel in by_size:
        smallest = sizes.index(min(sizes))
        bins[smallest].append(wheel)
        sizes[smallest] += os.path.getsize(wheel[0])  # noqa: PTH202
    return [
        _WheelJob(
            env_id=job.env_id, scheme=job.scheme, interpreter=job.interpreter, wheels=tuple(b)
        )
        for b in bins
        if b
    ]


_WORKER = """
from envmgr.errors import EnvmgrError
from envmgr.install import _WheelJob, install_wheel_job
import json
with open(sys.argv[2], encoding="utf-8") as handle:
    data = json.load(handle)
data["wheels"] = tuple(tuple(w) for w in data["wheels"])
try:
    install_wheel_job(_WheelJob(**data))
except EnvmgrError as exc:
    print(exc.message, file=sys.stderr)
    sys.exit(1)
print("installed", len(data["wheels"]))
"""


def _install_in_workers(jobs: list[_WheelJob]) -> None:
    """Each job in its own process of this interpreter (installer is pure Python: threads
    would share one core); an interrupted build kills them."""
    import sys  # noqa: PLC0415

    from envmgr.processes import run_shares  # noqa: PLC0415

    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    results = run_shares([sys.executable], _WORKER, [job.to_json() for job in jobs], environ)
    for job, (code, out, err) in zip(jobs, results, strict=True):
        if code != 0 or not out.startswith("installed "):
            reason = (err.strip().splitlines() or [f"exit code {code}"])[-1]
            if code == 1 and reason.startswith(f"env {job.env_id}:"):
                raise BuildError(reason)
            raise BuildError(f"env {job.env_id}: a wheel installer process failed: {reason}")


def install_wheel_job(job: _WheelJob) -> None:
    """Install *job*'s wheels as pip would (see :func:`_pip_like`); raises ``BuildError``
    naming the wheel that failed."""
    from installer import install  # noqa: PLC0415
    from installer.destinations import SchemeDictionaryDestination  # noqa: PLC0415
    from installer.sources import WheelFile  # noqa: PLC0415

    destination = SchemeDictionaryDestination(
        job.scheme,
        interpreter=job.interpreter,
        script_kind="posix",
        # The whole tree is byte-compiled for the target afterwards (compile_tree).
        bytecode_optimization_levels=(),
    )
    for path, name, version in job.wheels:
        try:
            with WheelFile.open(Path(path)) as source:
                install(
                    _pip_like(source),
                    destination,
                    additional_metadata={"INSTALLER": b"envmgr\n"},
                )
        except Exception as exc:
            raise BuildError(
                f"env {job.env_id}: installing {name} {version} failed: {exc}"
            ) from None


def _pip_like(source: Any) -> Any:
    """*source* (an installer ``WheelFile``) as pip installs it: a ``.data/scripts`` file
    named like one of the wheel's entry points is left out (the entry point wins, as with
    pip; installer would fail with "File already exists"), the other scripts are made
    executable, as pip does, and ``__pycache__`` members are left out quietly (the build
    writes the target's own bytecode)."""
    from installer.utils import parse_entrypoints  # noqa: PLC0415

    names: set[str] = set()
    if "entry_points.txt" in source.dist_info_filenames:
        text = source.read_dist_info("entry_points.txt")
        names = {name for name, _module, _attr, _section in parse_entrypoints(text)}
    original = source.get_contents
    data_scripts = f"{source.data_dir}/scripts/"

    def get_contents() -> Any:
        for element in original():
            path = element[0][0]
            if "__pycache__" in path.split("/")[:-1]:
                continue
            if path.startswith(data_scripts):
                if path[len(data_scripts) :] in names:
                    continue
                element = (element[0], element[1], True)  # pip makes every script executable
            yield element

    source.get_contents = get_contents
    return source


def _install_reporter(task: Task) -> Any:
    """py-rattler's installer callbacks, counted as installed packages."""
    import rattler  # noqa: PLC0415

    class Reporter(rattler.InstallerReporter):
        def on_transaction_operation_complete(self, operation: int) -> None:
            task.advance()

    # The protocol's other callbacks are no-ops; mypy reads their bodies as abstract.
    return Reporter()  # type: ignore[abstract]


def tree_size(prefix: Path) -> int:
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
    #: Each package's installed bytes (its files in conda-meta, or its wheel's RECORD).
    sizes: tuple[tuple[str, int], ...] = ()


def installed_sizes(prefix: Path) -> dict[str, int]:
    """The bytes each package put into *prefix*: the files its ``conda-meta`` record lists
    (conda) or its ``.dist-info/RECORD`` (wheels), as they are on disk."""

    def on_disk(paths: Iterable[str]) -> int:
        total = 0
        for rel in paths:
            with contextlib.suppress(OSError):
                total += (prefix / rel).lstat().st_size
        return total

    sizes: dict[str, int] = {}
    for record in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            data = json.loads(record.read_text())
            sizes[str(data["name"])] = on_disk(str(f) for f in data.get("files", ()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for dist_info in sorted(prefix.glob("lib/python*/site-packages/*.dist-info")):
        if not (dist_info / "INSTALLER").is_file() or "envmgr" not in (
            dist_info / "INSTALLER"
        ).read_text(errors="replace"):
            continue  # a conda package's own metadata: counted above
        site = dist_info.parent
        try:
            with (dist_info / "RECORD").open(newline="") as rows:
                files = [row[0] for row in csv.reader(rows) if row]
        except OSError:
            continue
        name = dist_info.name.removesuffix(".dist-info").rsplit("-", 1)[0]
        sizes[name.replace("_", "-").lower()] = on_disk(
            os.path.relpath(os.path.normpath(site / f), prefix) for f in files
        )
    return sizes


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
    credentials: Credentials | None = None,
) -> Prefix:
    """Install *lock* (any supported platform) into the new *prefix* as built on *host*
    (default: this machine), running nothing from the target; *progress* counts installed
    packages; *credentials* authenticate package downloads (see :mod:`envmgr.auth`). Raises
    ``BuildError`` (or ``BytecodeError``)."""
    import rattler  # noqa: PLC0415

    host = host or host_platform()
    # Checked-hash .pyc files do not depend on file times: the archive stays reproducible
    # and the unpacked env's bytecode stays valid.
    os.environ.setdefault("SOURCE_DATE_EPOCH", "946684800")
    label = f"install {lock.env_id[:12]}"
    with tracked(progress, label, total=len(lock.packages), unit="items") as task:
        try:
            asyncio.run(
                rattler.install(
                    conda_records(lock),
                    target_prefix=prefix,
                    cache_dir=cache_dir / "pkgs",
                    platform=rattler.Subdir(lock.platform),
                    execute_link_scripts=False,
                    client=rattler_client(credentials or {}),
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
    _normalise_metadata(prefix)
    link_scripts = _link_scripts(prefix)
    if link_scripts:
        progress.note(f"env {lock.env_id}: link scripts of {', '.join(link_scripts)} were not run")
    pyc = 0
    python = bytecode_python(lock, host=host, cache_dir=cache_dir, source=bytecode)
    xy = python_xy(lock)
    if python is not None and xy is not None:
        with tracked(progress, f"bytecode {lock.env_id[:12]}", unit="phase"):
            pyc = compile_tree(python, [prefix / "lib" / f"python{xy}"], env_id=lock.env_id)
    sizes = tuple(sorted(installed_sizes(prefix).items()))
    return Prefix(link_scripts=link_scripts, bytecode_files=pyc, sizes=sizes)
