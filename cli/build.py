"""``envmgr build``: resolve when needed, then build, pack and store every env of this host's
platform that the store does not have yet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from envmgr.build import BuildOptions, BuildOutcome, build_and_store, offer_lock
from envmgr.cache import Store
from envmgr.cli._common import STATE, emit_json, fail
from envmgr.cli._inputs import (
    ChannelOpt,
    CondaSpecs,
    CudaOpt,
    EnvFiles,
    ExtraIndexOpt,
    FlowArg,
    IndexOpt,
    JsonOpt,
    PlatformOpt,
    PypiSpecs,
    PythonOpt,
    ReqFiles,
    StoreOpt,
    gather,
    spec_args,
)
from envmgr.cli._progress import progress_for_cli
from envmgr.config import load
from envmgr.lock import PlatformLock
from envmgr.platforms import host_platform
from envmgr.progress import Progress

__all__ = ["build"]


def _jobs(
    from_lock: Path | None, spec_args: dict[str, Any], progress: Progress
) -> tuple[Store, Path, list[tuple[tuple[str, ...], PlatformLock]], dict[str, tuple[str, bool]]]:
    """The store, cache dir, (steps, lock) pairs to build, and env_id -> (spec_id, cached)."""
    if from_lock is not None:
        if (
            any(spec_args[k] for k in ("flow", "env_file", "requirements", "conda", "pypi"))
            or (spec_args["python"])
        ):
            fail("give --from-lock or specs to resolve, not both")
        from envmgr.cache import open_store  # noqa: PLC0415
        from envmgr.cli._targets import read_lock_file  # noqa: PLC0415

        config = load(flags={"store": spec_args["store"]})
        cache = Path(config["cache_dir"])
        lock_file = read_lock_file(from_lock, cache)
        steps: tuple[str, ...] = (from_lock.name,)
        return open_store(config["store"]), cache, [(steps, p) for p in lock_file.platforms], {}
    from envmgr.resolution import resolve_specs  # noqa: PLC0415

    inputs = gather(**spec_args, progress=progress)
    results = resolve_specs(inputs.specs, inputs.options)
    resolved = {r.lock.env_id: (r.spec_id, r.cached) for r in results}
    jobs = [(r.steps, r.lock) for r in results]
    return inputs.options.store, inputs.options.cache_dir, jobs, resolved


def _build_all(
    jobs: list[tuple[tuple[str, ...], PlatformLock]],
    resolved: dict[str, tuple[str, bool]],
    options: BuildOptions,
) -> list[dict[str, Any]]:
    host = host_platform()
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, str], BuildOutcome] = {}
    for steps, lock in jobs:
        key = (lock.platform, lock.env_id)
        row: dict[str, Any] = {
            "steps": list(steps),
            "env_id": lock.env_id,
            "platform": lock.platform,
            "status": "deferred",
            "size": None,
            "seconds": 0.0,
            "spec_id": resolved.get(lock.env_id, (lock.spec_id, False))[0],
            "lock_cached": resolved.get(lock.env_id, ("", True))[1],
        }
        if lock.platform != host:
            offer_lock(options.store, lock)
        else:
            outcome = done.get(key) or build_and_store(lock, options)
            done[key] = outcome
            row.update(
                status=outcome.status,
                size=outcome.manifest.size,
                seconds=round(outcome.seconds, 3),
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
    specs_json: Annotated[
        Path | None,
        typer.Option(
            "--specs-json",
            hidden=True,
            help="Steps' specs as JSON (how the Metaflow extension hands them over).",
        ),
    ] = None,
    from_lock: Annotated[
        Path | None,
        typer.Option("--from-lock", help="Build the envs of this conda-lock file (no resolution)."),
    ] = None,
    index_url: IndexOpt = None,
    extra_index_url: ExtraIndexOpt = [],
    store: StoreOpt = None,
    cuda: CudaOpt = None,
    codec: Annotated[
        str | None, typer.Option("--codec", help="zst (default) or gz; config: codec")
    ] = None,
    level: Annotated[
        int | None, typer.Option("--level", help="Compression level (default 3); config: level")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build, pack and store each env of this host's platform once; report the others."""
    parameters = dict(locals())
    config = load(flags={"store": store, "codec": codec, "level": level})
    with progress_for_cli() as progress:
        store_obj, cache, jobs, resolved = _jobs(
            from_lock, {**spec_args(parameters), "specs_json": specs_json}, progress
        )
        options = BuildOptions(
            store=store_obj,
            cache_dir=cache,
            codec="gz" if config["codec"] == "gz" else "zst",
            level=int(config["level"]),
            progress=progress,
        )
        rows = _build_all(jobs, resolved, options)
    if as_json:
        emit_json({"store": store_obj.url, "envs": rows})
        return
    if STATE.quiet:
        return
    for row in rows:
        label = ", ".join(row["steps"])
        if row["status"] == "deferred":
            typer.echo(
                f"{label:<24} {row['platform']:<14} env {row['env_id'][:12]}  will be "
                f"built by the first worker of {row['platform']}"
            )
            continue
        state = {
            "built": "built and uploaded",
            "present": "already in the store, uploaded nothing",
            "waited": "built by another process",
        }[str(row["status"])]
        size = int(row["size"] or 0) / 1e6
        typer.echo(
            f"{label:<24} {row['platform']:<14} env {row['env_id'][:12]}  "
            f"{size:8.1f} MB  {state}  {row['seconds']:.2f}s"
        )
