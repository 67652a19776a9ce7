"""PyPI locks of other tools: ``pylock.toml`` (PEP 751, written by pip, uv and pdm) and
``uv.lock``.

:func:`read_pypi_lock` gives a :class:`PypiLockFile` whose :meth:`~PypiLockFile.select` picks
the packages and files of one target (markers and wheel tags of the target, never the host's);
every file URL must name a file of its package, a wheel entry a wheel. Their Python comes from
a conda solve (:func:`envmgr.resolve.resolution_cache.complete_pypi_lock`), unless the file
carries envmgr's own ``[tool.envmgr]`` table (written by ``envmgr export --format pylock``),
which holds the exact conda part, so a round trip keeps the env id.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from envmgr.ids import is_sha256
from envmgr.limits import check_package_url, read_bounded
from envmgr.locks.formats import LockFormat
from envmgr.locks.lock import (
    LockedPackage,
    LockError,
    PlatformLock,
    strip_credentials,
)
from envmgr.platforms import Platform, is_platform

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from envmgr.locks.python_target import PythonTarget

__all__ = ["PypiLockFile", "read_pypi_lock"]


@dataclass(frozen=True, kw_only=True, slots=True)
class _File:
    url: str
    sha256: str
    size: int
    wheel: bool


def _checked_file(where: str, name: str, *, url: str, sha256: str, size: int, wheel: bool) -> _File:
    """A file of package *name* as a lock lists it, refused in one line when its URL does not
    name a file of that package (``file:///etc/passwd``) or a wheel entry is no wheel."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename  # noqa: PLC0415

    if not url:
        raise LockError(f"{where}: {name} has a file with only a local path; envmgr needs URLs")
    problem = check_package_url(url, manager="pypi", name=name)
    if problem is None and wheel:
        try:
            parse_wheel_filename(_filename(url))
        except InvalidWheelFilename:
            problem = f"{_filename(url)[:120]!r} is listed as a wheel but is not a wheel file"
    if problem is not None:
        raise LockError(
            f"{where}: {name[:80]}: its URL {strip_credentials(url)[:200]} is refused: {problem}"
        )
    return _File(url=url, sha256=sha256, size=size, wheel=wheel)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Node:
    """One package of a uv.lock or pylock.toml with all its files."""

    name: str
    version: str
    files: tuple[_File, ...]
    depends: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class PypiLockFile:
    """A lock of PyPI packages (pylock.toml or uv.lock) to be selected per target.

    *requires_python* is the file's ``requires-python`` (``""`` when absent); *wheel_pythons*
    the CPython versions (``"3.11"``) its binary wheels are built for; *conda* the exact conda
    part per platform when envmgr wrote the file.
    """

    path: str
    format: LockFormat
    requires_python: str
    wheel_pythons: tuple[str, ...]
    conda: tuple[PlatformLock, ...] = ()
    platforms: tuple[Platform, ...] = ()  # the platforms the file says it is for ([tool.envmgr])
    indexes: tuple[str, ...] = ()  # the package indexes the file names
    _data: Any = None

    def select(self, target: PythonTarget) -> tuple[LockedPackage, ...]:
        """The packages (one file each, the best wheel for *target*, else the sdist) that
        *target* installs. Raises ``LockError`` naming a package with no file for it."""
        nodes = (
            _select_pylock(self.path, self._data, target)
            if self.format == "pylock.toml"
            else _select_uv(self.path, self._data, target)
        )
        return tuple(_pick_file(self.path, node, target) for node in nodes)

    def python_spec(self) -> str | None:
        """The Python to solve for when none is asked: the lowest series ``requires-python``
        allows, else the one series every binary wheel is built for, else none."""
        from packaging.specifiers import SpecifierSet  # noqa: PLC0415

        if self.requires_python:
            allowed = SpecifierSet(self.requires_python)
            for minor in range(8, 20):
                if allowed.contains(f"3.{minor}.99"):
                    return f"3.{minor}"
        if len(self.wheel_pythons) == 1:
            return self.wheel_pythons[0]
        return None


def _wheel_pythons(nodes: Iterable[_Node]) -> tuple[str, ...]:
    from packaging.utils import parse_wheel_filename  # noqa: PLC0415

    found: set[str] = set()
    for node in nodes:
        for file in node.files:
            if not file.wheel:
                continue
            for tag in parse_wheel_filename(_filename(file.url))[3]:
                match = re.fullmatch(r"cp3(\d+)", tag.interpreter)
                if match and tag.abi != "abi3":
                    found.add(f"3.{match.group(1)}")
    return tuple(sorted(found))


def _filename(url: str) -> str:
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def _pick_file(where: str, node: _Node, target: PythonTarget) -> LockedPackage:
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename  # noqa: PLC0415

    rank = target.tag_rank()
    best: tuple[int, _File] | None = None
    sdist = None
    for file in node.files:
        if not file.wheel:
            sdist = sdist or file
            continue
        try:
            tags = parse_wheel_filename(_filename(file.url))[3]
        except InvalidWheelFilename as exc:
            raise LockError(f"{where}: {node.name} {node.version}: {exc}") from None
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, file)
    chosen = best[1] if best is not None else sdist
    if chosen is None:
        raise LockError(
            f"{where}: {node.name} {node.version} has no file for {target.platform} with "
            f"CPython {target.python} in the lock",
            hint="lock for this platform too (uv lock is universal; pip lock is for one "
            "machine), or give --python for the version the lock was made for",
        )
    return LockedPackage(
        manager="pypi",
        name=node.name,
        version=node.version,
        url=chosen.url,
        sha256=chosen.sha256,
        size=chosen.size,
        depends=node.depends,
    )


