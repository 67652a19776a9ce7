"""Jupyter kernels that run an env: kernelspecs where Jupyter looks for the user's kernels.

A kernel's command is ``python -m envmgr run ENV_ID --store S -- python -m ipykernel_launcher
-f {connection_file}`` (the python envmgr is installed in): while the kernel runs it holds the
env's use lock, so ``gc`` keeps the env, and an env that ``gc`` removed in between is hydrated
again when the kernel starts. envmgr's kernelspecs say so in ``metadata.envmgr``; envmgr never
replaces or removes a kernel without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envmgr.errors import EnvmgrError

__all__ = [
    "Kernel",
    "KernelError",
    "default_kernel_name",
    "has_ipykernel",
    "install_kernel",
    "is_kernel_name",
    "kernels_dir",
    "list_kernels",
    "remove_kernel",
]

#: The key of envmgr's record in a kernelspec's ``metadata``.
_KEY = "envmgr"
_NAME = re.compile(r"[a-z0-9._-]{1,64}")


class KernelError(EnvmgrError):
    """A kernel that is not there, not envmgr's, or unreadable."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Kernel:
    name: str
    display_name: str
    path: Path
    env_id: str
    target: str
    store: str
    argv: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "path": str(self.path),
            "env_id": self.env_id,
            "target": self.target,
            "store": self.store,
            "argv": list(self.argv),
        }


def kernels_dir() -> Path:
    """Where Jupyter looks for this user's kernelspecs (jupyter_core's rule)."""
    data = os.environ.get("JUPYTER_DATA_DIR")
    if data:
        return Path(data).expanduser() / "kernels"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Jupyter" / "kernels"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "jupyter" / "kernels"


def is_kernel_name(name: str) -> bool:
    """A kernelspec name: 1-64 of lowercase ASCII letters, digits, ``-``, ``.``, ``_``."""
    return bool(_NAME.fullmatch(name)) and name not in (".", "..")


def default_kernel_name(target: str) -> str:
    """``envmgr-flow-train`` for ``path/flow.py:train``, ``envmgr-team-pandas-stable`` for a
    name, ``envmgr-<id>`` for an env id."""
    file, _, step = target.rpartition(":")
    text = f"{Path(file).stem}-{step}" if file.endswith(".py") else target
    slug = re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-.")
    return f"envmgr-{slug[:56]}"


def has_ipykernel(prefix: Path) -> bool:
    """Whether the env at *prefix* can run a kernel (its site-packages has ipykernel)."""
    return any(prefix.glob("lib/python3*/site-packages/ipykernel/__init__.py")) or any(
        prefix.glob("Lib/site-packages/ipykernel/__init__.py")
    )


def _read(path: Path) -> Kernel | None:
    """The envmgr kernel at *path*; ``None`` when there is none or it is not envmgr's.
    Raises ``KernelError`` when its kernel.json cannot be read."""
    spec = path / "kernel.json"
    try:
        data = json.loads(spec.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KernelError(f"{spec}: unreadable ({exc})", hint="remove it by hand") from None
    record = data.get("metadata", {}).get(_KEY) if isinstance(data, dict) else None
    if not isinstance(record, dict):
        return None
    return Kernel(
        name=path.name,
        display_name=str(data.get("display_name")),
        path=path,
        env_id=str(record.get("env_id")),
        target=str(record.get("target")),
        store=str(record.get("store")),
        argv=tuple(str(word) for word in data.get("argv", [])),
    )


def list_kernels(where: Path) -> list[Kernel]:
    """envmgr's kernels in *where*, by name (others, and unreadable ones, are passed over)."""
    found = []
    for spec in sorted(where.glob("*/kernel.json")):
        try:
            kernel = _read(spec.parent)
        except KernelError:
            continue
        if kernel is not None:
            found.append(kernel)
    return found


def install_kernel(
    where: Path, name: str, *, env_id: str, target: str, store: str, cache_dir: Path
) -> Kernel:
    """Write the kernelspec *name* in *where* for the env *env_id* (*target* is what the user
    named it by), replacing an envmgr kernel of that name, atomically. Raises
    ``KernelError`` when a kernel of that name is not envmgr's."""
    path = where / name
    if (path / "kernel.json").exists() and _read(path) is None:
        raise KernelError(
            f"kernel {name} in {where} is not envmgr's; envmgr leaves it alone",
            hint="give another name with --name",
        )
    spec = {
        "argv": [
            sys.executable, "-m", "envmgr", "run", env_id, "--store", store,
            "--", "python", "-m", "ipykernel_launcher", "-f", "{connection_file}",
        ],
        "display_name": f"{target} (envmgr {env_id[:12]})",
        "language": "python",
        "env": {"ENVMGR_CACHE_DIR": str(cache_dir)},
        "metadata": {_KEY: {"env_id": env_id, "target": target, "store": store}},
    }  # fmt: skip
    where.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=where))
    old = where / f".{name}-old-{os.getpid()}"
    try:
        (staging / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        if path.exists():
            path.rename(old)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return Kernel(
        name=name,
        display_name=str(spec["display_name"]),
        path=path,
        env_id=env_id,
        target=target,
        store=store,
        argv=tuple(spec["argv"]),
    )


def remove_kernel(where: Path, name: str) -> Kernel:
    """Remove envmgr's kernel *name* from *where*; raises ``KernelError`` when there is none
    or it is not envmgr's."""
    path = where / name
    kernel = _read(path)
    if kernel is None:
        if (path / "kernel.json").exists():
            raise KernelError(f"kernel {name} in {where} is not envmgr's; envmgr leaves it alone")
        raise KernelError(
            f"no kernel {name} in {where}", hint="`envmgr kernel --list` shows envmgr's kernels"
        )
    shutil.rmtree(path)
    return kernel
