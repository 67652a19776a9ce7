"""Read ``environment.yml``, ``requirements.txt`` and ``pyproject.toml`` into an ``EnvSpec``.

Every reader reports all problems of a file at once (``SpecError``), each with the file and
line. Nothing is silently dropped: lines envmgr cannot lock reproducibly (editable installs,
local directories, VCS URLs) and options it does not implement are reported as unsupported.

``environment.yml``: ``name`` (ignored), ``channels`` (``nodefaults`` dropped; the order is the
priority), ``dependencies`` (conda match specs; ``python`` becomes the python version) with a
nested ``pip:`` list in requirements.txt syntax, conda-lock's ``platforms``, and the ``prefix``
and ``variables`` of ``conda env export`` (ignored: they are about one machine).

``requirements.txt``: PEP 508 lines with ``--hash`` options, ``-r``/``-c`` includes (relative
to the including file), ``-i``/``--index-url``, ``--extra-index-url``, ``-f``/``--find-links``
(a directory, relative to the file, or a URL), local wheel and sdist paths (as
``name @ file:///abs/path``), comments and ``\\`` continuations. ``--require-hashes``,
``--only-binary :all:`` and ``--prefer-binary`` are accepted (envmgr always checks hashes and
installs wheels). ``${VAR}`` stays unexpanded.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envmgr.errors import Problem, SpecError
from envmgr.limits import MAX_REQUIREMENTS, InputError, check_yaml, read_bounded
from envmgr.platforms import PLATFORMS, Platform, is_platform
from envmgr.spec import (
    CondaDep,
    EnvSpec,
    PypiDep,
    parse_channel,
    parse_find_links,
    parse_index_url,
    parse_python,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["read_environment_yml", "read_pyproject", "read_requirements", "read_spec_file"]

_COMMENT = re.compile(r"(^|\s+)#.*$")
_ACCEPTED_FLAGS = {"--require-hashes", "--prefer-binary"}
_VCS = re.compile(r"^(git|hg|svn|bzr)\+[a-z]+://", re.IGNORECASE)
#: More bad lines than this, and nearly all lines bad: the first stands for the rest.
_MAX_BAD_LINES = 3
_LOCAL = re.compile(r"^(\.{1,2}(/|$)|/|~|[A-Za-z]:\\|file:)")


@dataclass
class _Requirements:
    """What requirement lines add up to, with the problems found on the way."""

    pypi: list[PypiDep] = field(default_factory=list)
    constraints: list[PypiDep] = field(default_factory=list)
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def bad(self, where: str, key: str, message: str) -> None:
        self.problems.append(Problem(where=where, key=key, message=message))


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) with comments removed and ``\\`` continuations joined."""
    out: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _COMMENT.sub("", raw)
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            out.append((start, buffer.strip()))
        buffer = ""
    if buffer.strip():
        out.append((start, buffer.strip()))
    return out


def _option_value(tokens: list[str], i: int) -> tuple[str | None, int]:
    token = tokens[i]
    if "=" in token and token.startswith("--"):
        return token.split("=", 1)[1], i + 1
    if token.startswith("-") and not token.startswith("--") and len(token) > 2:
        return token[2:], i + 1
    if i + 1 < len(tokens):
        return tokens[i + 1], i + 2
    return None, i + 1


