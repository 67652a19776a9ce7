"""``EnvSpec``: what a step asks for, as one frozen, hashable value.

An ``EnvSpec`` holds the Python version, conda dependencies (``channel::name`` match specs),
PyPI dependencies (PEP 508, with optional ``--hash`` pins) and constraints, conda channels,
PyPI indexes, target platforms, system (virtual) packages such as ``__cuda`` and ``__glibc``,
and whether the environment is disabled. Every field is normalised on construction, so two
specs that mean the same compare equal and share one :attr:`EnvSpec.spec_id`: dict order and
whitespace do not matter, PyPI names are PEP 503-normalised and extras PEP 685-normalised,
conda names are lower-cased, and versions are spelled the way py-rattler and ``packaging``
print them.

Merging (:func:`merge`), flow-level base first, then the step:

* conda and PyPI dependencies: the step's entry for a name replaces the base's entry for that
  name (for PyPI, every base entry of that name, whatever its marker); other entries add up;
* ``python``, ``index_url`` and ``disabled``: the step's value when it sets one, else the base's;
* channels: the step's channels first (highest priority), then the base's that are not listed;
* extra index URLs add up (base first); system packages merge per name, the step winning;
* platforms: the step's list when it gives one, else the base's.

``@conda`` and ``@pypi`` on the same step (or ``@conda_base`` and ``@pypi_base`` on a flow) are
combined into one *mixed* spec by :func:`combine`: conda provides Python and the conda
libraries, the PyPI packages install on top. Both may set ``python`` only if they agree.

Index and channel URLs are kept as written: ``${VAR}`` references stay unexpanded so that a
rotated token does not change the ``spec_id`` (and is never written into a lock).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from envmgr.errors import Problem, SpecError
from envmgr.platforms import PLATFORMS, Platform, is_platform
from envmgr.specs.deps import (
    CondaDep,
    PypiDep,
    parse_channel,
    parse_find_links,
    parse_index_url,
    parse_python,
    parse_system_package,
)

__all__ = [
    "SPEC_FORMAT",
    "CondaDep",
    "EnvSpec",
    "PypiDep",
    "SpecKind",
    "combine",
    "merge",
    "parse_channel",
    "parse_find_links",
    "parse_index_url",
    "parse_python",
    "parse_system_package",
]

#: Version of the canonical form hashed into ``spec_id``; bump when the form changes.
SPEC_FORMAT = 1

SpecKind = Literal["empty", "conda", "pypi", "mixed"]


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _merge_pypi(deps: Iterable[PypiDep]) -> tuple[PypiDep, ...]:
    by_key: dict[tuple[str, str], PypiDep] = {}
    for dep in deps:
        known = by_key.get(dep.key)
        by_key[dep.key] = dep if known is None else known.merged_with(dep)
    return tuple(sorted(by_key.values()))


@dataclass(frozen=True, kw_only=True, slots=True)
class EnvSpec:
    """The environment one step asks for. Construct with keywords; fields are normalised.

    ``python`` and ``disabled`` are ``None`` when not said (so merging can tell "not said" from
    "said false"); ``spec_id`` treats ``disabled=None`` as ``False``.
    """

    python: str | None = None
    conda: tuple[CondaDep, ...] = ()
    pypi: tuple[PypiDep, ...] = ()
    pypi_constraints: tuple[PypiDep, ...] = ()
    channels: tuple[str, ...] = ()
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    platforms: tuple[Platform, ...] = ()
    system: tuple[tuple[str, str], ...] = ()
    disabled: bool | None = None
    #: PyPI projects that come from one index only, ``(project, index URL)``; a URL may hold
    #: ``{backend}`` (``cpu``, ``cu126``: the target's ``__cuda``), see ``torch_index``.
    index_pins: tuple[tuple[str, str], ...] = ()
    _id: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, CondaDep] = {}
        for dep in self.conda:
            if dep.name in by_name and by_name[dep.name] != dep:
                raise ValueError(f"conda package {dep.name!r} is listed twice")
            by_name[dep.name] = dep
        pinned = by_name.get("python")
        if (
            self.python is not None
            and pinned is not None
            and pinned.spec != f"python {self.python}"
        ):
            raise ValueError(
                f"python is pinned twice: python={self.python!r} and the conda package "
                f"{pinned.spec!r}; give one of them"
            )
        set_ = object.__setattr__
        set_(self, "conda", tuple(sorted(by_name.values())))
        set_(self, "pypi", _merge_pypi(self.pypi))
        set_(self, "pypi_constraints", _merge_pypi(self.pypi_constraints))
        set_(self, "channels", _unique(self.channels))
        set_(self, "extra_index_urls", _unique(self.extra_index_urls))
        set_(self, "find_links", _unique(self.find_links))
        unknown = [p for p in self.platforms if not is_platform(p)]
        if unknown:
            raise ValueError(f"unknown platform(s) {unknown}; known: {', '.join(PLATFORMS)}")
        set_(self, "platforms", tuple(sorted(set(self.platforms))))
        set_(self, "system", tuple(sorted(dict(self.system).items())))
        set_(self, "index_pins", tuple(sorted(dict(self.index_pins).items())))

    @property
    def kind(self) -> SpecKind:
        if self.conda and self.pypi:
            return "mixed"
        if self.pypi:
            return "pypi"
        if self.conda or self.python:
            return "conda"
        return "empty"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; :meth:`from_dict` reads it back to an equal spec."""
        data = {
            "format": SPEC_FORMAT,
            "python": self.python,
            "conda": [str(d) for d in self.conda],
            "pypi": [str(d) for d in self.pypi],
            "pypi_constraints": [str(d) for d in self.pypi_constraints],
            "channels": list(self.channels),
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
            "platforms": list(self.platforms),
            "system": dict(self.system),
            "disabled": self.disabled,
        }
        if self.find_links:  # only when given, so the ids of specs without stay as they were
            data["find_links"] = list(self.find_links)
        if self.index_pins:  # the same
            data["index_pins"] = dict(self.index_pins)
        return data

    def canonical_json(self) -> str:
        """The canonical form hashed into :attr:`spec_id` (compact, sorted keys)."""
        data = self.to_dict()
        data["disabled"] = bool(self.disabled)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @property
    def spec_id(self) -> str:
        """A stable 32-hex-digit hash of the canonical form."""
        if not self._id:
            digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()[:32]
            object.__setattr__(self, "_id", digest)
        return self._id

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "spec") -> EnvSpec:
        """Read :meth:`to_dict` output; raises ``SpecError`` listing every problem."""
        problems: list[Problem] = []

        def bad(key: str, message: str) -> None:
            problems.append(Problem(where=where, key=key, message=message))

        if not isinstance(data, Mapping):
            raise SpecError([Problem(where=where, key="-", message="not a mapping")])
        if data.get("format") != SPEC_FORMAT:
            bad("format", f"unsupported spec format {data.get('format')!r}, want {SPEC_FORMAT}")
        known = {*cls().to_dict(), "find_links", "index_pins"}
        for key in sorted(set(data) - known):
            bad(key, "unknown key")

        def strings(key: str) -> list[str]:
            value = data.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                bad(key, "must be a list of strings")
                return []
            return value

        def parsed(key: str, parse: Any) -> list[Any]:
            out = []
            for i, text in enumerate(strings(key)):
                try:
                    out.append(parse(text))
                except ValueError as exc:
                    bad(f"{key}[{i}]", str(exc))
            return out

        def optional_str(key: str) -> str | None:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                bad(key, "must be a string or null")
                return None
            return value

        system = data.get("system") or {}
        if not isinstance(system, Mapping):
            bad("system", "must be a mapping of name to version")
            system = {}
        pins = data.get("index_pins") or {}
        if not isinstance(pins, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in pins.items()
        ):
            bad("index_pins", "must be a mapping of project to index URL")
            pins = {}
        disabled = data.get("disabled")
        if disabled is not None and not isinstance(disabled, bool):
            bad("disabled", "must be true, false or null")
            disabled = None
        python = optional_str("python")
        index_url = optional_str("index_url")
        conda = parsed("conda", CondaDep.parse)
        pypi = parsed("pypi", _parse_pypi_line)
        constraints = parsed("pypi_constraints", _parse_pypi_line)
        channels = parsed("channels", parse_channel)
        extra = parsed("extra_index_urls", parse_index_url)
        find_links = parsed("find_links", parse_find_links)
        platforms = strings("platforms")
        if problems:
            raise SpecError(problems)
        try:
            return cls(
                python=python,
                conda=tuple(conda),
                pypi=tuple(pypi),
                pypi_constraints=tuple(constraints),
                channels=tuple(channels),
                index_url=index_url,
                extra_index_urls=tuple(extra),
                find_links=tuple(find_links),
                platforms=tuple(platforms),  # type: ignore[arg-type]  # checked on construction
                system=tuple((str(k), str(v)) for k, v in system.items()),
                disabled=disabled,
                index_pins=tuple(pins.items()),
            )
        except ValueError as exc:
            raise SpecError([Problem(where=where, key="-", message=str(exc))]) from None


