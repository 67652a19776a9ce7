"""Source distributions: their metadata without building them, and their wheels, built once.

Metadata comes from the cheapest source that is allowed to answer (:meth:`Sdists.metadata`):

1. what an earlier resolution found, kept in the sdist cache (``<env cache dir>/pypi/sdist``)
   and in the store at ``wheels/<sdist sha256>/METADATA``;
2. a PEP 658/714 ``.metadata`` file, when the index advertises one for the sdist;
3. the metadata of a wheel of the same version, whatever its tags (uv's rule: all files of a
   version describe one release; markers, not files, say what differs by platform);
4. the sdist's own ``PKG-INFO``, when its Metadata-Version is 2.2 or newer and none of the
   fields a resolver needs (``Requires-Dist``, ``Requires-Python``, ``Provides-Extra``) is
   ``Dynamic`` (PEP 643);
5. the static ``[project]`` table of its ``pyproject.toml`` (PEP 621), when it names this
   project and lists none of ``dependencies``, ``optional-dependencies``, ``requires-python``
   as ``dynamic`` (uv's rule: a backend must not change what the table declares);
6. the build backend's PEP 517 ``prepare_metadata_for_build_wheel`` hook in an isolated build
   environment (pip's, through ``pip install --dry-run --report``): it runs ``setup.py egg_info``
   or its equivalent, never a compiler.

Resolution never builds a wheel for the host target. A wheel is built (``build_wheel``) only when
an env is built, once per sdist, and kept at ``wheels/<sdist sha256>/<wheel file>`` so every
builder of every env installs the very same wheel. For another target (another platform or
Python), an sdist is usable only if its project is pure Python: an sdist with compiled sources
is refused without building; otherwise one host build decides from the wheel's tags (cached).

All sdist work happens under ``<cache>/pypi/sdist`` (verified downloads, every build's
``TMPDIR``, pip's cache, the logs of failed builds), never in loose temporary directories.
"""

from __future__ import annotations

import email.message
import email.parser
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from packaging.utils import parse_wheel_filename

from envmgr.cache.store import get_record
from envmgr.fs import write_atomic
from envmgr.locks.lock import strip_credentials, strip_credentials_in
from envmgr.resolve.pypi.pep517 import (
    BuildSystem,
    Hook,
    build_system,
    hook_command,
    unpack_sdist,
)
from envmgr.resolve.pypi.pip_config import expand
from envmgr.resolve.pypi.sdist_files import (
    SdistBuildError,
    has_native_sources,
    pkg_info,
    pyproject_metadata,
    static_enough,
)
from envmgr.resolve.pypi.wheel_metadata import wheel_metadata

if TYPE_CHECKING:
    from envmgr.cache.store import Store
    from envmgr.resolve.pypi.index import IndexClient
    from envmgr.resolve.pypi.pages import DistFile

__all__ = [
    "MetadataSource",
    "SdistBuildError",
    "Sdists",
    "host_python_xy",
    "stored_wheel",
    "wheel_is_pure",
]

log = logging.getLogger("envmgr.sdist")

MetadataSource = Literal["cache", "store", "pep658", "wheel", "pkg-info", "pyproject", "pep517"]

#: Lines of a build log that explain a failure, and pip's own framing around them.
_EXPLAINS = re.compile(
    r"error|fatal|no such file|not found|cannot find|could not|undefined reference|"
    r"modulenotfounderror|importerror|exception|permission denied",
    re.IGNORECASE,
)
_FRAMING = (
    "this error originates from a subprocess",
    "note:",
    "hint:",
    "[end of output]",
    "see above for",
    "failed to build",
    "failed building wheel",
    "could not build wheels",
    "subprocess-exited-with-error",
    "exit code:",
    "error: metadata-generation-failed",
    "encountered error while generating package metadata",
    "building wheel for",
    "running command",
)


def host_python_xy() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def stored_wheel(store: Store, sdist_sha256: str, dest: Path) -> Path | None:
    """The wheel built from the sdist with *sdist_sha256*, fetched from the store into *dest*."""
    for key in store.list(f"wheels/{sdist_sha256}/"):
        if key.endswith(".whl"):
            target = dest / key.rsplit("/", 1)[-1]
            if target.is_file() or store.get_file(key, target):
                return target
    return None


