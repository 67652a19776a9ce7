"""Resolve the PyPI part of a spec into locked packages, explaining failures in sentences."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from envmgr.errors import EnvmgrError
from envmgr.lock import LockedPackage, strip_credentials
from envmgr.resolvers.conda import SolveError
from envmgr.resolvers.pypi.index import IndexClient
from envmgr.resolvers.pypi.provider import Candidate, PypiProvider, Req, parse_version
from envmgr.resolvers.pypi.sdist import SdistBuilder
from envmgr.resolvers.pypi.target import PythonTarget
from envmgr.spec import EnvSpec

__all__ = ["CONDA_TO_PYPI", "PypiConflictError", "fixed_from_conda", "resolve_pypi"]

#: Conda packages whose PyPI distribution has another name (the rest share their name).
CONDA_TO_PYPI: Mapping[str, str] = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "matplotlib-base": "matplotlib",
    "py-opencv": "opencv-python",
    "py-xgboost": "xgboost",
    "py-lightgbm": "lightgbm",
    "msgpack-python": "msgpack",
    "tensorflow-base": "tensorflow",
    "python-kubernetes": "kubernetes",
    "ruamel.yaml": "ruamel-yaml",
    "typing_extensions": "typing-extensions",
}


class PypiConflictError(SolveError):
    """The PyPI requirements cannot all be met; the message says who needs what."""


def fixed_from_conda(packages: tuple[LockedPackage, ...]) -> dict[str, Version]:
    """Python distributions installed by conda (packages that depend on ``python``), by PyPI
    name, at their conda version: the PyPI layer must take them as they are."""
    fixed: dict[str, Version] = {}
    for package in packages:
        if package.manager != "conda" or package.name == "python":
            continue
        if not any(d.split()[0] == "python" for d in package.depends):
            continue
        version = parse_version(package.version)
        if version is not None:
            fixed[canonicalize_name(CONDA_TO_PYPI.get(package.name, package.name))] = version
    return fixed


def _why_no_candidates(provider: PypiProvider, name: str, target: PythonTarget) -> str:
    files = provider.page(name).result()
    indexes = ", ".join(strip_credentials(u) for u in provider.client.index_urls)
    if not files:
        return f"no project named {name!r} on {indexes}"
    allowed = provider.hashes.get(name)
    if allowed and not any(f.sha256 in allowed for f in files):
        pinned = ", ".join(sorted(f"{h[:12]}…" for h in allowed)[:3])
        return (
            f"hash mismatch: no file of {name} on {indexes} has a pinned sha256 ({pinned}); "
            "the requirements' --hash values do not match what the index serves"
        )
    fitting = sorted(provider.best_files(name), reverse=True)
    wheels = [f for f in files if f.is_wheel]
    if fitting:
        text = f"available versions of {name} for {target.platform}: " + ", ".join(
            str(v) for v in fitting[:8]
        )
    else:
        seen = sorted(
            {str(t.platform) for w in wheels for t in parse_wheel_filename(w.filename)[3]}
        )[:6]
        text = f"no wheel of {name} fits {target.platform} with CPython {target.python}"
        if seen:
            text += f" (its wheels are for: {', '.join(seen)})"
        text += _macos_needed(wheels, target)
    sdist_only = sorted(
        {Version(f.version) for f in files} - {Version(f.version) for f in wheels} - set(fitting),
        reverse=True,
    )
    if sdist_only and provider.sdists is None:
        newest_wheel = max((Version(w.version) for w in wheels), default=None)
        text += (
            f"; {name} {sdist_only[0]} has only a source distribution, which envmgr "
            "builds only when locking for this host's platform and Python; newest "
            f"version with a wheel: {newest_wheel or 'none'}"
        )
    return text


def _macos_needed(wheels: list[Any], target: PythonTarget) -> str:
    """For a macOS target: the macOS release the project's wheels of this architecture need,
    when it is newer than the target's (empty otherwise)."""
    if not target.platform.startswith("osx"):
        return ""
    arch = "arm64" if target.platform == "osx-arm64" else "x86_64"
    needed = []
    for wheel in wheels:
        for tag in parse_wheel_filename(wheel.filename)[3]:
            parts = str(tag.platform).split("_")
            if parts[0] == "macosx" and len(parts) >= 4 and parts[-1] in (arch, "universal2"):
                with contextlib.suppress(ValueError):
                    needed.append((int(parts[1]), int(parts[2])))
    have = tuple(int(p) for p in (target.macos or "12.0").split(".")[:2])
    if not needed or min(needed) <= have:
        return ""
    major, minor = min(needed)
    return (
        f"; its {arch} wheels need macOS {major}.{minor} or newer and the target is macOS "
        f"{target.macos or '12.0'} (set MACOSX_DEPLOYMENT_TARGET={major}.{minor} or "
        f"CONDA_OVERRIDE_OSX={major}.{minor})"
    )


