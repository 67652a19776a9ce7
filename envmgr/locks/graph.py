"""The dependency graph of a lock: what ``envmgr tree`` draws and ``envmgr why`` walks.

Edges come from each locked package's ``depends`` (conda match specs, and PyPI requirements
in the same ``name spec`` form). Names are compared normalized (``Foo_Bar`` is ``foo-bar``), so
a PyPI package that needs ``numpy`` points at the conda numpy when conda provides it.
Virtual packages (``__glibc``) and requirements the lock does not hold (a marker left them
out) have no node.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from envmgr.locks.lock import LockedPackage, PlatformLock

__all__ = ["Graph", "Node", "TreeLine"]

_NAME = re.compile(r"^(?:[^:\s]+::)?([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependency_name(spec: str) -> str | None:
    match = _NAME.match(spec.strip())
    return _normalize(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class Node:
    key: str  # the normalized name
    package: LockedPackage

    @property
    def label(self) -> str:
        kind = "" if self.package.manager == "conda" else " (pypi)"
        return f"{self.package.name} {self.package.version}{kind}"


@dataclass(frozen=True, slots=True)
class TreeLine:
    """One line of a drawn tree: its prefix (``│   ├── ``), node, and whether it is a repeat
    (drawn in full further up, marked ``(*)``)."""

    prefix: str
    node: Node
    repeat: bool = False


class Graph:
    """Who depends on whom in one platform's lock."""

    def __init__(self, lock: PlatformLock) -> None:
        self.lock = lock
        self.nodes: dict[str, Node] = {}
        for pkg in lock.packages:
            # A name both conda and PyPI lock: the conda one stands for it (PyPI's came on top).
            key = _normalize(pkg.name)
            if key not in self.nodes or pkg.manager == "conda":
                self.nodes[key] = Node(key=key, package=pkg)
        self.needs: dict[str, list[str]] = {}
        self.needed_by: dict[str, list[str]] = {key: [] for key in self.nodes}
        for pkg in lock.packages:
            key = _normalize(pkg.name)
            deps = []
            for spec in pkg.depends:
                dep = _dependency_name(spec)
                if dep and dep in self.nodes and dep != key and dep not in deps:
                    deps.append(dep)
            self.needs.setdefault(key, [])
            self.needs[key] = sorted(set(self.needs[key]) | set(deps))
        for key, deps in self.needs.items():
            for dep in deps:
                self.needed_by[dep].append(key)
        for dependents in self.needed_by.values():
            dependents.sort()

    def find(self, name: str) -> Node | None:
        return self.nodes.get(_normalize(name))

    def suggest(self, name: str) -> list[str]:
        """Names in the lock close to *name*, for the error that says it is not there."""
        close = difflib.get_close_matches(_normalize(name), list(self.nodes), n=3, cutoff=0.6)
        return [self.nodes[key].package.name for key in close]

    def roots(self) -> list[str]:
        """Packages nothing else in the lock needs: the ones the spec asked for (and, in a
        cycle nothing enters, its first member, so every package is drawn)."""
        roots = sorted(k for k, dependents in self.needed_by.items() if not dependents)
        reached = self._reach(roots, self.needs)
        for key in sorted(self.nodes):
            if key not in reached:
                roots.append(key)
                reached |= self._reach([key], self.needs)
        return roots

    @staticmethod
    def _reach(starts: list[str], edges: dict[str, list[str]]) -> set[str]:
        seen: set[str] = set()
        stack = list(starts)
        while stack:
            key = stack.pop()
            if key not in seen:
                seen.add(key)
                stack.extend(edges.get(key, ()))
        return seen

    def tree(
        self, roots: list[str], *, invert: bool = False, depth: int | None = None
    ) -> list[TreeLine]:
        """The tree below *roots* (their dependencies; with *invert*, their dependents), each
        subtree drawn once and later occurrences marked as repeats."""
        edges = self.needed_by if invert else self.needs
        lines: list[TreeLine] = []
        drawn: set[str] = set()

        def walk(key: str, prefix: str, child_prefix: str, level: int, path: set[str]) -> None:
            children = edges.get(key, [])
            repeat = key in drawn and bool(children)
            lines.append(TreeLine(prefix=prefix, node=self.nodes[key], repeat=repeat))
            if repeat or key in path or (depth is not None and level >= depth):
                return
            drawn.add(key)
            for i, child in enumerate(children):
                last = i == len(children) - 1
                walk(
                    child,
                    child_prefix + ("└── " if last else "├── "),
                    child_prefix + ("    " if last else "│   "),
                    level + 1,
                    path | {key},
                )

        for root in roots:
            walk(root, "", "", 0, set())
        return lines

    def paths_to(self, key: str) -> list[list[str]]:
        """For each root that needs *key* (through any chain), the shortest chain
        root → … → *key*; ``[[key]]`` when *key* is itself a root."""
        toward: dict[str, str | None] = {key: None}  # dependent -> the next one toward key
        queue = [key]
        for current in queue:  # breadth first: the first way found to each is the shortest
            for dependent in self.needed_by[current]:
                if dependent not in toward:
                    toward[dependent] = current
                    queue.append(dependent)
        chains = []
        for start in sorted(k for k in toward if not self.needed_by[k]):
            chain = [start]
            while (step := toward[chain[-1]]) is not None:
                chain.append(step)
            chains.append(chain)
        return sorted(chains, key=lambda chain: (len(chain), chain))
