"""PyPI wheels into a prefix: fetched once by sha256, sdists' wheels built once, installed as
pip would, in worker processes of this interpreter when there is enough to share.

:func:`install_wheels` is the PyPI half of :func:`envmgr.build.prefix.create_prefix`: wheels
come from their URL (hash checked) or, for a locked sdist, from the store's
``wheels/<sdist sha256>/`` (built here once when missing); PyPA's ``installer`` puts them into
the target's scheme with scripts pointing at the env's python.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envmgr.archive.frames import workers
from envmgr.build.bytecode import python_xy
from envmgr.build.processes import run_shares
from envmgr.cache import Store
from envmgr.cache.store import get_record
from envmgr.errors import BuildError
from envmgr.locks.lock import LockedPackage, PlatformLock, strip_credentials
from envmgr.platforms import Platform
from envmgr.progress import Task

__all__ = ["SITE_PACKAGES", "WheelJob", "fetch_wheel", "install_wheel_job", "install_wheels"]

#: Where a prefix keeps its packages, for Python *xy* (``3.11``).
SITE_PACKAGES = "lib/python{xy}/site-packages"


def fetch_wheel(url: str, sha256: str, cache: Path) -> Path:
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

    # The PyPI client and the sdist builder (email, zipfile, html.parser) are imported only
    # for a lock with PyPI packages: every CLI command imports the builder.
    from envmgr.resolve.pypi.index import IndexClient  # noqa: PLC0415
    from envmgr.resolve.pypi.pages import DistFile  # noqa: PLC0415
    from envmgr.resolve.pypi.pip_config import pip_index_urls  # noqa: PLC0415
    from envmgr.resolve.pypi.sdist import Sdists, stored_wheel  # noqa: PLC0415

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
    record = get_record(store, f"wheels/{package.sha256}/build.json")
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


def install_wheels(
    lock: PlatformLock,
    prefix: Path,
    cache_dir: Path,
    store: Store | None,
    task: Task,
    host: Platform,
    skip: frozenset[str] = frozenset(),
) -> None:
    """Every locked wheel (but those *skip* names) into *prefix*: fetched (or built) here,
    then installed by one worker process per core, the largest wheels first, when there is
    enough to share."""

    wheels = [p for p in lock.packages if p.manager == "pypi" and p.name not in skip]
    if not wheels:
        return
    from envmgr.resolve.pypi.sdist import host_python_xy, wheel_is_pure  # noqa: PLC0415 - see above

    xy = python_xy(lock)
    if xy is None:
        raise BuildError(f"env {lock.env_id}: PyPI packages need a conda python in the lock")
    site = prefix / SITE_PACKAGES.format(xy=xy)
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
            path = fetch_wheel(wheel.url, wheel.sha256, cache_dir / "wheels")
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
    job = WheelJob(
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
class WheelJob:
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

    return min(workers(), len(jobs))


def _share(job: WheelJob, count: int) -> list[WheelJob]:
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
        WheelJob(env_id=job.env_id, scheme=job.scheme, interpreter=job.interpreter, wheels=tuple(b))
        for b in bins
        if b
    ]


_WORKER = """
from envmgr.errors import EnvmgrError
from envmgr.build.wheels import WheelJob, install_wheel_job
import json
with open(sys.argv[2], encoding="utf-8") as handle:
    data = json.load(handle)
data["wheels"] = tuple(tuple(w) for w in data["wheels"])
try:
    install_wheel_job(WheelJob(**data))
except EnvmgrError as exc:
    print(exc.message, file=sys.stderr)
    sys.exit(1)
print("installed", len(data["wheels"]))
"""


def _install_in_workers(jobs: list[WheelJob]) -> None:
    """Each job in its own process of this interpreter (installer is pure Python: threads
    would share one core); an interrupted build kills them."""
    import sys  # noqa: PLC0415

    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    results = run_shares([sys.executable], _WORKER, [job.to_json() for job in jobs], environ)
    for job, (code, out, err) in zip(jobs, results, strict=True):
        if code != 0 or not out.startswith("installed "):
            reason = (err.strip().splitlines() or [f"exit code {code}"])[-1]
            if code == 1 and reason.startswith(f"env {job.env_id}:"):
                raise BuildError(reason)
            raise BuildError(f"env {job.env_id}: a wheel installer process failed: {reason}")


def install_wheel_job(job: WheelJob) -> None:
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
