"""``envmgr store ls``, ``du`` and ``gc``: what a store holds, and collecting old envs."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from envmgr.cache.lifecycle import collect, collect_layers, plan_gc, scan
from envmgr.cli._common import STATE, emit_json, fail, size_text, warn_bad_names
from envmgr.cli._help import TidyCommand, TidyGroup
from envmgr.cli._inputs import JsonOpt, StoreOpt, configured_store
from envmgr.config import load
from envmgr.worker.env_cache import parse_age

if TYPE_CHECKING:
    from envmgr.cache.lifecycle import Lease, StoreContents, StoredEnv

__all__ = ["STORE_COMMANDS", "store_app"]


def _contents(store: str | None) -> StoreContents:

    contents = scan(configured_store(load(flags={"store": store}), reading=True))
    warn_bad_names(contents.bad_names)
    return contents


def _when(stamp: str) -> str:
    """A UTC ISO time as the local ``YYYY-MM-DD HH:MM`` (``-`` when unknown)."""
    if not stamp:
        return "-"
    try:
        parsed = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    return parsed.astimezone().strftime("%Y-%m-%d %H:%M")


def _lease_line(lease: Lease) -> str:
    if not lease.stale:
        return f"building: {lease.info.describe()}"
    taken = lease.info.taken or "?"
    return f"stale lease (holder {lease.info.holder}, taken {_when(taken)}, gone or expired)"


def ls_command(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the envs in the store, most recently active first: platform, size (with the
    package layers it lists, which other envs may share), when built and last used, and the
    names that point at them."""
    contents = _contents(store)
    envs = sorted(contents.envs, key=lambda e: e.last_active, reverse=True)
    if as_json:
        emit_json(
            {
                "store": contents.url,
                "envs": [env.to_dict() for env in envs],
                "leases": [lease.to_dict() for lease in contents.leases],
            }
        )
        return
    if not envs:
        typer.echo(f"no envs in {contents.url}")
    for env in envs:
        state = "" if env.state == "complete" else f"  [{env.state}]"
        typer.echo(
            f"{env.env_id[:12]}  {env.platform:<14} {size_text(env.size + env.layer_size):>9}  "
            f"built {_when(env.created)}  used {_when(env.last_used)}  "
            f"{', '.join(env.names)}{state}".rstrip()
        )
    for lease in contents.leases:
        typer.echo(f"{lease.env_id[:12]}  {_lease_line(lease)}")