def read_pypi_lock(path: Path, fmt: LockFormat) -> PypiLockFile:
    """A pylock.toml or uv.lock, checked; raises ``LockError`` with one line."""

    text = read_bounded(path, what="lock file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"{path}: not valid TOML ({exc})") from None
    if fmt == "pylock.toml":
        return _read_pylock(path, data)
    return _read_uv(path, data)


def _read_pylock(path: Path, data: dict[str, Any]) -> PypiLockFile:
    from packaging.pylock import (  # noqa: PLC0415
        Pylock,
        PylockUnsupportedVersionError,
        PylockValidationError,
    )

    version = str(data.get("lock-version", ""))
    if version.split(".")[0] != "1":
        # Checked before the schema: a later major version may reshape it entirely.
        raise LockError(
            f"{path}: pylock.toml lock-version {version or '(missing)'} is not supported"
            " (envmgr reads 1.x)",
            hint="write it with a pip or uv that writes lock-version 1.0",
        )
    try:
        pylock = Pylock.from_dict(data)
    except PylockUnsupportedVersionError as exc:
        raise LockError(f"{path}: {exc}", hint="write it with a current pip or uv") from None
    except PylockValidationError as exc:
        raise LockError(f"{path}: not a valid pylock.toml: {exc}") from None
    nodes = [_pylock_node(path, p) for p in pylock.packages]
    own = (pylock.tool or {}).get("envmgr") or {}
    conda = tuple(_tool_conda(path, own))
    return PypiLockFile(
        path=str(path),
        format="pylock.toml",
        requires_python=str(pylock.requires_python or ""),
        wheel_pythons=_wheel_pythons(nodes),
        conda=conda,
        platforms=tuple(p.platform for p in conda),
        indexes=tuple(sorted({str(p.index) for p in pylock.packages if p.index})),
        _data=pylock,
    )


def _hash(where: str, name: str, hashes: Mapping[str, str] | None) -> str:
    sha256 = (hashes or {}).get("sha256", "")
    if not is_sha256(sha256):
        raise LockError(f"{where}: {name} has a file without a sha256; envmgr needs one")
    return sha256


def _pylock_node(path: Path, package: Any) -> _Node:
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    name = str(canonicalize_name(package.name))
    if package.vcs or package.directory or package.archive:
        kind = (
            "a VCS checkout"
            if package.vcs
            else "a directory"
            if package.directory
            else "an archive"
        )
        raise LockError(
            f"{path}: {name} is {kind}; envmgr builds envs of index files (wheels, sdists) only"
        )
    files = []
    for wheel in package.wheels or ():
        url = wheel.url or ""
        files.append(
            _checked_file(
                str(path),
                name,
                url=url,
                sha256=_hash(str(path), name, wheel.hashes),
                size=wheel.size or 0,
                wheel=True,
            )
        )
    if package.sdist is not None:
        sdist = package.sdist
        files.append(
            _checked_file(
                str(path),
                name,
                url=sdist.url or "",
                sha256=_hash(str(path), name, sdist.hashes),
                size=sdist.size or 0,
                wheel=False,
            )
        )
    missing = [f for f in files if not f.url]
    if missing:
        raise LockError(f"{path}: {name} has a file with only a local path; envmgr needs URLs")
    depends = tuple(
        str(canonicalize_name(d["name"])) for d in package.dependencies or () if "name" in d
    )
    return _Node(name=name, version=str(package.version or ""), files=tuple(files), depends=depends)


def _select_pylock(where: str, pylock: Any, target: PythonTarget) -> list[_Node]:
    from packaging.pylock import PylockSelectError  # noqa: PLC0415

    try:
        chosen = [
            package
            for package, _dist in pylock.select(
                environment=target.markers(), tags=list(target.tags()), dependency_groups=()
            )
        ]
    except PylockSelectError as exc:
        raise LockError(
            f"{where}: nothing to install for {target.platform}, CPython {target.python}: {exc}"
        ) from None
    # select() picked the file by the target's tags; the same rule picks it again in
    # _pick_file, which also turns it into a locked package.
    return [_pylock_node(Path(where), package) for package in chosen]


def _tool_conda(path: Path, own: Mapping[str, Any]) -> Iterable[PlatformLock]:
    """The conda part envmgr wrote in ``[tool.envmgr]``: one table per platform."""
    for part in own.get("platforms", ()):
        try:
            packages = tuple(
                LockedPackage.from_dict({**p, "manager": "conda"}) for p in part["conda"]
            )
            platform = part["platform"]
            if not is_platform(platform):
                raise ValueError(f"unknown platform {platform!r}")
            yield PlatformLock(
                platform=platform,
                packages=packages,
                channels=tuple(part.get("channels", ())),
                virtual_packages=tuple(part.get("virtual_packages", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LockError(f"{path}: [tool.envmgr] is damaged ({exc})") from None


# --- uv.lock ------------------------------------------------------------------------


def _read_uv(path: Path, data: dict[str, Any]) -> PypiLockFile:
    version = data.get("version")
    if version != 1:
        raise LockError(
            f"{path}: uv.lock version {version!r} (envmgr reads version 1)",
            hint="write it with uv 0.4 or newer: uv lock",
        )
    packages = data.get("package", [])
    nodes = []
    for entry in packages:
        if not isinstance(entry, dict) or "name" not in entry:
            raise LockError(f"{path}: a [[package]] without a name")
        if "registry" in entry.get("source", {}) or "url" in entry.get("source", {}):
            nodes.append(_uv_node(path, entry))
    return PypiLockFile(
        path=str(path),
        format="uv.lock",
        requires_python=str(data.get("requires-python", "")),
        wheel_pythons=_wheel_pythons(nodes),
        indexes=tuple(
            sorted(
                {
                    str(e["source"]["registry"])
                    for e in packages
                    if isinstance(e.get("source"), dict) and "registry" in e["source"]
                }
            )
        ),
        _data=data,
    )


def _uv_node(path: Path, entry: Mapping[str, Any]) -> _Node:
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    name = str(canonicalize_name(entry["name"]))

    def file(item: Mapping[str, Any], wheel: bool) -> _File:
        algorithm, _, digest = str(item.get("hash", "")).partition(":")
        if algorithm != "sha256" or not is_sha256(digest):
            raise LockError(f"{path}: {name} has a file without a sha256; envmgr needs one")
        url = str(item.get("url", ""))
        if not url:
            raise LockError(f"{path}: {name} has a file with only a local path; envmgr needs URLs")
        size = int(item.get("size", 0))
        return _checked_file(str(path), name, url=url, sha256=digest, size=size, wheel=wheel)

    files = [file(w, True) for w in entry.get("wheels", ())]
    if "sdist" in entry:
        files.append(file(entry["sdist"], False))
    depends = tuple(str(canonicalize_name(d["name"])) for d in entry.get("dependencies", ()))
    return _Node(
        name=name, version=str(entry.get("version", "")), files=tuple(files), depends=depends
    )


def _select_uv(where: str, data: Mapping[str, Any], target: PythonTarget) -> list[_Node]:
    """Walk uv.lock's graph from its workspace members (``editable``/``virtual``/``directory``
    sources), following each dependency whose marker holds for *target* (extras a dependency
    asks for included; dev groups not), to the packages *target* installs."""
    from packaging.markers import Marker  # noqa: PLC0415
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    environment = target.markers()

    def holds(marker: str | None, extra: str = "") -> bool:
        return marker is None or Marker(marker).evaluate({**environment, "extra": extra})

    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for entry in data.get("package", []):
        by_name.setdefault(str(canonicalize_name(entry["name"])), []).append(entry)

    def entry_for(dep: Mapping[str, Any]) -> Mapping[str, Any]:
        name = str(canonicalize_name(dep["name"]))
        candidates = by_name.get(name, [])
        if "version" in dep:
            candidates = [c for c in candidates if c.get("version") == dep["version"]]
        if len(candidates) > 1:  # a fork: the one whose resolution markers hold here
            candidates = [
                c
                for c in candidates
                if any(holds(m) for m in c.get("resolution-markers", ()))
                or not c.get("resolution-markers")
            ]
        if not candidates:
            raise LockError(f"{where}: {name} is a dependency but not locked for {target.platform}")
        return candidates[0]

    roots = [
        e
        for entries in by_name.values()
        for e in entries
        if {"editable", "virtual", "directory"} & set(e.get("source", {}))
    ]
    if not roots:
        raise LockError(f"{where}: no workspace member (a package with source editable or virtual)")
    wanted: dict[str, Mapping[str, Any]] = {}
    queue: list[tuple[Mapping[str, Any], Sequence[str]]] = []
    for root in roots:
        queue.extend(
            (d, d.get("extra", ())) for d in root.get("dependencies", ()) if holds(d.get("marker"))
        )
    seen_extras: set[tuple[str, str]] = set()
    while queue:
        dep, extras = queue.pop()
        entry = entry_for(dep)
        name = str(canonicalize_name(entry["name"]))
        source = entry.get("source", {})
        if not ({"registry", "url"} & set(source)):
            if {"editable", "virtual", "directory"} & set(source):
                continue  # another workspace member: its dependencies are roots already
            kind = next(iter(source), "unknown")
            raise LockError(
                f"{where}: {name} comes from a {kind} source; envmgr builds envs of index "
                "files (wheels, sdists) only"
            )
        if name not in wanted:
            wanted[name] = entry
            queue.extend(
                (d, d.get("extra", ()))
                for d in entry.get("dependencies", ())
                if holds(d.get("marker"))
            )
        for extra in extras:
            if (name, extra) in seen_extras:
                continue
            seen_extras.add((name, extra))
            optional = entry.get("optional-dependencies", {}).get(extra, ())
            queue.extend((d, d.get("extra", ())) for d in optional if holds(d.get("marker"), extra))
    return [_uv_node(Path(where), wanted[n]) for n in sorted(wanted)]
