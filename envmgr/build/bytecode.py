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

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

from envmgr.build.processes import run_shares
from envmgr.channels import make_gateway
from envmgr.errors import EnvmgrError
from envmgr.fs import file_lock
from envmgr.locks.lock import PlatformLock, strip_credentials
from envmgr.platforms import Platform

__all__ = ["BytecodeError", "BytecodeSource", "bytecode_python", "compile_tree", "python_xy"]

#: Where the interpreter that writes a target's bytecode comes from (see the module doc).
BytecodeSource = Literal["auto", "tools"]

# Run by the chosen interpreter, one process per core, each on its own list of files:
# checked-hash .pyc files; files that do not compile (Python 2 test data in some packages)
# are skipped, as pip and conda do. A worker dies with the builder (Linux), so a killed build
# leaves no compiler writing into its prefix. A line may name, after a NUL, the path the
# bytecode records as its source (a layer's placeholder prefix).
_COMPILE = """
import py_compile
mode = py_compile.PycInvalidationMode.CHECKED_HASH
done = 0
with open(sys.argv[2], encoding="utf-8", errors="surrogateescape") as listing:
    for line in listing:
        path, _, shown = line.rstrip("\\n").partition("\\0")
        try:
            py_compile.compile(path, dfile=shown or None, doraise=True, invalidation_mode=mode)
            done += 1
        except Exception:
            pass
print("compiled", done)
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
            import asyncio  # noqa: PLC0415 - only to install a python, rarely

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


def _sources(roots: list[Path]) -> list[str]:
    """Every ``.py`` below *roots*, not following linked directories (as compileall)."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            found += [os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith(".py")]  # noqa: PTH118
    return found


def compile_tree(
    python: Path, roots: list[Path], *, env_id: str, shown_as: tuple[str, str] | None = None
) -> int:
    """Write checked-hash ``.pyc`` files for every ``.py`` below *roots* with *python*;
    returns how many were written. With *shown_as* = (prefix, placeholder), the bytecode
    records each source under the placeholder instead of the prefix. Raises
    ``BytecodeError`` when *python* cannot run.

    Cost: one worker process per core (about 1.5 s for a standard library on two cores); an
    interrupted build kills its workers.
    """
    sources = _sources([root for root in roots if root.is_dir()])
    if not sources:
        return 0
    jobs = max(1, min(os.cpu_count() or 1, len(sources) // 200 + 1))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    if shown_as is not None:
        real, shown = shown_as
        sources = [f"{path}\0{shown}{path[len(real) :]}" for path in sources]
    shares = ["".join(f"{path}\n" for path in sources[job::jobs]) for job in range(jobs)]
    results = run_shares([str(python), "-I"], _COMPILE, shares, environ)
    compiled = 0
    for code, out, err in results:
        last = (out.strip().splitlines() or [""])[-1]
        if code != 0 or not last.startswith("compiled "):
            reason = (err.strip().splitlines() or [f"exit code {code}"])[-1]
            raise BytecodeError(f"env {env_id}: writing bytecode with {python} failed: {reason}")
        compiled += int(last.split()[1])
    return compiled
