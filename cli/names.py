"""``envmgr alias`` and ``envmgr names``: named environments in the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from envmgr.cli._common import STATE, emit_json
from envmgr.cli._inputs import JsonOpt, PlatformOpt, StoreOpt, configured_store
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
    """Give an env a name: every platform of TARGET, usable wherever an env id is."""
    from envmgr.build import offer_lock  # noqa: PLC0415
    from envmgr.names import parse_name, set_alias  # noqa: PLC0415

    parse_name(name)  # a bad name fails before any lookup
    config = load(flags={"store": store})
    store_obj = configured_store(config)
    flow_options = FlowOptions(store=store, platform=tuple(platform))  # for FLOW.py:step
    found = load_target(target, store_obj, Path(config["cache_dir"]), flow_options=flow_options)
    for part in found.lock.platforms:
        offer_lock(store_obj, part)  # a worker can then build what the name points at
    alias, changed = set_alias(
        store_obj, name, {p.platform: p.env_id for p in found.lock.platforms}
    )
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
        envs = ", ".join(f"{p} {e[:12]}" for p, e in alias.envs.items())
        typer.echo(f"{alias.ref} {verb} {envs}")


def names_command(
    name: Annotated[str | None, typer.Argument(help="Only the tags of this name.")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the named envs in the store."""
    from envmgr.names import list_aliases  # noqa: PLC0415

    store_obj = configured_store(load(flags={"store": store}), reading=True)
    aliases = list(list_aliases(store_obj, name))
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
    for a in aliases:
        envs = ", ".join(f"{p} {e[:12]}" for p, e in a.envs.items())
        typer.echo(f"{a.ref:<32} {envs}  {a.created}")
