"""Locks: exact packages (URL + hashes) per platform, and the conda-lock v1 files that hold them.

A :class:`PlatformLock` is what one solve produces for one target; its :attr:`env_id` hashes
the locked package set (manager, name, version, build, URL, sha256), so two specs that lock to
the same packages share one environment. A :class:`Lock` gathers the platforms of one spec with
its metadata and is read and written as a conda-lock v1 file through conda-lock's own models,
so ``conda-lock render`` and ``conda-lock install`` accept envmgr's files.

URLs are stored without credentials: user info and ``/t/<token>/`` path segments are removed
(:func:`strip_credentials`); the channel configuration supplies them again at install time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from envmgr.errors import EnvmgrError
from envmgr.fs import write_atomic
from envmgr.limits import check_yaml, read_bounded
from envmgr.platforms import Platform, is_platform

__all__ = [
    "LOCK_FORMAT",
    "Lock",
    "LockDiff",
    "LockError",
    "LockedPackage",
    "PlatformLock",
    "diff_locks",
    "locked_package",
    "read_conda_lock",
    "render_conda_lock",
    "strip_credentials",
    "strip_credentials_in",
    "write_conda_lock",
]

#: Version of :meth:`PlatformLock.to_dict` data (the resolution cache's format).
LOCK_FORMAT = 1

Manager = Literal["conda", "pypi"]
_TOKEN_SEGMENT = re.compile(r"/t/[^/]+")


class LockError(EnvmgrError):
    """A lock file or cache entry cannot be read or written; names the file."""


def strip_credentials(url: str) -> str:
    """*url* without ``user:password@`` and without conda ``/t/<token>`` path segments."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    path = (
        _TOKEN_SEGMENT.sub("", parts.path, count=1) if parts.path.startswith("/t/") else parts.path
    )
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


@dataclass(frozen=True, kw_only=True, slots=True, order=True)
class LockedPackage:
    """One exact package: where to get it and how to check it."""

    manager: Manager
    name: str
    version: str
    url: str
    sha256: str
    build: str = ""
    subdir: str = ""
    md5: str = ""
    depends: tuple[str, ...] = ()
    size: int = 0
    noarch: str = ""  # conda: "python" or "generic" for noarch packages

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", strip_credentials(self.url))
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.name} {self.version}: sha256 must be 64 hex digits")

    @property
    def identity(self) -> str:
        """What :attr:`PlatformLock.env_id` hashes for this package."""
        return " ".join((self.manager, self.name, self.version, self.build, self.url, self.sha256))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "manager": self.manager,
            "name": self.name,
            "version": self.version,
            "url": self.url,
            "sha256": self.sha256,
        }
        for key in ("build", "subdir", "md5", "noarch"):
            if getattr(self, key):
                data[key] = getattr(self, key)
        if self.depends:
            data["depends"] = list(self.depends)
        if self.size:
            data["size"] = self.size
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LockedPackage:
        return cls(
            manager=data["manager"],
            name=data["name"],
            version=data["version"],
            url=data["url"],
            sha256=data["sha256"],
            build=data.get("build", ""),
            subdir=data.get("subdir", ""),
            md5=data.get("md5", ""),
            depends=tuple(data.get("depends", ())),
            size=int(data.get("size", 0)),
            noarch=str(data.get("noarch", "")),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PlatformLock:
    """The locked packages of one spec for one platform, and how they were solved."""

    platform: Platform
    packages: tuple[LockedPackage, ...]
    spec_id: str = ""
    channels: tuple[str, ...] = ()
    virtual_packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "packages", tuple(sorted(self.packages)))
        object.__setattr__(self, "channels", tuple(strip_credentials(c) for c in self.channels))

    @property
    def env_id(self) -> str:
        """32 hex digits identifying the package set (not how it was asked for)."""
        lines = "\n".join(p.identity for p in self.packages)
        return hashlib.sha256(f"{self.platform}\n{lines}".encode()).hexdigest()[:32]

    def names(self) -> dict[str, LockedPackage]:
        return {p.name: p for p in self.packages}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LOCK_FORMAT,
            "platform": self.platform,
            "spec_id": self.spec_id,
            "env_id": self.env_id,
            "channels": list(self.channels),
            "virtual_packages": list(self.virtual_packages),
            "packages": [p.to_dict() for p in self.packages],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "lock") -> PlatformLock:
        """Read :meth:`to_dict` output; raises ``LockError`` if it is not that."""
        if data.get("format") != LOCK_FORMAT:
            raise LockError(f"{where}: lock format {data.get('format')!r}, want {LOCK_FORMAT}")
        platform = data.get("platform")
        if not is_platform(platform):
            raise LockError(f"{where}: unknown platform {platform!r}")
        try:
            lock = cls(
                platform=platform,
                packages=tuple(LockedPackage.from_dict(p) for p in data["packages"]),
                spec_id=str(data.get("spec_id", "")),
                channels=tuple(data.get("channels", ())),
                virtual_packages=tuple(data.get("virtual_packages", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LockError(f"{where}: not an envmgr lock ({exc})") from None
        if data.get("env_id") not in (None, lock.env_id):
            raise LockError(f"{where}: env_id does not match its packages (edited by hand?)")
        return lock


@dataclass(frozen=True, kw_only=True, slots=True)
class Lock:
    """One spec locked for one or more platforms, with where it came from."""

    platforms: tuple[PlatformLock, ...]
    spec_id: str = ""
    sources: tuple[str, ...] = ()
    envmgr_version: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "platforms", tuple(sorted(self.platforms, key=lambda p: p.platform))
        )

    def for_platform(self, platform: str) -> PlatformLock:
        for lock in self.platforms:
            if lock.platform == platform:
                return lock
        raise LockError(
            f"the lock has no {platform} part (it has "
            f"{', '.join(p.platform for p in self.platforms) or 'none'})"
        )

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for p in self.platforms for c in p.channels))


