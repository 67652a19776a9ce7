"""``envmgr kernel``: a step's env (or any env) as a Jupyter kernel.

The kernelspec goes where Jupyter looks for the user's kernels (``$JUPYTER_DATA_DIR/kernels``,
else ``~/.local/share/jupyter/kernels`` on Linux, ``~/Library/Jupyter/kernels`` on macOS). Its
command is ``envmgr run ENV_ID -- python -m ipykernel_launcher``: the kernel holds the env's
use lock while it runs (``gc`` leaves it alone), and an env that ``gc`` removed in between is
hydrated again when the kernel starts. The kernelspec records the env id, the target and the
store; ``--list`` shows envmgr's kernels, ``--remove`` takes one away.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from envmgr.cli._common import STATE, emit_json, fail
from envmgr.cli._inputs import ChannelOpt, ExtraIndexOpt, IndexOpt, JsonOpt, StoreOpt
from envmgr.cli._targets import FlowOptions
from envmgr.config import load
from envmgr.errors import EnvmgrError

__all__ = ["kernel_command", "kernels_dir"]

#: The key of envmgr's record in a kernelspec's ``metadata``.
_KEY = "envmgr"


def kernels_dir() -> Path:
    """Where Jupyter looks for this user's kernelspecs (jupyter_core's rule)."""
    data = os.environ.get("JUPYTER_DATA_DIR")
    if data:
        return Path(data).expanduser() / "kernels"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Jupyter" / "kernels"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "jupyter" / "kernels"


_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _kernel_name(target: str) -> str:
    """The kernel's default name: ``envmgr-flow-train`` for ``path/flow.py:train``,
    ``envmgr-team-pandas-stable`` for a name, ``envmgr-<id>`` for an env id."""
    file, _, step = target.rpartition(":")
    text = f"{Path(file).stem}-{step}" if file.endswith(".py") else target
    slug = re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-.")
    return f"envmgr-{slug[:56]}"


def _has_ipykernel(prefix: Path) -> bool:
    return any(prefix.glob("lib/python3*/site-packages/ipykernel/__init__.py")) or any(
        prefix.glob("Lib/site-packages/ipykernel/__init__.py")
    )


def _envmgr_kernels(where: Path) -> list[dict[str, Any]]:
    rows = []
    for spec in sorted(where.glob("*/kernel.json")):
        try:
            data = json.loads(spec.read_text())
        except (OSError, ValueError):
            continue
        record = data.get("metadata", {}).get(_KEY) if isinstance(data, dict) else None
        if isinstance(record, dict):
            rows.append(_row(spec.parent, data))
    return rows


def _row(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """One envmgr kernel as ``--json`` shows it."""
    record = data["metadata"][_KEY]
    return {
        "name": path.name,
        "display_name": str(data.get("display_name")),
        "path": str(path),
        "env_id": str(record.get("env_id")),
        "target": str(record.get("target")),
        "store": str(record.get("store")),
        "argv": [str(word) for word in data.get("argv", [])],
    }


def kernel_command(
    target: Annotated[
        str | None,
        typer.Argument(
            help="FLOW.py:step, an env id (or its first 8+ digits), an env name[:tag] or a "
            "lock file; not with --list."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="The kernel's name (default: from TARGET)."),
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Take the kernel away.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="Show envmgr's kernels.")] = False,
    store: StoreOpt = None,
    channel: ChannelOpt = [],
    index_url: IndexOpt = None,
    extra_index_url: ExtraIndexOpt = [],
    as_json: JsonOpt = False,
) -> None:
    """Install a Jupyter kernel that runs TARGET's env (hydrated here; ipykernel must be in
    the env), so a notebook explores with exactly a step's packages."""
    where = kernels_dir()
    if list_:
        if target is not None or remove:
            fail("--list takes no TARGET and no --remove")
        rows = _envmgr_kernels(where)
        if as_json:
            emit_json({"action": "listed", "kernels_dir": str(where), "kernels": rows})
        elif not STATE.quiet:
            for row in rows:
                typer.echo(f"{row['name']:<32} env {row['env_id'][:12]}  {row['target']}")
        return
    if name is not None and not _NAME.fullmatch(name):
        fail(f"--name {name!r}: use up to 64 ASCII letters, digits, '-', '.' and '_'")
    if target is None and (name is None or not remove):
        fail("give a TARGET (e.g. flow.py:train), or --list")
    kernel = name.lower() if name is not None else _kernel_name(str(target))
    path = where / kernel
    if remove:
        _remove(path, as_json)
        return
    from envmgr.cli.envs import hydrate_for  # noqa: PLC0415 - hydrating imports much

    options = FlowOptions(
        store=store,
        channel=tuple(channel),
        index_url=index_url,
        extra_index_url=tuple(extra_index_url),
    )
    prefix = hydrate_for(str(target), options)
    env_id = prefix.name
    if not _has_ipykernel(prefix):
        raise EnvmgrError(
            f"{target}: env {env_id[:12]} has no ipykernel, which a Jupyter kernel runs",
            hint='add it to the spec (e.g. @pypi(packages={"ipykernel": ""}) on the step, '
            "or --pypi ipykernel) and run `envmgr kernel` again",
        )
    config = load(flags={"store": store})
    store_url = str(config["store"])
    spec = {
        "argv": [
            sys.executable, "-m", "envmgr", "run", env_id, "--store", store_url,
            "--", "python", "-m", "ipykernel_launcher", "-f", "{connection_file}",
        ],
        "display_name": f"{name or target} (envmgr {env_id[:12]})",
        "language": "python",
        "env": {"ENVMGR_CACHE_DIR": str(config["cache_dir"])},
        "metadata": {_KEY: {"env_id": env_id, "target": str(target), "store": store_url}},
    }  # fmt: skip
    where.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kernel}-", dir=where))
    try:
        (staging / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if as_json:
        row = _row(path, spec)
        emit_json({"action": "installed", "kernels_dir": str(where), "kernels": [row]})
    elif not STATE.quiet:
        typer.echo(f"kernel {kernel} (env {env_id[:12]}) installed in {path}")


def _remove(path: Path, as_json: bool) -> None:
    spec = path / "kernel.json"
    try:
        data = json.loads(spec.read_text())
    except FileNotFoundError:
        fail(f"no kernel {path.name} in {path.parent} (`envmgr kernel --list` shows them)")
    except (OSError, ValueError) as exc:
        fail(f"{spec}: unreadable ({exc}); remove it by hand")
    if not isinstance(data, dict) or _KEY not in data.get("metadata", {}):
        fail(f"kernel {path.name} in {path.parent} is not envmgr's; envmgr leaves it alone")
    row = _row(path, data)
    shutil.rmtree(path)
    if as_json:
        emit_json({"action": "removed", "kernels_dir": str(path.parent), "kernels": [row]})
    elif not STATE.quiet:
        typer.echo(f"removed kernel {path.name}")
