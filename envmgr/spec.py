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
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from envmgr.errors import Problem, SpecError
from envmgr.platforms import PLATFORMS, Platform, is_platform

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

_CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)*$")
_URL_SCHEMES = ("http", "https", "file", "s3")
#: One part of a conda version constraint: an operator, then a digit (or ``*``).
_VERSION_START = re.compile(r"^(?:[<>=!~]=?|==)?\s*(?:\d|\*$)")
_BARE_VERSION = re.compile(r"^\d+(\.\d+)*$")
_VIRTUAL_NAME = re.compile(r"^__[a-z][a-z0-9_]*$")
_VIRTUAL_VERSION = re.compile(r"^\d+(\.[0-9A-Za-z_]+)*$")
#: A conda package name as a dict key (``libraries={"name": ...}``), without the channel.
CONDA_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]*$")


def _rattler() -> Any:
    # py-rattler is imported on first parse, not at import: `import envmgr` stays fast.
    import rattler  # noqa: PLC0415

    return rattler


def parse_channel(text: str) -> str:
    """Normalise a channel name (``conda-forge``, ``nvidia/label/cuda-12.1``) or URL.

    Raises ``ValueError`` with a readable reason for anything else.
    """
    value = text.strip()
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in _URL_SCHEMES or (not urlsplit(value).netloc and scheme != "file"):
            raise ValueError(
                f"channel {text!r} is not a channel name or an http(s)://, file:// or s3:// URL"
            )
        return value.rstrip("/")
    if not _CHANNEL_NAME.match(value):
        raise ValueError(
            f"channel {text!r} is not a channel name (letters, digits, '-', '_', '.', '/') or a URL"
        )
    return value


def parse_index_url(text: str) -> str:
    """Normalise a PyPI index URL (http, https or file); ``${VAR}`` references stay as written."""
    value = text.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https", "file") or (
        parts.scheme != "file" and not parts.netloc
    ):
        raise ValueError(f"index URL {text!r} must be an http://, https:// or file:// URL")
    return value.rstrip("/") + "/"


def parse_find_links(text: str, base_dir: Path | None = None) -> str:
    """A ``--find-links`` location as a URL: http(s) and file URLs as written, a directory
    path (relative to *base_dir*, else the working directory) as its absolute file URL."""
    value = text.strip()
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.netloc:
        return value
    if parts.scheme == "file":
        return value
    if parts.scheme or not value:
        raise ValueError(f"find-links {text!r} must be a directory or an http(s):// URL")
    path = Path(os.path.expanduser(value))  # noqa: PTH111 - Path.expanduser raises for ~nobody
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return path.resolve().as_uri()


def parse_python(text: str) -> str:
    """The conda version spec for ``python``: ``"3.11"`` means 3.11.x, ``"3.11.7"`` exactly it.

    A bare version with one or two components names a series (like ``uv --python 3.11``);
    anything else is a conda version spec (``">=3.10,<3.13"``, ``"3.11.*"``), optionally followed
    by a build string (``"3.11.7 h123_0_cpython"``). Raises ``ValueError``.
    """
    value = " ".join(text.split())
    if not value:
        raise ValueError("empty python version")
    if _BARE_VERSION.match(value):
        value = f"{value}.*" if value.count(".") < 2 else f"=={value}"
    bad = [p for p in re.split(r"[,|]", value.split(" ")[0]) if not _VERSION_START.match(p)]
    if bad:
        raise ValueError(
            f"bad python version {text!r}: {bad[0]!r} is not a version (a version starts "
            "with a digit, e.g. 3.11 or >=3.10,<3.13)"
        )
    try:
        spec = _rattler().MatchSpec(f"python {value}")
    except Exception as exc:  # rattler raises its own exception types
        raise ValueError(f"bad python version {text!r}: {_first_line(exc)}") from None
    canonical = str(spec)
    if not canonical.startswith("python ") or spec.channel is not None:
        raise ValueError(f"bad python version {text!r}: give a version spec, not a package spec")
    version = str(spec.version) if spec.version is not None else ""
    return canonical[len("python ") :].replace(version, _sorted_conjunction(version), 1)


def parse_system_package(name: str, version: str) -> tuple[str, str]:
    """Validate a system (virtual) package such as ``("__cuda", "12.1")``."""
    if not _VIRTUAL_NAME.match(name):
        raise ValueError(f"system package {name!r} must be a virtual package name like '__cuda'")
    if not _VIRTUAL_VERSION.match(version.strip()):
        raise ValueError(
            f"bad version {version!r} for system package {name!r}: use digits and dots, like '12.1'"
        )
    return name, version.strip()


