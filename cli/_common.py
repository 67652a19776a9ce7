"""State and helpers shared by the command modules."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

__all__ = ["STATE", "emit_json", "fail"]


class _State:
    verbose: int = 0
    quiet: bool = False


STATE = _State()


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def fail(message: str, code: int = 2) -> None:
    """A usage problem: one line on stderr and exit *code*."""
    print(f"envmgr: error: {message}", file=sys.stderr)
    raise typer.Exit(code)
