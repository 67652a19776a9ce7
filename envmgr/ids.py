"""Ids are values: parsed where they enter, before anything joins them into a path or a key.

An env id or a spec id is 32 lower-case hex digits (a truncated sha256). Ids come from
people (flags, the bootstrap's arguments), from files (locks, manifests) and from other
writers of the store (``names/`` entries), so every one is parsed by :func:`parse_env_id` or
:func:`parse_spec_id` first; a bad one is a :class:`BadIdError` (exit 2) that names where it
came from, and nothing is touched. :func:`check_under` is the last guard of every removal.

Standard library only: the worker's warm path imports this module.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NewType

from envmgr.errors import EnvmgrError
from envmgr.platforms import PLATFORMS

__all__ = [
    "BadIdError",
    "EnvId",
    "LayerId",
    "SpecId",
    "check_under",
    "is_env_id",
    "is_id_prefix",
    "is_sha256",
    "looks_like_id",
    "parse_env_id",
    "parse_layer_id",
    "parse_platform",
    "parse_spec_id",
]

EnvId = NewType("EnvId", str)
SpecId = NewType("SpecId", str)
#: A package layer: 32 hex digits of the sha256 of what decides its bytes.
LayerId = NewType("LayerId", str)

# Every id pattern of envmgr, declared once.
_HEX32 = re.compile(r"[0-9a-f]{32}")
_PREFIX = re.compile(r"[0-9a-f]{8,31}")  # what people type for an env id: its first 8+ digits
_HEXISH = re.compile(r"[0-9a-f]{8,}")  # an id or an id's prefix: never a name
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BadIdError(EnvmgrError):
    """An id, a platform or a path that is not what it claims to be; names its source."""

    exit_code = 2


def _shown(value: object) -> str:
    """A bounded repr: a hostile 10 MB id must not become a 10 MB error line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def is_env_id(value: object) -> bool:
    """32 lower-case hex digits: an env id (or a spec id)."""
    return isinstance(value, str) and _HEX32.fullmatch(value) is not None


def is_id_prefix(value: object) -> bool:
    """8 to 31 lower-case hex digits: the start of an env id, as people type one."""
    return isinstance(value, str) and _PREFIX.fullmatch(value) is not None


def looks_like_id(value: object) -> bool:
    """8 or more lower-case hex digits: read as an id or its prefix, so never a name."""
    return isinstance(value, str) and _HEXISH.fullmatch(value) is not None


def is_sha256(value: object) -> bool:
    """64 lower-case hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _hex32(value: object, where: str, what: str, printed_by: str) -> str:
    if isinstance(value, str) and _HEX32.fullmatch(value):
        return value
    raise BadIdError(
        f"{where}: {_shown(value)} is not {what}",
        hint=f"{what} is 32 lower-case hex digits, as `{printed_by}` prints it",
    )


def parse_env_id(value: object, *, where: str) -> EnvId:
    """*value* as an :data:`EnvId`; raises ``BadIdError`` naming *where* it came from."""
    return EnvId(_hex32(value, where, "an env id", "envmgr build"))


def parse_layer_id(value: object, *, where: str) -> LayerId:
    """*value* as a :data:`LayerId`; raises ``BadIdError`` naming *where* it came from."""
    return LayerId(_hex32(value, where, "a layer id", "envmgr show --json"))


def parse_spec_id(value: object, *, where: str) -> SpecId:
    """*value* as a :data:`SpecId`; raises ``BadIdError`` naming *where* it came from."""
    return SpecId(_hex32(value, where, "a spec id", "envmgr resolve"))


def parse_platform(value: object, *, where: str) -> str:
    """*value* when it names a supported platform; raises ``BadIdError`` otherwise."""

    if isinstance(value, str) and value in PLATFORMS:
        return value
    raise BadIdError(
        f"{where}: {_shown(value)} is not a platform", hint=f"use one of {', '.join(PLATFORMS)}"
    )


def check_under(path: Path, root: Path) -> Path:
    """*path* when it lies strictly inside *root* (both resolved, links followed); raises
    ``BadIdError`` otherwise. Every recursive removal calls this first."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    if not real.startswith(base.rstrip(os.sep) + os.sep):
        raise BadIdError(f"refusing to remove {path}: it is not inside {root}")
    return path
