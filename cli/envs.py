"""``envmgr hydrate``, ``run``, ``ls``, ``verify`` and ``gc``: envs on this machine."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from envmgr.build.once import build_and_store, build_missing
from envmgr.cache.names import is_name
from envmgr.cli._common import STATE, emit_json, fail, size_text
from envmgr.cli._inputs import (
    ChannelOpt,
    CondaSpecs,
    CudaOpt,
    EnvFiles,
    ExtraIndexOpt,
    FindLinksOpt,
    FrozenOpt,
    IndexOpt,
    JsonOpt,
    LockedOpt,
    PypiSpecs,
    PythonOpt,
    ReqFiles,
    StoreOpt,
    build_options,
    configured_store,
    gather,
    spec_file_kind,
)
from envmgr.cli._progress import progress_for_cli
from envmgr.cli._targets import (
    FlowOptions,
    TargetArg,
    expand_env_id,
    load_target,
)
from envmgr.config import load
from envmgr.errors import EnvmgrError
from envmgr.ids import is_env_id, is_id_prefix
from envmgr.platforms import host_platform
from envmgr.resolve.resolution_cache import require_locked, resolve_specs
from envmgr.worker.env_cache import (
    COMPLETE,
    LocalEnv,
    drop_layers,
    env_dir,
    exec_in_env,
    gc,
    held_layers,
    list_envs,
    open_use_lock,
    parse_age,
    parse_size,
    record_steps,
)
from envmgr.worker.hydrate import hydrate
from envmgr.worker.layers import LayerCheck, check_layers

if TYPE_CHECKING:
    from envmgr.cache import Store
    from envmgr.locks.lock import PlatformLock
    from envmgr.progress import Progress

__all__ = ["gc_command", "hydrate_command", "hydrate_for", "ls_command", "run_command"]


def _hydrate(
    target: str | None,
    options: FlowOptions,
    *,
    use_lock: list[int] | None = None,
    spec: dict[str, Any] | None = None,
) -> tuple[Path, bool, tuple[str, ...]]:
    """Hydrate what *target* (or else the *spec* inputs, as ``resolve`` takes them) names
    for this host; a lock file, flow step or spec is built into the store first when the
    store lacks it. *options* say how to resolve (its ``locked``/``frozen`` apply where a
    flow step or spec is resolved). With *use_lock*, the env's shared use lock is taken
    before hydrating, so ``gc`` cannot remove it in between; its descriptor is appended
    there and stays open (the caller execs)."""

    config = load(flags={"store": options.store})
    # A lock or flow file is built into the store when it lacks the env; an id or a name is read.
    reading = target is not None and not Path(target.split(":", 1)[0]).is_file()
    store_obj, cache = configured_store(config, reading=reading), Path(config["cache_dir"])
    host = host_platform()
    options = replace(options, platform=(host,))
    steps: tuple[str, ...] = ()
    with progress_for_cli() as progress:
        lock = None  # a lock the store may lack (a spec, lock file or flow step)
        if target is None:
            lock, store_obj = _spec_lock(spec or {}, options, progress)
            env_id = lock.env_id
        elif (given_id := _as_env_id(target, store_obj)) is not None:
            env_id = given_id  # an id (or its prefix): hydrate() finds (or builds) it
        else:
            found = load_target(target, store_obj, cache, flow_options=options, progress=progress)
            store_obj = found.store or store_obj
            env_id, steps = found.lock.for_platform(host).env_id, found.steps
            if not found.from_store:
                lock = found.lock.for_platform(host)
        if lock is not None and not _hydrated(cache, env_id):
            channels = list(options.channel)
            build_and_store(lock, build_options(store_obj, cache, progress, channels, config))
        if use_lock is not None:
            use_lock.append(open_use_lock(cache, env_id))
        # A full envmgr install builds what the store lacks (workers only hydrate).
        builder = build_missing(
            build_options(store_obj, cache, progress, list(options.channel), config)
        )
        result = hydrate(env_id, store_obj, cache, build_missing=builder, progress=progress)
    if steps:
        record_steps(cache, env_id, steps)
    return result.prefix, result.downloaded, steps


def hydrate_for(target: str, options: FlowOptions) -> Path:
    """The prefix of TARGET's env for this host, hydrated (built into the store first where
    it lacks a lock file's or flow step's env); the flow steps it serves are recorded."""
    prefix, _downloaded, _steps = _hydrate(target, options)
    return prefix


def _as_env_id(target: str, store: Store) -> str | None:
    """The env id *target* is, or starts (expanded in *store*, as ``load_target`` does);
    ``None`` for a name, file or flow step. No lock is read: a warm run stays fast."""

    if is_env_id(target):
        return target
    if is_id_prefix(target) and not Path(target).exists():
        return expand_env_id(target, store, names_too=is_name(target))
    return None


def _hydrated(cache: Path, env_id: str) -> bool:
    """The env is complete in this host's cache: nothing to build or download (a warm
    `run` of a lock file or spec reads at most its cached lock from the store)."""

    return (env_dir(cache, env_id) / COMPLETE).is_file()


def _spec_lock(
    spec: dict[str, Any], options: FlowOptions, progress: Progress
) -> tuple[PlatformLock, Store]:
    """This host's lock (*options* name the platform) of the spec that ``run``'s
    -f/-r/--conda/--pypi/--python name."""

    inputs = gather(
        flow=None,
        platform=list(options.platform),
        channel=list(options.channel),
        index_url=options.index_url,
        extra_index_url=list(options.extra_index_url),
        store=options.store,
        datastore=None,
        locked=options.locked,
        frozen=options.frozen,
        progress=progress,
        **spec,
    )
    results = resolve_specs(inputs.specs, inputs.options)
    if options.locked:
        require_locked(results, inputs.options.store.url)
    return results[0].lock, inputs.options.store


def hydrate_command(
    target: TargetArg,
    store: StoreOpt = None,
    channel: ChannelOpt = [],
    index_url: IndexOpt = None,
    extra_index_url: ExtraIndexOpt = [],
    as_json: JsonOpt = False,
) -> None:
    """Make the env available in this host's env cache and print its python."""
    start = time.monotonic()
    options = FlowOptions(
        store=store,
        channel=tuple(channel),
        index_url=index_url,
        extra_index_url=tuple(extra_index_url),
    )
    prefix, downloaded, _steps = _hydrate(target, options)
    if as_json:
        emit_json(
            {
                "env_id": prefix.name,
                "prefix": str(prefix),
                "python": str(prefix / "bin" / "python"),
                "downloaded": downloaded,
                "seconds": round(time.monotonic() - start, 3),
            }
        )
    else:
        typer.echo(prefix / "bin" / "python")