def _chain(provider: PypiProvider, parent: Candidate | None) -> str:
    """``required by a 1.0 ← b 2.0 ← the step``: who asked, back to the step."""
    links: list[str] = []
    current = str(parent) if parent is not None else None
    while current is not None and len(links) < 6 and current not in links:
        links.append(current)
        current = provider.required_by.get(current.split(" ")[0].split("[")[0])
    return "required by " + " ← ".join([*links, "the step"])


def _explain(exc: Any, provider: PypiProvider, target: PythonTarget, where: str) -> str:
    by_name: dict[str, list[str]] = {}
    for cause in exc.causes:
        req: Req = cause.requirement
        base = req.name.split("[")[0]
        by_name.setdefault(base, []).append(f"{req} ({_chain(provider, cause.parent)})")
    sentences = []
    for name, needs in by_name.items():
        if name in provider.fixed:
            sentences.append(
                f"conda provides {name} {provider.fixed[name]}, but {' and '.join(needs)}"
            )
        elif len(needs) > 1:
            sentences.append(f"{' conflicts with '.join(needs)}")
        else:
            sentences.append(f"{needs[0]}: {_why_no_candidates(provider, name, target)}")
    return f"{where}: {target.platform}: cannot resolve PyPI packages: " + "; ".join(sentences)


def resolve_pypi(
    spec: EnvSpec,
    target: PythonTarget,
    *,
    client: IndexClient,
    fixed: Mapping[str, Version],
    where: str,
    sdists: SdistBuilder | None = None,
) -> tuple[LockedPackage, ...]:
    """Lock the PyPI requirements of *spec* for *target*; conda-installed *fixed* distributions
    are taken as they are. Raises :class:`PypiConflictError` or an index error."""
    from resolvelib import BaseReporter, Resolver  # noqa: PLC0415
    from resolvelib.resolvers import ResolutionImpossible, ResolutionTooDeep  # noqa: PLC0415

    constraints: dict[str, SpecifierSet] = {}
    provider = PypiProvider(
        client, target, fixed=fixed, sdists=sdists, user_requested=[d.name for d in spec.pypi]
    )
    for dep in spec.pypi_constraints:
        for req in provider.make_requirement(dep.requirement()):
            constraints[req.name] = constraints.get(req.name, SpecifierSet()) & req.specifier
    provider.constraints = constraints
    provider.hashes = {
        d.name: {h.split(":", 1)[1] for h in d.hashes if h.startswith("sha256:")}
        for d in spec.pypi
        if d.hashes
    }
    roots: list[Req] = []
    for dep in spec.pypi:
        roots += provider.make_requirement(dep.requirement())
    try:
        result = Resolver(provider, BaseReporter()).resolve(roots, max_rounds=5000)
        packages = []
        for candidate in result.mapping.values():
            if candidate.fixed or candidate.extras or candidate.dist is None:
                continue
            packages.append(_locked(provider, candidate))
    except ResolutionImpossible as exc:
        raise PypiConflictError(
            _explain(exc, provider, target, where), hint="relax a version, or -v for details"
        ) from None
    except ResolutionTooDeep:
        raise PypiConflictError(
            f"{where}: {target.platform}: PyPI resolution gave up after "
            "too many backtracking rounds",
            hint="pin a few versions",
        ) from None
    except EnvmgrError as exc:
        raise type(exc)(f"{where}: {exc.message}", hint=exc.hint) from None
    finally:
        provider.close()
    return tuple(sorted(packages))


def _locked(provider: PypiProvider, candidate: Candidate) -> LockedPackage:
    if candidate.dist is None:  # fixed candidates are never locked here
        raise ValueError(f"{candidate} has no file")
    depends = [line.split(";")[0].strip() for line in provider.dependencies_of(candidate)]
    return LockedPackage(
        manager="pypi",
        name=candidate.name,
        version=str(candidate.version),
        url=candidate.dist.url.split("#")[0],
        sha256=candidate.dist.sha256,
        depends=tuple(_as_name_spec(d) for d in depends),
        size=candidate.dist.size,
    )


def _as_name_spec(requirement: str) -> str:
    """``name>=1`` as conda-lock's ``name >=1`` dependency form."""
    from packaging.requirements import Requirement  # noqa: PLC0415

    req = Requirement(requirement)
    spec = str(req.specifier)
    return (
        f"{canonicalize_name(req.name)} {spec}".strip()
        if spec
        else str(canonicalize_name(req.name))
    )
