"""How long-running library calls report progress without printing.

The library calls a :class:`Progress` (solves, installs, packing, uploads, downloads); the CLI
passes one that draws bars on a terminal, everything else gets :data:`NULL`, which does
nothing. Implementations must accept calls from any thread.
"""

from __future__ import annotations

from typing import Literal, Protocol

__all__ = ["NULL", "Progress", "Task", "Unit"]

#: What a task counts: bytes (shown with sizes and rates) or items (``n/total``).
Unit = Literal["bytes", "items"]


class Task(Protocol):
    def advance(self, amount: int = 1) -> None:
        """*amount* more units are done."""

    def set_total(self, total: int) -> None:
        """The task turned out to have *total* units."""

    def close(self) -> None:
        """The task is finished (idempotent)."""


class Progress(Protocol):
    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:
        """Start a task; ``total=None`` means unknown (a spinner)."""

    def note(self, message: str) -> None:
        """A detail worth showing with ``-v``."""


class _NullTask:
    def advance(self, amount: int = 1) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def close(self) -> None:
        pass


class _NullProgress:
    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:
        return _NullTask()

    def note(self, message: str) -> None:
        pass


#: Reports nothing; the default everywhere.
NULL: Progress = _NullProgress()
