"""An sdist's PEP 517 build backend, called without pip: what the build system is, where the
sdist unpacks, and the command that runs one hook in an isolated interpreter.

The hook runs in ``python -I -S``: no site-packages and no user environment, only the standard
library, the build environment's directory (the build requirements, installed once per set of
requirements by :class:`envmgr.resolve.pypi.sdist.Sdists`) and the backend's own
``backend-path``. It writes its answer as JSON to a file, since backends print freely.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["BuildSystem", "Hook", "build_system", "hook_command", "unpack_sdist"]

Hook = Literal["prepare_metadata_for_build_wheel", "build_wheel"]

#: PEP 517's fallback for a project without ``[build-system]``: setuptools' legacy backend.
_LEGACY_REQUIRES = ("setuptools>=40.8.0",)
_LEGACY_BACKEND = "setuptools.build_meta:__legacy__"

_RUNNER = r"""
import importlib, json, os, sys
args = json.loads(sys.argv[1])
sys.path[:0] = args["path"]
os.chdir(args["source"])
module, _, attrs = args["backend"].partition(":")
backend = importlib.import_module(module.strip())
for attr in filter(None, attrs.strip().split(".")):
    backend = getattr(backend, attr)
get_requires = getattr(backend, "get_requires_for_build_wheel", None)
result = {"requires": list(get_requires({})) if get_requires else []}
# More build requirements: the caller installs them and calls again with them on the path.
if not result["requires"] or args["requires_done"]:
    hook = getattr(backend, args["hook"], None)
    if hook is None:  # PEP 517: no prepare_metadata hook means build the wheel and read it
        result["wheel"] = backend.build_wheel(args["out"], {})
    elif args["hook"] == "prepare_metadata_for_build_wheel":
        result["metadata"] = hook(args["out"], {})
    else:
        result["wheel"] = hook(args["out"], {})
with open(args["result"], "w") as handle:
    json.dump(result, handle)
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildSystem:
    """An sdist's ``[build-system]`` table, defaults filled in."""

    requires: tuple[str, ...]
    backend: str
    backend_path: tuple[str, ...] = ()

    @property
    def env_key(self) -> str:
        """The cache key of its build environment: the requirements and this Python."""
        text = json.dumps([sorted(self.requires), sys.version_info[:2]])
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def build_system(source: Path) -> BuildSystem:
    """The build system of the unpacked sdist at *source*. Raises ``ValueError`` with a
    reason when ``pyproject.toml`` is unreadable or malformed."""
    pyproject = source / "pyproject.toml"
    if not pyproject.is_file():
        return BuildSystem(requires=_LEGACY_REQUIRES, backend=_LEGACY_BACKEND)
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"pyproject.toml: {exc}") from None
    table = data.get("build-system")
    if not isinstance(table, dict):
        return BuildSystem(requires=_LEGACY_REQUIRES, backend=_LEGACY_BACKEND)
    requires = table.get("requires", [])
    backend = table.get("build-backend", _LEGACY_BACKEND)
    paths = table.get("backend-path", [])
    if not (isinstance(requires, list) and all(isinstance(r, str) for r in requires)):
        raise ValueError("pyproject.toml: build-system.requires must be a list of strings")
    if not isinstance(backend, str) or not isinstance(paths, list):
        raise ValueError(  # noqa: TRY004 - a malformed input, reported as such
            "pyproject.toml: malformed build-backend or backend-path"
        )
    if "build-backend" not in table and not requires:
        requires = list(_LEGACY_REQUIRES)
    for path in paths:
        resolved = (source / str(path)).resolve()
        if not resolved.is_relative_to(source.resolve()):
            raise ValueError(f"pyproject.toml: backend-path {path!r} leaves the project")
    return BuildSystem(
        requires=tuple(requires),
        backend=backend,
        backend_path=tuple(str((source / str(p)).resolve()) for p in paths),
    )


def unpack_sdist(archive: Path, dest: Path) -> Path:
    """Unpack the sdist *archive* into *dest* and return its project directory (the one
    top-level directory). Members that would leave *dest*, and links, are refused."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():
                target = (dest / name).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise ValueError(f"{archive.name}: member {name!r} leaves the archive")
            zipped.extractall(dest)  # noqa: S202 - every name checked above
    else:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                # Refuses absolute names, '..' and links that point out; keeps the rest.
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Pythons without extraction filters
                members = []
                for member in tar:
                    target = (dest / member.name).resolve()
                    if not target.is_relative_to(dest.resolve()) or not (
                        member.isfile() or member.isdir()
                    ):
                        raise ValueError(
                            f"{archive.name}: member {member.name!r} is a link or leaves "
                            "the archive"
                        )
                    members.append(member)
                tar.extractall(dest, members=members)  # noqa: S202 - checked above
    entries = [p for p in dest.iterdir() if p.is_dir()]
    if len(entries) != 1:
        raise ValueError(f"{archive.name}: expected one top-level directory")
    return entries[0]


def hook_command(
    *,
    hook: Hook,
    system: BuildSystem,
    source: Path,
    env_dirs: list[Path],
    out: Path,
    result: Path,
    requires_done: bool = False,
) -> list[str]:
    """The command that runs *hook* of *system* for the project at *source* in isolation.

    It first asks ``get_requires_for_build_wheel``; when that names requirements and
    *requires_done* is false, it answers only ``{"requires": [...]}`` and the caller calls
    again with them installed (one interpreter start in the common case)."""
    args = {
        "requires_done": requires_done,
        "path": [*system.backend_path, *(str(d) for d in env_dirs)],
        "source": str(source),
        "backend": system.backend,
        "hook": hook,
        "out": str(out),
        "result": str(result),
    }
    return [sys.executable, "-I", "-S", "-c", _RUNNER, json.dumps(args)]
