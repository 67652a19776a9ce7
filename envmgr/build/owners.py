"""Which package put each file into a prefix: the split of an installed env into layers.

A conda package owns the files its ``conda-meta`` record lists (and the record); a wheel that
envmgr installed (``INSTALLER`` says ``envmgr``) owns the rows of its ``RECORD``; a ``.pyc``
belongs to the package of its source. A path two packages claim (rattler lists the loser's
copy under ``__clobbers__/``) is *shared*, and its packages are *involved* in a clobber; a
path no package claims (``conda-meta/history``, rattler's ``CACHEDIR.TAG``) is *unowned*.
Shared and unowned paths belong to the env layer, not to any package layer.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from envmgr.locks.lock import LockedPackage, PlatformLock

__all__ = ["CLOBBERS", "Owners", "find_owners", "package_key"]

#: Where rattler records the copy of a path that a package installed earlier already wrote.
CLOBBERS = "__clobbers__/"


def package_key(package: LockedPackage) -> str:
    """``conda numpy`` / ``pypi tabulate``: one package of a lock, whatever its version."""
    name = canonicalize_name(package.name) if package.manager == "pypi" else package.name
    return f"{package.manager} {name}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Owners:
    """The files and links of a prefix, split by the package that put them there."""

    #: package key → the paths only it claims, sorted.
    paths: dict[str, tuple[str, ...]]
    #: Paths two or more packages claim (and rattler's ``__clobbers__`` copies).
    shared: frozenset[str]
    #: Packages that claim a shared path.
    involved: frozenset[str]
    #: Paths no package claims.
    unowned: tuple[str, ...]


def _tree(prefix: Path) -> set[str]:
    """Every file and link below *prefix*, relative, POSIX separators."""
    found = set()
    root = str(prefix)
    for dirpath, dirnames, filenames in os.walk(prefix):
        rel = os.path.relpath(dirpath, root)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]  # noqa: PTH114, PTH118
        dirnames[:] = [d for d in dirnames if d not in links]
        for name in filenames + links:
            found.add(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return found


def _conda_claims(prefix: Path, claims: dict[str, set[str]], involved: set[str]) -> None:
    for record in sorted((prefix / "conda-meta").glob("*.json")):
        data = json.loads(record.read_text())
        key = f"conda {data['name']}"
        claims.setdefault(f"conda-meta/{record.name}", set()).add(key)
        for path in data.get("files", ()):
            path = str(path)
            if path.startswith(CLOBBERS):
                involved.add(key)
            claims.setdefault(path, set()).add(key)


def _wheel_claims(prefix: Path, lock: PlatformLock, claims: dict[str, set[str]]) -> None:
    ours = {package_key(p) for p in lock.packages if p.manager == "pypi"}
    for dist_info in sorted(prefix.glob("lib/python*/site-packages/*.dist-info")):
        installer = dist_info / "INSTALLER"
        if not installer.is_file() or "envmgr" not in installer.read_text(errors="replace"):
            continue  # a conda package's own metadata: its record claims it
        name = dist_info.name.removesuffix(".dist-info").rsplit("-", 1)[0]
        key = f"pypi {canonicalize_name(name)}"
        if key not in ours:
            continue
        site = dist_info.parent
        with (dist_info / "RECORD").open(newline="") as rows:
            for row in csv.reader(rows):
                if row:
                    rel = os.path.relpath(os.path.normpath(site / row[0]), prefix)
                    claims.setdefault(Path(rel).as_posix(), set()).add(key)


def _source_of(pyc: str) -> str | None:
    """``a/__pycache__/b.cpython-311.pyc`` → ``a/b.py``; ``None`` for other paths."""
    parent, _, name = pyc.rpartition("/")
    if not name.endswith(".pyc") or f"/{parent}".rpartition("/")[2] != "__pycache__":
        return None
    package_dir = parent.removesuffix("__pycache__")
    return f"{package_dir}{name.split('.', 1)[0]}.py"


def find_owners(prefix: Path, lock: PlatformLock) -> Owners:
    """Split the installed *prefix* of *lock* by owner (see the module doc).

    Cost: one walk of the tree, every conda-meta record and every ``RECORD`` read once."""
    present = _tree(prefix)
    claims: dict[str, set[str]] = {}
    involved: set[str] = set()
    _conda_claims(prefix, claims, involved)
    _wheel_claims(prefix, lock, claims)
    for path in present:
        if path not in claims and (source := _source_of(path)) is not None:
            owners = claims.get(source)
            if owners:
                claims[path] = set(owners)
    shared = {p for p in present if len(claims.get(p, ())) > 1 or p.startswith(CLOBBERS)}
    for path in shared:
        involved.update(claims.get(path, ()))
    by_owner: dict[str, list[str]] = {}
    unowned = []
    for path in sorted(present):
        owners = claims.get(path)
        if not owners:
            unowned.append(path)
        elif path not in shared:
            by_owner.setdefault(next(iter(owners)), []).append(path)
    return Owners(
        paths={key: tuple(paths) for key, paths in by_owner.items()},
        shared=frozenset(shared),
        involved=frozenset(involved),
        unowned=tuple(unowned),
    )
