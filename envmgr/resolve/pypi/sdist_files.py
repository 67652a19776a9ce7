"""What an sdist says about itself without building it, read from the archive.

``PKG-INFO`` answers a resolver when PEP 643 says it may (:func:`static_enough`); a static
``[project]`` table of ``pyproject.toml`` answers when nothing a resolver needs is dynamic
(:func:`pyproject_metadata`); :func:`has_native_sources` tells, without a build, whether an
sdist compiles code. Members are read with bounded sizes: an sdist comes from an index.
"""

from __future__ import annotations

import email.message
import re
import sys
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from envmgr.errors import EnvmgrError

__all__ = [
    "SdistBuildError",
    "has_native_sources",
    "members",
    "pkg_info",
    "pyproject_metadata",
    "read_member",
    "static_enough",
]


class SdistBuildError(EnvmgrError):
    """A source distribution could not be read, prepared or built; names it and why, and for
    a failed build the lines of its log that explain it (``lines``) and the log (``log``)."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        lines: Sequence[str] = (),
        log: Path | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.lines = tuple(lines)
        self.log = log

    def details(self) -> dict[str, Any]:
        return {"lines": list(self.lines), "log": str(self.log) if self.log else None}


#: What a resolver reads; if PEP 643 marks any of them Dynamic, PKG-INFO is not enough.
_RESOLVER_FIELDS = frozenset({"requires-dist", "requires-python", "provides-extra"})
#: Files that mean an sdist compiles code (a heuristic that never needs a build).
_NATIVE_SUFFIXES = (".c", ".cc", ".cpp", ".cxx", ".pyx", ".f", ".f90", ".rs", ".cu", ".go")
_NATIVE_NAMES = frozenset({"cargo.toml", "cmakelists.txt"})
_NATIVE_SETUP = re.compile(rb"\bext_modules\b|\bExtension\s*\(|\bcythonize\s*\(")
_MAX_PKG_INFO = 4 << 20


def _metadata_version(text: str | None) -> Version | None:
    try:
        return Version(text or "")
    except InvalidVersion:
        return None


def static_enough(meta: email.message.Message) -> bool:
    """PEP 643: PKG-INFO answers a resolver when it is 2.2+ and nothing it needs is Dynamic."""
    version = _metadata_version(meta.get("Metadata-Version"))
    if version is None or version < Version("2.2"):
        return False
    dynamic = {d.strip().lower() for d in meta.get_all("Dynamic") or []}
    return not (dynamic & _RESOLVER_FIELDS)


def members(path: Path) -> Iterator[tuple[str, int]]:
    """(name, size) of every member of an sdist archive (.tar.gz, .tar.bz2, .zip, ...)."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                yield info.filename, info.file_size
        return
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isfile():
                yield member.name, member.size


def read_member(path: Path, wanted: str) -> bytes | None:
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            return archive.read(wanted)
    with tarfile.open(path, "r:*") as archive:
        handle = archive.extractfile(wanted)
        return handle.read(_MAX_PKG_INFO) if handle is not None else None


def pkg_info(path: Path) -> bytes | None:
    """The top-level ``<name>-<version>/PKG-INFO`` of an sdist, or None."""
    try:
        for name, size in members(path):
            if name.count("/") == 1 and name.endswith("/PKG-INFO") and size <= _MAX_PKG_INFO:
                return read_member(path, name)
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise SdistBuildError(f"{path.name}: not a readable sdist archive ({exc})") from None
    return None


def pyproject_metadata(path: Path, project: str, version: str) -> bytes | None:
    """Core metadata (2.2) made from the static ``[project]`` table of the sdist at *path*,
    or None when there is none, it names another project, or any field a resolver needs is
    ``dynamic`` or malformed. *project* is canonical, *version* the file's version."""
    from packaging.requirements import InvalidRequirement, Requirement  # noqa: PLC0415
    from packaging.specifiers import InvalidSpecifier, SpecifierSet  # noqa: PLC0415
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # noqa: PLC0415

    try:
        wanted = next(
            (
                name
                for name, size in members(path)
                if name.count("/") == 1
                and name.endswith("/pyproject.toml")
                and size <= _MAX_PKG_INFO
            ),
            None,
        )
        if wanted is None:
            return None
        table = tomllib.loads((read_member(path, wanted) or b"").decode("utf-8"))["project"]
        dynamic = {str(d).lower() for d in table.get("dynamic", [])}
        name = table["name"]
        if dynamic & {"dependencies", "optional-dependencies", "requires-python"}:
            return None
        if not isinstance(name, str) or canonicalize_name(name) != project:
            return None
        requires = [str(Requirement(r)) for r in table.get("dependencies", [])]
        extras = table.get("optional-dependencies", {})
        python = table.get("requires-python")
        if python is not None:
            SpecifierSet(python)
        lines = ["Metadata-Version: 2.2", f"Name: {name}", f"Version: {version}"]
        if python:
            lines.append(f"Requires-Python: {python}")
        lines += [f"Requires-Dist: {r}" for r in requires]
        for extra, deps in extras.items():
            extra_name = canonicalize_name(extra)
            lines.append(f"Provides-Extra: {extra_name}")
            for dep in deps:
                req = Requirement(dep)
                marker = f"({req.marker}) and " if req.marker else ""
                req.marker = None
                lines.append(f'Requires-Dist: {req}; {marker}extra == "{extra_name}"')
    except (
        OSError,
        UnicodeDecodeError,
        tomllib.TOMLDecodeError,
        KeyError,
        TypeError,
        AttributeError,
        InvalidRequirement,
        InvalidSpecifier,
        tarfile.TarError,
        zipfile.BadZipFile,
        EOFError,
    ):
        return None
    return ("\n".join(lines) + "\n\n").encode()


def has_native_sources(path: Path) -> bool:
    """Whether the sdist at *path* carries code to compile (C, C++, Cython, Fortran, Rust, ...)
    or a ``setup.py`` that declares extension modules."""
    setup = None
    for name, _size in members(path):
        lower = name.lower()
        base = lower.rsplit("/", 1)[-1]
        if lower.endswith(_NATIVE_SUFFIXES) or base in _NATIVE_NAMES:
            return True
        if lower.count("/") == 1 and base == "setup.py":
            setup = name
    if setup is not None:
        data = read_member(path, setup) or b""
        return bool(_NATIVE_SETUP.search(data))
    return False
