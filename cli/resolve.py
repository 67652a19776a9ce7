"""``envmgr resolve``: specs from a flow, files or flags into locks (cached in the store)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated

import typer

from envmgr import __version__
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
from envmgr.lock import Lock, write_conda_lock
from envmgr.resolution import Resolved, resolve_specs

__all__ = ["resolve"]


def _write_lockfile(path: Path, results: list[Resolved], sources: list[str]) -> None:
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lock = Lock(
        platforms=tuple(r.lock for r in results),
        spec_id=results[0].spec_id,
        sources=tuple(sources),
        envmgr_version=__version__,
        created=created,
    )
    write_conda_lock(lock, path)


def resolve(
    flow: FlowArg = None,
    env_file: EnvFiles = [],
    requirements: ReqFiles = [],
    conda: CondaSpecs = [],
    pypi: PypiSpecs = [],
    python: PythonOpt = None,
    platform: PlatformOpt = [],
    channel: ChannelOpt = [],
    lockfile: Annotated[
        Path | None,
        typer.Option("-o", "--lockfile", help="Write the conda-lock file of a single spec."),
    ] = None,
    lock_dir: Annotated[
        Path | None,
        typer.Option("--lock-dir", help="Write <step>.conda-lock.yml per step of a flow."),
    ] = None,
    index_url: IndexOpt = None,
    extra_index_url: ExtraIndexOpt = [],
    store: StoreOpt = None,
    cuda: CudaOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Solve again even when cached.")] = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Solve again and exit 1 if a lock differs from the cache."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Resolve specs into locks for each target platform; unchanged specs come from the cache."""
    if lockfile is not None and lock_dir is not None:
        fail("give -o/--lockfile or --lock-dir, not both")
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
        force=force,
        check=check,
    )
    specs, sources = inputs.specs, inputs.sources
    results = resolve_specs(specs, inputs.options)
    if lockfile is not None:
        if len({r.spec_id for r in results}) > 1:
            fail("-o/--lockfile takes a single spec; this flow has several: use --lock-dir")
        _write_lockfile(lockfile, results, sources)
    if lock_dir is not None:
        for step in specs:
            mine = [r for r in results if step in r.steps]
            _write_lockfile(lock_dir / f"{step}.conda-lock.yml", mine, sources)
    drifted = [r for r in results if r.drifted]
    if as_json:
        emit_json(
            {
                "envs": [
                    {
                        "steps": list(r.steps),
                        "spec_id": r.spec_id,
                        "platform": r.platform,
                        "env_id": r.lock.env_id,
                        "packages": len(r.lock.packages),
                        "cached": r.cached,
                        **({"drifted": r.drifted} if check else {}),
                    }
                    for r in results
                ]
            }
        )
    elif not STATE.quiet:
        for r in results:
            state = "cached" if r.cached else ("drifted" if r.drifted else "solved")
            for step in r.steps:
                typer.echo(
                    f"{step:<16} {r.platform:<14} env {r.lock.env_id[:12]}  "
                    f"{len(r.lock.packages):>3} packages  {state:<7} {r.seconds:.2f}s"
                )
    if check and drifted:
        typer.echo(
            f"envmgr: {len(drifted)} lock(s) differ from the cached ones: "
            + ", ".join(f"{'/'.join(r.steps)} {r.platform}" for r in drifted),
            err=True,
        )
        raise typer.Exit(1)
