"""envmgr tree and why: the dependency graph of a lock, drawn and walked."""

from __future__ import annotations

import json

from _helpers import envmgr_here
from _shapes import documented_shapes, problems

from envmgr.locks.graph import Graph
from envmgr.locks.lock import Lock, LockedPackage, PlatformLock, write_conda_lock


def _pkg(name: str, *depends: str, manager: str = "conda") -> LockedPackage:
    return LockedPackage(
        manager=manager,  # type: ignore[arg-type]
        name=name,
        version="1.0",
        url=f"https://example.invalid/{name}-1.0.tar.bz2",
        sha256="0" * 64,
        depends=depends,
    )


def _graph() -> Graph:
    """app needs lib-a and (PyPI) Foo_Bar; lib-a needs lib-b and __glibc; Foo_Bar needs
    numpy (conda's) and a requirement a marker left out; cyc-1 and cyc-2 need each other."""
    return Graph(
        PlatformLock(
            platform="linux-64",
            packages=(
                _pkg("app", "lib-a >=1", "conda-forge::foo-bar", "python 3.11.* *_cpython"),
                _pkg("lib-a", "lib-b", "__glibc >=2.17"),
                _pkg("lib-b", "python"),
                _pkg("numpy", "python >=3.10"),
                _pkg("python"),
                _pkg("Foo_Bar", "numpy >=1", "pywin32", manager="pypi"),
                _pkg("cyc-1", "cyc-2"),
                _pkg("cyc-2", "cyc-1"),
            ),
        )
    )


def test_edges_roots_and_a_drawn_tree():
    graph = _graph()
    assert graph.needs["app"] == ["foo-bar", "lib-a", "python"]
    assert graph.needs["foo-bar"] == ["numpy"]  # PyPI's numpy is conda's; pywin32 is absent
    assert graph.needs["lib-a"] == ["lib-b"]  # no node for the virtual package
    assert graph.roots() == ["app", "cyc-1"]  # the cycle nothing enters is still drawn
    drawn = [
        f"{line.prefix}{line.node.label}{' (*)' if line.repeat else ''}"
        for line in graph.tree(graph.roots())
    ]
    assert drawn == [
        "app 1.0",
        "├── Foo_Bar 1.0 (pypi)",
        "│   └── numpy 1.0",
        "│       └── python 1.0",
        "├── lib-a 1.0",
        "│   └── lib-b 1.0",
        "│       └── python 1.0",
        "└── python 1.0",
        "cyc-1 1.0",
        "└── cyc-2 1.0",
        "    └── cyc-1 1.0 (*)",
    ]
    shallow = graph.tree(["app"], depth=1)
    assert [line.node.key for line in shallow] == ["app", "foo-bar", "lib-a", "python"]


def test_inverted_tree_and_why_chains():
    graph = _graph()
    inverted = [f"{line.prefix}{line.node.label}" for line in graph.tree(["python"], invert=True)]
    assert inverted == [
        "python 1.0",
        "├── app 1.0",
        "├── lib-b 1.0",
        "│   └── lib-a 1.0",
        "│       └── app 1.0",
        "└── numpy 1.0",
        "    └── Foo_Bar 1.0 (pypi)",
        "        └── app 1.0",
    ]
    assert graph.paths_to("lib-b") == [["app", "lib-a", "lib-b"]]
    assert graph.paths_to("app") == [["app"]]
    assert graph.paths_to("cyc-2") == []  # only a cycle needs it
    assert graph.find("foo.bar") is graph.nodes["foo-bar"]
    assert sorted(graph.suggest("lib-c")) == ["lib-a", "lib-b"]


def test_tree_and_why_on_a_lock_file(world, mixed_lock, tmp_path):
    path = tmp_path / "mixed.conda-lock.yml"
    write_conda_lock(Lock(platforms=(mixed_lock,)), path)
    env = mixed_lock.env_id[:12]
    python = mixed_lock.names()["python"].version

    tree = envmgr_here("tree", str(path))
    assert tree.returncode == 0, tree.stderr
    lines = tree.stdout.splitlines()
    assert lines[0] == f"env {env}  linux-64"
    assert "python-dateutil 2.9.0.post0 (pypi)" in lines
    assert lines[lines.index("python-dateutil 2.9.0.post0 (pypi)") + 1] == "└── six 1.17.0 (pypi)"
    assert f"└── python {python}" in lines

    inverted = envmgr_here("tree", str(path), "--invert", "SIX", "-p", "linux-64")
    assert inverted.stdout.splitlines()[1:] == [
        "six 1.17.0 (pypi)",
        "└── python-dateutil 2.9.0.post0 (pypi)",
    ]
    shapes = documented_shapes()
    tree_json = json.loads(envmgr_here("tree", str(path), "--json").stdout)
    assert problems(tree_json, shapes["tree"]) == []
    data = tree_json["envs"][0]
    dateutil = next(r for r in data["roots"] if r["name"] == "python-dateutil")
    assert [d["name"] for d in dateutil["dependencies"]] == ["six"]

    why = envmgr_here("why", str(path), "six")
    assert why.stdout.splitlines() == [
        f"six 1.17.0 (pypi)  (linux-64, env {env}): needed by python-dateutil",
        "  python-dateutil 2.9.0.post0 (pypi) -> six 1.17.0 (pypi)",
    ]
    root = envmgr_here("why", str(path), "tabulate")
    assert root.stdout.strip().endswith(
        "nothing in the lock needs it; the spec (or an extra) asked for it"
    )
    why_all = json.loads(envmgr_here("why", str(path), "python", "--json").stdout)
    assert problems(why_all, shapes["why"]) == []
    why_json = why_all["envs"][0]
    assert why_json["requested"] is False
    assert ["numpy", "python"] in why_json["chains"]

    missing = envmgr_here("why", str(path), "tabulat")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"envmgr: error: tabulat is not in env {env} (linux-64); did you mean tabulate?"
    )
    other = envmgr_here("tree", str(path), "-p", "osx-arm64")
    assert other.returncode == 1
    assert "no osx-arm64 part (it has linux-64)" in other.stderr
    assert "Traceback" not in other.stderr
