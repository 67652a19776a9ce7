"""The typer application behind the ``envmgr`` console script."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from importlib import import_module
from typing import Any

import typer

from envmgr import __version__
from envmgr.cli._common import STATE, error_prefix
from envmgr.cli._help import RootGroup, RunCommand, TidyCommand
from envmgr.errors import BuildInterrupted, EnvmgrError

__all__ = ["app", "commands", "main", "make_app"]  # noqa: F822 - app: see __getattr__

#: Each command, where its function lives, and the example its help ends with (tests run
#: every one). A run imports only the module of the command it runs.
_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("resolve", "resolve:resolve",
     "envmgr resolve -f environment.yml --platform linux-64 -o env.lock.yml"),
    ("build", "build:build", "envmgr build flow.py --store s3://bucket/envmgr"),
    ("hydrate", "envs:hydrate_command", "envmgr hydrate team/pandas:stable"),
    ("run", "envs:run_command", "envmgr run flow.py:train -- python train.py"),
    ("show", "inspect:show_command", "envmgr show flow.py:train --json"),
    ("diff", "inspect:diff_command", "envmgr diff team/pandas:stable team/pandas:candidate"),
    ("tree", "graph:tree_command", "envmgr tree flow.py:train --invert numpy"),
    ("why", "graph:why_command", "envmgr why flow.py:train libblas"),
    ("export", "inspect:export_command", "envmgr export flow.py:train --format requirements.txt"),
    ("alias", "names:alias_command", "envmgr alias flow.py:train team/pandas:candidate"),
    ("names", "names:names_command", "envmgr names team/pandas"),
    ("ls", "envs:ls_command", "envmgr ls --json"),
    ("verify", "envs:verify_command", "envmgr verify --fix"),
    ("kernel", "kernel:kernel_command", "envmgr kernel flow.py:train --name train"),
    ("gc", "envs:gc_command", "envmgr gc --max-size 20G --older-than 14d"),
)  # fmt: skip
#: Command groups: their typer app.
_GROUPS = {"config": "config:config_app", "store": "store:store_app"}


def _load(where: str) -> Any:
    module, name = where.split(":")
    return getattr(import_module(f"envmgr.cli.{module}"), name)


def commands() -> tuple[tuple[str, Callable[..., None], str], ...]:
    """Every command as ``(name, function, example)`` (imports them all)."""
    return tuple((name, _load(where), example) for name, where, example in _COMMANDS)


def make_app(only: Iterable[str] | None = None) -> typer.Typer:
    """The typer application with every command, or with those named in *only*."""
    wanted = None if only is None else set(only)
    made = typer.Typer(
        cls=RootGroup,
        name="envmgr",
        help="Resolve, build, store and hydrate locked conda/PyPI environments for workflow steps.",
        epilog="Example: envmgr resolve --conda numpy --python 3.11 --platform linux-64",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        # Markdown joins a docstring's wrapped lines into paragraphs.
        rich_markup_mode="markdown",
    )
    made.callback()(_root)
    for name, where, example in _COMMANDS:
        if wanted is None or name in wanted:
            command_class = RunCommand if name == "run" else TidyCommand
            made.command(name, cls=command_class, epilog=f"Example: {example}")(_load(where))
    for name, where in _GROUPS.items():
        if wanted is None or name in wanted:
            made.add_typer(_load(where), name=name)
    return made


def _command_of(args: list[str]) -> str | None:
    """The command *args* run (the first word that is not a global flag), if it is one of
    envmgr's and no shell completion is asked for; else ``None`` (all are needed)."""
    if any(key.startswith("_ENVMGR_COMPLETE") for key in os.environ):
        return None
    word = next((a for a in args if not a.startswith("-")), None)
    known = {name for name, _w, _e in _COMMANDS} | set(_GROUPS)
    return word if word in known else None


def __getattr__(name: str) -> Any:
    if name == "app":  # the whole application, for tests and tools that invoke it
        value = make_app()
        globals()["app"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"envmgr {__version__}")
        raise typer.Exit


def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
    verbose: int = typer.Option(
        0,
        "--verbose",
        "-v",
        count=True,
        help="More detail: -v the resolver's reasoning, -vv also tracebacks on errors.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
) -> None:
    """Resolve, build, store and hydrate locked conda/PyPI environments for workflow steps."""
    STATE.verbose = verbose
    STATE.quiet = quiet
    if verbose:
        # -v: what the resolvers decide and where metadata comes from; -vv: also tracebacks.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("envmgr: %(message)s"))
        logger = logging.getLogger("envmgr")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose == 1 else logging.DEBUG)


#: How long Ctrl-C waits for the command to unwind before the process ends anyway.
_INTERRUPT_GRACE = 0.8


def _interrupted(_signum: int, _frame: object) -> None:
    """Ctrl-C: unwind as usual (KeyboardInterrupt), but end the process within a second even
    if a worker thread (a resolver's HTTP request, py-rattler's runtime) holds the unwinding
    up. A build installs its own handler, which releases its lease first."""
    import threading  # noqa: PLC0415

    def stop() -> None:
        sys.stderr.write("envmgr: interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    timer = threading.Timer(_INTERRUPT_GRACE, stop)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def main() -> None:
    """Run the CLI; an ``EnvmgrError`` becomes one line on stderr and its exit code."""
    code: int | str | None = 0
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)
    from envmgr import profile  # noqa: PLC0415

    try:
        with profile.phase("command"):
            _run_app()
    except SystemExit as exc:
        code = exc.code
    profile.dump()
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    # py-rattler 0.28's runtime threads can abort the interpreter while it finalizes (seen
    # under load: "Fatal Python error ... finalizing", exit -6): the command is complete
    # here, so flush and leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _run_app() -> None:
    try:
        # Standalone mode: usage errors print one line and exit 2; our errors pass through.
        command = _command_of(sys.argv[1:])
        running = make_app(None if command is None else [command])
        running(prog_name="envmgr")  # also under `python -m envmgr`: completion keys on it
    except BuildInterrupted as exc:
        name = signal.Signals(exc.signum).name
        typer.echo(
            f"envmgr: stopped by {name}; the build's lease was released and its temp files removed",
            err=True,
        )
        raise SystemExit(exc.exit_code) from None
    except OSError as exc:
        if exc.filename is None or STATE.verbose > 1:
            raise
        # A cache, store or build root that cannot be written: say which and what to set.
        typer.echo(
            f"{error_prefix()} cannot write {exc.filename}: {exc.strerror} (check the cache_dir, "
            "store and build_root settings: `envmgr config show`)",
            err=True,
        )
        raise SystemExit(1) from None
    except EnvmgrError as exc:
        args = sys.argv[1:]
        if "--json" in (args[: args.index("--")] if "--" in args else args):
            # The whole error as data on stdout (the Metaflow extension shows it whole).
            typer.echo(json.dumps({"error": exc.to_dict()}, indent=2))
        if STATE.verbose > 1:
            traceback.print_exc()
        if STATE.verbose:
            explanation = getattr(exc, "explanation", "")
            if explanation:
                print(explanation, file=sys.stderr)
        typer.echo(f"{error_prefix()} {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
