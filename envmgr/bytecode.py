"""Bytecode for the target: checked-hash ``.pyc`` files written at build time, on any host.

A ``.pyc`` depends on the Python version (major.minor: the magic number), not on the platform,
so the builder compiles a target's ``lib/pythonX.Y`` with an interpreter *of that version that
runs on the host* and never executes the target's own python. :func:`bytecode_python` picks it:

* ``"auto"``: the interpreter running envmgr when its major.minor matches the target's, else
  the tool python below;
* ``"tools"``: always a ``python`` of the target's version *for the host platform*, solved from
  the lock's own channels and installed once into ``<cache>/tools/python-<version>-<host>``
  (the locked version when the channels have it for the host, else the newest ``X.Y.*``).

:func:`compile_tree` writes checked-hash pycs (PEP 552) for every ``.py`` below the tree, in
parallel: they hold no file times, so the archive stays reproducible and the bytecode stays
valid after unpacking; Python checks the source hash instead of writing new bytecode, which a
read-only or ``PYTHONDONTWRITEBYTECODE`` worker could not do anyway.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from envmgr.errors import EnvmgrError
from envmgr.hydrate import file_lock
from envmgr.lock import PlatformLock, strip_credentials
from envmgr.platforms import Platform

__all__ = ["BytecodeError", "BytecodeSource", "bytecode_python", "compile_tree", "python_xy"]

#: Where the interpreter that writes a target's bytecode comes from (see the module doc).
BytecodeSource = Literal["auto", "tools"]

# Run by the chosen interpreter: compile every .py below each argument, checked-hash, on
# every core; files that do not compile (Python 2 test data in some packages) are skipped,
# as pip and conda do. The last line reports how many .pyc files exist afterwards.
_COMPILE = """
import compileall, os, py_compile, sys
mode = py_compile.PycInvalidationMode.CHECKED_HASH
for root in sys.argv[1:]:
    compileall.compile_dir(root, quiet=2, workers=0, invalidation_mode=mode)
count = sum(
    name.endswith(".pyc") for root in sys.argv[1:] for _, _, names in os.walk(root)
    for name in names
)
print("compiled", count)
"""


class BytecodeError(EnvmgrError):
    """No interpreter of the target's Python version could be found or run on this host."""


def python_xy(lock: PlatformLock) -> str | None:
    """The lock's conda python as ``X.Y``, or ``None`` when it has none."""
    python = lock.names().get("python")
    if python is None or python.manager != "conda":
        return None
    return ".".join(python.version.split(".")[:2])


def bytecode_python(
    lock: PlatformLock, *, host: Platform, cache_dir: Path, source: BytecodeSource = "auto"
) -> Path | None:
    """An interpreter of *lock*'s Python major.minor that runs on *host*, or ``None`` when
    the lock has no conda python. Raises ``BytecodeError`` when none can be had.

    Cost: nothing for the running interpreter; the first use of a tool python solves and
    installs it (seconds), later uses are one ``stat``.
    """
    xy = python_xy(lock)
    if xy is None:
        return None
    if source == "auto" and f"{sys.version_info.major}.{sys.version_info.minor}" == xy:
        return Path(sys.executable)
    return _tool_python(lock, xy, host, cache_dir)


def _tool_python(lock: PlatformLock, xy: str, host: Platform, cache_dir: Path) -> Path:
    version = lock.names()["python"].version
    root = cache_dir / "tools" / f"python-{version}-{host}"
    python = root / "bin" / f"python{xy}"
    if (root / ".complete").is_file():
        return python
    with file_lock(cache_dir / "tools" / f".python-{version}-{host}.lock"):
        if (root / ".complete").is_file():
            return python
        tmp = root.with_name(f".tmp-{root.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            asyncio.run(_install_python(lock, version, xy, host, tmp, cache_dir))
            (tmp / ".complete").write_text(f"{version}\n")
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return python


async def _install_python(
    lock: PlatformLock, version: str, xy: str, host: Platform, prefix: Path, cache_dir: Path
) -> None:
    import rattler  # noqa: PLC0415
    from rattler.exceptions import GatewayError, SolverError  # noqa: PLC0415

    from envmgr.resolvers.conda import make_gateway  # noqa: PLC0415

    channels = list(lock.channels) or sorted({p.url.rsplit("/", 2)[0] for p in lock.packages})
    gateway = make_gateway(cache_dir / "repodata")
    records = None
    problems = []
    for spec in (f"python =={version}", f"python {xy}.*"):
        try:
            records = await rattler.solve(
                sources=channels, specs=[spec], gateway=gateway, platforms=[host, "noarch"]
            )
            break
        except (GatewayError, SolverError) as exc:
            problems.append(" ".join(str(exc).split())[:200])
    if records is None:
        raise BytecodeError(
            f"env {lock.env_id} is for {lock.platform} with python {xy}; this {host} host "
            f"needs a python {xy} of its own to write the env's bytecode, and the lock's "
            f"channels have none for {host} ({strip_credentials(problems[-1])})",
            hint=f"build on a host whose python is {xy}, or add a channel with python {xy} "
            f"for {host}",
        )
    await rattler.install(
        records,
        target_prefix=prefix,
        cache_dir=cache_dir / "pkgs",
        show_progress=False,
        execute_link_scripts=False,
    )


def compile_tree(python: Path, roots: list[Path], *, env_id: str) -> int:
    """Write checked-hash ``.pyc`` files below *roots* with *python*; returns how many
    ``.pyc`` files are there afterwards. Raises ``BytecodeError`` when *python* cannot run.

    Cost: one process; compiling is parallel over the host's cores (about 1.5 s for a
    standard library on two cores).
    """
    existing = [str(root) for root in roots if root.is_dir()]
    if not existing:
        return 0
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [str(python), "-I", "-c", _COMPILE, *existing],
        capture_output=True,
        text=True,
        env=environ,
        check=False,
    )
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0 or not last.startswith("compiled "):
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise BytecodeError(f"env {env_id}: writing bytecode with {python} failed: {reason}")
    return int(last.split()[1])
