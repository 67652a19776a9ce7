"""The parts of a spec: conda and PyPI dependencies, channels, indexes, python, system
packages, each parsed and normalised where it enters.

:class:`CondaDep` is a ``channel::name`` match spec spelled the way py-rattler prints it;
:class:`PypiDep` a PEP 508 requirement (names PEP 503-normalised, extras PEP 685) with its
``--hash`` pins. The ``parse_*`` functions raise ``SpecError`` naming the bad value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

__all__ = [
    "CONDA_NAME",
    "CondaDep",
    "PypiDep",
    "parse_channel",
    "parse_find_links",
    "parse_index_url",
    "parse_python",
    "parse_system_package",
]

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