def run_command(
    target: Annotated[
        str | None,
        typer.Argument(
            help="An env id (or its first 8+ digits), an env name[:tag], a lock file or "
            "FLOW.py:step; left out when -f/-r/--conda/--pypi/--python name the env."
        ),
    ] = None,
    command: Annotated[
        list[str] | None, typer.Argument(metavar="COMMAND...", help="The command, after --.")
    ] = None,
    env_file: EnvFiles = [],
    requirements: ReqFiles = [],
    conda: CondaSpecs = [],
    pypi: PypiSpecs = [],
    python: PythonOpt = None,
    channel: ChannelOpt = [],
    index_url: IndexOpt = None,
    extra_index_url: ExtraIndexOpt = [],
    find_links: FindLinksOpt = [],
    store: StoreOpt = None,
    cuda: CudaOpt = None,
    locked: LockedOpt = False,
    frozen: FrozenOpt = False,
) -> None:
    """Hydrate TARGET (or the env the spec options name: resolved, built and stored when
    new), then run COMMAND inside it (its bin first on PATH)."""

    words = [*([target] if target is not None else []), *(command or [])]
    spec: dict[str, Any] | None = None
    kind = spec_file_kind(Path(target)) if target is not None else None
    if kind is not None and target is not None:  # `run environment.yml -- ...`, as pixi runs
        env_file = [Path(target), *env_file] if kind == "env_file" else env_file
        requirements = [Path(target), *requirements] if kind == "requirements" else requirements
        words = words[1:]
    if env_file or requirements or conda or pypi or python:
        if words and (is_env_id(words[0]) or ".py:" in words[0]):
            fail(f"give a TARGET ({words[0]}) or -f/-r/--conda/--pypi/--python, not both")
        spec = {
            "env_file": env_file,
            "requirements": requirements,
            "conda": conda,
            "pypi": pypi,
            "python": python,
            "find_links": find_links,
            "cuda": cuda,
        }
        target, command = None, words
    elif target is None:
        fail("give a TARGET or a spec (-f/-r/--conda/--pypi/--python), then -- and the command")
    if not command:
        fail("give the command to run after --, e.g. envmgr run ID -- python -V")
    held: list[int] = []  # the use lock, from before hydrating through the exec
    options = FlowOptions(
        store=store,
        channel=tuple(channel),
        index_url=index_url,
        extra_index_url=tuple(extra_index_url),
        locked=locked,
        frozen=frozen,
    )
    prefix, _downloaded, _steps = _hydrate(target, options, use_lock=held, spec=spec)
    try:
        exec_in_env(prefix, command, held[0])
    except OSError as exc:
        fail(f"cannot run {command[0]!r} in env {prefix.name}: {exc.strerror}", code=127)


