"""The variables that tune a worker (``ENVMGR_LINK``, ``ENVMGR_LAYER_STREAMS``, ...), read
strictly: a value they do not take is a one-line error naming the variable, never a silent
default. ``ENVMGR_LINK=Copy`` taken as "link" would share a root task's files with every
other env on the host, which that setting exists to prevent.

Unset or empty means the default. Standard library only: this is on every task's start path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from envmgr.errors import EnvmgrError

__all__ = ["SettingError", "env_choice", "env_int"]


class SettingError(EnvmgrError):
    """An ``ENVMGR_*`` variable holds a value it does not take; names the variable."""

    exit_code = 2


def env_int(name: str, default: int, *, low: int, high: int) -> int:
    """The integer in the variable *name*, *default* when unset or empty. Raises
    ``SettingError`` unless it is a whole number from *low* to *high*."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise SettingError(
            f"{name}={text[:40]!r} is not a whole number from {low} to {high}",
            hint=f"fix it, or unset it for {default}",
        )
    return value


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """The value of the variable *name*, one of *choices*; *default* when unset or empty.
    Raises ``SettingError`` for anything else."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if text not in choices:
        raise SettingError(
            f"{name}={text[:40]!r} is not one of {', '.join(choices)}",
            hint=f"fix it, or unset it for {default}",
        )
    return text