@dataclass(frozen=True, kw_only=True, slots=True)
class LockDiff:
    """What changes from lock *old* to lock *new*, by (manager, name)."""

    added: tuple[LockedPackage, ...]
    removed: tuple[LockedPackage, ...]
    changed: tuple[tuple[LockedPackage, LockedPackage], ...]  # (old, new)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def diff_locks(old: PlatformLock, new: PlatformLock) -> LockDiff:
    """Packages added, removed and changed (version, build, URL or hash) between two locks."""
    before = {(p.manager, p.name): p for p in old.packages}
    after = {(p.manager, p.name): p for p in new.packages}
    return LockDiff(
        added=tuple(after[k] for k in sorted(after.keys() - before.keys())),
        removed=tuple(before[k] for k in sorted(before.keys() - after.keys())),
        changed=tuple(
            (before[k], after[k])
            for k in sorted(before.keys() & after.keys())
            if before[k].identity != after[k].identity
        ),
    )


def _conda_lock_models() -> Any:
    # conda-lock (pydantic and friends) is imported only to read or write its files.
    from conda_lock.lockfile.v2prelim import models  # noqa: PLC0415

    return models


def _dependencies(depends: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for dep in depends:
        name, _, rest = dep.strip().partition(" ")
        out[name] = rest.strip() or "*"
    return out


def write_conda_lock(lock: Lock, path: Path) -> None:
    """Write *lock* as a conda-lock v1 file at *path* (temp file + rename)."""
    write_atomic(path, render_conda_lock(lock))


_HEADER = "# This lock file was generated by envmgr; conda-lock reads it too. DO NOT EDIT.\n"


def render_conda_lock(lock: Lock) -> str:
    """*lock* as the text of a conda-lock v1 file: the bytes conda-lock's own models write
    (``Lockfile.to_v1().dict_for_output()``, tested against them), without importing
    conda-lock, which costs a fresh resolve ~0.3 s. A channel with credentials or a token in
    it, or a conda package without an md5, goes through conda-lock itself."""
    import yaml  # noqa: PLC0415

    unusual = any("@" in c or "/t/" in c for c in lock.channels) or any(
        p.manager == "conda" and not p.md5 for pl in lock.platforms for p in pl.packages
    )
    if unusual:  # conda-lock names credentials by variable, and refuses conda without md5
        return render_with_conda_lock(lock)
    packages = []
    for platform_lock in lock.platforms:
        for pkg in platform_lock.packages:
            entry: dict[str, Any] = {
                "name": pkg.name,
                "version": pkg.version,
                "manager": "conda" if pkg.manager == "conda" else "pip",
                "platform": platform_lock.platform,
                "dependencies": dict(sorted(_dependencies(pkg.depends).items())),
                "url": pkg.url,
                "hash": {**({"md5": pkg.md5} if pkg.md5 else {}), "sha256": pkg.sha256},
            }
            if pkg.build:
                entry["build"] = pkg.build
            packages.append({**entry, "category": "main", "optional": False})
    packages.sort(key=lambda e: (e["manager"], e["name"], e["platform"]))
    metadata: dict[str, Any] = {
        "content_hash": {p.platform: p.env_id for p in lock.platforms},
        "channels": [{"url": c, "used_env_vars": []} for c in lock.channels],
        "platforms": [p.platform for p in lock.platforms],
        "sources": list(lock.sources),
    }
    if lock.created:
        metadata["time_metadata"] = {"created_at": lock.created}
    metadata["custom_metadata"] = _custom_metadata(lock)
    return (
        _HEADER
        + f"# spec_id: {lock.spec_id}\n"
        + str(
            yaml.safe_dump(
                {"version": 1, "metadata": metadata, "package": packages}, sort_keys=False
            )
        )
    )


def _custom_metadata(lock: Lock) -> dict[str, str]:
    custom = {"envmgr_version": lock.envmgr_version, "spec_id": lock.spec_id}
    for platform_lock in lock.platforms:
        custom[f"env_id.{platform_lock.platform}"] = platform_lock.env_id
        custom[f"virtual_packages.{platform_lock.platform}"] = " ".join(
            platform_lock.virtual_packages
        )
    return custom


def render_with_conda_lock(lock: Lock) -> str:
    """*lock* as the text of a conda-lock v1 file, written by conda-lock's own models."""
    import yaml  # noqa: PLC0415

    models = _conda_lock_models()
    packages = []
    for platform_lock in lock.platforms:
        for pkg in platform_lock.packages:
            packages.append(
                models.LockedDependency(
                    name=pkg.name,
                    version=pkg.version,
                    manager="conda" if pkg.manager == "conda" else "pip",
                    platform=platform_lock.platform,
                    dependencies=_dependencies(pkg.depends),
                    url=pkg.url,
                    hash=models.HashModel(md5=pkg.md5 or None, sha256=pkg.sha256),
                    build=pkg.build or None,
                    categories={"main"},
                )
            )
    custom = _custom_metadata(lock)
    meta = models.LockMeta(
        content_hash={p.platform: p.env_id for p in lock.platforms},
        channels=list(lock.channels),
        platforms=[p.platform for p in lock.platforms],
        sources=list(lock.sources),
        time_metadata=models.TimeMeta(created_at=lock.created) if lock.created else None,
        custom_metadata=custom,
    )
    content = models.Lockfile(package=packages, metadata=meta)
    content.alphasort_inplace()
    return (
        _HEADER
        + f"# spec_id: {lock.spec_id}\n"
        + str(yaml.safe_dump(content.to_v1().dict_for_output(), sort_keys=False))
    )


def read_conda_lock(path: Path) -> Lock:
    """Read a conda-lock v1 (or v2) file into a :class:`Lock`; raises ``LockError``."""
    from conda_lock.lockfile import parse_conda_lock_file  # noqa: PLC0415

    check_yaml(read_bounded(path, what="lock file"), where=str(path))
    try:
        content = parse_conda_lock_file(path)
    except FileNotFoundError:
        raise LockError(f"{path}: no such lock file") from None
    except Exception as exc:  # conda-lock raises pydantic, yaml and its own errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LockError(f"{path}: not a conda-lock file ({first})") from None
    by_platform: dict[str, list[LockedPackage]] = {}
    for dep in content.package:
        if not dep.hash.sha256:
            raise LockError(
                f"{path}: {dep.name} {dep.version} has no sha256; envmgr needs one "
                "for every package"
            )
        by_platform.setdefault(dep.platform, []).append(
            LockedPackage(
                manager="conda" if dep.manager == "conda" else "pypi",
                name=dep.name,
                version=dep.version,
                url=dep.url,
                sha256=dep.hash.sha256,
                md5=dep.hash.md5 or "",
                build=dep.build or "",
                subdir=_subdir_of(dep.url) if dep.manager == "conda" else "",
                depends=tuple(
                    f"{k} {v}".strip() if v != "*" else k for k, v in dep.dependencies.items()
                ),
                noarch=_noarch_of(dep) if dep.manager == "conda" else "",
            )
        )
    custom = content.metadata.custom_metadata or {}
    platforms = []
    for platform, packages in by_platform.items():
        if not is_platform(platform):
            raise LockError(f"{path}: unknown platform {platform!r}")
        vps = tuple(custom.get(f"virtual_packages.{platform}", "").split())
        platforms.append(
            PlatformLock(
                platform=platform,
                packages=tuple(packages),
                spec_id=custom.get("spec_id", ""),
                channels=tuple(c.url for c in content.metadata.channels),
                virtual_packages=vps,
            )
        )
    created = content.metadata.time_metadata.created_at if content.metadata.time_metadata else ""
    return Lock(
        platforms=tuple(platforms),
        spec_id=custom.get("spec_id", ""),
        sources=tuple(content.metadata.sources),
        envmgr_version=custom.get("envmgr_version", ""),
        created=created,
    )


def _noarch_of(dep: Any) -> str:
    """conda-lock files do not say; a noarch package depending on python is noarch: python."""
    if _subdir_of(dep.url) != "noarch":
        return ""
    return "python" if "python" in dep.dependencies else "generic"


def _subdir_of(url: str) -> str:
    parts = urlsplit(url).path.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else ""


def dumps(data: Mapping[str, Any]) -> bytes:
    """Compact, sorted JSON for cache entries."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def locked_package(record: Any) -> LockedPackage:
    """A py-rattler ``RepoDataRecord`` (which must have a sha256) as a locked package."""
    return LockedPackage(
        manager="conda",
        name=record.name.normalized,
        version=str(record.version),
        build=str(record.build),
        subdir=str(record.subdir),
        url=str(record.url),
        sha256=record.sha256.hex(),
        md5=record.md5.hex() if record.md5 else "",
        depends=tuple(record.depends),
        noarch="python" if record.noarch.python else ("generic" if record.noarch.generic else ""),
        size=int(record.size or 0),
    )


def strip_credentials_in(text: str) -> str:
    """Every URL in *text* without credentials (error messages reach logs)."""
    return re.sub(r"[a-z][a-z0-9+.-]*://\S+", lambda m: strip_credentials(m.group(0)), text)
