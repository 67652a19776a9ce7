"""A resolvelib provider over an :class:`IndexClient`, for a :class:`PythonTarget`.

Candidates are versions with a wheel the target accepts (best tag first), that satisfy the
target's Python through ``requires-python``; yanked files only when pinned with ``==``/``===``;
pre-releases only when a specifier asks for one (or when nothing else exists, as in pip).
Markers are evaluated for the target's environment. Extras are separate identifiers
(``name[extra]``) that depend on their base at the same version, as in pip.

Versions come newest first, a wheel standing for its version where one fits and its sdist
where none does (pip's and uv's answer: a newer sdist-only release beats an older wheel).
An sdist's metadata is read without building it (:mod:`envmgr.resolve.pypi.sdist`); for a
target other than this host's platform and Python, an sdist must be pure Python.
``Requires-Python`` found only in an sdist's metadata becomes a requirement on the
pseudo-project ``<python>``, whose one candidate is the target's Python (as pip does).

*Fixed* distributions (installed by conda in a mixed env) have exactly one candidate, their
conda version, with no dependencies to follow: the PyPI layer never replaces them.
"""

from __future__ import annotations

import contextlib
import email.message
import functools
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import parse_tag
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version
from resolvelib import AbstractProvider

from envmgr.locks.python_target import PythonTarget
from envmgr.resolve.pypi.candidates import (
    PYTHON,
    Candidate,
    NativeSdistError,
    Req,
    pinned,
    python_allows,
    version_of,
)
from envmgr.resolve.pypi.index import IndexClient
from envmgr.resolve.pypi.pages import DistFile
from envmgr.resolve.pypi.sdist import Sdists

__all__ = ["PypiProvider"]

#: Candidates whose metadata is fetched ahead while the resolver walks down a project's list.
_AHEAD = 10