def _host_cache() -> Path:
    """This host's env cache, for a command that reads or trims it: one that is missing is
    empty, but one that is there and not a directory is a wrong setting, not an empty cache
    (`ls` printed nothing and `verify` checked 0 layers, exit 0)."""
    config = load()
    path = Path(config.values["cache_dir"])
    if path.exists() and not path.is_dir():
        source = config.sources["cache_dir"]
        if source == "ENVMGR_CACHE_DIR":
            fix = "point ENVMGR_CACHE_DIR at a directory"
        elif source == "default":
            fix = "move that file away, or set ENVMGR_CACHE_DIR to a directory"
        else:
            fix = f"set cache_dir in {source} to a directory"
        raise EnvmgrError(f"the env cache {path} (from {source}) is not a directory", hint=fix)
    return path


def ls_command(as_json: JsonOpt = False) -> None:
    """List the envs in this host's env cache, most recently used first, each with its
    size: its own files and the package layers it links to, which other envs may share."""

    cache = _host_cache()
    envs = list_envs(cache)
    layers = held_layers(cache)

    def linked(env: LocalEnv) -> int:
        return sum(layers.get(layer, 0) for layer in env.layers)

    if as_json:
        emit_json(
            {
                "cache_dir": str(cache),
                "envs": [
                    {
                        "env_id": e.env_id,
                        "prefix": str(e.prefix),
                        "size": e.size,
                        "layers": len(e.layers),
                        "layers_size": linked(e),
                        "last_used": e.last_used,
                        "steps": list(e.steps),
                    }
                    for e in envs
                ],
                "layers": {"count": len(layers), "size": sum(layers.values())},
            }
        )
        return
    for e in envs:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        size = size_text(e.size + linked(e))
        typer.echo(f"{e.env_id}  {size:>9}  {used}  {', '.join(e.steps)}")
    if layers:
        shared = sum(layers.values())
        typer.echo(
            f"{len(envs)} envs: {size_text(sum(e.size for e in envs) + shared)} on disk, "
            f"{size_text(shared)} of it in {len(layers)} package layers they share"
        )


def _problem(check: LayerCheck) -> str:
    """What is wrong with a layer, in a few words and at most three paths of each kind."""
    if check.unreadable:
        return "its kept manifest is unreadable, so its files cannot be checked"

    def some(paths: tuple[str, ...]) -> str:
        return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

    parts = []
    if check.changed:
        parts.append(f"written since it was unpacked: {some(check.changed)}")
    if check.missing:
        parts.append(f"gone: {some(check.missing)}")
    if check.added:
        parts.append(f"not its own: {some(check.added)}")
    return "; ".join(parts)


