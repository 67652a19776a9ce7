"""Where a command's time goes, for ``bench/resolve_profile.py``.

With ``ENVMGR_PROFILE=FILE`` set, the phases below add up their seconds (and counts, bytes)
while a command runs, and :func:`dump` writes them to FILE as JSON when it ends; without it
each hook costs one dictionary lookup. Phases that run on several threads at once (HTTP, page
and metadata parsing) add up thread time, so they can exceed the wall time they overlap.

Phases: ``command`` (from the CLI's entry to its exit), ``cli`` (the command's imports and
argument parsing, up to its own code), ``config`` (envmgr's settings and pip's), ``gateway``
(py-rattler's import and repodata gateway), ``store`` (cached locks read and written),
``conda`` (the conda solve of python and friends), ``pypi`` (the PyPI resolution,
wall), ``http`` (requests, thread time, with ``requests`` and ``bytes``), ``parse``
(project pages and metadata, thread time).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["add", "dump", "phase", "since_command"]

_TARGET = os.environ.get("ENVMGR_PROFILE") or None
_LOCK = threading.Lock()
_TOTALS: dict[str, dict[str, float]] = {}
_COMMAND_START: list[float] = []


def add(name: str, seconds: float, *, count: int = 1, size: int = 0) -> None:
    """Add *seconds* (and *count* events, *size* bytes) to phase *name*."""
    if _TARGET is None:
        return
    with _LOCK:
        row = _TOTALS.setdefault(name, {"seconds": 0.0, "count": 0, "bytes": 0})
        row["seconds"] += seconds
        row["count"] += count
        row["bytes"] += size


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the ``with`` block as phase *name*."""
    if _TARGET is None:
        yield
        return
    start = time.perf_counter()
    if name == "command":
        _COMMAND_START.append(start)
    try:
        yield
    finally:
        add(name, time.perf_counter() - start)


def since_command(name: str) -> None:
    """Record the time from the command's start to now as phase *name* (e.g. ``cli``: the
    argument parsing before a command's own code runs)."""
    if _TARGET is not None and _COMMAND_START:
        add(name, time.perf_counter() - _COMMAND_START[0])


def dump() -> None:
    """Write the phases to ``ENVMGR_PROFILE`` (nothing without it)."""
    if _TARGET is None:
        return
    with _LOCK:
        data = json.dumps(_TOTALS, indent=1, sort_keys=True)
    with open(_TARGET, "w", encoding="utf-8") as handle:  # noqa: PTH123 - no pathlib import here
        handle.write(data + "\n")