def _parse_pypi_line(text: str) -> PypiDep:
    requirement, *options = text.split(" --hash=")
    return PypiDep.parse(requirement, hashes=[o.strip() for o in options])


def _override_pypi(base: Sequence[PypiDep], over: Sequence[PypiDep]) -> tuple[PypiDep, ...]:
    names = {d.name for d in over}
    return (*(d for d in base if d.name not in names), *over)


def merge(base: EnvSpec, step: EnvSpec) -> EnvSpec:
    """The flow-level *base* overridden by the *step* (see the module docstring); a python
    the step pins either way (``python=`` or a ``python`` package) replaces the base's."""
    conda = {d.name: d for d in base.conda} | {d.name: d for d in step.conda}
    python = step.python if step.python is not None else base.python
    step_pins_package = any(d.name == "python" for d in step.conda)
    if step.python is not None and not step_pins_package:
        conda.pop("python", None)
    elif step_pins_package and step.python is None:
        python = None
    return EnvSpec(
        python=python,
        conda=tuple(conda.values()),
        pypi=_override_pypi(base.pypi, step.pypi),
        pypi_constraints=_override_pypi(base.pypi_constraints, step.pypi_constraints),
        channels=(*step.channels, *base.channels),
        index_url=step.index_url if step.index_url is not None else base.index_url,
        extra_index_urls=(*base.extra_index_urls, *step.extra_index_urls),
        find_links=(*base.find_links, *step.find_links),
        platforms=step.platforms or base.platforms,
        system=tuple((dict(base.system) | dict(step.system)).items()),
        disabled=step.disabled if step.disabled is not None else base.disabled,
        index_pins=tuple((dict(base.index_pins) | dict(step.index_pins)).items()),
    )


def combine(a: EnvSpec, b: EnvSpec, *, where: str) -> EnvSpec:
    """Two layers of one level (``@conda`` + ``@pypi``) as one mixed spec.

    Raises ``SpecError`` when both set ``python``, ``index_url``, ``disabled``, ``platforms``
    or the same system package differently.
    """
    problems = [
        Problem(where=where, key=key, message=f"@conda says {x!r} but @pypi says {y!r}")
        for key, x, y in (
            ("python", a.python, b.python),
            ("index_url", a.index_url, b.index_url),
            ("disabled", a.disabled, b.disabled),
            ("platforms", a.platforms or None, b.platforms or None),
        )
        if x is not None and y is not None and x != y
    ]
    a_system = dict(a.system)
    problems += [
        Problem(
            where=where,
            key=f"system_packages[{name!r}]",
            message=f"@conda says {a_system[name]!r} but @pypi says {version!r}",
        )
        for name, version in b.system
        if name in a_system and a_system[name] != version
    ]
    if problems:
        raise SpecError(problems)
    return merge(a, b)
