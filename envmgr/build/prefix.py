"""Install a lock into a prefix, for any target platform, on any host, running nothing of it.

:func:`create_prefix` installs a :class:`~envmgr.locks.lock.PlatformLock` of *any* supported
platform: conda packages with py-rattler's installer for the lock's platform (shared package cache,
hardlinks where it can, link scripts never run: the packages that ship one are named), then the
PyPI wheels (downloaded once into a wheel cache by sha256, hashes checked) with PyPA's ``installer``
into the target's scheme, scripts pointing at the env's python, and last the checked-hash
bytecode of the target's Python, written by an interpreter of that version that runs on the
host (see :mod:`envmgr.build.bytecode`). A native build is the same path with target = host.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from envmgr.build.bytecode import BytecodeSource, bytecode_python, compile_tree, python_xy
from envmgr.build.placeholder import to_placeholder
from envmgr.build.wheels import install_wheels
from envmgr.cache import Store
from envmgr.channels import Credentials, rattler_client
from envmgr.errors import BuildError
from envmgr.locks.lock import PlatformLock, strip_credentials
from envmgr.platforms import Platform, host_platform
from envmgr.progress import NULL, Progress, Task, tracked

__all__ = [
    "BuildError",
    "Prefix",
    "conda_records",
    "create_prefix",
    "installed_sizes",
    "tree_size",
]

_NOARCH: dict[str, Literal["python", "generic"]] = {"python": "python", "generic": "generic"}


def conda_records(lock: PlatformLock) -> list[Any]:
    import rattler  # noqa: PLC0415

    records = []
    for pkg in lock.packages:
        if pkg.manager != "conda":
            continue
        build_number = pkg.build.rsplit("_", 1)[-1]
        record = rattler.PackageRecord(
            name=pkg.name,
            version=pkg.version,
            build=rattler.BuildString(pkg.build),
            build_number=int(build_number) if build_number.isdigit() else 0,
            subdir=pkg.subdir,
            noarch=_NOARCH.get(pkg.noarch),
            depends=list(pkg.depends),
            sha256=bytes.fromhex(pkg.sha256),
            md5=bytes.fromhex(pkg.md5) if pkg.md5 else None,
            size=pkg.size or None,
        )
        channel = pkg.url.rsplit("/", 2)[0] + "/"
        records.append(rattler.RepoDataRecord(record, pkg.url.rsplit("/", 1)[-1], pkg.url, channel))
    return records


def _install_reporter(task: Task) -> Any:
    """py-rattler's installer callbacks, counted as installed packages."""
    import rattler  # noqa: PLC0415

    class Reporter(rattler.InstallerReporter):
        def on_transaction_operation_complete(self, operation: int) -> None:
            task.advance()

    # The protocol's other callbacks are no-ops; mypy reads their bodies as abstract.
    return Reporter()  # type: ignore[abstract]


def tree_size(prefix: Path) -> int:
    """Bytes in the regular files under *prefix* (what :func:`pack` reports)."""
    total = 0
    for root, _dirs, files in os.walk(prefix):
        for name in files:
            info = os.lstat(os.path.join(root, name))  # noqa: PTH118 - hot loop
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _normalise_metadata(prefix: Path) -> None:
    """Drop machine-specific paths (the package cache) from conda-meta, for a reproducible
    archive; ``conda``/``rattler`` do not need them to read the env."""
    meta = prefix / "conda-meta"
    for path in sorted(meta.glob("*.json")):
        data = json.loads(path.read_text())
        for key in ("extracted_package_dir", "package_tarball_full_path"):
            data.pop(key, None)
        link = data.get("link")
        if isinstance(link, dict) and "source" in link:
            # Where the package cache was on the build machine; conda-pack needs the key.
            link["source"] = f"pkgs/{Path(str(link['source'])).name}"
            # How files reached the build prefix (hardlink, copy, clone) depends on the
            # build host's file systems; an unpacked archive holds copies.
            link["type"] = 3
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True, kw_only=True, slots=True)
class Prefix:
    """What :func:`create_prefix` made: the packages whose link scripts were not run, and
    how many ``.pyc`` files the target's Python finds."""

    link_scripts: tuple[str, ...]
    bytecode_files: int
    #: Each package's installed bytes (its files in conda-meta, or its wheel's RECORD).
    sizes: tuple[tuple[str, int], ...] = ()


