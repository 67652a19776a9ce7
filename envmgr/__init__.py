"""envmgr: locked, built-once, relocatable environments for workflow steps.

Importing this package has no side effects and stays cheap: it sits on every task's start
path, so the public names below are loaded on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from envmgr.errors import EnvmgrError, SpecError

if TYPE_CHECKING:
    from envmgr.specs.decorators import conda, conda_base, pypi, pypi_base
    from envmgr.specs.discovery import discover
    from envmgr.specs.model import EnvSpec

__all__ = [
    "EnvSpec",
    "EnvmgrError",
    "SpecError",
    "__version__",
    "conda",
    "conda_base",
    "discover",
    "pypi",
    "pypi_base",
]

__version__ = "0.1.0"

_LAZY = {
    "conda": "envmgr.specs.decorators",
    "conda_base": "envmgr.specs.decorators",
    "pypi": "envmgr.specs.decorators",
    "pypi_base": "envmgr.specs.decorators",
    "discover": "envmgr.specs.discovery",
    "EnvSpec": "envmgr.specs.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'envmgr' has no attribute {name!r}")
