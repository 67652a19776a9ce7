"""``pixi.lock`` (versions 4 to 7): read through py-rattler's lock API into a complete
:class:`~envmgr.locks.lock.Lock`, every platform of one pixi environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from envmgr.ids import is_sha256
from envmgr.locks.lock import (
    Lock,
    LockedPackage,
    LockError,
    PlatformLock,
    locked_package,
)
from envmgr.platforms import is_platform

__all__ = ["read_pixi_lock"]


def read_pixi_lock(path: Path, environment: str = "default") -> Lock:
    """Every platform of *environment* in a pixi.lock as a :class:`Lock`: conda packages with
    their repodata records, PyPI packages with their URL and sha256. Raises ``LockError``."""
    import rattler  # noqa: PLC0415

    try:
        lock_file = rattler.LockFile.from_path(path)
    except Exception as exc:  # py-rattler raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LockError(f"{path}: not a readable pixi.lock ({first[:200]})") from None
    env = lock_file.environment(environment)
    if env is None:
        names = ", ".join(name for name, _ in lock_file.environments()) or "none"
        raise LockError(f"{path}: no environment {environment!r} (it has: {names})")
    channels = tuple(str(c) for c in env.channels())
    parts: list[PlatformLock] = []
    for platform in env.platforms():
        name = str(platform.name) if hasattr(platform, "name") else str(platform)
        if not is_platform(name):
            continue  # a platform envmgr does not build (win-32, …) is left out
        conda = []
        for record in env.conda_repodata_records_for_platform(platform) or ():
            if record.sha256 is None:
                raise LockError(f"{path}: {name}: {record.name.normalized} has no sha256")
            conda.append(locked_package(record))
        pypi = [
            _pixi_pypi(path, name, package)
            for package in env.pypi_packages_for_platform(platform) or ()
        ]
        parts.append(PlatformLock(platform=name, packages=(*conda, *pypi), channels=channels))
    if not parts:
        raise LockError(f"{path}: environment {environment!r} has no platform envmgr builds")
    return Lock(platforms=tuple(parts), sources=(str(path),))


def _pixi_pypi(path: Path, platform: str, package: Any) -> LockedPackage:
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    location = str(package.location)
    url, _, fragment = location.partition("#")
    sha256 = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else ""
    hashes = package.hashes
    if not sha256 and hashes is not None and getattr(hashes, "sha256", None):
        sha256 = hashes.sha256.hex()
    if not is_sha256(sha256):
        raise LockError(f"{path}: {platform}: PyPI package {package.name} has no sha256")
    if not url.startswith(("http://", "https://", "file://")):
        raise LockError(
            f"{path}: {platform}: PyPI package {package.name} is a local path or an editable "
            f"({url[:120]}); envmgr builds envs of published files only"
        )
    depends = tuple(str(r).split(";")[0].strip() for r in package.requires_dist or ())
    return LockedPackage(
        manager="pypi",
        name=str(canonicalize_name(package.name)),
        version=str(package.version),
        url=url,
        sha256=sha256,
        depends=depends,
    )


# --- pylock.toml and uv.lock ----------------------------------------------------------
