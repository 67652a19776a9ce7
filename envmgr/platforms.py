"""Target platforms: the closed set of conda subdirs envmgr locks and builds for."""

from __future__ import annotations

from typing import Literal, TypeGuard, get_args

__all__ = ["PLATFORMS", "Platform", "is_platform"]

Platform = Literal["linux-64", "linux-aarch64", "osx-64", "osx-arm64", "win-64"]

#: Every supported target, in a stable order.
PLATFORMS: tuple[Platform, ...] = get_args(Platform)


def is_platform(value: object) -> TypeGuard[Platform]:
    """True when *value* names a supported target platform."""
    return isinstance(value, str) and value in PLATFORMS
