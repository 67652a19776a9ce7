"""``envmgr build``: resolve when needed, then build, pack and store every env the specs lock,
for every platform they lock (``--platform`` narrows it), that the store does not have yet.
Any host builds any supported platform's env; nothing of the target is executed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from envmgr.build.once import BuildOptions, BuildOutcome, build_and_store, read_stored_lock
from envmgr.cache import Store
from envmgr.cache.names import step_envs
from envmgr.cli._common import STATE, emit_json, fail, layers_built_text
from envmgr.cli._inputs import (
    ChannelOpt,
    CondaSpecs,
    CudaOpt,
    DatastoreOpt,
    DeployOpt,
    EnvFiles,
    ExtraIndexOpt,
    FindLinksOpt,
    FlowArg,
    FrozenOpt,
    IndexOpt,
    JsonOpt,
    LockedOpt,
    PlatformOpt,
    PypiSpecs,
    PythonOpt,
    ReqFiles,
    SpecsJsonOpt,
    StoreOpt,
    build_options,
    configured_store,
    gather,
    spec_args,
)
from envmgr.cli._progress import progress_for_cli
from envmgr.cli._targets import default_resolve_options, expand_env_id, read_lock_file
from envmgr.config import load
from envmgr.errors import EnvmgrError
from envmgr.ids import is_id_prefix, parse_env_id, parse_platform
from envmgr.locks.lock import PlatformLock
from envmgr.platforms import PLATFORMS
from envmgr.progress import Progress
from envmgr.resolve.resolution_cache import require_locked, resolve_specs

__all__ = ["build"]


def _stored_jobs(
    env: str, spec_args: dict[str, Any]
) -> tuple[Store, Path, list[tuple[tuple[str, ...], PlatformLock]], dict[str, tuple[str, bool]]]:
    """The stored locks of env id *env* (for the ``--platform`` ones, default all)."""

    config = load(flags={"store": spec_args["store"]})
    store = configured_store(config)

    if is_id_prefix(env):
        env = expand_env_id(env, store) or env
    try:
        env_id = parse_env_id(env, where="--env")
        platforms = [parse_platform(p, where="--platform") for p in spec_args["platform"]]
    except EnvmgrError as exc:
        fail(str(exc))
    locks = [
        lock
        for platform in platforms or PLATFORMS
        if (lock := read_stored_lock(store, platform, env_id)) is not None
    ]
    if not locks:
        where = ", ".join(platforms) if platforms else "any platform"
        fail(f"env {env_id}: {store.url} has no lock of it for {where}", code=1)
    return store, Path(config["cache_dir"]), [((env_id[:12],), lock) for lock in locks], {}


def _jobs(
    from_lock: Path | None, env: str | None, spec_args: dict[str, Any], progress: Progress
) -> tuple[Store, Path, list[tuple[tuple[str, ...], PlatformLock]], dict[str, tuple[str, bool]]]:
    """The store, cache dir, (steps, lock) pairs to build, and env_id -> (spec_id, cached)."""
    given = any(spec_args[k] for k in ("flow", "env_file", "requirements", "conda", "pypi"))
    if spec_args.get("deploy") and (env is not None or from_lock is not None):
        fail("--for goes with a flow file, not with --env or --from-lock")
    if env is not None:
        if from_lock is not None or given or spec_args["python"]:
            fail("give --env, --from-lock or specs to resolve, not several")
        return _stored_jobs(env, spec_args)
    if from_lock is not None:
        if any(spec_args[k] for k in ("flow", "env_file", "requirements", "conda", "pypi")):
            fail("give --from-lock or specs to resolve, not both")

        config = load(flags={"store": spec_args["store"]})
        cache = Path(config["cache_dir"])
        resolve = default_resolve_options(
            cache,
            store=configured_store(config),
            channels=tuple(spec_args["channel"]),
            platforms=tuple(spec_args["platform"]),
        )
        lock_file = read_lock_file(from_lock, cache, options=resolve, python=spec_args["python"])
        steps: tuple[str, ...] = (from_lock.name,)
        return configured_store(config), cache, [(steps, p) for p in lock_file.platforms], {}

    inputs = gather(**spec_args, progress=progress)
    results = resolve_specs(inputs.specs, inputs.options) if inputs.specs else []
    if spec_args.get("locked"):
        require_locked(results, inputs.options.store.url)
    resolved = {r.lock.env_id: (r.spec_id, r.cached) for r in results}
    jobs = [(r.steps, r.lock) for r in results]
    jobs += _named_jobs(inputs.named, inputs.options.store, inputs.options.platforms)
    return inputs.options.store, inputs.options.cache_dir, jobs, resolved


def _named_jobs(
    named: Mapping[str, tuple[str, tuple[str, ...]]], store: Store, platforms: tuple[str, ...]
) -> list[tuple[tuple[str, ...], PlatformLock]]:
    """Steps with ``name=`` run in that name's env: it is built (if the store lacks its
    archive) from its stored lock, never resolved."""

    jobs: list[tuple[tuple[str, ...], PlatformLock]] = []
    for step, (name, step_platforms) in sorted(named.items()):
        envs = step_envs(store, name, platforms or step_platforms, step=step)
        for platform, env_id in envs.items():
            lock = read_stored_lock(store, platform, env_id)
            if lock is None:
                raise EnvmgrError(
                    f"step {step!r}: named env {name} points at {platform} env {env_id}, "
                    f"whose lock is not in {store.url}"
                )
            jobs.append(((step,), lock))
    return jobs


def _build_all(
    jobs: list[tuple[tuple[str, ...], PlatformLock]],
    resolved: dict[str, tuple[str, bool]],
    options: BuildOptions,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, str], BuildOutcome] = {}
    for steps, lock in jobs:
        key = (lock.platform, lock.env_id)
        row: dict[str, Any] = {
            "steps": list(steps),
            "env_id": lock.env_id,
            "platform": lock.platform,
            "status": "built",
            "size": None,
            "uploaded": 0,
            "layers": 0,
            "layers_built": 0,
            "seconds": 0.0,
            "spec_id": resolved.get(lock.env_id, (lock.spec_id, False))[0],
            "lock_cached": resolved.get(lock.env_id, ("", True))[1],
        }
        outcome = done.get(key) or build_and_store(lock, options)
        done[key] = outcome
        row.update(
            status=outcome.status,
            size=outcome.size,
            uploaded=outcome.uploaded,
            layers=len(outcome.manifest.layers),
            layers_built=outcome.layers_built,
            seconds=round(outcome.seconds, 3),
            link_scripts=list(outcome.manifest.link_scripts),
        )
        rows.append(row)
    return rows


def build(
    flow: FlowArg = None,
    env_file: EnvFiles = [],
    requirements: ReqFiles = [],
    conda: CondaSpecs = [],
    pypi: PypiSpecs = [],
    python: PythonOpt = None,
    platform: PlatformOpt = [],
    channel: ChannelOpt = [],
    specs_json: SpecsJsonOpt = None,
    deploy: DeployOpt = None,
    from_lock: Annotated[
        Path | None,
        typer.Option(
            "--from-lock",
            metavar="LOCKFILE",
            help="Build the envs of this lock file (conda-lock, @EXPLICIT, pixi.lock, "
            "pylock.toml, uv.lock); only a PyPI-only lock's python is solved.",
        ),
    ] = None,
    env: Annotated[
        str | None,
        typer.Option(
            "--env",
            metavar="ENV_ID",
            help="Build an env whose lock is in the store (what a worker that found no "
            "archive asks for).",
        ),
    ] = None,
    index_url: IndexOpt = None,
    extra_index_url: ExtraIndexOpt = [],
    find_links: FindLinksOpt = [],
    store: StoreOpt = None,
    cuda: CudaOpt = None,
    datastore: DatastoreOpt = None,
    codec: Annotated[
        str | None, typer.Option("--codec", help="zst (default) or gz; config: codec")
    ] = None,
    level: Annotated[
        int | None, typer.Option("--level", help="Compression level (default 3); config: level")
    ] = None,
    locked: LockedOpt = False,
    frozen: FrozenOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build, pack and store each env once, for every platform it is locked for."""
    parameters = dict(locals())
    config = load(flags={"store": store, "codec": codec, "level": level})
    with progress_for_cli() as progress:
        store_obj, cache, jobs, resolved = _jobs(
            from_lock,
            env,
            {
                **spec_args(parameters),
                "specs_json": specs_json,
                "deploy": deploy,
                "locked": locked,
                "frozen": frozen,
            },
            progress,
        )
        options = build_options(store_obj, cache, progress, channel, config)
        rows = _build_all(jobs, resolved, options)
    for row in rows:
        if row["link_scripts"] and not STATE.quiet:
            typer.echo(
                f"envmgr: warning: env {row['env_id'][:12]} ({row['platform']}): the link "
                f"scripts of {', '.join(row['link_scripts'])} were not run (envmgr runs no "
                "package code at build time)",
                err=True,
            )
    if as_json:
        emit_json({"store": store_obj.url, "envs": rows})
        return
    if STATE.quiet:
        return
    for row in rows:
        label = ", ".join(row["steps"])
        state = {
            "built": "built and uploaded",
            "present": "already in the store, uploaded nothing",
            "waited": "built by another process",
        }[str(row["status"])]
        if row["status"] == "built" and row["layers"]:
            state = layers_built_text(row["layers_built"], row["layers"], int(row["uploaded"]))
        size = int(row["size"] or 0) / 1e6
        typer.echo(
            f"{label:<24} {row['platform']:<14} env {row['env_id'][:12]}  "
            f"{size:8.1f} MB  {state}  {row['seconds']:.2f}s"
        )
