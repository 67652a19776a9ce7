"""How long-running library calls report progress without printing.

The library calls a :class:`Progress` (solves, installs, packing, uploads, downloads); the CLI
passes one that draws bars on a terminal, everything else gets :data:`NULL`, which does
nothing. Implementations must accept calls from any thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, Protocol

__all__ = ["NULL", "NullTask", "Progress", "Task", "Unit", "tracked"]

#: What a task counts: bytes (shown with sizes and rates), items (``n/total``), or nothing
#: (a phase such as a solve: a spinner and the time it took).
Unit = Literal["bytes", "items", "phase"]


class Task(Protocol):
    def advance(self, amount: int = 1) -> None:
        """*amount* more units are done."""

    def set_total(self, total: int) -> None:
        """The task turned out to have *total* units."""

    def close(self) -> None:
        """The task is finished (idempotent)."""

    def fail(self) -> None:
        """The task stopped on an error (idempotent; a later ``close`` changes nothing)."""


class Progress(Protocol):
    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:
        """Start a task; ``total=None`` means unknown (a spinner)."""

    def note(self, message: str) -> None:
        """A detail worth showing with ``-v``."""


class NullTask:
    """A task that shows nothing (subclass it to hear of one thing only)."""

    def advance(self, amount: int = 1) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def close(self) -> None:
        pass

    def fail(self) -> None:
        pass


class _NullProgress:
    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:
        return NullTask()

    def note(self, message: str) -> None:
        pass


#: Reports nothing; the default everywhere.
NULL: Progress = _NullProgress()


@contextlib.contextmanager
def tracked(
    progress: Progress, description: str, *, total: int | None = None, unit: Unit = "bytes"
) -> Iterator[Task]:
    """A task for the ``with`` block: closed when it ends, marked failed if it raises."""
    task = progress.task(description, total=total, unit=unit)
    try:
        yield task
    except BaseException:
        task.fail()
        raise
    task.close()
