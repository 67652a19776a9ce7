"""``envmgr resolve``: specs from a flow, files or flags into locks (cached in the store)."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from envmgr import __version__, profile
from envmgr.build.once import offer_lock
from envmgr.cache.layout import lock_key
from envmgr.cli._common import STATE, emit_json, fail, writing_output
from envmgr.cli._inputs import (
    ChannelOpt,
    CondaSpecs,
    CudaOpt,
    DatastoreOpt,
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
    configured_store,
    gather,
    spec_args,
)
from envmgr.cli._progress import progress_for_cli
from envmgr.cli._targets import default_resolve_options, read_lock_file
from envmgr.config import load
from envmgr.cuda import cuda_need, describe
from envmgr.errors import EnvmgrError
from envmgr.locks.formats import detect_format
from envmgr.locks.lock import (
    Lock,
    LockError,
    PlatformLock,
    dumps,
    read_conda_lock,
    write_conda_lock,
)
from envmgr.resolve.conda import conda_specs
from envmgr.resolve.resolution_cache import Resolved, effective_spec, require_locked, resolve_specs
from envmgr.specs.model import EnvSpec

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
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Write the conda-lock file of a single spec."),
    ] = None,
    adopt_file: Annotated[
        Path | None,
        typer.Option(
            "--lockfile",
            metavar="LOCKFILE",
            help="Adopt this lock file (conda-lock, @EXPLICIT, pixi.lock, pylock.toml, "
            "uv.lock) as the lock (of the spec given with it, if any) instead of solving.",
        ),
    ] = None,
    lock_dir: Annotated[
        Path | None,
        typer.Option("--lock-dir", help="Write STEP.conda-lock.yml per step of a flow."),
    ] = None,
    index_url: IndexOpt = None,
    extra_index_url: ExtraIndexOpt = [],
    find_links: FindLinksOpt = [],
    store: StoreOpt = None,
    cuda: CudaOpt = None,
    datastore: DatastoreOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Solve again even when cached.")] = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Solve again and exit 1 if a lock differs from the cache."),
    ] = False,
    locked: LockedOpt = False,
    frozen: FrozenOpt = False,
    specs_json: SpecsJsonOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Resolve specs into locks for each target platform; unchanged specs come from the cache.
    With --locked and -o/--lock-dir, those files must already hold these locks (they are not
    rewritten): a CI check that committed locks are current."""
    profile.since_command("cli")
    if output is not None and lock_dir is not None:
        fail("give -o/--output or --lock-dir, not both")
    lock_files = [f for f in env_file if _is_lock_file(f)]
    if lock_files:
        if adopt_file is not None or len(lock_files) > 1:
            fail("adopt one lock file at a time (-f LOCK or --lockfile LOCK)")
        adopt_file = lock_files[0]
        env_file = [f for f in env_file if f != adopt_file]
    if adopt_file is not None and (check or force or locked or frozen):
        fail("--lockfile adopts a lock as it is; --check, --force, --locked, --frozen do not apply")
    args = spec_args(locals())
    with progress_for_cli() as progress:
        if adopt_file is not None:
            results, sources = _adopt(adopt_file, args)
        else:
            inputs = gather(
                **args,
                force=force,
                check=check,
                locked=locked,
                frozen=frozen,
                specs_json=specs_json,
                progress=progress,
            )
            results = resolve_specs(inputs.specs, inputs.options) if inputs.specs else []
            sources = inputs.sources
            if not check:
                for fresh in (r for r in results if not r.cached):
                    # Beside where its env will be: `show`, `alias`, `build --env` and any
                    # worker find the printed id before it is built.
                    offer_lock(inputs.options.store, fresh.lock)
            if locked and output is None and lock_dir is None:
                # With -o/--lock-dir, those files are the locks --locked compares with.
                require_locked(results, inputs.options.store.url)
            if not as_json and not STATE.quiet:
                for step, (name, _platforms) in sorted(inputs.named.items()):
                    typer.echo(f"{step:<16} named env {name}: used as it is, never resolved")
    files: dict[Path, list[Resolved]] = {}
    if output is not None:
        if len({r.spec_id for r in results}) > 1:
            fail("-o/--output takes a single spec; this flow has several: use --lock-dir")
        files[output] = results
    if lock_dir is not None:
        for step in dict.fromkeys(s for r in results for s in r.steps):
            files[lock_dir / f"{step}.conda-lock.yml"] = [r for r in results if step in r.steps]
    for path, mine in files.items():
        if locked:
            _require_file(path, mine)
        else:
            with writing_output(path, "-o" if path == output else "--lock-dir"):
                _write_lockfile(path, mine, sources)
    _report(results, check=check, adopted=adopt_file is not None, as_json=as_json)