def wheel_is_pure(wheel: Path) -> bool:
    """Whether *wheel* installs on every platform and Python 3 (its tags are ``none-any``)."""
    tags = parse_wheel_filename(wheel.name)[3]
    return all(t.abi == "none" and t.platform == "any" for t in tags)


def _explaining_lines(text: str, limit: int = 3) -> list[str]:
    """The lines of a build log a user needs to see: the last distinct error-like lines, else
    the last lines, without pip's framing."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("\u2502\u2570\u2500>\u00d7").strip()  # pip's box drawing
        if line and not any(f in line.lower() for f in _FRAMING):
            lines.append(line)
    picked = [line for line in lines if _EXPLAINS.search(line)] or lines
    out: list[str] = []
    for line in reversed(picked):
        if line not in out:
            out.append(line[:240])
        if len(out) == limit:
            break
    return list(reversed(out))


def _safe_index(url: str) -> str:
    """*url* as it may be written down: ``${VAR}`` references kept, literal passwords dropped."""
    parts = urlsplit(url)
    if parts.password and not parts.password.startswith("${"):
        return strip_credentials(url)
    return url


class Sdists:
    """Metadata and wheels of sdists for one resolution or build; thread-safe, one piece of
    work per sdist at a time.

    *client* reads ``.metadata`` files and downloads (with the index's credentials);
    *index_urls* are where isolated builds get their build dependencies.
    """

    def __init__(
        self,
        *,
        store: Store,
        cache_dir: Path,
        client: IndexClient,
        index_urls: tuple[str, ...],
        retry_failed: bool = False,
    ) -> None:
        self.store = store
        self.retry_failed = retry_failed
        self.client = client
        self.index_urls = tuple(index_urls)
        self.root = cache_dir / "sdist"
        self.sources: dict[str, MetadataSource] = {}  # sdist sha256 -> where its metadata came
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _one(self, sha256: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sha256, threading.Lock())

    # -- files -----------------------------------------------------------------------------------

    def source(self, dist: DistFile) -> Path:
        """The sdist file on this machine, downloaded once and checked against its sha256."""
        if urlsplit(dist.url).scheme == "file":
            path = Path(unquote(urlsplit(dist.url).path))
            if self.client.local_sha256(path)[0] != dist.sha256:
                raise SdistBuildError(f"{path} does not match its sha256")
            return path
        target = self.root / "src" / dist.sha256 / dist.filename
        if target.is_file():
            return target
        answer = self.client.fetch(dist.url)
        if hashlib.sha256(answer).hexdigest() != dist.sha256:
            raise SdistBuildError(
                f"{dist.filename} does not match its sha256 ({strip_credentials(dist.url)})",
                hint="the index serves a different file than it advertises",
            )
        write_atomic(target, answer)
        return target

    # -- metadata --------------------------------------------------------------------------------

    def metadata(self, dist: DistFile, sibling: DistFile | None = None) -> email.message.Message:
        """The core metadata of *dist* from the cheapest allowed source (see the module doc);
        *sibling* is a wheel of the same version, if the index has one."""
        with self._one(dist.sha256):
            data, source = self._metadata_bytes(dist, sibling)
        self.sources[dist.sha256] = source
        log.info("%s: metadata from %s", dist.filename, source)
        return email.parser.BytesParser().parsebytes(data)

    def _metadata_bytes(
        self, dist: DistFile, sibling: DistFile | None
    ) -> tuple[bytes, MetadataSource]:
        cached = self.root / "metadata" / f"{dist.sha256}.metadata"
        if cached.is_file():
            return cached.read_bytes(), "cache"
        key = f"wheels/{dist.sha256}/METADATA"
        stored = get_record(self.store, key)
        if stored is not None:
            write_atomic(cached, stored)
            return stored, "store"
        data: bytes | None = None
        source: MetadataSource = "pep658"
        if dist.metadata_sha256 is not None:
            data = self.client.metadata_file(dist)
        if data is None and sibling is not None:
            data, source = self.client.metadata(sibling).as_bytes(), "wheel"
        if data is None:
            path = self.source(dist)
            info = pkg_info(path)
            if info is not None and static_enough(email.parser.BytesParser().parsebytes(info)):
                data, source = info, "pkg-info"
            elif (table := pyproject_metadata(path, dist.project, dist.version)) is not None:
                data, source = table, "pyproject"
            else:
                data, source = self._prepare_remembered(dist, path), "pep517"
        write_atomic(cached, data)
        self.store.put(key, data)
        self._remember_indexes(dist)
        return data, source

    def _remember_indexes(self, dist: DistFile) -> None:
        """Where this sdist's build dependencies come from, for the builder of the env."""
        record = json.dumps({"index_urls": [_safe_index(u) for u in self.index_urls]})
        self.store.put(f"wheels/{dist.sha256}/build.json", record.encode())

    def _prepare_remembered(self, dist: DistFile, path: Path) -> bytes:
        """:meth:`_prepare_metadata`, whose failure is remembered for this sdist's sha256 (with
        its error) and raised again without running the backend, unless ``retry_failed``."""
        record = self.root / "failed" / f"{dist.sha256}.json"
        if not self.retry_failed and record.is_file():
            try:
                known = json.loads(record.read_bytes())
                message, lines, log_path = known["message"], known["lines"], known["log"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
            else:
                raise SdistBuildError(
                    f"{message} [remembered from {known.get('when', 'an earlier resolve')}]",
                    hint="fix the cause, then resolve with --force to prepare it again",
                    lines=[str(line) for line in lines],
                    log=Path(log_path) if log_path else None,
                )
        try:
            data = self._prepare_metadata(dist, path)
        except SdistBuildError as exc:
            known = {
                "message": exc.message,
                "lines": list(exc.lines),
                "log": str(exc.log) if exc.log else None,
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            write_atomic(record, json.dumps(known).encode())
            raise
        record.unlink(missing_ok=True)
        return data

    def _prepare_metadata(self, dist: DistFile, path: Path) -> bytes:
        """The backend's ``prepare_metadata_for_build_wheel`` (a backend without that hook
        builds the wheel, which is then kept as the sdist's wheel)."""
        work = self._workdir(dist)
        try:
            out = self._hook(dist, path, work, "prepare_metadata_for_build_wheel", "preparing")
            if "metadata" in out:
                found = work / "out" / str(out["metadata"]) / "METADATA"
                try:
                    return found.read_bytes()
                except OSError:
                    raise SdistBuildError(
                        f"{dist.filename}: the build backend wrote no METADATA"
                    ) from None
            wheel = self._keep_wheel(dist, work / "out" / str(out["wheel"]))

            with zipfile.ZipFile(wheel) as archive:
                data = wheel_metadata(archive)
            if data is None:
                raise SdistBuildError(f"{dist.filename}: the built wheel has no METADATA")
            return data
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # -- wheels ----------------------------------------------------------------------------------

    def wheel_for(self, dist: DistFile) -> Path:
        """The wheel of *dist*: the sdist cache, else the store, else built here (once)."""
        with self._one(dist.sha256):
            local = self.root / "built" / dist.sha256
            found = sorted(local.glob("*.whl")) if local.is_dir() else []
            if found:
                return found[0]
            local.mkdir(parents=True, exist_ok=True)
            stored = stored_wheel(self.store, dist.sha256, local)
            if stored is not None:
                return stored
            return self._build(dist)

    def is_pure(self, dist: DistFile) -> bool:
        """Whether *dist* builds a wheel for every platform: compiled sources say no at once;
        otherwise a host build decides (and its wheel is kept for the env's build)."""
        key = f"wheels/{dist.sha256}/"
        for stored in self.store.list(key):
            if stored.endswith(".whl"):
                return wheel_is_pure(Path(stored.rsplit("/", 1)[-1]))
        if has_native_sources(self.source(dist)):
            return False
        return wheel_is_pure(self.wheel_for(dist))

    def _build(self, dist: DistFile) -> Path:
        work = self._workdir(dist)
        try:
            out = self._hook(dist, self.source(dist), work, "build_wheel", "building a wheel from")
            return self._keep_wheel(dist, work / "out" / str(out["wheel"]))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _keep_wheel(self, dist: DistFile, built: Path) -> Path:
        """*built* (a wheel of *dist*) moved into the sdist cache and put in the store."""
        if not built.name.endswith(".whl") or not built.is_file():
            raise SdistBuildError(f"building {dist.filename} produced no wheel")
        local = self.root / "built" / dist.sha256
        local.mkdir(parents=True, exist_ok=True)
        target = local / built.name
        built.replace(target)
        self.store.put_file(f"wheels/{dist.sha256}/{target.name}", target)
        return target

    # -- PEP 517 ---------------------------------------------------------------------------------

    def _hook(
        self, dist: DistFile, archive: Path, work: Path, hook: Hook, what: str
    ) -> dict[str, Any]:
        """Unpack *archive* under *work* and run *hook* of its backend in its isolated build
        environment (plus what ``get_requires_for_build_wheel`` adds); the hook's answer."""
        try:
            source = unpack_sdist(archive, work / "src")
            system = build_system(source)
        except (ValueError, OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
            raise SdistBuildError(f"{what} {dist.filename} failed: {exc}") from None
        envs = [self._build_env(dist, system.requires, work)]
        (work / "out").mkdir()
        answer = self._call(dist, hook, system, source, envs, work, what, requires_done=False)
        if "metadata" in answer or "wheel" in answer:
            return answer
        envs.insert(0, self._build_env(dist, tuple(answer["requires"]), work))
        return self._call(dist, hook, system, source, envs, work, what, requires_done=True)

    def _call(
        self,
        dist: DistFile,
        hook: Hook,
        system: BuildSystem,
        source: Path,
        envs: list[Path],
        work: Path,
        what: str,
        *,
        requires_done: bool,
    ) -> dict[str, Any]:
        result = work / f"{hook}.json"
        cmd = hook_command(
            hook=hook,
            system=system,
            source=source,
            env_dirs=envs,
            out=work / "out",
            result=result,
            requires_done=requires_done,
        )
        self._run(dist, cmd, work, what=what, cwd=source)
        try:
            answer: dict[str, Any] = json.loads(result.read_text())
        except (OSError, ValueError):
            raise SdistBuildError(
                f"{what} {dist.filename}: the build backend gave no answer"
            ) from None
        return answer

    def _build_env(self, dist: DistFile, requires: tuple[str, ...], work: Path) -> Path:
        """A directory holding *requires* (for this Python), installed once and shared by
        every sdist that needs the same build requirements."""
        system = BuildSystem(requires=requires, backend="")
        final = self.root / "buildenv" / system.env_key
        with self._one(f"env:{system.env_key}"):
            if (final / ".complete").is_file():
                return final
            staging = work / f"env-{system.env_key}"
            if requires:
                self._pip(
                    dist,
                    ["install", "--target", str(staging), "--no-compile", *requires],
                    work,
                    what="installing the build requirements of",
                )
            staging.mkdir(parents=True, exist_ok=True)
            (staging / ".complete").write_text("\n".join(requires) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.replace(final)
            return final

    # -- running pip -----------------------------------------------------------------------------

    def _workdir(self, dist: DistFile) -> Path:
        work = self.root / "tmp" / f"{dist.sha256[:16]}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return work

    def _pip(self, dist: DistFile, args: list[str], work: Path, *, what: str) -> None:
        """Run pip for *dist* with only these indexes (not pip.conf's)."""

        cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]
        if self.index_urls:
            cmd += ["--index-url", expand(self.index_urls[0])]
            for extra in self.index_urls[1:]:
                cmd += ["--extra-index-url", expand(extra)]
        self._run(dist, cmd, work, what=what, cwd=work)

    def _run(self, dist: DistFile, cmd: list[str], work: Path, *, what: str, cwd: Path) -> None:
        """Run *cmd* for *dist* with temp files and pip's cache under envmgr's cache; a
        failure keeps the whole log and names the lines that explain it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
        tmp = work / "tmp"
        tmp.mkdir(exist_ok=True)
        env.update(
            PIP_CONFIG_FILE=os.devnull,
            PIP_CACHE_DIR=str(self.root / "pip-cache"),
            TMPDIR=str(tmp),
            PYTHONDONTWRITEBYTECODE="1",
        )
        start = time.monotonic()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=cwd)
        log.debug("%s %s: %.1f s", what, dist.filename, time.monotonic() - start)
        if result.returncode == 0:
            return
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{dist.filename}.{time.strftime('%Y%m%dT%H%M%S')}.log"
        text = strip_credentials_in(result.stdout + "\n" + result.stderr)
        shown = " ".join(strip_credentials(c) for c in cmd[:4] if "\n" not in c)
        log_path.write_text(f"$ {shown} ...\n{text}")
        explaining = _explaining_lines(text)
        cause = " | ".join(explaining) or f"exit code {result.returncode}"
        raise SdistBuildError(
            f"{what} {dist.filename} failed: {cause} (whole log: {log_path})",
            hint="install what the log says is missing, or pin a version that has a wheel",
            lines=explaining,
            log=log_path,
        )
