"""Progress on stderr: live lines on a terminal (rich, through typer), plain lines off one.

:func:`progress_for_cli` gives the :class:`~envmgr.progress.Progress` a command passes to the
library. On a terminal (and without ``-q``) every task is one line, in the order the tasks
started: a spinner, then a green ✓ when it finished or a red ✗ when it failed; byte tasks
show sizes and rates, item tasks ``n/total``, phases (a solve) only their time. Off a
terminal, a phase still running after ``ENVMGR_PROGRESS_AFTER`` seconds (default 1) is one
line, ``envmgr: solve train linux-64 ...``, so a log is never silent for a minute; ``-v``
notes are printed either way. Colour follows rich, which honours ``NO_COLOR``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from envmgr.cli._common import STATE
from envmgr.progress import NULL, Progress, Task, Unit

__all__ = ["progress_for_cli"]

#: Off a terminal, a task still running after this many seconds gets its line.
DEFAULT_AFTER = 1.0


class _LiveTask:
    def __init__(self, bars: Any, task_id: Any) -> None:
        self.bars = bars
        self.task_id = task_id
        self.done = False
        self.guard = threading.Lock()

    def advance(self, amount: int = 1) -> None:
        self.bars.advance(self.task_id, amount)

    def set_total(self, total: int) -> None:
        self.bars.update(self.task_id, total=total)

    def _finish(self, *, failed: bool) -> None:
        with self.guard:
            if self.done:
                return
            self.done = True
        task = self.bars.tasks[self.task_id]
        if failed:
            self.bars.update(self.task_id, failed=True)
        elif task.total is None:
            self.bars.update(self.task_id, total=1, completed=1)
        else:
            self.bars.update(self.task_id, completed=task.total)
        self.bars.stop_task(self.task_id)

    def close(self) -> None:
        self._finish(failed=False)

    def fail(self) -> None:
        self._finish(failed=True)


class _Live:
    def __init__(self, bars: Any) -> None:
        self.bars = bars

    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:
        task_id = self.bars.add_task(description, total=total, unit=unit, failed=False)
        return _LiveTask(self.bars, task_id)

    def note(self, message: str) -> None:
        if STATE.verbose:
            self.bars.console.print(message, markup=False, highlight=False)


class _LineTask:
    """Off a terminal: one line if the task is still running after *after* seconds."""

    def __init__(self, description: str, after: float) -> None:
        self.timer: threading.Timer | None = None
        line = f"envmgr: {description} ..."
        if after <= 0:
            print(line, file=sys.stderr, flush=True)
            return
        self.timer = threading.Timer(after, print, (line,), {"file": sys.stderr, "flush": True})
        self.timer.daemon = True
        self.timer.start()

    def advance(self, amount: int = 1) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def fail(self) -> None:
        self.close()


class _Lines:
    def __init__(self, after: float) -> None:
        self.after = after

    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:
        return _LineTask(description, self.after)

    def note(self, message: str) -> None:
        if STATE.verbose:
            print(message, file=sys.stderr, flush=True)


class _Quiet(_Lines):
    """``-q``: no progress; ``-v`` notes still (``-q -v`` asks for both)."""

    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:

        return NULL.task(description, total=total, unit=unit)


def _after() -> float:
    text = os.environ.get("ENVMGR_PROGRESS_AFTER", "")
    try:
        return float(text) if text else DEFAULT_AFTER
    except ValueError:
        return DEFAULT_AFTER


@contextlib.contextmanager
def progress_for_cli() -> Iterator[Progress]:
    """The progress to hand to library calls for the duration of a command."""
    if STATE.quiet:
        yield _Quiet(0.0)
        return
    if not sys.stderr.isatty():
        yield _Lines(_after())
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import Progress as RichProgress  # noqa: PLC0415
    from rich.progress import TextColumn, TimeElapsedColumn  # noqa: PLC0415

    console = Console(stderr=True)
    bars = RichProgress(
        _status_column(),
        TextColumn("{task.description:<28}"),
        _amount_column(),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=10,
    )
    with bars:
        yield _Live(bars)


def _status_column() -> Any:  # the column classes are made on first use: rich loads lazily
    from rich.progress import SpinnerColumn  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    class StatusColumn(SpinnerColumn):
        """A spinner while the task runs, ✓ when it finished, ✗ when it failed."""

        def render(self, task: Any) -> Any:
            if task.fields.get("failed"):
                return Text("✗", style="bold red")
            if task.finished:
                return Text("✓", style="green")
            return super().render(task)

    return StatusColumn()


def _amount_column() -> Any:
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TransferSpeedColumn,
    )
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    class AmountColumn(ProgressColumn):
        """A bar with sizes and rate for bytes, a bar and ``n/total`` for items, nothing
        for a phase (a solve has no amount to show)."""

        def __init__(self) -> None:
            super().__init__()
            self.bar = BarColumn()
            self.size = DownloadColumn()
            self.rate = TransferSpeedColumn()
            self.count = MofNCompleteColumn()

        def render(self, task: Any) -> Any:
            unit = task.fields.get("unit", "bytes")
            if unit == "phase":
                return Text("")
            grid = Table.grid(padding=(0, 1))
            if unit == "items":
                grid.add_row(self.bar.render(task), self.count.render(task))
            else:
                grid.add_row(self.bar.render(task), self.size.render(task), self.rate.render(task))
            return grid

    return AmountColumn()
