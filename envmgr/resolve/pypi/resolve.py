"""Resolve the PyPI part of a spec into locked packages, explaining failures in sentences."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from envmgr.errors import EnvmgrError
from envmgr.locks.lock import LockedPackage, strip_credentials
from envmgr.locks.python_target import PythonTarget
from envmgr.resolve.conda import SolveError
from envmgr.resolve.pypi.candidates import PYTHON, Candidate, Req, parse_version, pinned
from envmgr.resolve.pypi.index import IndexClient
from envmgr.resolve.pypi.provider import PypiProvider
from envmgr.resolve.pypi.sdist import SdistBuildError, Sdists
from envmgr.resolve.pypi.sdist_files import has_native_sources
from envmgr.specs.model import EnvSpec

log = logging.getLogger("envmgr.pypi")

__all__ = [
    "CONDA_TO_PYPI",
    "PypiConflictError",
    "PypiLocked",
    "SourceBuild",
    "fixed_from_conda",
    "resolve_pypi",
]

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


class SourceBuild(NamedTuple):
    """A locked sdist whose wheel ``build`` must make (no builder has stored one yet):
    whether it carries code to compile (None: not known), and the newest version of its
    project with a wheel for the target (None: none, or not known)."""

    name: str
    version: str
    filename: str
    compiles: bool | None
    newest_wheel: str | None

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()

    def sentence(self, platform: str) -> str:
        what = (
            "builds it from source"
            if self.compiles is None
            else ("compiles its code" if self.compiles else "builds its wheel")
        )
        newest = (
            f"; newest version with a wheel for {platform}: {self.newest_wheel}"
            if self.newest_wheel
            else ""
        )
        return f"{self.name} {self.version} is an sdist ({self.filename}): build {what}{newest}"


class PypiLocked(NamedTuple):
    """What :func:`resolve_pypi` locked, and which of it ``build`` makes from source."""

    packages: tuple[LockedPackage, ...]
    source_builds: tuple[SourceBuild, ...]


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
        if provider.client.find_links:
            indexes += " or the find-links " + ", ".join(
                strip_credentials(u) for u in provider.client.find_links
            )
        return f"no project named {name!r} on {indexes}" + _did_you_mean(provider, name)
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
    return text


#: Often-typed projects, for suggestions when an index is too large to list (PyPI).
_WELL_KNOWN = (
    "numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "seaborn", "requests",
    "torch", "torchvision", "tensorflow", "keras", "transformers", "sentence-transformers",
    "xgboost", "lightgbm", "catboost", "statsmodels", "pyarrow", "polars", "dask",
    "boto3", "botocore", "pydantic", "fastapi", "flask", "django", "sqlalchemy",
    "pytest", "jupyter", "ipython", "notebook", "plotly", "bokeh", "altair", "nltk",
    "spacy", "gensim", "opencv-python", "pillow", "beautifulsoup4", "lxml", "pyyaml",
    "tabulate", "tqdm", "click", "typer", "rich", "attrs", "six", "python-dateutil",
    "pytz", "networkx", "sympy", "numba", "jax", "jaxlib", "metaflow", "mlflow",
    "datasets", "tokenizers", "accelerate", "huggingface-hub", "openai", "langchain",
)  # fmt: skip


def _did_you_mean(provider: PypiProvider, name: str) -> str:
    """``; did you mean 'pandas'?`` for a near miss among the indexes' projects."""
    import difflib  # noqa: PLC0415

    known = {*provider.client.project_names(), *_WELL_KNOWN}
    close = difflib.get_close_matches(name, sorted(known - {name}), n=2, cutoff=0.75)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


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


def _bound(specifier: str) -> tuple[Version, str]:
    """Order ``>=2.0``, ``>=2.1``, ``>=10``: by the version a specifier names, then its text."""
    digits = specifier.lstrip("<>=!~ ").split(",")[0]
    return (parse_version(digits) or Version("0"), specifier)


def _summary(name: str, causes: list[Any]) -> str:
    """A long conflict on *name* in one sentence: who needs what, grouped by project, with
    the step's own requirement last ("every b 2.3.0 to 3.0.1 (5 versions) needs c>=4.32; the
    step asks for c==4.30.1")."""
    by_project: dict[str, list[tuple[Version, str]]] = {}
    asked: list[str] = []
    for cause in causes:
        spec = str(cause.requirement.specifier) or "any version"
        if cause.parent is None:
            asked.append(str(cause.requirement))
        else:
            parent: Candidate = cause.parent
            by_project.setdefault(parent.name, []).append((parent.version, spec))
    parts = []
    for project, needs in by_project.items():
        versions = sorted({v for v, _ in needs})
        specs = sorted({s for _, s in needs}, key=_bound)
        wanted = f"{name}{specs[0]}" + (f" (or {', '.join(specs[1:3])})" if len(specs) > 1 else "")
        if len(versions) == 1:
            parts.append(f"{project} {versions[0]} needs {wanted}")
        else:
            parts.append(
                f"every {project} {versions[0]} to {versions[-1]} that fits "
                f"({len(versions)} versions) needs {wanted}"
            )
    if asked:
        parts.append(f"the step asks for {' and '.join(dict.fromkeys(asked))}")
    return "; ".join(parts)