def verify_command(
    fix: Annotated[
        bool,
        typer.Option(
            "--fix",
            help="Remove each changed layer and the envs linking to it (not ones in use): "
            "the next hydrate fetches them again.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check this host's package layers for files changed since they were unpacked.

    Envs share their layers' files through hard links, read-only; root ignores that, so a
    task running as root that writes into its env's files changes every env linking to
    them. Exit 1 when a layer changed (with --fix: when an env linking to it is in use, or
    a hydrate is linking from it).
    """

    cache = _host_cache()
    checks = check_layers(cache)
    bad = [check for check in checks if not check.intact]
    envs = list_envs(cache) if bad else []
    users = {c.layer_id: sorted(e.env_id for e in envs if c.layer_id in e.layers) for c in bad}
    removed, busy, dropped = drop_layers(cache, users) if fix and bad else ([], [], [])
    # With --fix, what is left: an env a command runs in, a layer a hydrate assembles from.
    kept = [c.layer_id for c in bad if c.layer_id not in dropped] if fix else []
    if as_json:
        emit_json(
            {
                "cache_dir": str(cache),
                "layers_checked": len(checks),
                "changed": [
                    {
                        "layer_id": check.layer_id,
                        "package": check.package,
                        "written": list(check.changed),
                        "missing": list(check.missing),
                        "added": list(check.added),
                        "unreadable": check.unreadable,
                        "envs": users[check.layer_id],
                    }
                    for check in bad
                ],
                "removed": [env.env_id for env in removed],
                "in_use": [env.env_id for env in busy],
                "removed_layers": dropped,
            }
        )
        if bad and (not fix or busy or kept):
            raise typer.Exit(1)
        return
    for check in bad:
        linked = ", ".join(users[check.layer_id]) or "no env"
        typer.echo(
            f"layer {check.layer_id} ({check.package or 'unknown package'}): {_problem(check)}; "
            f"linked by {linked}"
        )
    for env in removed:
        typer.echo(f"removed {env.env_id}")
    for env in busy:
        typer.echo(f"kept {env.env_id}: in use by a running command; run --fix again after it")
    for layer_id in kept:
        typer.echo(f"kept layer {layer_id}: a hydrate is linking from it; run --fix again after it")
    if dropped:
        what, it = ("layer", "it") if len(dropped) == 1 else ("layers", "them")
        typer.echo(f"removed {len(dropped)} changed package {what}; a hydrate fetches {it} again")
    if not bad:
        if not STATE.quiet:
            what = "layer" if len(checks) == 1 else "layers"
            typer.echo(f"{len(checks)} package {what} checked: none changed")
        return
    if not fix:
        raise EnvmgrError(
            f"{len(bad)} of {len(checks)} package layers in {cache} changed since they "
            "were unpacked (a task running as root wrote into its env?)",
            hint="`envmgr verify --fix` removes them and the envs linking to them; give such "
            "tasks ENVMGR_LINK=copy",
        )
    if busy or kept:
        raise typer.Exit(1)


def gc_command(
    max_size: Annotated[str | None, typer.Option("--max-size", help="e.g. 20G")] = None,
    older_than: Annotated[str | None, typer.Option("--older-than", help="e.g. 7d")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove least recently used envs from this host's env cache (never ones in use)."""

    if max_size is None and older_than is None:
        fail("give --max-size and/or --older-than")
    try:
        size = parse_size(max_size) if max_size else None
        age = parse_age(older_than) if older_than else None
    except ValueError as exc:
        fail(str(exc))
    removed, busy, layers = gc(_host_cache(), max_size=size, older_than=age, dry_run=dry_run)
    freed = sum(e.size for e in removed) + sum(size for _layer, size in layers)
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "removed": [e.env_id for e in removed],
                "in_use": [e.env_id for e in busy],
                "removed_layers": [layer for layer, _size in layers],
                "freed": freed,
            }
        )
    elif not STATE.quiet:
        verb = "would remove" if dry_run else "removed"
        for e in removed:
            typer.echo(f"{verb} {e.env_id} ({e.size / 1e6:.1f} MB)")
        for e in busy:
            typer.echo(f"kept {e.env_id}: in use by a running command")
        if layers:
            typer.echo(
                f"{verb} {len(layers)} package layers no env "
                f"{'would link' if dry_run else 'links'} to "
                f"({size_text(sum(size for _layer, size in layers))})"
            )