def installed_sizes(prefix: Path) -> dict[str, int]:
    """The bytes each package put into *prefix*: the files its ``conda-meta`` record lists
    (conda) or its ``.dist-info/RECORD`` (wheels), as they are on disk."""

    def on_disk(paths: Iterable[str]) -> int:
        total = 0
        for rel in paths:
            with contextlib.suppress(OSError):
                total += (prefix / rel).lstat().st_size
        return total

    sizes: dict[str, int] = {}
    for record in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            data = json.loads(record.read_text())
            sizes[str(data["name"])] = on_disk(str(f) for f in data.get("files", ()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for dist_info in sorted(prefix.glob("lib/python*/site-packages/*.dist-info")):
        if not (dist_info / "INSTALLER").is_file() or "envmgr" not in (
            dist_info / "INSTALLER"
        ).read_text(errors="replace"):
            continue  # a conda package's own metadata: counted above
        site = dist_info.parent
        try:
            with (dist_info / "RECORD").open(newline="") as rows:
                files = [row[0] for row in csv.reader(rows) if row]
        except OSError:
            continue
        name = dist_info.name.removesuffix(".dist-info").rsplit("-", 1)[0]
        sizes[name.replace("_", "-").lower()] = on_disk(
            os.path.relpath(os.path.normpath(site / f), prefix) for f in files
        )
    return sizes


def _link_scripts(prefix: Path) -> tuple[str, ...]:
    """Packages that ship conda link scripts (``bin/.<name>-post-link.sh`` and friends)."""
    names = set()
    for path in (prefix / "bin").glob(".*-*.sh"):
        for action in ("-pre-link.sh", "-post-link.sh", "-pre-unlink.sh"):
            if path.name.endswith(action):
                names.add(path.name[1 : -len(action)])
    return tuple(sorted(names))


def create_prefix(
    lock: PlatformLock,
    prefix: Path,
    cache_dir: Path,
    store: Store | None = None,
    *,
    progress: Progress = NULL,
    host: Platform | None = None,
    bytecode: BytecodeSource = "auto",
    credentials: Credentials | None = None,
    skip: frozenset[str] = frozenset(),
    placeholder: str | None = None,
) -> Prefix:
    """Install *lock* (any supported platform) into the new *prefix* as built on *host*
    (default: this machine), running nothing from the target; *progress* counts installed
    packages; *credentials* authenticate package downloads (see :mod:`envmgr.channels`).
    *skip* names packages to leave out (their layers exist: see :mod:`envmgr.build.layers`).
    With *placeholder* (as long as *prefix*), every file holding *prefix* holds the placeholder
    instead before the bytecode is written, and the bytecode records its sources under it
    (see :mod:`envmgr.build.placeholder`). Raises ``BuildError`` (or ``BytecodeError``)."""
    import rattler  # noqa: PLC0415

    host = host or host_platform()
    # Checked-hash .pyc files do not depend on file times: the archive stays reproducible
    # and the unpacked env's bytecode stays valid.
    os.environ.setdefault("SOURCE_DATE_EPOCH", "946684800")
    label = f"install {lock.env_id[:12]}"
    total = sum(1 for p in lock.packages if p.name not in skip)
    with tracked(progress, label, total=total, unit="items") as task:
        try:
            asyncio.run(
                rattler.install(
                    conda_records(lock),
                    ignored_packages=set(skip) or None,
                    target_prefix=prefix,
                    cache_dir=cache_dir / "pkgs",
                    platform=rattler.Subdir(lock.platform),
                    execute_link_scripts=False,
                    client=rattler_client(credentials or {}),
                    show_progress=False,
                    reporter=_install_reporter(task),
                )
            )
        except Exception as exc:
            text = " ".join(str(exc).split())[:500]
            raise BuildError(
                f"env {lock.env_id}: installing conda packages failed: {strip_credentials(text)}"
            ) from None
        install_wheels(lock, prefix, cache_dir, store, task, host, skip)
    _normalise_metadata(prefix)
    if placeholder is not None:
        to_placeholder(prefix, placeholder)
    link_scripts = _link_scripts(prefix)
    if link_scripts:
        progress.note(f"env {lock.env_id}: link scripts of {', '.join(link_scripts)} were not run")
    pyc = 0
    python = bytecode_python(lock, host=host, cache_dir=cache_dir, source=bytecode)
    xy = python_xy(lock)
    if python is not None and xy is not None:
        with tracked(progress, f"bytecode {lock.env_id[:12]}", unit="phase"):
            pyc = compile_tree(
                python,
                [prefix / "lib" / f"python{xy}"],
                env_id=lock.env_id,
                shown_as=(str(prefix), placeholder) if placeholder else None,
            )
    sizes = tuple(sorted(installed_sizes(prefix).items()))
    return Prefix(link_scripts=link_scripts, bytecode_files=pyc, sizes=sizes)