def du_command(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """How much the store holds: envs per platform, named and incomplete envs, the package
    layers they share, locks. An env's own objects count under envs, its layers once under
    layers, however many envs list them."""
    contents = _contents(store)

    def total(envs: list[StoredEnv]) -> dict[str, int]:
        return {"count": len(envs), "size": sum(e.size for e in envs)}

    envs = list(contents.envs)
    platforms = {
        p: total([e for e in envs if e.platform == p]) for p in sorted({e.platform for e in envs})
    }
    other = {"count": len(contents.other), "size": sum(entry.size for entry in contents.other)}
    locks = {"count": contents.locks, "size": contents.lock_bytes}
    stale = sum(1 for lease in contents.leases if lease.stale)
    layers = {
        "count": len(contents.layers),
        "size": sum(layer.size for layer in contents.layers),
        # What the envs would take as one archive each (format 2): the sharing layers save.
        "listed": sum(e.layer_size for e in envs),
    }
    rows = {
        "envs": total(envs),
        "named": total([e for e in envs if e.names]),
        "incomplete": total([e for e in envs if e.state == "incomplete"]),
        "layers": layers,
        "locks": locks,
        "other": other,
    }
    grand = rows["envs"]["size"] + layers["size"] + locks["size"] + other["size"]
    if as_json:
        emit_json(
            {
                "store": contents.url,
                **rows,
                "platforms": platforms,
                "names": contents.names,
                "leases": {"count": len(contents.leases), "stale": stale},
                "total": grand,
            }
        )
        return
    typer.echo(f"{contents.url}: {size_text(grand)}")
    lines = [("envs", rows["envs"]), *((f"  {p}", t) for p, t in platforms.items())]
    lines += [("named envs", rows["named"]), ("incomplete envs", rows["incomplete"])]
    lines += [("package layers", layers), ("locks", locks), ("other files", other)]
    for label, row in lines:
        typer.echo(f"{label:<20} {row['count']:>6}  {size_text(row['size']):>9}")
    if layers["listed"] > layers["size"]:
        typer.echo(
            f"{'':<20} {'':>6}  (the envs list {size_text(layers['listed'])} of layers: "
            f"{layers['listed'] / max(layers['size'], 1):.1f}x what is stored)"
        )
    typer.echo(f"{'names':<20} {contents.names:>6}")
    typer.echo(f"{'leases':<20} {len(contents.leases):>6}  ({stale} stale)")


def gc_command(
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Remove envs not built, used or named for this long, e.g. 90d (required).",
        ),
    ] = None,
    keep_named: Annotated[
        bool,
        typer.Option(
            "--keep-named",
            help="Keep every env a name points at. Always on: move or remove the name first.",
        ),
    ] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove old envs from the store: never one a name points at, one built, used or named
    within --older-than, or one a live lease is building; stale leases are removed too. The
    resolution cache stays, so a later build re-creates a removed env with the same id.
    Package layers that no remaining env lists go too, once they are as old (never while a
    build is running)."""

    del keep_named  # documented for scripts; the rule holds either way
    if older_than is None:
        fail("give --older-than, e.g. --older-than 90d: envs active more recently are kept")
    try:
        age = parse_age(older_than)
    except ValueError as exc:
        fail(f"--older-than: {exc}")
    config = load(flags={"store": store})
    store_obj = configured_store(config, reading=True)

    contents = scan(store_obj)
    warn_bad_names(contents.bad_names)
    plan = plan_gc(contents, older_than=age)
    removed = plan.remove if dry_run else collect(store_obj, plan)
    layers = plan.remove_layers if dry_run else collect_layers(store_obj, plan, contents)
    freed = sum(env.size for env in removed) + sum(layer.size for layer in layers)
    if as_json:
        emit_json(
            {
                "store": store_obj.url,
                "dry_run": dry_run,
                "removed": [env.to_dict() for env in removed],
                "kept": [
                    {"env_id": k.env.env_id, "platform": k.env.platform, "reason": k.reason}
                    for k in plan.kept
                ],
                "stale_leases": [lease.to_dict() for lease in plan.stale_leases],
                "removed_layers": [layer.to_dict() for layer in layers],
                "freed": freed,
            }
        )
        return
    if STATE.quiet:
        return
    verb = "would remove" if dry_run else "removed"
    for env in removed:
        typer.echo(
            f"{verb} {env.env_id[:12]} {env.platform} ({size_text(env.size)}, built "
            f"{_when(env.created)}, used {_when(env.last_used)})"
        )
    for lease in plan.stale_leases:
        typer.echo(f"{verb} the {_lease_line(lease)} of {lease.env_id[:12]}")
    if layers:
        size = size_text(sum(layer.size for layer in layers))
        typer.echo(f"{verb} {len(layers)} package layers no env lists ({size})")
    reasons = [k.reason for k in plan.kept]
    kept = ", ".join(
        f"{reasons.count(r)} {r}" for r in ("named", "recent", "building") if r in reasons
    )
    typer.echo(
        f"{'would free' if dry_run else 'freed'} {size_text(freed)} in {store_obj.url}"
        + (f"; kept {kept}" if kept else "")
    )


#: Each ``envmgr store`` command and the example its help ends with.
STORE_COMMANDS: tuple[tuple[str, Callable[..., None], str], ...] = (
    ("ls", ls_command, "envmgr store ls --store s3://bucket/envmgr"),
    ("du", du_command, "envmgr store du --json"),
    ("gc", gc_command, "envmgr store gc --keep-named --older-than 90d --dry-run"),
)

store_app = typer.Typer(
    cls=TidyGroup,
    help="What a store holds (ls, du) and collecting its old envs (gc); local or S3.",
    no_args_is_help=True,
)
for _name, _function, _example in STORE_COMMANDS:
    store_app.command(_name, cls=TidyCommand, epilog=f"Example: {_example}")(_function)
