"""Which lock format a file is, from its content: the one place that tells locks from
everything else people hand in where a lock goes.

:func:`detect_format` names the format (:data:`LOCK_FORMATS`) and refuses, in one line naming
what the file is, anything that is not a lock envmgr reads: a requirements file, an
``environment.yml``, a ``poetry.lock``, a ``Pipfile.lock``, a ``pyproject.toml``. conda-lock
and ``@EXPLICIT`` files are read by :mod:`.lock` and :mod:`.export`, ``pixi.lock`` by
:mod:`.pixi`, ``pylock.toml`` and ``uv.lock`` by :mod:`.pylock`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args

from envmgr.limits import check_yaml, read_bounded
from envmgr.locks.export import is_explicit
from envmgr.locks.lock import (
    LockError,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "LOCK_FORMATS",
    "LockFormat",
    "UnsupportedLockError",
    "detect_format",
    "looks_like_requirements",
]

LockFormat = Literal["conda-lock", "explicit", "pylock.toml", "uv.lock", "pixi.lock"]
LOCK_FORMATS: tuple[LockFormat, ...] = get_args(LockFormat)
_SUPPORTED = "conda-lock, conda @EXPLICIT, pylock.toml (PEP 751), uv.lock and pixi.lock"
PIXI_VERSIONS = (4, 5, 6, 7)


class UnsupportedLockError(LockError):
    """A file given as a lock that is not one envmgr reads; names what it is instead."""

    exit_code = 2


def _refuse(path: Path, what: str, hint: str = "") -> UnsupportedLockError:
    return UnsupportedLockError(
        f"{path}: {what}, not a lock file envmgr reads (it reads {_SUPPORTED})", hint=hint
    )


def detect_format(path: Path) -> LockFormat:
    """The lock format of *path*, from its content. Raises ``UnsupportedLockError`` naming
    what the file is (a spec file, another tool's lock) and the formats that are read."""

    text = read_bounded(path, what="lock file")
    if is_explicit(path):
        return "explicit"
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return _json_kind(path, text)
    try:
        data: Any = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        name = path.name.lower()
        if name.endswith("uv.lock") or (name.startswith("pylock") and name.endswith(".toml")):
            kind = "uv.lock" if name.endswith("uv.lock") else "pylock.toml"
            raise LockError(
                f"{path}: a {kind} with a TOML syntax error: {exc}",
                hint="fix it or write it again with the tool that made it",
            ) from None
        data = None
    if isinstance(data, dict):
        return _toml_kind(path, data)
    return _yaml_kind(path, text)


def _json_kind(path: Path, text: str) -> LockFormat:
    try:
        data = json.loads(text)
    except ValueError:
        raise _refuse(path, "a JSON file that does not parse") from None
    if isinstance(data, dict) and "_meta" in data and "default" in data:
        raise _refuse(path, "a Pipfile.lock", hint="export it: pipenv requirements --hash")
    raise _refuse(path, "a JSON file")


def _toml_kind(path: Path, data: dict[str, Any]) -> LockFormat:
    if "lock-version" in data:
        return "pylock.toml"
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and "content-hash" in metadata:
        raise _refuse(path, "a poetry.lock", hint="export it: poetry export --with-hashes")
    packages = data.get("package")
    if isinstance(data.get("version"), int) and isinstance(packages, list):
        if all(isinstance(p, dict) and "source" in p for p in packages):
            return "uv.lock"
        raise _refuse(path, "a TOML lock of an unknown tool ([[package]] without 'source')")
    if "project" in data or "build-system" in data or "tool" in data:
        raise _refuse(path, "a pyproject.toml", hint="lock it first: uv lock, or pip lock")
    raise _refuse(path, "a TOML file")


def _yaml_kind(path: Path, text: str) -> LockFormat:
    import yaml  # noqa: PLC0415

    check_yaml(text, where=str(path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if path.name.lower().endswith("pixi.lock"):
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise LockError(
                f"{path}: a pixi.lock with a YAML syntax error{at}: {problem}",
                hint="fix it or write it again: pixi lock",
            ) from None
        data = None
    if isinstance(data, dict):
        if "environments" in data and "packages" in data:
            if data.get("version") not in PIXI_VERSIONS:
                raise _refuse(
                    path,
                    f"a pixi.lock of version {data.get('version')!r} (envmgr reads "
                    f"versions {', '.join(map(str, PIXI_VERSIONS))})",
                    hint="update the lock with a current pixi: pixi lock",
                )
            return "pixi.lock"
        if "package" in data and "metadata" in data:
            return "conda-lock"
        if "dependencies" in data:
            raise _refuse(path, "an environment.yml (a spec)", hint=f"resolve it: -f {path}")
    if looks_like_requirements(text):
        raise _refuse(
            path,
            "a requirements file (a spec)",
            hint=f"resolve it: -r {path} (its --hash pins are kept)",
        )
    raise _refuse(path, "a file of unknown format")


def looks_like_requirements(text: str) -> bool:
    """Whether *text* reads as requirement lines (the first 50 that are not comments)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    requirement = re.compile(r"^(-[rcei]\s|--|[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[|[<>=!~;@]|$))")
    return bool(lines) and all(requirement.match(ln) or ln.startswith("\\") for ln in lines[:50])


# --- pixi.lock --------------------------------------------------------------------------
