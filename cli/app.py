"""The typer application behind the ``envmgr`` console script."""

from __future__ import annotations

import typer

from envmgr import __version__
from envmgr.errors import EnvmgrError

__all__ = ["app", "main"]

app = typer.Typer(
    name="envmgr",
    help="Resolve, build, store and hydrate locked conda/PyPI environments for workflow steps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"envmgr {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Resolve, build, store and hydrate locked conda/PyPI environments for workflow steps."""


def main() -> None:
    """Run the CLI; an ``EnvmgrError`` becomes one line on stderr and its exit code."""
    try:
        # Standalone mode: usage errors print one line and exit 2; our errors pass through.
        app()
    except EnvmgrError as exc:
        typer.echo(f"envmgr: error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
