"""``envmgr resolve``: specs from a flow, files or flags into locks (cached in the store)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import typer

from envmgr import __version__
from envmgr.cache import open_store
from envmgr.cli._common import STATE, emit_json, fail
from envmgr.config import cache_dir, default_channels, default_store_url
from envmgr.discovery import discover
from envmgr.errors import Problem, SpecError
from envmgr.lock import Lock, write_conda_lock
from envmgr.platforms import PLATFORMS, Platform, is_platform
from envmgr.resolution import Resolved, ResolveOptions, resolve_specs
from envmgr.spec import CondaDep, EnvSpec, PypiDep, merge, parse_index_url, parse_python
from envmgr.specfiles import read_spec_file

__all__ = ["resolve"]


def _platforms(values: list[str]) -> tuple[Platform, ...]:
    out: list[Platform] = []
    for value in values:
        if not is_platform(value):
            fail(f"--platform {value!r}: unknown platform; known: {', '.join(PLATFORMS)}")
        else:
            out.append(value)
    return tuple(out)


def _single_spec(
    files: list[Path], conda: list[str], pypi: list[str], python: str | None
) -> EnvSpec:
    spec = EnvSpec()
    for path in files:
        spec = merge(spec, read_spec_file(path))
    problems: list[Problem] = []
    deps: list[CondaDep] = []
    for text in conda:
        try:
            dep = CondaDep.parse(text)
        except ValueError as exc:
            problems.append(
                Problem(where="command line", key=f"--conda {text!r}", message=str(exc))
            )
            continue
        if dep.name == "python" and dep.channel is None:
            python = python or dep.spec[len("python") :].strip().replace("==", "", 1) or "*"
            continue
        deps.append(dep)
    pypi_deps: list[PypiDep] = []
    for text in pypi:
        try:
            pypi_deps.append(PypiDep.parse(text))
        except ValueError as exc:
            problems.append(Problem(where="command line", key=f"--pypi {text!r}", message=str(exc)))
    parsed_python = None
    if python:
        try:
            parsed_python = parse_python(python)
        except ValueError as exc:
            problems.append(Problem(where="command line", key="--python", message=str(exc)))
    if problems:
        raise SpecError(problems)
    return merge(spec, EnvSpec(python=parsed_python, conda=tuple(deps), pypi=tuple(pypi_deps)))


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
    flow: Path | None = typer.Argument(None, help="A flow file: every step is resolved."),
    env_file: list[Path] = typer.Option([], "-f", "--file", help="environment.yml (repeatable)"),
    requirements: list[Path] = typer.Option(
        [], "-r", "--requirements", help="requirements.txt (repeatable)"
    ),
    conda: list[str] = typer.Option([], "--conda", help="A conda match spec (repeatable)."),
    pypi: list[str] = typer.Option([], "--pypi", help="A PEP 508 requirement (repeatable)."),
    python: str | None = typer.Option(None, "--python", help="Python version, e.g. 3.11"),
    platform: list[str] = typer.Option([], "--platform", help="Target platform (repeatable)."),
    channel: list[str] = typer.Option(
        [],
        "--channel",
        "-c",
        help="Channel for specs that name none (repeatable; "
        "default ENVMGR_CHANNELS or conda-forge).",
    ),
    lockfile: Path | None = typer.Option(
        None, "-o", "--lockfile", help="Write the conda-lock file of a single spec."
    ),
    lock_dir: Path | None = typer.Option(
        None, "--lock-dir", help="Write <step>.conda-lock.yml per step of a flow."
    ),
    index_url: str | None = typer.Option(
        None, "--index-url", help="PyPI index (default: pip's configured index)."
    ),
    extra_index_url: list[str] = typer.Option(
        [], "--extra-index-url", help="Another PyPI index (repeatable)."
    ),
    store: str | None = typer.Option(
        None, "--store", help="Store URL (default ENVMGR_STORE or the local store)."
    ),
    cuda: str | None = typer.Option(None, "--cuda", help="Assume this CUDA version (__cuda)."),
    force: bool = typer.Option(False, "--force", help="Solve again even when cached."),
    check: bool = typer.Option(
        False, "--check", help="Solve again and exit 1 if a lock differs from the cache."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Resolve specs into locks for each target platform; unchanged specs come from the cache."""
    singles = env_file or requirements or conda or pypi or python
    if flow is not None and singles:
        fail("give a flow file or -f/-r/--conda/--pypi/--python, not both")
    if flow is None and not singles:
        fail("nothing to resolve: give a flow file, -f, -r, --conda, --pypi or --python")
    try:
        indexes = [
            parse_index_url(u) for u in ([index_url] if index_url else []) + list(extra_index_url)
        ]
    except ValueError as exc:
        fail(str(exc))
    if lockfile is not None and lock_dir is not None:
        fail("give -o/--lockfile or --lock-dir, not both")
    if flow is not None:
        specs = discover(flow)
        if not specs:
            fail(f"{flow}: no step has an environment (@conda, @pypi, @conda_base, @pypi_base)")
        sources = [str(flow)]
    else:
        files = [*env_file, *requirements]
        name = files[0].name if files else "command line"
        specs = {name: _single_spec(files, conda, pypi, python)}
        sources = [str(f) for f in files]
    options = ResolveOptions(
        store=open_store(store or default_store_url()),
        cache_dir=cache_dir(),
        platforms=_platforms(platform),
        default_channels=tuple(channel) or default_channels(),
        cuda=cuda,
        force=force,
        check=check,
        index_url=indexes[0] if index_url else None,
        extra_index_urls=tuple(indexes[1:] if index_url else indexes),
        steps_are_steps=flow is not None,
        env=dict(os.environ),
    )
    results = resolve_specs(specs, options)
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