def _explain(exc: Any, provider: PypiProvider, target: PythonTarget, where: str) -> str:
    by_name: dict[str, list[str]] = {}
    causes_of: dict[str, list[Any]] = {}
    for cause in exc.causes:
        req: Req = cause.requirement
        base = req.name.split("[")[0]
        by_name.setdefault(base, []).append(f"{req} ({_chain(provider, cause.parent)})")
        causes_of.setdefault(base, []).append(cause)
    sentences = []
    for name, needs in by_name.items():
        if name == PYTHON:
            parents = sorted({str(c.parent) for c in causes_of[name] if c.parent is not None})
            sentences.append(
                f"{', '.join(parents[:4])} need{'s' if len(parents) == 1 else ''} "
                f"{' and '.join(sorted(set(needs)))[:80].split(' (')[0]}, and the target has "
                f"CPython {target.python}"
            )
        elif len(needs) > 2:
            sentences.append(_summary(name, causes_of[name]))
        elif name in provider.fixed:
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
    sdists: Sdists | None = None,
    native_sdists: bool = False,
) -> PypiLocked:
    """Lock the PyPI requirements of *spec* for *target*; conda-installed *fixed* distributions
    are taken as they are. *sdists* reads source distributions (None: wheels only); with
    *native_sdists* the target is this host and sdists may be compiled when the env is built.
    Raises :class:`PypiConflictError` or an index error."""
    from resolvelib import Resolver  # noqa: PLC0415
    from resolvelib.resolvers import ResolutionImpossible, ResolutionTooDeep  # noqa: PLC0415

    constraints: dict[str, SpecifierSet] = {}
    provider = PypiProvider(
        client,
        target,
        fixed=fixed,
        sdists=sdists,
        native_sdists=native_sdists,
        user_requested=[d.name for d in spec.pypi],
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
        _check_pins(provider, roots, target)
        result = Resolver(provider, _reporter(target)).resolve(roots, max_rounds=5000)
        packages = []
        builds = []
        for candidate in result.mapping.values():
            if candidate.fixed or candidate.extras or candidate.dist is None:
                continue
            packages.append(_locked(provider, candidate))
            if not candidate.dist.is_wheel and sdists is not None:
                build = _source_build(provider, sdists, candidate)
                if build is not None:
                    builds.append(build)
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
    return PypiLocked(tuple(sorted(packages)), tuple(sorted(builds)))


def _source_build(
    provider: PypiProvider, sdists: Sdists, candidate: Candidate
) -> SourceBuild | None:
    """What ``build`` will do with the sdist of *candidate* (None: its wheel is stored)."""
    dist = candidate.dist
    if dist is None or any(k.endswith(".whl") for k in sdists.store.list(f"wheels/{dist.sha256}/")):
        return None
    try:
        compiles: bool | None = has_native_sources(sdists.source(dist))
    except (SdistBuildError, OSError):
        compiles = None
    newest = provider.newest_wheel(candidate.name)
    return SourceBuild(
        name=candidate.name,
        version=str(candidate.version),
        filename=dist.filename,
        compiles=compiles,
        newest_wheel=str(newest) if newest is not None else None,
    )


def _reporter(target: PythonTarget) -> Any:
    """A resolvelib reporter that tells ``-v`` what the resolver decides, and why."""
    from resolvelib import BaseReporter  # noqa: PLC0415

    prefix = f"{target.platform}: "

    class Reasons(BaseReporter):  # type: ignore[type-arg]
        def pinning(self, candidate: Candidate) -> None:
            log.info("%schose %s", prefix, candidate)

        def rejecting_candidate(self, criterion: Any, candidate: Candidate) -> None:
            needs = sorted({str(i.requirement) for i in criterion.information})[:4]
            log.info("%sreject %s: it conflicts with %s", prefix, candidate, ", ".join(needs))

        def resolving_conflicts(self, causes: Any) -> None:
            found = sorted({str(c.requirement) for c in causes})[:4]
            log.info("%sbacktrack over %s", prefix, ", ".join(found))

    return Reasons()


def _check_pins(provider: PypiProvider, roots: list[Req], target: PythonTarget) -> None:
    """A pinned version with no file for the target is reported at once, before any metadata
    is read (an old pin with no cp311 wheel must not wait for other projects' sdists)."""
    for req in roots:
        if req.extras or req.url or req.name in provider.fixed or not pinned(req.specifier):
            continue
        fitting = provider.best_files(req.name)
        if any(req.specifier.contains(v, prereleases=True) for v in fitting):
            continue
        files = provider.page(req.name).result()
        wanted = [f for f in files if req.specifier.contains(f.version, prereleases=True)]
        if not wanted or provider.hashes.get(req.name):
            text = _why_no_candidates(provider, req.name, target)
        else:
            tags = sorted(
                {
                    f"{t.interpreter}-{t.platform}"
                    for f in wanted
                    if f.is_wheel
                    for t in parse_wheel_filename(f.filename)[3]
                }
            )
            text = (
                f"{req.name} {wanted[0].version} has no file for {target.platform} with "
                f"CPython {target.python}"
                + (f" (its wheels are for: {', '.join(tags[:6])})" if tags else "")
                + _macos_needed([f for f in wanted if f.is_wheel], target)
            )
            if fitting:
                newest = sorted(fitting, reverse=True)[:5]
                text += f"; versions for this target: {', '.join(map(str, newest))}"
        raise PypiConflictError(
            f"{target.platform}: cannot resolve PyPI packages: {req}: {text}",
            hint="pin a version that has a file for this target",
        )


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
