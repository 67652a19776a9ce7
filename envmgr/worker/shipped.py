"""The files a worker needs for ``python -m envmgr.bootstrap``, taken from the code.

A Metaflow code package ships exactly these, so the list must not be kept by hand:
:func:`worker_modules` follows the imports of :data:`ENTRY` (at the top of a module and
inside functions alike) through envmgr's own modules, with every package's ``__init__``.
Imports under ``if TYPE_CHECKING:`` never run, and an import inside a ``try`` that handles
``ImportError`` is optional by construction (the bootstrap's ``--build-if-missing`` reaches the
builder that way, present only on a full install): neither is followed. Reading the sources
costs a few milliseconds and runs where the package is made, never on a worker.
"""

from __future__ import annotations

import ast
from pathlib import Path

__all__ = ["ENTRY", "worker_imports", "worker_modules", "worker_sources"]

#: The worker's entry point.
ENTRY = "envmgr.bootstrap"


#: The directory of the ``envmgr`` package (``cache/`` and ``cli/`` are under it when
#: installed, and symlinked there in a checkout).
_ROOT = Path(__file__).resolve().parent.parent


def _file_of(module: str) -> Path | None:
    """The source of the envmgr module *module*, or ``None`` when it names no module (the
    ``Store`` of ``from envmgr.cache.store import Store``). Nothing is imported."""
    parts = module.split(".")[1:]
    package = _ROOT.joinpath(*parts, "__init__.py")
    if package.is_file():
        return package
    plain = _ROOT.joinpath(*parts).with_suffix(".py")
    return plain if parts and plain.is_file() else None


def _source(module: str) -> Path:
    path = _file_of(module)
    if path is None:
        raise ImportError(f"cannot find the source of {module}", name=module)
    return path


def _skipped(tree: ast.Module) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:`` or a ``try`` handling ImportError."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        optional = isinstance(node, ast.Try) and any(
            isinstance(handler.type, ast.Name)
            and handler.type.id in ("ImportError", "ModuleNotFoundError")
            for handler in node.handlers
        )
        typing_only = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        if optional and isinstance(node, ast.Try):
            # the handlers run on a worker too: only the tried imports are optional
            skipped.update(id(inner) for part in node.body for inner in ast.walk(part))
        if typing_only:
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def worker_imports(module: str) -> tuple[set[str], set[str]]:
    """(envmgr modules, other top-level modules) that *module* imports when it runs."""
    path = _source(module)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = _skipped(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    ours: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] != "envmgr":
                others.add(name.split(".")[0])
            elif _file_of(name) is not None:
                ours.add(name)
    return ours, others - {"__future__"}


def _with_packages(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts) + 1)}


def worker_modules(entry: str = ENTRY) -> tuple[str, ...]:
    """Every envmgr module the worker may import, starting from *entry*, sorted."""
    seen: set[str] = set()
    todo = sorted(_with_packages(entry))
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        ours, _others = worker_imports(module)
        for name in ours:
            todo.extend(_with_packages(name) - seen)
    return tuple(sorted(seen))


def worker_sources() -> list[tuple[Path, str]]:
    """(file, archive name) of each of :func:`worker_modules` in this installation: the
    archive name is the module's path under the import root (``envmgr/worker/hydrate.py``),
    wherever the file lies (a checkout keeps ``cache/`` beside ``envmgr/``)."""
    out = []
    for module in worker_modules():
        source = _source(module)
        name = "/".join(module.split("."))
        out.append(
            (source, f"{name}/__init__.py" if source.name == "__init__.py" else f"{name}.py")
        )
    return out
