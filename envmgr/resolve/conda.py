"""Solve the conda part of a spec for one target platform with py-rattler, in-process.

No conda, mamba or micromamba binary is involved. Channels may be names (``conda-forge``) or
URLs (``file://``, ``https://``, with ``/t/<token>/`` or user info); channel priority is strict,
``channel::name`` pins a package to its channel, and repodata is cached on disk by the
gateway. Solver failures become :class:`SolveError` subclasses whose first line names the
step, the platform and the packages involved.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envmgr.errors import EnvmgrError
from envmgr.locks.lock import PlatformLock, locked_package, strip_credentials, strip_credentials_in
from envmgr.platforms import Platform, VirtualPackage
from envmgr.specs.model import EnvSpec

__all__ = [
    "ChannelError",
    "CondaTarget",
    "SolveError",
    "UnknownPackageError",
    "UnsatisfiableError",
    "conda_specs",
    "solve",
]

_NO_CANDIDATES = re.compile(r"No candidates were found for (\S+)(?: (.*?))?\.?$", re.M)
_TREE = re.compile(r"^[\s│├└─]+")


class SolveError(EnvmgrError):
    """The solver could not produce a lock; ``explanation`` has the solver's full text."""

    def __init__(self, message: str, *, explanation: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.explanation = explanation


class UnsatisfiableError(SolveError):
    """No set of packages satisfies the spec."""


class UnknownPackageError(SolveError):
    """A requested package does not exist (at all, or in a matching version)."""


class ChannelError(SolveError):
    """A channel could not be reached or read."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CondaTarget:
    """Where and for what to solve: platform, channels in priority order, virtual packages."""

    platform: Platform
    channels: tuple[str, ...]
    virtual_packages: tuple[VirtualPackage, ...]


def conda_specs(spec: EnvSpec) -> list[str]:
    """The match specs to solve: python (when asked for, or needed by PyPI packages), pip (for
    PyPI packages) and the conda dependencies."""
    specs = [str(d) for d in spec.conda]
    names = {d.name for d in spec.conda}
    if spec.pypi and "pip" not in names:
        specs.insert(0, "pip")  # as in Metaflow: PyPI packages install with the env's pip
    if spec.python is not None:
        specs.insert(0, f"python {spec.python}")
    elif spec.pypi and "python" not in names:
        specs.insert(0, "python")
    return specs


def _rattler_vps(target: CondaTarget) -> list[Any]:
    import rattler  # noqa: PLC0415

    return [
        rattler.GenericVirtualPackage(
            rattler.PackageName(v.name), rattler.Version(v.version), rattler.BuildString(v.build)
        )
        for v in target.virtual_packages
    ]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _summarise(explanation: str) -> str:
    """The solver's tree as one line: what each involved package would require."""
    lines = [_TREE.sub("", line).strip() for line in explanation.splitlines()]
    parts: list[str] = []
    for i, line in enumerate(lines):
        if line.endswith("would require") and i + 1 < len(lines):
            needed = re.split(r",| which", lines[i + 1])[0].strip()
            parts.append(f"{line[: -len(' would require')]} needs {needed}")
    if not parts:
        parts = [line for line in lines[1:] if line and "reported above" not in line][:3]
    return "; ".join(dict.fromkeys(parts))


async def _explain_missing(
    gateway: Any, target: CondaTarget, name: str, wanted: str, where: str, explanation: str
) -> SolveError:
    subdirs = [target.platform, "noarch"]
    channels = ", ".join(strip_credentials(c) for c in target.channels)
    try:
        names = sorted(n.normalized for n in await gateway.names(list(target.channels), subdirs))
    except Exception:  # the names are advice only
        names = []
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "check the name and channels"
        return UnknownPackageError(
            f"{where}: no package named {name!r} for {target.platform} in channels {channels}",
            explanation=explanation,
            hint=hint,
        )
    versions: list[str] = []
    try:
        for records in await gateway.query(list(target.channels), subdirs, [name], recursive=False):
            versions += [str(r.version) for r in records]
    except Exception:  # the versions are advice only
        versions = []
    shown = ", ".join(dict.fromkeys(reversed(versions))) or "none"
    return UnknownPackageError(
        f"{where}: no version of {name} matches {wanted or '*'} for {target.platform} in "
        f"channels {channels}",
        explanation=explanation,
        hint=f"available: {shown}",
    )


async def solve(
    spec: EnvSpec, target: CondaTarget, *, gateway: Any, where: str, spec_id: str = ""
) -> PlatformLock:
    """Solve the conda part of *spec* for *target*; raises a :class:`SolveError` subclass.

    *where* names the step(s) in messages. Cost: reading repodata (cached by the gateway) and
    one in-process solve.
    """
    import rattler  # noqa: PLC0415
    from rattler.exceptions import GatewayError, SolverError  # noqa: PLC0415

    specs = conda_specs(spec)
    try:
        records: Sequence[Any] = await rattler.solve(
            sources=list(target.channels),
            specs=specs,
            gateway=gateway,
            platforms=[target.platform, "noarch"],
            virtual_packages=_rattler_vps(target),
            channel_priority=rattler.ChannelPriority.Strict,
        )
    except GatewayError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ChannelError(
            f"{where}: cannot read channels for {target.platform}: {strip_credentials_in(detail)}",
            explanation=str(exc),
            hint="check the channel URL and the network",
        ) from None
    except SolverError as exc:
        text = str(exc)
        missing = _NO_CANDIDATES.search(text)
        if missing:
            raise await _explain_missing(
                gateway, target, missing.group(1), (missing.group(2) or "").strip(), where, text
            ) from None
        involved = [s for s in specs if re.search(rf"\b{re.escape(s.split()[0])}\b", text)]
        raise UnsatisfiableError(
            f"{where}: {target.platform}: cannot satisfy {', '.join(involved or specs)}: "
            f"{_summarise(text)}",
            explanation=text,
            hint="relax a version or pin; -v shows the solver's explanation",
        ) from None
    packages = []
    for record in records:
        if record.sha256 is None:
            raise ChannelError(
                f"{where}: {record.url} has no sha256 in its channel's repodata; "
                "envmgr verifies every download and needs one"
            )
        packages.append(locked_package(record))
    return PlatformLock(
        platform=target.platform,
        packages=tuple(packages),
        spec_id=spec_id,
        channels=target.channels,
        virtual_packages=tuple(str(v) for v in target.virtual_packages),
    )
