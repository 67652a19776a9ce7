"""Wheels built from source distributions, once, and kept in the store under ``wheels/``.

When no wheel of a needed version fits, and the target is this host's platform with this
host's Python version, the sdist is downloaded (its sha256 checked) and built with
``pip wheel`` (a PEP 517 build in an isolated environment whose build dependencies come from
the same indexes). The wheel is kept in the local cache and in the store at
``wheels/<sdist sha256>/<wheel file>``, so the resolver reads its metadata and every builder of
the env installs the very same wheel. The lock records the sdist's URL and sha256.
"""

from __future__ import annotations

import email.message
import email.parser
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from envmgr.errors import EnvmgrError
from envmgr.lock import strip_credentials

if TYPE_CHECKING:
    from envmgr.cache.store import Store
    from envmgr.resolvers.pypi.index import DistFile

__all__ = ["SdistBuildError", "SdistBuilder", "host_python_xy", "stored_wheel"]


class SdistBuildError(EnvmgrError):
    """A source distribution could not be built into a wheel; names it and why."""


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


class SdistBuilder:
    """Builds (or finds) the wheel of an sdist; thread-safe, one build per sdist."""

    def __init__(self, *, store: Store, cache_dir: Path, index_urls: tuple[str, ...]) -> None:
        self.store = store
        self.cache_dir = cache_dir / "built"
        self.index_urls = index_urls
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def wheel_for(self, dist: DistFile) -> Path:
        """The wheel of *dist* (an sdist): local cache, else the store, else built here."""
        with self._guard:
            lock = self._locks.setdefault(dist.sha256, threading.Lock())
        with lock:
            local = self.cache_dir / dist.sha256
            local.mkdir(parents=True, exist_ok=True)
            found = sorted(local.glob("*.whl"))
            if found:
                return found[0]
            stored = stored_wheel(self.store, dist.sha256, local)
            if stored is not None:
                return stored
            wheel = self._build(dist, local)
            self.store.put_file(f"wheels/{dist.sha256}/{wheel.name}", wheel)
            return wheel

    def metadata(self, dist: DistFile) -> email.message.Message:
        wheel = self.wheel_for(dist)
        from envmgr.resolvers.pypi.index import wheel_metadata  # noqa: PLC0415

        with zipfile.ZipFile(wheel) as archive:
            data = wheel_metadata(archive)
        if data is None:
            raise SdistBuildError(f"{dist.filename}: the built wheel has no METADATA")
        return email.parser.BytesParser().parsebytes(data)

    def _build(self, dist: DistFile, out: Path) -> Path:
        import requests  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="envmgr-sdist-") as tmp:
            source = Path(tmp) / dist.filename
            try:
                answer = requests.get(dist.url, timeout=120)
            except requests.RequestException as exc:
                raise SdistBuildError(
                    f"download {strip_credentials(dist.url)}: {type(exc).__name__}"
                ) from None
            if answer.status_code != 200:
                raise SdistBuildError(
                    f"download {strip_credentials(dist.url)}: HTTP {answer.status_code}"
                )
            if hashlib.sha256(answer.content).hexdigest() != dist.sha256:
                raise SdistBuildError(f"{dist.filename} does not match its sha256")
            source.write_bytes(answer.content)
            built = Path(tmp) / "wheel"
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "--wheel-dir",
                str(built),
                str(source),
            ]
            from envmgr.resolvers.pypi.index import expand  # noqa: PLC0415

            if self.index_urls:
                cmd += ["--index-url", expand(self.index_urls[0])]
                for extra in self.index_urls[1:]:
                    cmd += ["--extra-index-url", expand(extra)]
            # Only the indexes of the spec: not find-links or extra indexes from pip.conf.
            env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
            env["PIP_CONFIG_FILE"] = os.devnull
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if result.returncode != 0:
                tail = " ".join(result.stderr.strip().splitlines()[-3:])[:400]
                raise SdistBuildError(
                    f"building a wheel from {dist.filename} failed: {strip_credentials(tail)}"
                )
            wheels = sorted(built.glob("*.whl"))
            if not wheels:
                raise SdistBuildError(f"building {dist.filename} produced no wheel")
            target = out / wheels[0].name
            wheels[0].replace(target)
            return target