def _read_requirement_lines(
    lines: list[tuple[int, str]],
    where_file: str,
    base_dir: Path | None,
    acc: _Requirements,
    *,
    constraint: bool,
    seen: frozenset[Path],
) -> None:
    for number, line in lines:
        where = f"{where_file}:{number}"
        if line.startswith("-"):
            try:
                tokens = shlex.split(line, posix=True)
            except ValueError as exc:
                acc.bad(where, line, f"cannot split the line: {exc}")
                continue
            _read_option(tokens, where, base_dir, acc, constraint=constraint, seen=seen)
            continue
        # Not shlex: quotes inside markers are part of the requirement.
        requirement, *option_parts = re.split(r"\s+(?=--)", line)
        options = " ".join(option_parts).replace("--hash ", "--hash=").split()
        hashes: list[str] = []
        for option in options:
            if option.startswith("--hash="):
                hashes.append(option.split("=", 1)[1])
            else:
                acc.bad(where, requirement, f"unsupported per-requirement option {option!r}")
        if _VCS.match(requirement):
            acc.bad(
                where,
                requirement,
                "VCS requirements are not supported (envmgr locks files with hashes); build a "
                "wheel and publish it to an index, or give 'name @ https://.../file.whl'",
            )
            continue
        if _LOCAL.match(requirement) or (
            requirement.endswith((".whl", ".tar.gz", ".zip")) and "@" not in requirement
        ):
            local = _local_file(requirement, base_dir)
            if local is None:
                acc.bad(
                    where,
                    requirement,
                    "a local path must name a wheel or sdist file (a directory or "
                    "editable project is not supported); build a wheel first",
                )
                continue
            requirement = local
        try:
            dep = PypiDep.parse(requirement, hashes=hashes)
        except ValueError as exc:
            acc.bad(where, requirement, str(exc))
            continue
        (acc.constraints if constraint else acc.pypi).append(dep)


def _local_file(text: str, base_dir: Path | None) -> str | None:
    """``./dist/x-1.0-py3-none-any.whl`` (or a file URL) as ``x @ file:///abs/path``, as pip
    reads it; None when it does not name a wheel or sdist file."""
    from packaging.utils import (  # noqa: PLC0415
        InvalidSdistFilename,
        InvalidWheelFilename,
        parse_sdist_filename,
        parse_wheel_filename,
    )

    value = text[len("file://") :] if text.startswith("file://") else text
    path = Path(os.path.expanduser(value.removeprefix("file:")))  # noqa: PTH111 - see spec.py
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    try:
        if path.name.endswith(".whl"):
            name = str(parse_wheel_filename(path.name)[0])
        else:
            name = str(parse_sdist_filename(path.name)[0])
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return f"{name} @ {path.resolve().as_uri()}"


def _read_option(
    tokens: list[str],
    where: str,
    base_dir: Path | None,
    acc: _Requirements,
    *,
    constraint: bool,
    seen: frozenset[Path],
) -> None:
    head = tokens[0]
    name = head.split("=", 1)[0]
    if name in _ACCEPTED_FLAGS:
        return
    if name == "--only-binary":
        value, _ = _option_value(tokens, 0)
        if value != ":all:":
            acc.bad(
                where, name, "only '--only-binary :all:' is supported (envmgr installs wheels only)"
            )
        return
    if name in ("-i", "--index-url", "--extra-index-url") or head.startswith("-i"):
        value, _ = _option_value(tokens, 0)
        if value is None:
            acc.bad(where, name, "needs a URL")
            return
        try:
            url = parse_index_url(value)
        except ValueError as exc:
            acc.bad(where, name, str(exc))
            return
        if name == "--extra-index-url":
            acc.extra_index_urls.append(url)
        elif acc.index_url not in (None, url):
            acc.bad(where, name, f"a second, different index URL (first: {acc.index_url})")
        else:
            acc.index_url = url
        return
    if name in ("-f", "--find-links") or head.startswith("-f"):
        value, _ = _option_value(tokens, 0)
        if value is None:
            acc.bad(where, name, "needs a directory or URL")
            return
        try:
            acc.find_links.append(parse_find_links(value, base_dir))
        except ValueError as exc:
            acc.bad(where, name, str(exc))
        return
    if name in ("-r", "--requirement", "-c", "--constraint") or head[:2] in ("-r", "-c"):
        value, _ = _option_value(tokens, 0)
        is_constraint = constraint or name in ("-c", "--constraint") or head.startswith("-c")
        if value is None:
            acc.bad(where, name, "needs a file name")
            return
        if "://" in value:
            acc.bad(where, name, f"remote requirement files are not supported: {value}")
            return
        if "\0" in value:
            acc.bad(where, name, f"{value!r} is not a file name (it holds a NUL byte)")
            return
        path = (base_dir or Path.cwd()) / value
        _read_requirements_file(path, acc, constraint=is_constraint, seen=seen, included_from=where)
        return
    if name in ("-e", "--editable"):
        acc.bad(
            where,
            name,
            "editable installs are not supported (a lock must work on every "
            "worker); build a wheel and publish it to an index",
        )
        return
    acc.bad(where, name, "unsupported option")


