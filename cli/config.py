"""``envmgr config show``: the effective settings and where each one came from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from envmgr.cli._common import STATE, emit_json
from envmgr.cli._help import TidyCommand, TidyGroup
from envmgr.cli._inputs import JsonOpt
from envmgr.config import SETTINGS, load
from envmgr.locks.lock import strip_credentials
from envmgr.platforms import host_platform, virtual_packages
from envmgr.resolve.pypi.pip_config import pip_sources

__all__ = ["config_app"]

config_app = typer.Typer(
    cls=TidyGroup,
    help="Show envmgr's configuration.",
    no_args_is_help=True,
    epilog="Example: envmgr config show --json",
)


def _plain(value: Any) -> Any:
    """JSON-ready, with credentials removed from URLs."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return strip_credentials(value)
    return value


@config_app.command("show", cls=TidyCommand, epilog="Example: envmgr config show")
def show(as_json: JsonOpt = False) -> None:
    """Print every setting, its value and its source (flag, ENVMGR_* variable, the
    configuration file, pip's configuration or the default)."""

    config = load()
    values = dict(config.values)
    notes: list[str] = []
    if values["index_url"] is None:
        values["index_url"], values["extra_index_urls"], links = pip_sources()
        # What resolution leaves out of pip's configuration (see effective_spec).
        for url in values["extra_index_urls"]:
            if url.startswith("file:"):
                notes.append(
                    f"pip's extra index {url} is machine-local: not used (give "
                    "--extra-index-url to use it)"
                )
        for url in links:
            if url.startswith("file:"):
                notes.append(
                    f"pip's find-links {url} is machine-local: not used (give "
                    "--find-links to use it)"
                )
            else:
                notes.append(f"pip's find-links {strip_credentials(url)} is used")
    platform = host_platform()
    overrides = {k: v for k, v in sorted(os.environ.items()) if k.startswith("CONDA_OVERRIDE_")}
    data = {
        "config_file": str(config.path),
        "config_file_exists": config.path.is_file(),
        "settings": {
            s.key: {"value": _plain(values[s.key]), "source": config.sources[s.key]}
            for s in SETTINGS
        },
        "virtual_packages": {
            "platform": platform,
            "packages": [str(v) for v in virtual_packages(platform)],
            "overrides": overrides,
        },
        "notes": notes,
    }
    if as_json:
        emit_json(data)
        return
    if STATE.quiet:
        return
    state = "" if data["config_file_exists"] else "  (not present)"
    typer.echo(f"config file  {config.path}{state}")
    for s in SETTINGS:
        value = _plain(values[s.key])
        shown = ", ".join(value) if isinstance(value, list) else value
        typer.echo(f"{s.key:<17} {shown if shown not in (None, '') else '-'}")
        typer.echo(f"{'':<17} from {config.sources[s.key]}; {s.help}")
    packages = " ".join(data["virtual_packages"]["packages"])  # type: ignore[index]
    typer.echo(f"{'virtual packages':<17} {platform}: {packages}")
    if overrides:
        typer.echo(f"{'':<17} from {', '.join(overrides)}")
    for note in notes:
        typer.echo(f"{'note':<17} {note}")
