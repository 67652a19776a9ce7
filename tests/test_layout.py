"""The layout is checked, not hoped for: no import cycles, no import that climbs a stage, and a
worker boundary the code keeps (what ``python -m envmgr.bootstrap`` can import never reaches
the builder, a resolver, the specs or the CLI, nor a library a worker lacks).

The walker here reads every module's syntax tree itself (imports at the top, inside functions
and under ``try``), independent of :mod:`envmgr.worker.shipped`, and takes the source root as
a value, so a tree with one added import shows that the checks fail when they should.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
from pathlib import Path

import pytest

import envmgr
from envmgr.worker.shipped import worker_modules, worker_sources

REPO = Path(__file__).resolve().parent.parent

#: Stages, lowest first: a module may import its own stage or a lower one only.
ORDER = ("shared", "cache", "archive", "worker", "specs", "locks", "resolve", "build", "entry")
#: Every stage a worker may reach.
WORKER_STAGES = {"shared", "cache", "archive", "worker", "entry"}
#: What a worker has besides the standard library.
WORKER_LIBRARIES = {"boto3", "botocore", "zstandard"}


def stage(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "metaflow_extensions" or module in ("envmgr.__main__", "envmgr.bootstrap"):
        return "entry"
    if len(parts) > 1 and parts[1] == "cli":
        return "entry"
    if len(parts) > 1 and parts[1] in ORDER:
        return parts[1]
    return "shared"  # envmgr/*.py: errors, ids, platforms, settings, limits, fs, ...


def sources(root: Path) -> dict[str, Path]:
    """Module name -> file, for ``envmgr`` (its ``cli``/``cache`` symlinks followed) and the
    Metaflow extension under *root*."""
    found = {}
    for top in ("envmgr", "metaflow_extensions"):
        for dirpath, _dirs, files in os.walk(root / top, followlinks=True):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = (Path(dirpath) / name).relative_to(root).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                found[".".join(parts)] = Path(dirpath) / name
    return found


def imports(path: Path, module: str, known: set[str]) -> list[tuple[str, bool]]:
    """(module imported, optional) for every import of *path* that runs: top level, inside
    functions, under ``try``; never under ``if TYPE_CHECKING:``. *optional*: inside a ``try``
    that handles ImportError."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            optional.update(id(n) for part in node.body for n in ast.walk(part))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while (
                name not in known
                and "." in name
                and name.split(".")[0] in ("envmgr", "metaflow_extensions")
            ):
                name = name.rsplit(".", 1)[0]
            out.append((name, id(node) in optional))
    return out


def graph(root: Path) -> dict[str, list[tuple[str, bool]]]:
    files = sources(root)
    known = set(files)
    return {
        module: [(n, opt) for n, opt in imports(path, module, known) if n in known and n != module]
        for module, path in files.items()
    }


def cycles(edges: dict[str, list[tuple[str, bool]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            node, children = work[-1]
            for child, _opt in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(edges[child])))
                    break
                if child in on:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def climbs(edges: dict[str, list[tuple[str, bool]]]) -> list[str]:
    rank = {name: n for n, name in enumerate(ORDER)}
    return sorted(
        f"{module} ({stage(module)}) imports {target} ({stage(target)})"
        for module, targets in edges.items()
        for target, _opt in targets
        if stage(module) != stage(target) and rank[stage(target)] > rank[stage(module)]
    )


def worker_breaches(root: Path) -> list[str]:
    """What the worker's import closure (from ``envmgr.bootstrap``, optional imports left
    out) reaches that a worker must not: another stage, or a library a worker lacks."""
    files = sources(root)
    known = set(files)
    seen: set[str] = set()
    todo = ["envmgr.bootstrap"]
    problems = []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if stage(module) not in WORKER_STAGES:
            problems.append(f"{module} ({stage(module)}) is reachable from envmgr.bootstrap")
        for name, optional in imports(files[module], module, known):
            top = name.split(".")[0]
            if optional or top == "__future__":
                continue
            if name in known:
                todo.extend(".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 2))
                continue
            allowed = {"envmgr", "metaflow_extensions", *sys.stdlib_module_names, *WORKER_LIBRARIES}
            if top not in allowed:
                problems.append(f"{module} imports {top}, which a worker does not have")
    return sorted(set(problems))


def test_no_import_cycles_and_no_import_climbs_a_stage():
    edges = graph(REPO)
    assert len(edges) > 60  # the walker found the package (and followed cli/ and cache/)
    assert cycles(edges) == []
    assert climbs(edges) == []


def test_the_worker_reaches_only_worker_stages_and_libraries():
    assert worker_breaches(REPO) == []
    shipped = set(worker_modules())
    assert "envmgr.cache.names" in shipped  # --name on a worker: it was missing from the list
    assert not any(stage(m) not in WORKER_STAGES for m in shipped)
    names = [arcname for _path, arcname in worker_sources()]
    assert "envmgr/worker/hydrate.py" in names and "envmgr/cache/store.py" in names
    assert all(path.is_file() for path, _arcname in worker_sources())


@pytest.fixture(scope="module")
def copied_tree(tmp_path_factory) -> Path:
    """The package sources copied (symlinks followed), for edits the checks must catch."""
    root = tmp_path_factory.mktemp("tree")
    package = Path(envmgr.__file__).resolve().parent
    shutil.copytree(
        package, root / "envmgr", symlinks=False, ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(
        REPO / "metaflow_extensions",
        root / "metaflow_extensions",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return root


def _with_line(path: Path, line: str) -> str:
    original = path.read_text()
    path.write_text(original + f"\n\ndef _added() -> None:\n    {line}\n")
    return original


def test_the_checks_fail_when_a_worker_module_imports_the_builder(copied_tree):
    assert worker_breaches(copied_tree) == [] and climbs(graph(copied_tree)) == []
    hydrate = copied_tree / "envmgr" / "worker" / "hydrate.py"
    original = _with_line(hydrate, "from envmgr.build.once import build_and_store")
    try:
        breaches = worker_breaches(copied_tree)
        assert "envmgr.build.once (build) is reachable from envmgr.bootstrap" in breaches
        assert any(
            "imports rattler" in b or "imports requests" in b or "imports packaging" in b
            for b in breaches
        )
        assert "envmgr.worker.hydrate (worker) imports envmgr.build.once (build)" in climbs(
            graph(copied_tree)
        )
        assert any("envmgr.worker.hydrate" in c for c in cycles(graph(copied_tree)))
    finally:
        hydrate.write_text(original)


def test_the_checks_fail_on_a_library_a_worker_lacks_and_allow_an_optional_import(copied_tree):
    archive = copied_tree / "envmgr" / "archive" / "unpack.py"
    original = _with_line(archive, "import yaml")
    try:
        assert worker_breaches(copied_tree) == [
            "envmgr.archive.unpack imports yaml, which a worker does not have"
        ]
    finally:
        archive.write_text(original)
    entry = copied_tree / "envmgr" / "bootstrap.py"
    original = entry.read_text()
    assert "from envmgr.build.once import" in original  # --build-if-missing, under try
    assert worker_breaches(copied_tree) == []


def test_pytest_collects_every_test_directory(pytestconfig):
    """No directory of tests/ is one pytest skips: its default ``norecursedirs`` names
    ``build``, and tests/build (42 tests) ran only when named until it was overridden."""
    import fnmatch

    skipped = pytestconfig.getini("norecursedirs")
    tests = Path(__file__).resolve().parent
    dirs = {p.name for p in tests.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert "build" in dirs
    assert [d for d in sorted(dirs) if any(fnmatch.fnmatch(d, pat) for pat in skipped)] == []
