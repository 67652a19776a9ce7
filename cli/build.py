"""``envmgr build``: resolve when needed, then build, pack and store every env of this host's
platform that the store does not have yet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from envmgr.build import BuildOptions, BuildOutcome, build_and_store
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
)
from envmgr.lock import PlatformLock, read_conda_lock
from envmgr.platforms import host_platform

__all__ = ["build"]


def _offer_lock(store: Any, lock: PlatformLock) -> None:
    """Store the lock of an env this host cannot build, so the first worker of its platform
    finds it and builds it (see envmgr.hydrate)."""
    import tempfile  # noqa: PLC0415

    from envmgr import __version__  # noqa: PLC0415
    from envmgr.cache.layout import env_lock_key  # noqa: PLC0415
    from envmgr.lock import Lock, write_conda_lock  # noqa: PLC0415

    key = env_lock_key(lock.platform, lock.env_id)
    if store.exists(key):
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conda-lock.yml"
        write_conda_lock(
            Lock(platforms=(lock,), spec_id=lock.spec_id, envmgr_version=__version__), path
        )
        store.put_file(key, path)


def _say(message: str) -> None:
    if STATE.verbose:
        typer.echo(message, err=True)


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
    codec: Annotated[str, typer.Option("--codec", help="zst (default) or gz")] = "zst",
    level: Annotated[int, typer.Option("--level", help="Compression level.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Build, pack and store each env of this host's platform once; report the others."""
    if codec not in ("zst", "gz"):
        fail(f"--codec {codec!r}: use zst or gz")
    inputs = None
    resolved: dict[str, tuple[str, bool]] = {}
    if from_lock is not None:
        if flow or env_file or requirements or conda or pypi or python:
            fail("give --from-lock or specs to resolve, not both")
        lock_file = read_conda_lock(from_lock)
        jobs: list[tuple[tuple[str, ...], PlatformLock]] = [
            ((from_lock.name,), p) for p in lock_file.platforms
        ]
        from envmgr.cache import open_store  # noqa: PLC0415
        from envmgr.config import cache_dir, default_store_url  # noqa: PLC0415

        store_obj, cache = open_store(store or default_store_url()), cache_dir()
    else:
        from envmgr.resolution import resolve_specs  # noqa: PLC0415

        inputs = gather(
            flow=flow,
            env_file=env_file,
            requirements=requirements,
            conda=conda,
            pypi=pypi,
            python=python,
            platform=platform,
            channel=channel,
            index_url=index_url,
            extra_index_url=extra_index_url,
            store=store,
            cuda=cuda,
            specs_json=specs_json,
        )
        results = resolve_specs(inputs.specs, inputs.options)
        jobs = [(r.steps, r.lock) for r in results]
        resolved = {r.lock.env_id: (r.spec_id, r.cached) for r in results}
        store_obj, cache = inputs.options.store, inputs.options.cache_dir
    codec_value: Literal["zst", "gz"] = "gz" if codec == "gz" else "zst"
    options = BuildOptions(
        store=store_obj, cache_dir=cache, codec=codec_value, level=level, on_progress=_say
    )
    host = host_platform()
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, str], BuildOutcome] = {}
    for steps, lock in jobs:
        key = (lock.platform, lock.env_id)
        if lock.platform != host:
            _offer_lock(store_obj, lock)
            rows.append(
                {
                    "steps": list(steps),
                    "env_id": lock.env_id,
                    "platform": lock.platform,
                    "status": "deferred",
                    "size": None,
                    "seconds": 0.0,
                }
            )
            continue
        outcome = done.get(key) or build_and_store(lock, options)
        done[key] = outcome
        rows.append(
            {
                "steps": list(steps),
                "env_id": lock.env_id,
                "platform": lock.platform,
                "status": outcome.status,
                "size": outcome.manifest.size,
                "seconds": round(outcome.seconds, 3),
                "spec_id": resolved.get(lock.env_id, (lock.spec_id, False))[0],
                "lock_cached": resolved.get(lock.env_id, ("", True))[1],
            }
        )
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
