"""``envmgr show``, ``diff`` and ``export``: look at envs and hand them to other tools."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from envmgr import __version__
from envmgr.archive.manifest import Manifest
from envmgr.build.once import read_manifest
from envmgr.cache import Store
from envmgr.cli._common import STATE, emit_json, fail, writing_output
from envmgr.cli._inputs import JsonOpt, StoreOpt, configured_store
from envmgr.cli._targets import FlowOptions, Target, TargetArg, load_target
from envmgr.config import load
from envmgr.cuda import cuda_need, describe
from envmgr.fs import write_atomic
from envmgr.locks.export import FORMATS, known_format, render
from envmgr.locks.lock import Lock, LockedPackage, PlatformLock, diff_locks
from envmgr.platforms import host_platform, is_platform
from envmgr.worker.env_cache import COMPLETE, env_dir, recorded_steps
from envmgr.worker.layers import fetch_layer_manifests

__all__ = ["diff_command", "export_command", "load_env", "platform_parts", "show_command"]

PlatformFilter = Annotated[
    str | None,
    typer.Option(
        "-p",
        "--platform",
        metavar="PLATFORM",
        help="Only this platform (default: all in the target).",
    ),
]


def load_env(target: str, store: str | None) -> tuple[Target, Any, Path]:

    config = load(flags={"store": store})
    store_obj, cache = configured_store(config, reading=True), Path(config["cache_dir"])
    found = load_target(target, store_obj, cache, flow_options=FlowOptions(store=store))
    return found, found.store or store_obj, cache


def platform_parts(target: Target, platform: str | None) -> list[PlatformLock]:
    if platform is None:
        return list(target.lock.platforms)
    return [target.lock.for_platform(platform)]


def _source(pkg: LockedPackage) -> str:
    """Where a package comes from: its conda channel, or its file's host for PyPI."""
    if pkg.manager == "conda":
        return pkg.url.rsplit("/", 2)[0]
    parts = urlsplit(pkg.url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else parts.scheme + ":"


def _package_row(pkg: LockedPackage, installed: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "name": pkg.name,
        "version": pkg.version,
        "build": pkg.build,
        "manager": pkg.manager,
        "source": _source(pkg),
        "size": pkg.size or None,  # the download, from the index or channel
        "installed_size": (installed or {}).get(pkg.name),  # on disk, once built
    }


def show_command(
    target: TargetArg,
    platform: PlatformFilter = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show an env: platforms, python, packages, archive, cache, steps.

    TARGET is looked up, never built: an env id or name in the store, a lock file, or a
    flow step (resolved through the resolution cache)."""

    found, store_obj, cache = load_env(target, store)
    rows = []
    for part in platform_parts(found, platform):
        manifest = read_manifest(store_obj, part.platform, part.env_id)
        prefix = env_dir(cache, part.env_id)
        python = part.names().get("python")
        need = cuda_need(part.packages)
        locked_for = next(
            (v.split("=")[1] for v in part.virtual_packages if v.startswith("__cuda=")), None
        )
        rows.append(
            {
                "platform": part.platform,
                "env_id": part.env_id,
                "variant": describe(part.platform, need),
                "cuda": None
                if need is None
                else {"minimum": need.minimum, "package": need.package, "locked_for": locked_for},
                "python": python.version if python else None,
                "packages": [
                    _package_row(p, dict(manifest.package_sizes) if manifest else None)
                    for p in part.packages
                ],
                "archive": None if manifest is None else _archive(store_obj, manifest),
                "cached_at": str(prefix) if (prefix / COMPLETE).is_file() else None,
                "steps": sorted(set(found.steps) | set(recorded_steps(cache, part.env_id))),
            }
        )
    data = {
        "target": found.text,
        "kind": found.kind,
        "spec_id": found.lock.spec_id or None,
        "store": store_obj.url,
        "platforms": rows,
    }
    if as_json:
        emit_json(data)
        return
    for row in rows:
        _print_env(row)


def _archive(store: Store, manifest: Manifest) -> dict[str, Any]:
    """What the env takes in the store and on disk: its archive, or (format 3) its env
    layer and package layers together, with the layer count."""
    size, unpacked = manifest.size, manifest.unpacked_size
    if manifest.layers:
        for layer in fetch_layer_manifests(store, manifest.layers).values():
            if layer is not None:
                size += layer.size
                unpacked += layer.unpacked_size
    return {
        "size": size,
        "unpacked_size": unpacked,
        "codec": manifest.codec,
        "created": manifest.created,
        "format": manifest.format,
        "layers": len(manifest.layers),
    }


def _print_env(row: dict[str, Any]) -> None:
    packages = row["packages"]
    typer.echo(
        f"env {row['env_id']}  {row['platform']}  python {row['python'] or '-'}  "
        f"{len(packages)} packages"
    )
    cuda, variant = row["cuda"], "CPU"
    if cuda is not None:
        variant = f"CUDA >= {cuda['minimum']} ({cuda['package']})"
        if cuda["locked_for"]:
            variant += f", locked for __cuda {cuda['locked_for']}"
    typer.echo(f"  variant  {variant}")
    archive = row["archive"]
    if archive:
        typer.echo(
            f"  archive  {archive['size'] / 1e6:.1f} MB ({archive['unpacked_size'] / 1e6:.1f} MB "
            f"unpacked, {archive['codec']}"
            + (f", {archive['layers']} package layers" if archive["layers"] else "")
            + f"), built {archive['created']}"
        )
    else:
        typer.echo("  archive  not built yet")
    typer.echo(f"  cached   {row['cached_at'] or 'not on this machine'}")
    typer.echo(f"  steps    {', '.join(row['steps']) or '-'}")
    width = max((len(p["name"]) for p in packages), default=4)
    installed = any(p["installed_size"] is not None for p in packages)
    typer.echo(
        f"  {'package':<{width}}  {'version':<12} {'build':<22} {'from':<5} "
        f"{'installed' if installed else 'download':>10}  source"
    )
    for p in packages:
        bytes_ = p["installed_size"] if installed else p["size"]
        size = f"{bytes_ / 1e6:7.1f} MB" if bytes_ is not None else f"{'-':>10}"
        typer.echo(
            f"  {p['name']:<{width}}  {p['version']:<12} {p['build'][:22]:<22} "
            f"{p['manager']:<5} {size}  {p['source']}"
        )


def diff_command(
    a: Annotated[str, typer.Argument(help="The old env (same forms as TARGET).")],
    b: Annotated[str, typer.Argument(help="The new env.")],
    platform: PlatformFilter = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Packages added, removed and changed between two envs or lock files.

    Exits 0 when the packages are the same and 1 when they differ, like diff."""

    old, _store, _cache = load_env(a, store)
    new, _store, _cache = load_env(b, store)
    old_parts = {p.platform: p for p in platform_parts(old, platform)}
    new_parts = {p.platform: p for p in platform_parts(new, platform)}
    common = sorted(old_parts.keys() & new_parts.keys())
    if not common:
        fail(
            f"{a} ({', '.join(old_parts)}) and {b} ({', '.join(new_parts)}) share no platform",
        )
    rows: list[dict[str, Any]] = []
    for name in common:
        change = diff_locks(old_parts[name], new_parts[name])
        rows.append(
            {
                "platform": name,
                "old_env_id": old_parts[name].env_id,
                "new_env_id": new_parts[name].env_id,
                "added": [_package_row(p) for p in change.added],
                "removed": [_package_row(p) for p in change.removed],
                "changed": [
                    {
                        "name": o.name,
                        "manager": o.manager,
                        "old": f"{o.version} {o.build}".strip(),
                        "new": f"{n.version} {n.build}".strip(),
                    }
                    for o, n in change.changed
                ],
            }
        )
    differs = any(r["added"] or r["removed"] or r["changed"] for r in rows)
    if as_json:
        emit_json({"a": a, "b": b, "same": not differs, "platforms": rows})
    elif not STATE.quiet:
        for row in rows:
            typer.echo(f"{row['platform']}: {row['old_env_id'][:12]} → {row['new_env_id'][:12]}")
            for p in row["added"]:
                typer.echo(f"  + {p['name']} {p['version']} ({p['manager']})")
            for p in row["removed"]:
                typer.echo(f"  - {p['name']} {p['version']} ({p['manager']})")
            for c in row["changed"]:
                typer.echo(f"  ~ {c['name']} {c['old']} → {c['new']}")
            if not (row["added"] or row["removed"] or row["changed"]):
                typer.echo("  (same packages)")
    if differs:
        raise typer.Exit(1)


def export_command(
    target: TargetArg,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-F",
            metavar="FORMAT",
            help="conda-lock, explicit, environment.yml, requirements.txt or pylock "
            "(pylock.toml, PEP 751)",
        ),
    ] = "conda-lock",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here (default: stdout).")
    ] = None,
    platform: Annotated[
        str | None,
        typer.Option(
            "-p",
            "--platform",
            metavar="PLATFORM",
            help="For single-platform formats (default: this host's).",
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Write an env's lock in a format other tools read.

    `envmgr resolve --lockfile` (conda-lock, explicit), `-f` (environment.yml) and `-r`
    (requirements.txt) read the files back."""

    if fmt not in (*FORMATS, "pylock.toml"):
        fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if platform is not None and not is_platform(platform):
        fail(f"--platform {platform!r}: unknown platform")
    chosen = known_format(fmt)
    lock = load_env(target, store)[0].lock
    # One platform when asked for, or when the format holds one and the lock has several.
    if platform is None and chosen != "conda-lock" and len(lock.platforms) > 1:
        platform = host_platform()
    if platform is not None:
        lock = Lock(platforms=(lock.for_platform(platform),), spec_id=lock.spec_id)
    # The file is written now, by this envmgr (the stored locks do not record the version).
    lock = replace(lock, envmgr_version=__version__)
    text = render(lock, chosen)
    if chosen in ("requirements.txt", "pylock") and not any(
        p.manager == "pypi" for part in lock.platforms for p in part.packages
    ):
        typer.echo(f"envmgr: note: {target} has no PyPI packages", err=True)
    if output is None:
        sys.stdout.write(text)
    else:
        with writing_output(output):
            write_atomic(output, text)
        if not STATE.quiet:
            typer.echo(f"wrote {output} ({chosen})", err=True)