def _report(results: list[Resolved], *, check: bool, adopted: bool, as_json: bool) -> None:
    drifted = [r for r in results if r.drifted]
    if as_json:
        emit_json(
            {
                "envs": [
                    {
                        "steps": list(r.steps),
                        "spec_id": (r.lock.spec_id or None) if adopted else r.spec_id,
                        "platform": r.platform,
                        "env_id": r.lock.env_id,
                        "packages": len(r.lock.packages),
                        "variant": describe(r.platform, cuda_need(r.lock.packages)),
                        "cached": r.cached,
                        "adopted": adopted,
                        "seconds": round(r.seconds, 3),
                        "source_builds": [b.to_dict() for b in r.source_builds],
                        **({"drifted": r.drifted, "uncached": r.uncached} if check else {}),
                    }
                    for r in results
                ]
            }
        )
    elif not STATE.quiet:
        for r in results:
            state = "cached" if r.cached else ("drifted" if r.drifted else "solved")
            state = "new" if r.uncached and check else state
            state = "adopted" if adopted else state
            need = cuda_need(r.lock.packages)
            for step in r.steps:
                typer.echo(
                    f"{step:<16} {r.platform:<14} env {r.lock.env_id[:12]}  "
                    f"{len(r.lock.packages):>3} packages  {state:<7} {r.seconds:.2f}s"
                    + (f"  CUDA >= {need.minimum}" if need else "")
                )
            for build in r.source_builds:
                typer.echo(f"envmgr: note: {r.platform}: {build.sentence(r.platform)}", err=True)
    new = [r for r in results if r.uncached]
    if check and (drifted or new):
        if drifted:
            typer.echo(
                f"envmgr: {len(drifted)} lock(s) differ from the cached ones: "
                + ", ".join(f"{'/'.join(r.steps)} {r.platform}" for r in drifted),
                err=True,
            )
        if new:
            typer.echo(
                "envmgr: no cached lock to check for "
                + ", ".join(f"{'/'.join(r.steps)} {r.platform}" for r in new)
                + " (resolve without --check to cache one)",
                err=True,
            )
        raise typer.Exit(1)


def _require_file(path: Path, results: list[Resolved]) -> None:
    """--locked with -o/--lock-dir: *path* already holds exactly these platforms' envs."""

    if not path.is_file():
        raise LockError(
            f"--locked: {path} does not exist (the lock would be written)",
            hint="run envmgr resolve without --locked to write it",
        )
    held = {p.platform: p.env_id for p in read_conda_lock(path).platforms}
    wanted = {r.platform: r.lock.env_id for r in results}
    if held != wanted:
        differ = sorted(p for p in held.keys() | wanted.keys() if held.get(p) != wanted.get(p))
        raise LockError(
            f"--locked: {path} would change ({', '.join(differ)})",
            hint="run envmgr resolve without --locked to rewrite it",
        )


def _is_lock_file(path: Path) -> bool:
    """A lock file (given to -f by habit) rather than a spec."""

    try:
        detect_format(path)
    except EnvmgrError:
        return False
    return True


def _adopt(lock_path: Path, args: dict[str, Any]) -> tuple[list[Resolved], list[str]]:
    """The lock file's platforms as results. With a spec, each platform's lock becomes that
    spec's resolution-cache entry (after checking it satisfies the spec); without one, the
    locks are only stored beside their envs so `build`, `hydrate` and `alias` find them."""

    has_spec = any(args[k] for k in ("flow", "env_file", "requirements", "conda", "pypi"))
    inputs = gather(**args) if has_spec or args["python"] else None
    config = load(flags={"store": args["store"]})
    store = inputs.options.store if inputs else configured_store(config)

    cache = Path(config["cache_dir"])
    resolve_options = (
        inputs.options
        if inputs
        else default_resolve_options(
            cache, store=store, channels=tuple(args["channel"]), platforms=tuple(args["platform"])
        )
    )
    lock = read_lock_file(lock_path, cache, options=resolve_options, python=args["python"])
    wanted = set(args["platform"])
    parts = [p for p in lock.platforms if not wanted or p.platform in wanted]
    if not parts:
        fail(f"{lock_path}: has no {', '.join(sorted(wanted))} part")
    specs = inputs.specs if inputs else {lock_path.name: EnvSpec()}
    results: list[Resolved] = []
    for step, spec in specs.items():
        effective = effective_spec(spec, inputs.options) if inputs else spec
        for part in parts:
            if inputs is not None:
                _check_satisfies(effective, part, where=f"{lock_path} for {step}")
                part = replace(part, spec_id=effective.spec_id)
                store.put(lock_key(effective.spec_id, part.platform), dumps(part.to_dict()))
            offer_lock(store, part)
            results.append(
                Resolved(
                    steps=(step,),
                    spec=effective,
                    platform=part.platform,
                    lock=part,
                    cached=False,
                    seconds=0.0,
                )
            )
    return results, [str(lock_path)]


def _check_satisfies(spec: EnvSpec, lock: PlatformLock, *, where: str) -> None:
    """Every conda and PyPI requirement of *spec* is met by *lock*; else one error naming
    the requirements that are not."""
    import rattler  # noqa: PLC0415
    from packaging.specifiers import SpecifierSet  # noqa: PLC0415

    from envmgr.build.prefix import conda_records  # noqa: PLC0415 - this command only

    records = {r.name.normalized: r for r in conda_records(lock)}
    pypi = {p.name: p for p in lock.packages if p.manager == "pypi"}
    unmet = []
    for text in conda_specs(spec):
        match = rattler.MatchSpec(text)
        name = match.name.normalized if match.name else ""
        record = records.get(name)
        if record is None or not match.matches(record):
            unmet.append(text)
    for dep in spec.pypi:
        pkg = pypi.get(dep.name)
        if pkg is None and (dep.name in records or dep.marker):  # conda has it / not here
            continue
        if pkg is None or not SpecifierSet(dep.specifier).contains(pkg.version, prereleases=True):
            unmet.append(f"{dep.name}{dep.specifier}")
    if unmet:
        raise LockError(
            f"{where}: the lock does not satisfy {', '.join(unmet)} ({lock.platform})",
            hint="resolve the spec instead, or fix the lock file",
        )