class PypiProvider(AbstractProvider):  # type: ignore[type-arg]
    """The provider resolvelib asks; see the module docstring for the rules."""

    def __init__(
        self,
        client: IndexClient,
        target: PythonTarget,
        *,
        fixed: Mapping[str, Version] | None = None,
        constraints: Mapping[str, SpecifierSet] | None = None,
        user_requested: Iterable[str] = (),
        prefetch_workers: int = 16,
        sdists: Sdists | None = None,
        native_sdists: bool = False,
    ) -> None:
        self.client = client
        self.target = target
        self.fixed = dict(fixed or {})
        self.constraints = dict(constraints or {})
        self.user_requested: dict[str, int] = {
            canonicalize_name(n): i for i, n in enumerate(user_requested)
        }
        self.hashes: dict[str, set[str]] = {}  # name -> allowed sha256 (requirements' --hash)
        self.sdists: Sdists | None = sdists
        self.native_sdists = native_sdists  # the target is this host: sdists may compile
        self.required_by: dict[str, str] = {}
        self.markers = target.markers()
        self.python = Version(target.python)
        self.rank = target.tag_rank()
        self.pool = ThreadPoolExecutor(
            max_workers=prefetch_workers, thread_name_prefix="envmgr-pypi"
        )
        self._pages: dict[str, Future[list[DistFile]]] = {}
        self._prefetch_lock = threading.RLock()
        self._closed = False
        self._best: dict[str, dict[Version, DistFile]] = {}
        self._match_cache: dict[tuple[str, str], frozenset[Version]] = {}
        self._order: dict[str, list[Version]] = {}
        self._candidates: dict[tuple[str, Version, frozenset[str]], Candidate] = {}
        self._meta: dict[str, Future[email.message.Message]] = {}
        self._direct: dict[str, Future[DistFile]] = {}
        self._found: dict[str, list[Candidate]] = {}  # identifier -> find_matches' last answer

    def close(self) -> None:
        self._closed = True
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- prefetching ---------------------------------------------------------------------------

    def page(self, name: str) -> Future[list[DistFile]]:
        """The project page, fetched in the pool; on arrival the newest fitting wheel's
        metadata is fetched too, and on *its* arrival the pages of its dependencies: the
        prefetcher walks the likely dependency tree ahead of the resolver, in parallel."""
        with self._prefetch_lock:
            future = self._pages.get(name)
            if future is None:
                future = self.pool.submit(self.client.project_files, name)
                self._pages[name] = future
                future.add_done_callback(functools.partial(self._ahead_of_page, name))
        return future

    def metadata(self, dist: DistFile) -> Future[email.message.Message]:
        with self._prefetch_lock:
            future = self._meta.get(dist.sha256)
            if future is None:
                if dist.is_wheel or self.sdists is None:
                    future = self.pool.submit(self.client.metadata, dist)
                else:
                    future = self.pool.submit(self.sdists.metadata, dist, self._sibling(dist))
                self._meta[dist.sha256] = future
                future.add_done_callback(self._ahead_of_metadata)
        return future

    def _sibling(self, sdist: DistFile) -> DistFile | None:
        """A wheel of the same version as *sdist*, for any target (see the sdist module)."""
        future = self._pages.get(sdist.project)
        files = future.result() if future is not None else []
        version = version_of(sdist.version)
        wheels = [f for f in files if f.is_wheel and version_of(f.version) == version]
        return min(wheels, key=self._sibling_rank, default=None)

    def _sibling_rank(self, wheel: DistFile) -> tuple[int, int, bool]:
        """Which wheel of a version stands best for its sdist: a Python 3 one of the newest
        Python (old setup.py files chose dependencies by Python version), then one for the
        target's operating system, then one with a PEP 658 metadata file."""
        tags = parse_wheel_filename(wheel.filename)[3]
        best = 0
        for tag in tags:
            digits = tag.interpreter[2:]
            if tag.interpreter[:2] in ("cp", "py") and digits.startswith("3"):
                best = max(best, 1000 + int(digits[1:] or 0) if digits[1:].isdigit() else 1000)
        system = {"linux": "linux", "osx": "macosx", "win": "win"}[
            self.target.platform.split("-")[0]
        ]
        same_os = any(system in t.platform or t.platform == "any" for t in tags)
        return (-best, 0 if same_os else 1, wheel.metadata_sha256 is None)

    def _ahead_of_page(self, name: str, future: Future[list[DistFile]]) -> None:
        if future.cancelled() or future.exception() is not None or self._closed:
            return
        files = self.best_files(name)
        finals = [v for v in files if not v.is_prerelease] or list(files)
        if finals and name not in self.fixed and files[max(finals)].is_wheel:
            with contextlib.suppress(RuntimeError):  # the pool closed meanwhile
                self.metadata(files[max(finals)])

    def _ahead_of_metadata(self, future: Future[email.message.Message]) -> None:
        if future.cancelled() or future.exception() is not None or self._closed:
            return
        for line in future.result().get_all("Requires-Dist") or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({**self.markers, "extra": ""}):
                with contextlib.suppress(RuntimeError):  # the pool closed meanwhile
                    self.page(canonicalize_name(req.name))

    # -- requirements ----------------------------------------------------------------------------

    def make_requirement(self, text: str, extras_env: Iterable[str] = ("",)) -> list[Req]:
        """Requirements (base and one per extra) from a PEP 508 line, if its marker applies."""
        req = Requirement(text)
        if req.marker is not None and not any(
            req.marker.evaluate({**self.markers, "extra": e}) for e in extras_env
        ):
            return []
        name = canonicalize_name(req.name)
        extras = frozenset(canonicalize_name(e) for e in req.extras)
        out = [Req(name=name, specifier=req.specifier, url=req.url, text=str(req))]
        out += [
            Req(
                name=f"{name}[{e}]",
                specifier=req.specifier,
                extras=frozenset({e}),
                url=req.url,
                text=str(req),
            )
            for e in sorted(extras)
        ]
        self.page(name)
        return out

    # -- the resolvelib interface ----------------------------------------------------------------

    def identify(self, requirement_or_candidate: Req | Candidate) -> str:
        return requirement_or_candidate.identifier

    def get_preference(
        self,
        identifier: str,
        resolutions: Mapping[str, Candidate],
        candidates: Mapping[str, Iterator[Candidate]],
        information: Mapping[str, Iterator[Any]],
        backtrack_causes: Sequence[Any],
    ) -> Any:
        infos = list(information[identifier])
        base = identifier.split("[")[0]
        is_pinned = any(pinned(i.requirement.specifier) for i in infos)
        direct = any(i.parent is None for i in infos)
        causes = {c.requirement.name for c in backtrack_causes} | {
            c.parent.name for c in backtrack_causes if c.parent is not None
        }
        return (
            base not in self.fixed,
            base not in causes,
            not is_pinned,
            not direct,
            self.user_requested.get(base, len(self.user_requested)),
            identifier,
        )

    def find_matches(
        self,
        identifier: str,
        requirements: Mapping[str, Iterator[Req]],
        incompatibilities: Mapping[str, Iterator[Candidate]],
    ) -> list[Candidate]:
        reqs = list(requirements[identifier])
        bad = {c.version for c in incompatibilities[identifier]}
        name = identifier.split("[")[0]
        extras = frozenset().union(*(r.extras for r in reqs)) if reqs else frozenset()
        specifier = SpecifierSet()
        for req in reqs:
            specifier &= req.specifier
        if name in self.constraints:
            specifier &= self.constraints[name]
        if name == PYTHON:
            if bad or not specifier.contains(self.python, prereleases=True):
                return []
            return [Candidate(name=PYTHON, version=self.python, fixed=True)]
        if name in self.fixed:
            version = self.fixed[name]
            if version in bad or not specifier.contains(version, prereleases=True):
                return []
            return [Candidate(name=name, version=version, extras=extras, fixed=True)]
        urls = {r.url.split("#")[0] for r in reqs if r.url}
        if urls:
            return self._direct_matches(name, urls, specifier, extras, bad)
        by_version = self.best_files(name)
        allow_yanked = any(pinned(r.specifier) for r in reqs)
        explicit_pre = any(s.prereleases for s in (r.specifier for r in reqs))
        # Backtracking asks the same questions thousands of times: each specifier's matching
        # versions are computed once per project, then intersected.
        allowed: frozenset[Version] | None = None
        for spec in [r.specifier for r in reqs] + [self.constraints.get(name, SpecifierSet())]:
            if not str(spec):
                continue
            matching = self._matching(name, spec)
            allowed = matching if allowed is None else allowed & matching
        found: list[Candidate] = []
        for version in self._newest_first(name):
            dist = by_version[version]
            if version in bad or (allowed is not None and version not in allowed):
                continue
            if dist.yanked is not None and not allow_yanked:
                continue
            found.append(self._candidate(name, version, extras, dist))
        finals = [c for c in found if not c.version.is_prerelease]
        if not explicit_pre and finals:
            found = finals
        self._found[identifier] = found
        # The resolver asks about the first candidate next; when it is backtracking it will
        # likely walk down the list, so fetch a few more ahead (and see get_dependencies).
        for candidate in found[: _AHEAD if bad else 1]:
            # Asked for next: fetch (or, for an sdist, prepare) its metadata in the pool.
            if candidate.dist is not None and (candidate.dist.is_wheel or not bad):
                self.metadata(candidate.dist)
        return found

    def _walking_down(self, candidate: Candidate) -> None:
        """When the resolver asks about a candidate below the first of its list, it is walking
        down that list (resolvelib tries each in turn after a conflict, without asking for
        matches again): fetch the metadata of the next few wheels ahead, in parallel, instead
        of one at a time (sentence-transformers beside transformers==4.30.1 walks down 40
        versions)."""
        found = self._found.get(candidate.identifier, [])
        try:
            at = found.index(candidate)
        except ValueError:
            return
        if at == 0 or candidate.dist is None:
            return
        self.metadata(candidate.dist)  # asked for now: first in the pool's queue
        for ahead in found[at + 1 : at + 1 + _AHEAD]:
            if ahead.dist is not None and ahead.dist.is_wheel:
                with contextlib.suppress(RuntimeError):  # the pool closed meanwhile
                    self.metadata(ahead.dist)

    def _direct_matches(
        self,
        name: str,
        urls: set[str],
        specifier: SpecifierSet,
        extras: frozenset[str],
        bad: set[Version],
    ) -> list[Candidate]:
        """The one candidate of a direct URL requirement (``name @ URL``): that very file,
        if it is *name*'s, fits the target and meets the other requirements on *name*."""
        if len(urls) > 1:
            return []
        url = next(iter(urls))
        with self._prefetch_lock:
            future = self._direct.get(url)
            if future is None:
                future = self.pool.submit(self.client.direct_file, url, name)
                self._direct[url] = future
        dist = future.result()
        version = version_of(dist.version)
        fits = not dist.is_wheel or self._tag_rank(
            "-".join(dist.filename[:-4].split("-")[-3:])
        ) < len(self.rank)
        if dist.project != name or version is None or version in bad or not fits:
            return []
        if not specifier.contains(version, prereleases=True):
            return []
        return [Candidate(name=name, version=version, extras=extras, dist=dist)]

    def _matching(self, name: str, specifier: SpecifierSet) -> frozenset[Version]:
        key = (name, str(specifier))
        found = self._match_cache.get(key)
        if found is None:
            found = frozenset(
                v for v in self.best_files(name) if specifier.contains(v, prereleases=True)
            )
            self._match_cache[key] = found
        return found

    def _newest_first(self, name: str) -> list[Version]:
        order = self._order.get(name)
        if order is None:
            order = sorted(self.best_files(name), reverse=True)
            self._order[name] = order
        return order

    def _candidate(
        self, name: str, version: Version, extras: frozenset[str], dist: DistFile
    ) -> Candidate:
        key = (name, version, extras)
        found = self._candidates.get(key)
        if found is None:
            found = Candidate(name=name, version=version, extras=extras, dist=dist)
            self._candidates[key] = found
        return found

    def best_files(self, name: str) -> dict[Version, DistFile]:
        """Per version, the wheel whose tag the target prefers most (that fits its Python)."""
        known = self._best.get(name)
        if known is not None:
            return known
        best: dict[Version, tuple[int, DistFile]] = {}
        allowed = self.hashes.get(name)
        for dist in self.page(name).result():
            if not dist.is_wheel or (allowed and dist.sha256 not in allowed):
                continue
            parts = dist.filename[:-4].split("-")
            rank = self._tag_rank("-".join(parts[-3:]))
            version = version_of(parts[1])
            if rank >= len(self.rank) or version is None or not self._python_ok(dist):
                continue
            if version not in best or rank < best[version][0]:
                best[version] = (rank, dist)
        if self.sdists is not None:
            # No wheel fits these versions: their sdists stand for them.
            for dist in self.page(name).result():
                version = version_of(dist.version)
                if dist.is_wheel or version is None or version in best:
                    continue
                if (allowed and dist.sha256 not in allowed) or not self._python_ok(dist):
                    continue
                best[version] = (len(self.rank), dist)
        found = {v: d for v, (_, d) in best.items()}
        self._best[name] = found
        return found

    @functools.cache  # noqa: B019 - one provider per resolution; tag strings repeat a lot
    def _tag_rank(self, tags: str) -> int:
        try:
            parsed = parse_tag(tags)
        except ValueError:
            return len(self.rank)
        return min((self.rank.get(t, len(self.rank)) for t in parsed), default=len(self.rank))

    def _python_ok(self, dist: DistFile) -> bool:
        return not dist.requires_python or python_allows(dist.requires_python, self.python)

    def is_satisfied_by(self, requirement: Req, candidate: Candidate) -> bool:
        if requirement.url and (
            candidate.dist is None
            or candidate.dist.url.split("#")[0] != requirement.url.split("#")[0]
        ):
            return candidate.fixed
        return requirement.specifier.contains(candidate.version, prereleases=True)

    def newest_wheel(self, name: str) -> Version | None:
        """The newest version of *name* with a wheel the target accepts."""
        return max((v for v, d in self.best_files(name).items() if d.is_wheel), default=None)

    def _check_sdist(self, candidate: Candidate) -> None:
        """An sdist for another target must be pure Python (see the module docstring)."""
        dist = candidate.dist
        if dist is None or dist.is_wheel or self.native_sdists or self.sdists is None:
            return
        if not self.sdists.is_pure(dist):
            newest = self.newest_wheel(candidate.name)
            raise NativeSdistError(
                f"{candidate.name} {candidate.version} has only a source distribution with "
                f"compiled code, which must be compiled for {self.target.platform} with "
                f"CPython {self.target.python} (envmgr compiles only for this host); newest "
                f"version with a wheel for it: {newest or 'none'}",
                hint=f"pin {candidate.name}=={newest}" if newest else "lock on such a host",
            )

    def dependencies_of(self, candidate: Candidate) -> list[str]:
        """The applicable ``Requires-Dist`` lines of *candidate* (without extras' own)."""
        if candidate.fixed or candidate.dist is None:
            return []
        self._check_sdist(candidate)
        meta = self.metadata(candidate.dist).result()
        out = []
        for line in meta.get_all("Requires-Dist") or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({**self.markers, "extra": ""}):
                out.append(line)
        return out

    def get_dependencies(self, candidate: Candidate) -> list[Req]:
        if candidate.fixed:
            return []
        if candidate.extras:
            # name[extra] needs name at exactly this version, plus what the extra adds.
            deps = [
                Req(
                    name=candidate.name,
                    specifier=SpecifierSet(f"=={candidate.version}"),
                    text=f"{candidate.name}=={candidate.version}",
                )
            ]
            if candidate.dist is None:
                return deps
            meta = self.metadata(candidate.dist).result()
            for line in meta.get_all("Requires-Dist") or []:
                try:
                    req = Requirement(line)
                except InvalidRequirement:
                    continue
                if (
                    req.marker is not None
                    and any(
                        req.marker.evaluate({**self.markers, "extra": e}) for e in candidate.extras
                    )
                    and not req.marker.evaluate({**self.markers, "extra": ""})
                ):
                    deps += self.make_requirement(line, candidate.extras)
            return deps
        if candidate.dist is None:
            return []
        self._walking_down(candidate)
        deps = []
        for line in self.dependencies_of(candidate):
            deps += self.make_requirement(line)
        requires_python = self.metadata(candidate.dist).result().get("Requires-Python")
        if requires_python and not candidate.dist.requires_python:
            with contextlib.suppress(InvalidSpecifier):  # pip ignores a broken one too
                deps.append(
                    Req(
                        name=PYTHON,
                        specifier=SpecifierSet(requires_python),
                        text=f"Python {requires_python}",
                    )
                )
        for dep in deps:  # who first asked for each project, for conflict explanations
            self.required_by.setdefault(dep.name.split("[")[0], str(candidate))
        return deps

    def requires_python_of(self, candidate: Candidate) -> str | None:
        return candidate.dist.requires_python if candidate.dist else None
