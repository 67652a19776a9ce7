"""Resolve specs into locks, through the resolution cache in the store.

:func:`resolve_specs` takes ``{step: EnvSpec}`` (a flow, or one spec under a name), groups
steps with equal specs, and for each distinct spec and target platform either reads the cached
lock (``locks/<spec_id>/<platform>.json``) or solves, all platforms and specs concurrently.

The ``spec_id`` used as the resolution cache's key is that of the *effective* spec: the
channels it will be solved against are filled in (the spec's, else the configured defaults). A
cached entry is used only if it was solved with the same virtual packages; ``force`` re-solves;
``check`` re-solves without writing and reports which locks drifted from the resolution cache
(or were never cached); ``frozen`` never solves: every lock must be in the resolution cache
(:func:`require_locked` turns a ``check`` into uv's ``--locked``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envmgr import profile
from envmgr.cache import Store
from envmgr.cache.layout import lock_key
from envmgr.cache.store import get_record
from envmgr.channels import Credentials, make_gateway, split_credentials
from envmgr.cuda import TORCH_FAMILY, torch_backend
from envmgr.errors import EnvmgrError
from envmgr.locks.lock import LOCK_FORMAT, Lock, LockError, PlatformLock, dumps
from envmgr.locks.python_target import PythonTarget
from envmgr.platforms import Platform, host_platform, virtual_packages
from envmgr.progress import NULL, Progress, tracked
from envmgr.resolve.conda import CondaTarget, solve
from envmgr.resolve.pypi.pip_config import pip_sources
from envmgr.specs.deps import CondaDep, parse_index_url, parse_python
from envmgr.specs.model import EnvSpec

if TYPE_CHECKING:
    from envmgr.locks.pylock import PypiLockFile
    from envmgr.resolve.pypi.resolve import SourceBuild

__all__ = [
    "ResolveOptions",
    "Resolved",
    "complete_pypi_lock",
    "effective_spec",
    "require_locked",
    "resolve_specs",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class ResolveOptions:
    """How to resolve: targets, channel defaults, cache behaviour. Travels down the layers."""

    store: Store
    cache_dir: Path
    platforms: tuple[Platform, ...] = ()  # overrides the specs' platforms when given
    default_platforms: tuple[Platform, ...] = ()  # for specs that name none (else the host)
    default_channels: tuple[str, ...] = ("conda-forge",)
    index_url: str | None = None  # overrides pip's configured index for specs naming none
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()  # added to every PyPI spec's find-links
    cuda: str | None = None
    torch_index: str | None = None  # the torch family's index, "{backend}" in it
    force: bool = False
    check: bool = False
    frozen: bool = False  # never solve: a spec without a cached lock is an error
    steps_are_steps: bool = True  # False: the names are inputs (a file, "command line")
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    progress: Progress = NULL


@dataclass(frozen=True, kw_only=True, slots=True)
class Resolved:
    """One (spec, platform) result: which steps share it, its lock, and how it was obtained."""

    steps: tuple[str, ...]
    spec: EnvSpec
    platform: Platform
    lock: PlatformLock
    cached: bool
    seconds: float
    drifted: bool = False  # check mode: the fresh lock differs from the cached one
    uncached: bool = False  # check mode: there was no cached lock to compare with
    source_builds: tuple[SourceBuild, ...] = ()  # sdists build makes wheels of (fresh solves)

    @property
    def spec_id(self) -> str:
        return self.spec.spec_id


def effective_spec(spec: EnvSpec, options: ResolveOptions) -> EnvSpec:
    """*spec* with the channels and indexes it will be resolved against filled in."""
    spec = replace(spec, channels=spec.channels or options.default_channels)
    if not (spec.pypi or spec.pypi_constraints):
        return spec
    index_url = spec.index_url or options.index_url
    extra = (*spec.extra_index_urls, *options.extra_index_urls)
    find_links = (*spec.find_links, *options.find_links)
    if index_url is None:
        with profile.phase("config"):
            index_url, pip_extra, pip_links = pip_sources()
        # pip.conf's file:// indexes and local find-links would make the lock depend on this
        # machine's disk without the spec saying so: only their http(s) ones are used.
        extra = (*extra, *(u for u in pip_extra if not u.startswith("file:")))
        find_links = (*find_links, *(u for u in pip_links if not u.startswith("file:")))
    pins = dict(spec.index_pins)
    if options.torch_index:  # as uv's --torch-backend: the whole family, direct or not
        pins = dict.fromkeys(TORCH_FAMILY, options.torch_index) | pins
    return replace(
        spec,
        index_url=parse_index_url(index_url),
        extra_index_urls=tuple(parse_index_url(u) for u in extra),
        find_links=find_links,
        index_pins=tuple(pins.items()),
    )


def _targets(spec: EnvSpec, options: ResolveOptions) -> tuple[Platform, ...]:
    return options.platforms or spec.platforms or options.default_platforms or (host_platform(),)


def _cached(
    store: Store, spec_id: str, platform: Platform, vps: tuple[str, ...]
) -> PlatformLock | None:
    key = lock_key(spec_id, platform)
    raw = get_record(store, key)
    if raw is None:
        return None
    import json  # noqa: PLC0415

    try:
        data = json.loads(raw)
        newer = isinstance(data, dict) and isinstance(data.get("format"), int)
        newer = newer and data["format"] > LOCK_FORMAT
    except ValueError:
        return None  # a damaged entry is re-solved and replaced
    if newer:  # never replaced by an older envmgr's answer
        raise LockError(
            f"{store.url}/{key}: a lock of format {data['format']}, written by a newer envmgr "
            f"(this one reads format {LOCK_FORMAT})",
            hint="upgrade envmgr",
        )
    try:
        lock = PlatformLock.from_dict(data, where=f"{store.url}/{key}")
    except (LockError, ValueError):
        return None  # a damaged entry is re-solved and replaced
    return lock if lock.virtual_packages == vps else None


def resolve_specs(specs: Mapping[str, EnvSpec], options: ResolveOptions) -> list[Resolved]:
    """Locks for every distinct spec in *specs* and each of its target platforms.

    Raises ``EnvmgrError`` subclasses: ``SolveError`` (unsatisfiable, unknown package,
    unreachable channel) naming the steps, or an error for specs that need PyPI resolution.
    Results come in the order of *specs* (by first step), then by platform.
    """
    groups: dict[str, tuple[EnvSpec, list[str]]] = {}
    for step, spec in specs.items():
        effective = effective_spec(spec, options)
        groups.setdefault(effective.spec_id, (effective, []))[1].append(step)
    cuda = options.cuda
    if cuda == "host":  # this machine's driver, or CONDA_OVERRIDE_CUDA: what the host has
        from envmgr.cuda import node_cuda  # noqa: PLC0415

        try:
            cuda = node_cuda(options.env)[0] or ""
        except ValueError as exc:  # a CONDA_OVERRIDE_CUDA that is no version
            raise EnvmgrError(f"--cuda host: {exc}", hint="fix or unset it") from None
    elif cuda == "none":
        cuda = ""
    jobs: list[tuple[EnvSpec, tuple[str, ...], CondaTarget]] = []
    credentials: dict[str, str] = {}
    for effective, steps in groups.values():
        # Tokens go to py-rattler as headers: a URL with one would be written to its cache.
        channels, found = split_credentials(effective.channels)
        credentials.update(found)
        for platform in _targets(effective, options):
            vps = virtual_packages(
                platform, system=dict(effective.system), cuda=cuda, env=options.env
            )
            target = CondaTarget(platform=platform, channels=channels, virtual_packages=vps)
            jobs.append((effective, tuple(steps), target))
    results = (
        _frozen(jobs, options) if options.frozen else asyncio.run(_run(jobs, options, credentials))
    )
    order = {step: i for i, step in enumerate(specs)}
    return sorted(results, key=lambda r: (order[r.steps[0]], r.platform))


def _frozen(
    jobs: list[tuple[EnvSpec, tuple[str, ...], CondaTarget]], options: ResolveOptions
) -> list[Resolved]:
    """Every job's cached lock, solving none; one error naming each step and platform that
    has none."""
    results: list[Resolved] = []
    missing: list[str] = []
    for spec, steps, target in jobs:
        vps = tuple(str(v) for v in target.virtual_packages)
        cached = _cached(options.store, spec.spec_id, target.platform, vps)
        if cached is None:
            missing.append(f"{'/'.join(steps)} {target.platform}")
            continue
        results.append(
            Resolved(
                steps=steps,
                spec=spec,
                platform=target.platform,
                lock=cached,
                cached=True,
                seconds=0.0,
            )
        )
    if missing:
        raise LockError(
            f"--frozen: {options.store.url} has no lock for {', '.join(missing)}",
            hint="resolve without --frozen first (the spec or its virtual packages changed "
            "since the last resolve)",
        )
    return results


def require_locked(results: list[Resolved], store_url: str) -> None:
    """``--locked``: *results* came from a ``check`` resolve; raise one error naming every
    lock that would change (drifted, or never resolved)."""
    changed = [f"{'/'.join(r.steps)} {r.platform}" for r in results if r.drifted]
    new = [f"{'/'.join(r.steps)} {r.platform}" for r in results if r.uncached]
    if not (changed or new):
        return
    parts = []
    if changed:
        parts.append(f"the lock of {', '.join(changed)} would change")
    if new:
        parts.append(f"{', '.join(new)} has no lock in {store_url} yet")
    raise LockError(
        f"--locked: {'; '.join(parts)}",
        hint="run envmgr resolve without --locked to update the locks",
    )


async def _run(
    jobs: list[tuple[EnvSpec, tuple[str, ...], CondaTarget]],
    options: ResolveOptions,
    credentials: Credentials,
) -> list[Resolved]:
    with profile.phase("gateway"):
        gateway = make_gateway(options.cache_dir / "repodata", credentials)
    clients: dict[tuple[str, ...], Any] = {}
    tasks = [_one(spec, steps, target, gateway, options, clients) for spec, steps, target in jobs]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    del tasks, gateway
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        first = next((e for e in errors if isinstance(e, EnvmgrError)), errors[0])
        # The tracebacks hold frames that hold the gateway; py-rattler's runtime must be gone
        # before the interpreter shuts down, or it may crash on exit.
        for error in errors:
            error.__traceback__ = None
        del errors, outcomes
        gc.collect()
        raise first
    return [o for o in outcomes if isinstance(o, Resolved)]


async def _one(
    spec: EnvSpec,
    steps: tuple[str, ...],
    target: CondaTarget,
    gateway: Any,
    options: ResolveOptions,
    clients: dict[tuple[str, ...], Any],
) -> Resolved:
    start = time.monotonic()
    vps = tuple(str(v) for v in target.virtual_packages)
    with profile.phase("store"):
        cached = _cached(options.store, spec.spec_id, target.platform, vps)
    if cached is not None and not options.force and not options.check:
        return Resolved(
            steps=steps,
            spec=spec,
            platform=target.platform,
            lock=cached,
            cached=True,
            seconds=time.monotonic() - start,
        )
    where = (
        ("step " + ", ".join(repr(s) for s in steps))
        if options.steps_are_steps
        else ", ".join(steps)
    )
    label = f"solve {', '.join(steps)[:18]} {target.platform}"
    with tracked(options.progress, label, unit="phase"):
        solving = time.perf_counter()
        lock = await solve(spec, target, gateway=gateway, where=where, spec_id=spec.spec_id)
        profile.add("conda", time.perf_counter() - solving)
        builds: tuple[SourceBuild, ...] = ()
        if spec.pypi:
            solving = time.perf_counter()
            lock, builds = await asyncio.to_thread(
                _add_pypi, spec, lock, target, options, clients, where
            )
            profile.add("pypi", time.perf_counter() - solving)
    drifted = options.check and cached is not None and cached.env_id != lock.env_id
    if not options.check:
        with profile.phase("store"):
            options.store.put(lock_key(spec.spec_id, target.platform), dumps(lock.to_dict()))
    return Resolved(
        steps=steps,
        spec=spec,
        platform=target.platform,
        lock=lock,
        cached=False,
        seconds=time.monotonic() - start,
        drifted=drifted,
        uncached=options.check and cached is None,
        source_builds=builds,
    )


def _add_pypi(
    spec: EnvSpec,
    lock: PlatformLock,
    target: CondaTarget,
    options: ResolveOptions,
    clients: dict[tuple[str, ...], Any],
    where: str,
) -> tuple[PlatformLock, tuple[SourceBuild, ...]]:
    """The conda lock plus the PyPI packages resolved on top of it, and the sdists among them
    that ``build`` makes wheels of."""
    # The PyPI resolver (resolvelib, email, zipfile, html.parser: ~40 ms) is imported only
    # when a spec has PyPI packages: every CLI command imports this module.
    from envmgr.resolve.pypi.index import IndexClient  # noqa: PLC0415
    from envmgr.resolve.pypi.resolve import fixed_from_conda, resolve_pypi  # noqa: PLC0415
    from envmgr.resolve.pypi.sdist import Sdists  # noqa: PLC0415

    python = lock.names().get("python")
    if python is None:
        raise EnvmgrError(f"{where}: the conda solve has no python for the PyPI packages")
    indexes = tuple(u for u in (spec.index_url, *spec.extra_index_urls) if u)
    virtual = {v.name: v.version for v in target.virtual_packages}
    pins = tuple(
        (name, url.replace("{backend}", torch_backend(virtual.get("__cuda"))))
        for name, url in spec.index_pins
    )
    key = (*indexes, "--find-links", *spec.find_links, "--pins", *map(str, pins))
    client = clients.get(key)
    if client is None:
        client = clients.setdefault(
            key,
            IndexClient(
                indexes, options.cache_dir / "pypi", find_links=spec.find_links, pins=dict(pins)
            ),
        )
    python_target = PythonTarget.from_virtual_packages(target.platform, python.version, virtual)

    sdists = Sdists(
        store=options.store,
        cache_dir=options.cache_dir / "pypi",
        client=client,
        index_urls=indexes,
        retry_failed=options.force,
    )
    locked = resolve_pypi(
        spec,
        python_target,
        client=client,
        fixed=fixed_from_conda(lock.packages),
        where=where,
        sdists=sdists,
        native_sdists=(
            target.platform == host_platform() and python_target.python_xy == sys.version_info[:2]
        ),
    )
    return replace(lock, packages=(*lock.packages, *locked.packages)), locked.source_builds


def complete_pypi_lock(
    found: PypiLockFile, options: ResolveOptions, python: str | None = None
) -> Lock:
    """A PyPI-only lock file (pylock.toml, uv.lock) as a whole lock for each target platform:
    the conda part envmgr wrote in the file, or else a solve of ``python`` (*python*, else
    what the file implies) and ``pip`` on the configured channels (cached like any solve);
    then the file's packages selected for that platform and Python. Packages conda provides
    (``fixed_from_conda``) are conda's. Raises ``LockError`` / ``SolveError``."""
    from envmgr.resolve.pypi.resolve import fixed_from_conda  # noqa: PLC0415 - see above

    platforms = options.platforms or found.platforms or options.default_platforms
    platforms = platforms or (host_platform(),)
    conda = {part.platform: part for part in found.conda}
    to_solve = tuple(p for p in platforms if p not in conda or python)
    if to_solve:
        wanted = python or found.python_spec()
        try:
            parsed = parse_python(wanted) if wanted else None
        except ValueError as exc:
            raise LockError(f"{found.path}: {exc}") from None
        spec = EnvSpec(python=parsed, conda=(CondaDep.parse("pip"),))
        solved = resolve_specs(
            {found.path: spec}, replace(options, platforms=to_solve, steps_are_steps=False)
        )
        conda.update((r.platform, r.lock) for r in solved)
    parts = []
    for platform in platforms:
        base = conda[platform]
        interpreter = base.names().get("python")
        if interpreter is None:
            raise LockError(f"{found.path}: {platform}: the conda part has no python")
        virtual = dict(v.split("=")[:2] for v in base.virtual_packages if "=" in v)
        target = PythonTarget.from_virtual_packages(platform, interpreter.version, virtual)
        provided = fixed_from_conda(base.packages)
        pypi = [p for p in found.select(target) if p.name not in provided]
        parts.append(
            PlatformLock(
                platform=platform,
                packages=(*(p for p in base.packages if p.manager == "conda"), *pypi),
                channels=base.channels,
                virtual_packages=base.virtual_packages,
            )
        )
    return Lock(platforms=tuple(parts), sources=(found.path,))
