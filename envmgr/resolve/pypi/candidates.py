"""What the PyPI resolver reasons about: requirements on an identifier and the candidates
that may meet them (a version of a project, with its extras, backed by one file or fixed by
conda), as resolvelib's provider hands them around."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from envmgr.errors import EnvmgrError
from envmgr.resolve.pypi.pages import DistFile

__all__ = [
    "PYTHON",
    "Candidate",
    "NativeSdistError",
    "Req",
    "parse_version",
    "pinned",
    "python_allows",
    "version_of",
]

#: The pseudo-project an sdist's ``Requires-Python`` becomes a requirement on.
PYTHON = "<python>"


class NativeSdistError(EnvmgrError):
    """An sdist with compiled code was chosen for a target this host cannot compile for."""


@dataclass(frozen=True, slots=True)
class Req:
    """A requirement on one identifier (``name`` or ``name[extra]``)."""

    name: str
    specifier: SpecifierSet
    extras: frozenset[str] = frozenset()
    url: str | None = None
    text: str = ""

    @property
    def identifier(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.text or f"{self.name}{self.specifier}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One version of a project (with extras, if any), backed by one file or fixed by conda."""

    name: str
    version: Version
    extras: frozenset[str] = frozenset()
    dist: DistFile | None = None
    fixed: bool = False  # installed by conda: no file, no dependencies of its own
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def identifier(self) -> str:
        if self.extras:
            return f"{self.name}[{','.join(sorted(self.extras))}]"
        return self.name

    def __str__(self) -> str:
        suffix = " (from conda)" if self.fixed else ""
        return f"{self.identifier} {self.version}{suffix}"


def pinned(specifier: SpecifierSet) -> bool:
    """The specifier names one version exactly (``==1.2``, ``===1.2``; not ``==1.*``)."""
    return any(s.operator in ("==", "===") and "*" not in s.version for s in specifier)


@functools.lru_cache(maxsize=8192)
def python_allows(requires_python: str, python: Version) -> bool:
    try:
        return SpecifierSet(requires_python).contains(python, prereleases=True)
    except InvalidSpecifier:
        return False


@functools.lru_cache(maxsize=65536)
def version_of(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def parse_version(text: str) -> Version | None:
    """*text* as a PEP 440 version, or None (conda versions are not always PEP 440)."""
    try:
        return Version(text)
    except InvalidVersion:
        return None
