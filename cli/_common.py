"""State and helpers shared by the command modules."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

if TYPE_CHECKING:
    from envmgr.cache.names import BadName

__all__ = [
    "STATE",
    "emit_json",
    "emit_json_error",
    "error_prefix",
    "fail",
    "json_asked",
    "layers_built_text",
    "size_text",
    "tell",
    "warn_bad_names",
    "writing_output",
]


class _State:
    verbose: int = 0
    quiet: bool = False


STATE = _State()


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def size_text(size: int) -> str:
    """*size* bytes as people read them: ``87.6 kB``, ``36.9 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def layers_built_text(built: int, layers: int, uploaded: int) -> str:
    """What a layered build made: its new package layers among the env's, and the bytes."""
    if built == layers:
        made = f"built its {layers} package layers"
    elif built:
        made = f"built {built} of its {layers} package layers (the rest were stored)"
    else:
        made = f"built on its {layers} stored package layers"
    return f"{made}, uploaded {size_text(uploaded)}"


def warn_bad_names(bad: Iterable[BadName]) -> None:
    """One warning line per object under ``names/`` that is not a name entry."""
    for entry in bad:
        tell(f"warning: skipped {entry.error.message} (gc keeps every env it mentions)")


def tell(message: str) -> None:
    """What a person must see even off a terminal (not silenced by ``-q``): one line."""
    print(f"envmgr: {message}", file=sys.stderr, flush=True)


def error_prefix() -> str:
    """``envmgr: error:``, with ``error`` in red when stderr is a terminal that has colour
    (not under ``NO_COLOR`` or ``TERM=dumb``)."""
    if (
        sys.stderr.isatty()
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM", "") != "dumb"
    ):
        return "envmgr: \x1b[1;31merror\x1b[0m:"
    return "envmgr: error:"


@contextlib.contextmanager
def writing_output(path: Path, option: str = "-o") -> Iterator[None]:
    """Around writing the file a user named with *option*: a directory, a missing or
    unwritable parent is one line naming *path* and what is wrong with it (not a temp file
    and the cache settings)."""
    if path.is_dir():
        fail(f"{option} {path}: is a directory; give a file path, e.g. {path / 'env.lock'}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        fail(f"{option} {path}: {parent} is a file, not a directory")
    try:
        yield
    except OSError as exc:
        fail(f"{option} {path}: cannot write it: {exc.strerror or exc}", code=1)


def json_asked() -> bool:
    """Whether the command line asks for ``--json`` (before any ``--`` and its command)."""
    args = sys.argv[1:]
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def emit_json_error(kind: str, message: str, code: int) -> None:
    """``{"error": ...}`` on stdout, as every failure of a ``--json`` command prints."""
    error = {"type": kind, "message": message, "hint": None, "exit_code": code}
    print(json.dumps({"error": error}, indent=2), flush=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """A usage problem: one line on stderr (and the error as JSON on stdout under
    ``--json``), and exit *code*."""
    if json_asked():
        emit_json_error("UsageError", message, code)
    print(f"{error_prefix()} {message}", file=sys.stderr)
    raise typer.Exit(code)
