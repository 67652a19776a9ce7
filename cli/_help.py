"""Help in the usual style: ``Usage: envmgr run [OPTIONS] [TARGET] -- COMMAND...``, options
with a metavar (``--store URL``) and flags with none.

typer 0.29 draws every parameter's Python type (``<bool>``, ``<list[Path]>``) and a required
argument as ``{target}``; the command classes here redraw them as click, pip and uv do. A
parameter's own ``metavar`` always wins.
"""

from __future__ import annotations

from typer._click import core as click_core  # typer 0.29 parses with its own click (pinned)
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from envmgr.cli._common import emit_json_error, json_asked

__all__ = ["RootGroup", "RunCommand", "TidyCommand", "TidyGroup"]

#: The metavar of an option that names none, by the kind of value it takes.
_BY_TYPE = {"Path": "PATH", "int": "N", "float": "NUMBER", "str": "TEXT"}


class _Argument(TyperArgument):
    def display_type_rich(self, ctx: click_core.Context) -> str | None:
        return None  # the name column already says it (TARGET, COMMAND...)

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        if self.nargs != 1 and not name.endswith("..."):
            name += "..."
        return name if self.required else f"[{name}]"


class _Option(TyperOption):
    def display_type_rich(self, ctx: click_core.Context) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        return _BY_TYPE.get(self.bare_type().removeprefix("list[").removesuffix("]"), "TEXT")


def _tidy(params: list[click_core.Parameter]) -> None:
    for param in params:
        if isinstance(param, TyperArgument):
            if param.metavar is None and param.name:
                param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
            param.__class__ = _Argument
        elif isinstance(param, TyperOption):
            param.__class__ = _Option


class _TidyParams(click_core.Command):
    def get_params(self, ctx: click_core.Context) -> list[click_core.Parameter]:
        params = super().get_params(ctx)  # with --help, which click adds late
        _tidy(params)
        return params

    def parse_args(self, ctx: click_core.Context, args: list[str]) -> list[str]:
        """Usage errors (a mistyped flag, a bad value) are also ``{"error": ...}`` on stdout
        under ``--json``, like every other failure."""
        from typer._click.exceptions import UsageError as ClickUsageError  # noqa: PLC0415

        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as exc:
            if json_asked():
                emit_json_error("UsageError", exc.format_message(), exc.exit_code)
            raise


class TidyCommand(_TidyParams, TyperCommand):
    """A command whose help and usage line are in the usual style."""


class TidyGroup(_TidyParams, TyperGroup):
    """A group (``envmgr``, ``envmgr store``) whose own options are drawn the same way."""


#: envmgr's own options that may also come after the command, as uv takes them.
_GLOBAL_FLAGS = frozenset({"-q", "--quiet", "-v", "-vv", "-vvv", "--verbose"})


class RootGroup(TidyGroup):
    """``envmgr``: ``-q``/``-v`` after the command (``envmgr show X -q``) count as given
    before it, as in uv; never inside ``run``'s command or after ``--``."""

    def parse_args(self, ctx: click_core.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _globals_first(list(args)))


def _globals_first(args: list[str]) -> list[str]:
    command = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if command is None:
        return args
    moved: list[str] = []
    rest = args[: command + 1]
    for i in range(command + 1, len(args)):
        word = args[i]
        if word == "--" or (args[command] == "run" and not word.startswith("-")):
            rest += args[i:]  # run's TARGET: what follows may be its command's
            break
        (moved if word in _GLOBAL_FLAGS else rest).append(word)
    return [*moved, *rest]


class RunCommand(TidyCommand):
    """``envmgr run``: without ``--``, the first word after TARGET that is not an option of
    ``run`` starts the command, as with ``uv run`` (``envmgr run flow.py:train python -c 1``
    runs ``python -c 1``; ``-c`` is not read as ``--channel``)."""

    def parse_args(self, ctx: click_core.Context, args: list[str]) -> list[str]:
        args = list(args)
        if "--" not in args:
            args = self._command_split(ctx, args)
        return super().parse_args(ctx, args)

    def _command_split(self, ctx: click_core.Context, args: list[str]) -> list[str]:
        """*args* with ``--`` before the command, when one is given: the first positional
        word once a spec flag (``--pypi``, ``-f``, ...) was given, else the second."""
        takes_value = {
            name
            for param in self.get_params(ctx)
            if isinstance(param, TyperOption) and not (param.is_flag or param.count)
            for name in param.opts
        }
        spec_given = False
        target_seen = False
        i = 0
        while i < len(args):
            word = args[i]
            if word.startswith("-") and word != "-":
                name = word.split("=", 1)[0]
                spec_given |= name in _SPEC_FLAGS
                i += 2 if name in takes_value and "=" not in word else 1
            elif spec_given or target_seen:
                return [*args[:i], "--", *args[i:]]
            else:
                target_seen = True
                i += 1
        return args


#: The options through which ``run`` takes a spec instead of a TARGET.
_SPEC_FLAGS = frozenset({"-f", "--file", "-r", "--requirements", "--conda", "--pypi", "--python"})
