"""``envmgr alias`` and ``envmgr names``: named environments in the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from envmgr.build.once import offer_lock
from envmgr.cache.names import AliasError, BadName, list_aliases, lookup, parse_name, set_alias
from envmgr.cli._common import STATE, emit_json, fail, warn_bad_names
from envmgr.cli._inputs import (
    JsonOpt,
    PlatformOpt,
    StoreOpt,
    configured_store,
    parse_platforms,
)
from envmgr.cli._targets import FlowOptions, TargetArg, load_target
from envmgr.config import load

__all__ = ["alias_command", "names_command"]


def alias_command(
    target: TargetArg,
    name: Annotated[
        str,
        typer.Argument(
            help="name[:tag]; the tags latest (default), candidate and stable move, others "
            "are written once."
        ),
    ],
    store: StoreOpt = None,
    platform: PlatformOpt = [],
    as_json: JsonOpt = False,
) -> None:
    """Give an env a name: every platform of TARGET, usable wherever an env id is. With
    --platform, only those platforms of the name are set and its others are kept."""

    parse_name(name)  # a bad name fails before any lookup
    wanted = parse_platforms(platform)
    config = load(flags={"store": store})
    store_obj = configured_store(config)
    flow_options = FlowOptions(store=store, platform=wanted)  # for FLOW.py:step
    found = load_target(target, store_obj, Path(config["cache_dir"]), flow_options=flow_options)
    envs: dict[str, str] = {p.platform: p.env_id for p in found.lock.platforms}
    if wanted:
        missing = [p for p in wanted if p not in envs]
        if missing:
            fail(
                f"--platform {missing[0]}: {target} has no {missing[0]} env "
                f"(it has: {', '.join(sorted(envs))})"
            )
        try:
            kept = dict(lookup(store_obj, name).envs)
        except AliasError:
            kept = {}  # a new name (a broken one is refused by set_alias below)
        envs = {**kept, **{p: envs[p] for p in wanted}}
    for part in found.lock.platforms:
        if part.platform in envs:
            offer_lock(store_obj, part)  # a worker can then build what the name points at
    alias, changed = set_alias(store_obj, name, envs)
    if as_json:
        emit_json(
            {
                "name": alias.name,
                "tag": alias.tag,
                "envs": dict(alias.envs),
                "changed": changed,
                "store": store_obj.url,
            }
        )
    elif not STATE.quiet:
        verb = "now points at" if changed else "already points at"
        shown = ", ".join(f"{p} {e[:12]}" for p, e in alias.envs.items())
        typer.echo(f"{alias.ref} {verb} {shown}")


def names_command(
    name: Annotated[str | None, typer.Argument(help="Only the tags of this name.")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the named envs in the store."""

    store_obj = configured_store(load(flags={"store": store}), reading=True)
    bad: list[BadName] = []
    aliases = list(list_aliases(store_obj, name, bad=bad))
    warn_bad_names(bad)
    if as_json:
        emit_json(
            {
                "store": store_obj.url,
                "names": [
                    {
                        "name": a.name,
                        "tag": a.tag,
                        "envs": dict(a.envs),
                        "created": a.created,
                        "by": a.by,
                    }
                    for a in aliases
                ],
            }
        )
        return
    if not aliases and not STATE.quiet:
        # Silence would read as "that worked": `envmgr names ls` asks for a name "ls".
        said = (
            f"no name {name} in {store_obj.url}; `envmgr names` lists them all"
            if name
            else (f"no names in {store_obj.url}; `envmgr alias TARGET team/name:tag` gives one")
        )
        typer.echo(f"envmgr: note: {said}", err=True)
    for a in aliases:
        envs = ", ".join(f"{p} {e[:12]}" for p, e in a.envs.items())
        typer.echo(f"{a.ref:<32} {envs}  {a.created}")