def _read_requirements_file(
    path: Path,
    acc: _Requirements,
    *,
    constraint: bool,
    seen: frozenset[Path],
    included_from: str | None = None,
) -> None:
    resolved = path.resolve()
    if resolved in seen:
        acc.bad(included_from or str(path), str(path), "includes itself (directly or not)")
        return
    try:
        text = read_bounded(path, what="requirements file")
    except InputError as exc:
        acc.bad(included_from or str(path), str(path), exc.reason)
        return
    lines = _logical_lines(text)
    if len(lines) + len(acc.pypi) + len(acc.constraints) > MAX_REQUIREMENTS:
        acc.bad(
            included_from or str(path),
            str(path),
            f"more than {MAX_REQUIREMENTS:,} requirements (it has {len(lines):,} lines); "
            "split the env or pin fewer packages",
        )
        return
    before = len(acc.problems)
    _read_requirement_lines(
        lines, str(path), path.parent, acc, constraint=constraint, seen=seen | {resolved}
    )
    _one_problem_for_a_foreign_file(acc, before, str(path), len(lines))


def _one_problem_for_a_foreign_file(
    acc: _Requirements, before: int, where_file: str, lines: int
) -> None:
    """A file whose lines are (nearly) all bad is not a requirements file (``-r /etc/passwd``):
    its first bad line stands for the rest, so an error never echoes a whole file."""
    own = [p for p in acc.problems[before:] if p.where.startswith(f"{where_file}:")]
    if len(own) <= _MAX_BAD_LINES or len(own) < 0.9 * lines:
        return
    first = own[0]
    rest = [p for p in acc.problems[before:] if p not in own]
    acc.problems[before:] = [
        first._replace(
            message=f"{first.message} (and {len(own) - 1} more bad lines: is {where_file} a "
            "requirements file?)"
        ),
        *rest,
    ]


def _finish(
    acc: _Requirements,
    *,
    conda: list[CondaDep] | None = None,
    python: str | None = None,
    channels: list[str] | None = None,
    platforms: list[Platform] | None = None,
) -> EnvSpec:
    if acc.problems:
        raise SpecError(acc.problems)
    try:
        return EnvSpec(
            python=python,
            conda=tuple(conda or ()),
            pypi=tuple(acc.pypi),
            pypi_constraints=tuple(acc.constraints),
            channels=tuple(channels or ()),
            index_url=acc.index_url,
            extra_index_urls=tuple(acc.extra_index_urls),
            find_links=tuple(acc.find_links),
            platforms=tuple(platforms or ()),
        )
    except ValueError as exc:  # e.g. one name given two different URLs
        raise SpecError([Problem(where="-", key="-", message=str(exc))]) from None


def read_requirements(path: str | Path) -> EnvSpec:
    """A ``requirements.txt`` (and what it includes) as a PyPI-only ``EnvSpec``.

    Raises ``SpecError`` listing every problem with its file and line.
    """
    acc = _Requirements()
    _read_requirements_file(Path(path), acc, constraint=False, seen=frozenset())
    return _finish(acc)


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
    acc = _Requirements()
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
            _read_requirement_lines(
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
    return _finish(
        acc,
        conda=[dep for _, dep in conda.values()],
        python=python,
        channels=channels,
        platforms=platforms,
    )


def _items(data: dict[str, Any], key: str, acc: _Requirements, name: str) -> list[Any]:
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
    acc = _Requirements()
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
    return _finish(acc, python=python)


def read_spec_file(path: str | Path) -> EnvSpec:
    """Dispatch on the file name: ``*.yml``/``*.yaml``, ``pyproject.toml``, else requirements."""
    path = Path(path)
    if path.suffix in (".yml", ".yaml"):
        return read_environment_yml(path)
    if path.name == "pyproject.toml":
        return read_pyproject(path)
    return read_requirements(path)
