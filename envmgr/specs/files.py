"""Read ``environment.yml``, ``requirements.txt`` and ``pyproject.toml`` into an ``EnvSpec``.

Every reader reports all problems of a file at once (``SpecError``), each with the file and
line. Nothing is silently dropped: lines envmgr cannot lock reproducibly (editable installs,
local directories, VCS URLs) and options it does not implement are reported as unsupported.

``environment.yml``: ``name`` (ignored), ``channels`` (``nodefaults`` dropped; the order is the
priority), ``dependencies`` (conda match specs; ``python`` becomes the python version) with a
nested ``pip:`` list in requirements.txt syntax, conda-lock's ``platforms``, and the ``prefix``
and ``variables`` of ``conda env export`` (ignored: they are about one machine).

``requirements.txt``: see :mod:`envmgr.specs.requirements`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from envmgr.errors import Problem, SpecError
from envmgr.limits import InputError, check_yaml, read_bounded
from envmgr.platforms import PLATFORMS, Platform, is_platform
from envmgr.specs.deps import CondaDep, PypiDep, parse_channel, parse_python
from envmgr.specs.model import EnvSpec
from envmgr.specs.requirements import (
    Requirements,
    finish,
    read_requirement_lines,
    read_requirements,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["read_environment_yml", "read_pyproject", "read_spec_file"]


def _yaml_value(node: Any) -> Any:
    import yaml  # noqa: PLC0415 - only environment.yml readers need YAML

    if isinstance(node, yaml.MappingNode):
        return {_yaml_key(k): (v, _yaml_value(v)) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [(item, _yaml_value(item)) for item in node.value]
    if node.tag.endswith(":str"):
        return node.value
    if node.tag.endswith(":null"):
        return None
    try:  # a number or bool; a tag YAML itself cannot build (`=`, `!foo`) stays text
        return yaml.constructor.SafeConstructor().construct_object(node)
    except yaml.YAMLError:
        return node.value


def _yaml_key(node: Any) -> Any:
    """A mapping key; a list or mapping used as a key becomes its YAML text, which the
    readers then report as an unknown key."""
    import yaml  # noqa: PLC0415

    if isinstance(node, yaml.ScalarNode):
        return _yaml_value(node)
    start, end = node.start_mark, node.end_mark
    if start.buffer is not None:
        return " ".join(start.buffer[start.index : end.index].split())
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def read_environment_yml(path: str | Path) -> EnvSpec:
    """A conda ``environment.yml`` (including ``conda env export`` output) as an ``EnvSpec``.

    Raises ``SpecError`` listing every problem with its file and line.
    """
    import yaml  # noqa: PLC0415

    path = Path(path)
    name = str(path)
    try:
        text = read_bounded(path, what="environment file")
        check_yaml(text, where=name)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except InputError as exc:
        raise SpecError([Problem(where=name, key="-", message=exc.reason)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise SpecError([Problem(where=where, key="-", message=f"not valid YAML: {exc}")]) from None
    acc = Requirements()
    if not isinstance(root, yaml.MappingNode):
        raise SpecError(
            [
                Problem(
                    where=name,
                    key="-",
                    message="must be a mapping with 'channels' and 'dependencies'",
                )
            ]
        )
    data = _yaml_value(root)

    def at(node: Any) -> str:
        return f"{name}:{node.start_mark.line + 1}"

    for key, (node, _value) in data.items():
        if key not in ("name", "channels", "dependencies", "prefix", "variables", "platforms"):
            acc.bad(
                at(node),
                str(key),
                "unknown key (envmgr reads name, channels, dependencies, platforms)",
            )
    channels: list[str] = []
    for node, value in _items(data, "channels", acc, name):
        if value == "nodefaults":
            continue
        try:
            channels.append(parse_channel(str(value)))
        except ValueError as exc:
            acc.bad(at(node), "channels", str(exc))
    platforms: list[Platform] = []
    for node, value in _items(data, "platforms", acc, name):
        if is_platform(value):
            platforms.append(value)
        else:
            acc.bad(
                at(node), "platforms", f"unknown platform {value!r}; known: {', '.join(PLATFORMS)}"
            )
    conda: dict[str, tuple[str, CondaDep]] = {}
    python: str | None = None
    for node, value in _items(data, "dependencies", acc, name):
        if isinstance(value, dict) and set(value) == {"pip"}:
            pip_node, pip_items = value["pip"]
            if not isinstance(pip_items, list):
                acc.bad(at(pip_node), "pip", "must be a list of requirement lines")
                continue
            lines = []
            for item_node, item in pip_items:
                if isinstance(item, str):
                    lines.append((item_node.start_mark.line + 1, item))
                else:
                    acc.bad(at(item_node), "pip", "each entry must be a string")
            read_requirement_lines(
                lines, name, path.parent, acc, constraint=False, seen=frozenset({path.resolve()})
            )
            continue
        if not isinstance(value, str):
            acc.bad(at(node), "dependencies", "each entry must be a conda spec or a 'pip:' list")
            continue
        try:
            dep = CondaDep.parse(value)
        except ValueError as exc:
            acc.bad(at(node), value, str(exc))
            continue
        if dep.name == "python" and dep.channel is None:
            try:
                python = parse_python(dep.spec[len("python") :].strip() or "*")
            except ValueError as exc:
                acc.bad(at(node), value, str(exc))
            continue
        if dep.name in conda and conda[dep.name][1] != dep:
            acc.bad(at(node), value, f"{dep.name} is listed twice (first at {conda[dep.name][0]})")
            continue
        conda[dep.name] = (at(node), dep)
    return finish(
        acc,
        conda=[dep for _, dep in conda.values()],
        python=python,
        channels=channels,
        platforms=platforms,
    )


def _items(data: dict[str, Any], key: str, acc: Requirements, name: str) -> list[Any]:
    if key not in data:
        return []
    node, value = data[key]
    if value is None:
        return []
    if not isinstance(value, list):
        acc.bad(f"{name}:{node.start_mark.line + 1}", key, "must be a list")
        return []
    return value


def read_pyproject(path: str | Path, *, extras: tuple[str, ...] = ()) -> EnvSpec:
    """``[project].dependencies`` (plus the named optional-dependency groups) and
    ``requires-python`` of a ``pyproject.toml`` as a PyPI ``EnvSpec``.
    """
    path = Path(path)
    name = str(path)
    try:
        data = tomllib.loads(read_bounded(path, what="pyproject.toml"))
    except InputError as exc:
        raise SpecError([Problem(where=name, key="-", message=exc.reason)]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([Problem(where=name, key="-", message=f"not valid TOML: {exc}")]) from None
    acc = Requirements()
    project = data.get("project")
    if not isinstance(project, dict):
        raise SpecError([Problem(where=name, key="[project]", message="no [project] table")])
    if "dependencies" in project.get("dynamic", []):
        acc.bad(
            name,
            "[project].dependencies",
            "dependencies are dynamic; envmgr reads only static ones",
        )
    groups: list[tuple[str, Any]] = [("[project].dependencies", project.get("dependencies", []))]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            acc.bad(name, f"[project.optional-dependencies].{extra}", "no such group")
        groups.append((f"[project.optional-dependencies].{extra}", optional.get(extra, [])))
    for key, items in groups:
        if not isinstance(items, list):
            acc.bad(name, key, "must be a list of requirement strings")
            continue
        for i, item in enumerate(items):
            try:
                acc.pypi.append(PypiDep.parse(str(item)))
            except ValueError as exc:
                acc.bad(name, f"{key}[{i}]", str(exc))
    python = None
    requires = project.get("requires-python")
    if requires is not None:
        try:
            python = parse_python(str(requires).replace(" ", ""))
        except ValueError as exc:
            acc.bad(name, "[project].requires-python", str(exc))
    return finish(acc, python=python)


def read_spec_file(path: str | Path) -> EnvSpec:
    """Dispatch on the file name: ``*.yml``/``*.yaml``, ``pyproject.toml``, else requirements."""
    path = Path(path)
    if path.suffix in (".yml", ".yaml"):
        return read_environment_yml(path)
    if path.name == "pyproject.toml":
        return read_pyproject(path)
    return read_requirements(path)
