"""Progress bars on a terminal (rich, through typer), nothing when output is piped.

:func:`progress_for_cli` gives the :class:`~envmgr.progress.Progress` a command passes to the
library: bars on stderr when stderr is a terminal and ``-q`` is not given; otherwise the null
progress, except that ``-v`` still prints the notes as plain lines.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

from envmgr.cli._common import STATE
from envmgr.progress import NULL, Progress, Task, Unit

__all__ = ["progress_for_cli"]


class _BarTask:
    def __init__(self, bars: Any, task_id: Any) -> None:
        self.bars = bars
        self.task_id = task_id
        self.closed = False
        self.guard = threading.Lock()

    def advance(self, amount: int = 1) -> None:
        self.bars.advance(self.task_id, amount)

    def set_total(self, total: int) -> None:
        self.bars.update(self.task_id, total=total)

    def close(self) -> None:
        with self.guard:
            if self.closed:
                return
            self.closed = True
        task = self.bars.tasks[self.task_id]
        if task.total is None:
            self.bars.update(self.task_id, total=1, completed=1)
        else:
            self.bars.update(self.task_id, completed=task.total)
        self.bars.stop_task(self.task_id)


class _Bars:
    """Byte tasks show size and rate; item tasks show ``n/total``."""

    def __init__(self, bars: Any, item_bars: Any) -> None:
        self.bars = bars
        self.item_bars = item_bars

    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:
        bars = self.bars if unit == "bytes" else self.item_bars
        return _BarTask(bars, bars.add_task(description, total=total))

    def note(self, message: str) -> None:
        if STATE.verbose:
            self.bars.console.print(message, markup=False, highlight=False)


class _Notes:
    """No bars (not a terminal): only ``-v`` notes, as plain lines on stderr."""

    def task(self, description: str, *, total: int | None = None, unit: Unit = "bytes") -> Task:
        return NULL.task(description, total=total, unit=unit)

    def note(self, message: str) -> None:
        if STATE.verbose:
            print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_for_cli() -> Iterator[Progress]:
    """The progress to hand to library calls for the duration of a command."""
    if STATE.quiet or not sys.stderr.isatty():
        yield _Notes()
        return
    from rich.console import Console, Group  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress  # noqa: PLC0415

    console = Console(stderr=True)
    head = (SpinnerColumn(finished_text="✓"), TextColumn("{task.description:<28}"), BarColumn())
    byte_bars = RichProgress(
        *head, DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(), console=console
    )
    item_bars = RichProgress(*head, MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    with Live(Group(item_bars, byte_bars), console=console, refresh_per_second=10):
        yield _Bars(byte_bars, item_bars)
