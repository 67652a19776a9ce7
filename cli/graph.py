"""``envmgr tree`` and ``envmgr why``: the dependency graph of an env, as uv and pixi draw it."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from envmgr.cli._common import emit_json, fail
from envmgr.cli._inputs import JsonOpt, StoreOpt
from envmgr.cli._targets import TargetArg
from envmgr.cli.inspect import PlatformFilter, load_env, platform_parts
from envmgr.locks.graph import Graph, Node

__all__ = ["tree_command", "why_command"]

PackageArg = Annotated[str, typer.Argument(metavar="PACKAGE", help="A package in the env.")]


def _graphs(target: str, platform: str | None, store: str | None) -> list[Graph]:
    found, _store, _cache = load_env(target, store)
    return [Graph(part) for part in platform_parts(found, platform)]


def _node(graph: Graph, name: str) -> Node:
    node = graph.find(name)
    if node is None:
        close = graph.suggest(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(
            f"{name} is not in env {graph.lock.env_id[:12]} ({graph.lock.platform}){hint}",
            code=1,
        )
    return node


def _as_json(graph: Graph, key: str, edges: dict[str, list[str]], seen: set[str]) -> dict[str, Any]:
    node = graph.nodes[key]
    out: dict[str, Any] = {
        "name": node.package.name,
        "version": node.package.version,
        "manager": node.package.manager,
    }
    if key in seen:
        out["repeat"] = bool(edges.get(key))
        return out
    seen.add(key)
    out["dependencies"] = [_as_json(graph, k, edges, seen) for k in edges.get(key, [])]
    return out


def tree_command(
    target: TargetArg,
    invert: Annotated[
        str | None,
        typer.Option(
            "--invert",
            "-i",
            metavar="PACKAGE",
            help="Draw what needs PACKAGE, up to the packages the spec asked for.",
        ),
    ] = None,
    depth: Annotated[
        int | None,
        typer.Option("--depth", "-d", metavar="N", min=0, help="Draw N levels at most."),
    ] = None,
    platform: PlatformFilter = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw the env's dependency tree: the packages nothing else needs at the top, each
    with what it needs below it; a subtree drawn once is marked (*) where it repeats."""
    data = []
    for graph in _graphs(target, platform, store):
        roots = [_node(graph, invert).key] if invert else graph.roots()
        if as_json:
            edges = graph.needed_by if invert else graph.needs
            seen: set[str] = set()
            data.append(
                {
                    "platform": graph.lock.platform,
                    "env_id": graph.lock.env_id,
                    "inverted": invert is not None,
                    "roots": [_as_json(graph, root, edges, seen) for root in roots],
                }
            )
            continue
        typer.echo(f"env {graph.lock.env_id[:12]}  {graph.lock.platform}")
        for line in graph.tree(roots, invert=invert is not None, depth=depth):
            typer.echo(f"{line.prefix}{line.node.label}{' (*)' if line.repeat else ''}")
    if as_json:
        emit_json({"envs": data})


def why_command(
    target: TargetArg,
    package: PackageArg,
    platform: PlatformFilter = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Say why PACKAGE is in the env: for each package the spec asked for that needs it,
    the shortest chain of requirements from there to PACKAGE."""
    data = []
    for graph in _graphs(target, platform, store):
        node = _node(graph, package)
        chains = graph.paths_to(node.key)
        if as_json:
            data.append(
                {
                    "platform": graph.lock.platform,
                    "env_id": graph.lock.env_id,
                    "package": node.package.name,
                    "version": node.package.version,
                    "requested": chains == [[node.key]],
                    "needed_by": [graph.nodes[k].package.name for k in graph.needed_by[node.key]],
                    "chains": [[graph.nodes[k].package.name for k in c] for c in chains],
                }
            )
            continue
        head = f"{node.label}  ({graph.lock.platform}, env {graph.lock.env_id[:12]})"
        if chains == [[node.key]]:
            # Locked PyPI dependencies leave out those an extra adds (requests[socks]):
            # a root was asked for by the spec or through an extra.
            typer.echo(f"{head}: nothing in the lock needs it; the spec (or an extra) asked for it")
            continue
        needed_by = ", ".join(graph.nodes[k].package.name for k in graph.needed_by[node.key])
        typer.echo(f"{head}: needed by {needed_by}")
        for chain in chains:
            typer.echo("  " + " -> ".join(graph.nodes[k].label for k in chain))
    if as_json:
        emit_json({"envs": data})
