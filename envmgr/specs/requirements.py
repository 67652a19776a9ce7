"""Read ``requirements.txt`` files (and the ``pip:`` list of an ``environment.yml``).

``requirements.txt``: PEP 508 lines with ``--hash`` options, ``-r``/``-c`` includes (relative
to the including file), ``-i``/``--index-url``, ``--extra-index-url``, ``-f``/``--find-links``
(a directory, relative to the file, or a URL), local wheel and sdist paths (as
``name @ file:///abs/path``), comments and ``\\`` continuations. ``--require-hashes``,
``--only-binary :all:`` and ``--prefer-binary`` are accepted (envmgr always checks hashes and
installs wheels). ``${VAR}`` stays unexpanded.

Every problem of a file is reported at once, each with its file and line; a file whose lines
are nearly all bad is its first bad line and a count (it is probably not a requirements file).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from envmgr.errors import Problem, SpecError
from envmgr.limits import MAX_REQUIREMENTS, InputError, read_bounded
from envmgr.platforms import Platform
from envmgr.specs.model import (
    CondaDep,
    EnvSpec,
    PypiDep,
    parse_find_links,
    parse_index_url,
)

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised on Python 3.10 only
    pass

__all__ = ["Requirements", "finish", "read_requirement_lines", "read_requirements"]

_COMMENT = re.compile(r"(^|\s+)#.*$")
_ACCEPTED_FLAGS = {"--require-hashes", "--prefer-binary"}
_VCS = re.compile(r"^(git|hg|svn|bzr)\+[a-z]+://", re.IGNORECASE)
#: More bad lines than this, and nearly all lines bad: the first stands for the rest.
_MAX_BAD_LINES = 3
_LOCAL = re.compile(r"^(\.{1,2}(/|$)|/|~|[A-Za-z]:\\|file:)")


@dataclass
class Requirements:
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


def read_requirement_lines(
    lines: list[tuple[int, str]],
    where_file: str,
    base_dir: Path | None,
    acc: Requirements,
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
    if "\0" in value:  # no path holds one (and expanduser raises ValueError on "~\0")
        return None
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
    acc: Requirements,
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
    acc: Requirements,
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
    read_requirement_lines(
        lines, str(path), path.parent, acc, constraint=constraint, seen=seen | {resolved}
    )
    _one_problem_for_a_foreign_file(acc, before, str(path), len(lines))


def _one_problem_for_a_foreign_file(
    acc: Requirements, before: int, where_file: str, lines: int
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


def finish(
    acc: Requirements,
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
    acc = Requirements()
    _read_requirements_file(Path(path), acc, constraint=False, seen=frozenset())
    return finish(acc)