def _sorted_conjunction(version: str) -> str:
    """``<2,>=1.26`` and ``>=1.26,<2`` mean the same: spell a plain conjunction one way."""
    if "," in version and not any(c in version for c in "|()"):
        return ",".join(sorted(version.split(",")))
    return version


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True, kw_only=True, slots=True, order=True)
class CondaDep:
    """One conda dependency: its lower-case ``name``, optional ``channel`` and canonical ``spec``.

    ``spec`` is the full match spec as py-rattler prints it (``pytorch::pytorch ==2.3``).
    """

    name: str
    spec: str
    channel: str | None = None

    @classmethod
    def parse(cls, text: str) -> CondaDep:
        """Parse a conda match spec (``numpy >=1.26,<2``, ``pytorch::pytorch``, ``blas=*=mkl``).

        Raises ``ValueError`` naming what is wrong.
        """
        value = text.strip()
        channel: str | None = None
        if "::" in value:
            raw_channel, _, rest = value.rpartition("::")
            if not raw_channel.strip():
                raise ValueError(f"empty channel before '::' in {text!r}")
            if "::" in raw_channel:
                raise ValueError(f"more than one '::' in {text!r}")
            channel = parse_channel(raw_channel)
            value = f"{raw_channel.strip()}::{rest.strip()}"
            if not rest.strip() or rest.strip()[0] in "<>=!~ ":
                raise ValueError(f"no package name after '::' in {text!r}")
        elif not value or value[0] in "<>=!~*[":
            raise ValueError(f"no package name in {text!r}")
        try:
            spec = _rattler().MatchSpec(value)
        except Exception as exc:
            raise ValueError(f"bad conda spec {text!r}: {_first_line(exc)}") from None
        name = spec.name.normalized if spec.name is not None else ""
        if not name:
            raise ValueError(f"no package name in {text!r}")
        canonical = str(spec)
        version = str(spec.version) if spec.version is not None else ""
        canonical = canonical.replace(version, _sorted_conjunction(version), 1)
        return cls(name=name, spec=canonical, channel=channel)

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True, kw_only=True, slots=True, order=True)
class PypiDep:
    """One PyPI requirement, normalised: name, extras, specifier or URL, marker, hashes."""

    name: str
    marker: str = ""
    extras: tuple[str, ...] = ()
    specifier: str = ""
    url: str | None = None
    hashes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, *, hashes: Iterable[str] = ()) -> PypiDep:
        """Parse a PEP 508 requirement; ``hashes`` are ``algo:hexdigest`` pins.

        Direct URLs must be http(s) or absolute file URLs (a VCS checkout has no hash to lock).
        Raises ``ValueError``.
        """
        try:
            req = Requirement(text.strip())
        except InvalidRequirement as exc:
            raise ValueError(f"bad requirement {text.strip()!r}: {_first_line(exc)}") from None
        if req.url is not None:
            scheme = urlsplit(req.url).scheme.lower()
            if "+" in scheme:
                raise ValueError(
                    f"{req.name} @ {req.url}: VCS requirements are not supported (envmgr locks "
                    "files with hashes); build a wheel and give its https:// URL"
                )
            if scheme not in ("http", "https", "file") or (
                scheme == "file" and not urlsplit(req.url).path.startswith("/")
            ):
                raise ValueError(
                    f"{req.name} @ {req.url}: give an https:// URL or an absolute "
                    "file:///path of a wheel or sdist"
                )
        checked: list[str] = []
        for item in hashes:
            algo, sep, digest = item.partition(":")
            if not sep or algo not in ("sha256", "sha384", "sha512") or not digest.isalnum():
                raise ValueError(f"bad hash {item!r} for {req.name}: use sha256:<hex digest>")
            checked.append(f"{algo}:{digest.lower()}")
        return cls(
            name=canonicalize_name(req.name),
            extras=tuple(sorted({canonicalize_name(e) for e in req.extras})),
            specifier=str(req.specifier),
            url=req.url,
            marker=str(req.marker) if req.marker is not None else "",
            hashes=tuple(sorted(set(checked))),
        )

    @property
    def key(self) -> tuple[str, str]:
        """Entries with the same name and marker describe one requirement."""
        return (self.name, self.marker)

    def requirement(self) -> str:
        """The PEP 508 string (without hashes)."""
        text = self.name
        if self.extras:
            text += f"[{','.join(self.extras)}]"
        if self.url:
            text += f" @ {self.url}"
            if self.marker:
                text += " "
        else:
            text += self.specifier
        if self.marker:
            text += f"; {self.marker}"
        return text

    def __str__(self) -> str:
        """requirements.txt syntax: the requirement followed by its ``--hash`` options."""
        return " ".join([self.requirement(), *(f"--hash={h}" for h in self.hashes)])

    def merged_with(self, other: PypiDep) -> PypiDep:
        """Both requirements at once (pip's rule for a name listed twice): ranges intersect."""
        if self.url and other.url and self.url != other.url:
            raise ValueError(f"{self.name} is given two different URLs")
        return replace(
            self,
            extras=tuple(sorted(set(self.extras) | set(other.extras))),
            specifier=str(SpecifierSet(self.specifier) & SpecifierSet(other.specifier)),
            url=self.url or other.url,
            hashes=tuple(sorted(set(self.hashes) | set(other.hashes))),
        )


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
        known = {*cls().to_dict(), "find_links"}
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
