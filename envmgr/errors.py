"""The one error hierarchy of envmgr.

Library code raises these and never prints; the CLI turns them into one line and a non-zero
exit. Each error carries the data a person needs to act: which input, which package or step,
and what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "BuildError",
    "BuildInterrupted",
    "EnvmgrError",
    "Problem",
    "SpecError",
]


class EnvmgrError(Exception):
    """Root of every error envmgr raises on purpose.

    ``message`` says what is wrong and names the input; ``hint`` (optional) says what to do.
    ``exit_code`` is what the CLI exits with (2 for bad input, 1 for everything else).
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message

    def details(self) -> dict[str, Any]:
        """What a subclass knows beyond the message (e.g. a build log's path and the lines
        that explain it), as JSON-able data."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The whole error as data, for ``--json`` output and for a parent process (the
        Metaflow extension) that shows it to a person."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
            **self.details(),
        }


class Problem(NamedTuple):
    """One thing wrong in an input: where (a step, or a file and line), which key, what.

    A named tuple, not a dataclass: this module is imported on every task's start, and
    ``dataclasses`` (with ``inspect``) would be a third of that import."""

    where: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}"


class SpecError(EnvmgrError):
    """An environment spec (decorators, environment.yml, requirements.txt, ...) is invalid.

    Carries every problem found in the input, not just the first, in ``problems``.
    """

    exit_code = 2

    def __init__(self, problems: Sequence[Problem], *, hint: str | None = None) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            message = f"invalid environment spec: {self.problems[0]}"
        else:
            lines = "".join(f"\n  {problem}" for problem in self.problems)
            message = f"{len(self.problems)} problems in environment specs:{lines}"
        super().__init__(message, hint=hint)

    def details(self) -> dict[str, Any]:
        return {
            "problems": [
                {"where": p.where, "key": p.key, "message": p.message} for p in self.problems
            ]
        }


class BuildError(EnvmgrError):
    """An env could not be built, packed or stored; names the env and what failed."""


class BuildInterrupted(BaseException):
    """SIGTERM, SIGHUP or SIGINT arrived during a build: the lease is released and the
    build's temp files removed on the way out; the CLI exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
