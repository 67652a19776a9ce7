"""What a TARGET argument names: an env id, an env name, a lock file or ``FLOW.py:step``.

``hydrate``, ``run``, ``show``, ``diff``, ``export`` and ``alias`` all take one. Lookups never
build; :func:`host_env_id` builds (once, into the store) only when a lock file or a flow step
is to be hydrated and the store has no archive for it yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from envmgr.build.once import read_stored_lock
from envmgr.cache import Store, open_store
from envmgr.cache.names import AliasError, is_name, lookup
from envmgr.cli._common import fail
from envmgr.cli._inputs import gather, parse_platforms
from envmgr.config import load
from envmgr.ids import is_env_id, is_id_prefix
from envmgr.limits import InputError, read_bounded
from envmgr.locks.export import adopt, channel_urls, read_explicit
from envmgr.locks.formats import detect_format
from envmgr.locks.lock import Lock, read_conda_lock
from envmgr.locks.pixi import read_pixi_lock
from envmgr.locks.pylock import read_pypi_lock
from envmgr.platforms import PLATFORMS
from envmgr.progress import NULL, Progress
from envmgr.resolve.pypi.pip_config import pip_sources
from envmgr.resolve.resolution_cache import (
    ResolveOptions,
    complete_pypi_lock,
    require_locked,
    resolve_specs,
)

if TYPE_CHECKING:
    from envmgr.resolve.resolution_cache import ResolveOptions

__all__ = [
    "FlowOptions",
    "Target",
    "TargetArg",
    "expand_env_id",
    "load_target",
    "read_lock_file",
]

#: A shortened env id, as envmgr prints them (12 digits), like git's abbreviated hashes.

TargetArg = Annotated[
    str,
    typer.Argument(
        help="An env id (or its first 8+ digits), an env name[:tag], a conda-lock or @EXPLICIT "
        "file, or FLOW.py:step."
    ),
]


@dataclass(frozen=True, kw_only=True, slots=True)
class FlowOptions:
    """The flags that say how to resolve a ``FLOW.py:step`` target."""

    store: str | None = None
    channel: tuple[str, ...] = ()
    index_url: str | None = None
    extra_index_url: tuple[str, ...] = ()
    platform: tuple[str, ...] = ()
    datastore: str | None = None
    locked: bool = False  # --locked: the step's lock must be cached and unchanged
    frozen: bool = False  # --frozen: the step's cached lock, never a solve


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    text: str
    kind: str  # "env id", "name", "lock file", "flow step"
    lock: Lock
    steps: tuple[str, ...] = ()
    from_store: bool = False  # every platform's lock came from the store
    store: Store | None = None  # a flow step's: the store its run uses (see envmgr.specs.flows)


def read_lock_file(
    path: Path,
    cache_dir: Path,
    *,
    options: ResolveOptions | None = None,
    python: str | None = None,
) -> Lock:
    """A lock file of any format :mod:`envmgr.locks.formats` names, as a checked :class:`Lock`.
    A PyPI-only lock (pylock.toml, uv.lock) is completed with a conda python by
    :func:`~envmgr.resolve.resolution_cache.complete_pypi_lock` under *options* (default: the
    configuration's channels and platforms)."""

    options = options or default_resolve_options(cache_dir)
    fmt = detect_format(path)
    if fmt == "explicit":
        lock = Lock(platforms=(read_explicit(path, cache_dir),))
    elif fmt == "conda-lock":
        lock = read_conda_lock(path)
    elif fmt == "pixi.lock":
        lock = read_pixi_lock(path)
    else:
        found = read_pypi_lock(path, fmt)
        lock = complete_pypi_lock(found, options, python)
        return adopt(lock, where=str(path), trusted=(*_trusted_sources(options), *found.indexes))
    return adopt(lock, where=str(path), trusted=_trusted_sources(options))


def _trusted_sources(options: ResolveOptions) -> tuple[str, ...]:
    """The configured channels, indexes and find-links locations: where an adopted lock's
    packages may come from besides the channels it declares."""

    index, extra, find_links = pip_sources()
    indexes = (options.index_url or index, *options.extra_index_urls, *extra)
    return (
        *channel_urls(options.default_channels),
        *(u for u in indexes if u),
        *options.find_links,
        *find_links,
    )


def default_resolve_options(
    cache_dir: Path,
    *,
    store: Store | None = None,
    channels: tuple[str, ...] = (),
    platforms: tuple[str, ...] = (),
) -> ResolveOptions:
    """Resolve options from the configuration (channels, platforms, store), for the conda
    part of a PyPI-only lock file; *channels* and *platforms* flags override it."""

    config = load(flags={"channels": list(channels)})
    return ResolveOptions(
        store=store or open_store(config["store"]),
        cache_dir=cache_dir,
        platforms=parse_platforms(list(platforms)),
        default_platforms=parse_platforms(
            list(config["platforms"]), where=config.sources["platforms"]
        ),
        default_channels=tuple(config["channels"]),
    )


def expand_env_id(prefix: str, store: Store, *, names_too: bool = False) -> str | None:
    """The env id in *store* that starts with *prefix* (8+ hex digits). Exits with one line
    when several do (listing them) or, unless *prefix* may also be a name (*names_too*:
    then ``None``), when none does."""
    found = sorted(
        {
            key.split("/")[2]
            for platform in PLATFORMS
            for key in store.list(f"envs/{platform}/{prefix}")
            if key.endswith(("/conda-lock.yml", "/manifest.json"))
        }
    )
    if len(found) > 1:
        shown = ", ".join(f[:16] for f in found[:8]) + (", ..." if len(found) > 8 else "")
        fail(f"env id prefix {prefix} is ambiguous in {store.url}: {shown} (give more digits)")
    if found:
        return found[0]
    if names_too:
        return None
    fail(f"no env id starts with {prefix} in {store.url}", code=1)
    raise AssertionError  # fail() exits


def _step_names(path: Path) -> list[str]:
    """The ``@step`` methods of the classes in the flow file at *path*, in file order."""
    import ast  # noqa: PLC0415

    try:
        tree = ast.parse(read_bounded(path, what="flow file"))
    except (InputError, SyntaxError, ValueError):
        return []
    return [
        item.name
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        for item in node.body
        if isinstance(item, ast.FunctionDef)
        and any(
            (d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")) == "step"
            for d in item.decorator_list
        )
    ]


def _stored(store: Store, env_ids: dict[str, str] | str, what: str) -> Lock:
    """The stored locks of an env id (any platform) or of a name's platform → env id map."""

    pairs = [(p, env_ids) for p in PLATFORMS] if isinstance(env_ids, str) else list(env_ids.items())
    found = [lock for p, e in pairs if (lock := read_stored_lock(store, p, e)) is not None]
    if not found:
        fail(
            f"{what}: not in {store.url} (no envs/<platform>/<env_id>/conda-lock.yml)",
            code=1,
        )
    return Lock(platforms=tuple(found), spec_id=found[0].spec_id)


def load_target(
    text: str,
    store: Store,
    cache_dir: Path,
    *,
    flow_options: FlowOptions | None = None,
    progress: Progress = NULL,
) -> Target:
    """Read what *text* names; a flow step is resolved (through the resolution cache) with
    *flow_options* (channel, index and platform flags). Exits 1/2 with one line if nothing
    matches."""

    if is_env_id(text):
        return Target(text=text, kind="env id", lock=_stored(store, text, f"env {text}"))
    if is_id_prefix(text) and not Path(text).exists():
        env_id = expand_env_id(text, store, names_too=is_name(text))
        if env_id is not None:
            lock = _stored(store, env_id, f"env {env_id}")
            return Target(text=text, kind="env id", lock=lock, from_store=True)
    if ":" in text and text.rsplit(":", 1)[0].endswith(".py"):
        return _flow_step(text, flow_options or FlowOptions(), progress)
    path = Path(text)
    if path.is_file() and path.suffix == ".py":
        steps = _step_names(path)
        example = "start" if "start" in steps else (steps[0] if steps else "STEP")
        fail(
            f"{text} is a flow file: name one of its steps, e.g. {text}:{example} "
            f"(its steps: {', '.join(steps) or 'none found'})"
        )
    if path.is_file():
        options = flow_options or FlowOptions()
        resolve = default_resolve_options(
            cache_dir, store=store, channels=options.channel, platforms=options.platform
        )
        lock = read_lock_file(path, cache_dir, options=resolve)
        return Target(text=text, kind="lock file", lock=lock)
    if is_name(text):
        try:
            alias = lookup(store, text)
        except AliasError:
            if is_id_prefix(text):  # no name is 8+ hex digits: it was an env id prefix
                raise AliasError(
                    f"no env id starts with {text} in {store.url}",
                    hint="`envmgr store ls` lists the stored envs",
                ) from None
            raise
        lock = _stored(store, dict(alias.envs), f"env {alias.ref}")
        return Target(text=text, kind="name", lock=lock, from_store=True)
    fail(
        f"{text!r} is not an env id (32 hex digits), an env name[:tag], a lock file or FLOW.py:step"
    )
    raise AssertionError  # fail() exits


def _flow_step(text: str, options: FlowOptions, progress: Progress) -> Target:

    flow, step = text.rsplit(":", 1)
    inputs = gather(
        flow=Path(flow),
        env_file=[],
        requirements=[],
        conda=[],
        pypi=[],
        python=None,
        platform=list(options.platform),
        channel=list(options.channel),
        index_url=options.index_url,
        extra_index_url=list(options.extra_index_url),
        store=options.store,
        cuda=None,
        datastore=options.datastore,
        locked=options.locked,
        frozen=options.frozen,
        progress=progress,
    )
    if step in inputs.named:
        alias = lookup(inputs.options.store, inputs.named[step][0])
        lock = _stored(inputs.options.store, dict(alias.envs), f"env {alias.ref}")
        return Target(
            text=text,
            kind="name",
            lock=lock,
            steps=(step,),
            from_store=True,
            store=inputs.options.store,
        )
    if step not in inputs.specs:
        fail(
            f"{flow}: no step {step!r} with an environment (steps with one: "
            f"{', '.join(inputs.specs) or 'none'})"
        )
    results = resolve_specs({step: inputs.specs[step]}, inputs.options)
    if options.locked:
        require_locked(results, inputs.options.store.url)
    lock = Lock(platforms=tuple(r.lock for r in results), spec_id=results[0].spec_id)
    return Target(text=text, kind="flow step", lock=lock, steps=(step,), store=inputs.options.store)
