"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from envmgr.archive import Manifest
from envmgr.cache.local import LocalStore
from envmgr.resolution import ResolveOptions

ROOT = Path(__file__).resolve().parent.parent


def run_envmgr(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The ``envmgr`` command as users run it, in a child process."""
    return subprocess.run(
        [sys.executable, "-c", "from envmgr.cli.app import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=dict(env) if env is not None else dict(os.environ),
        check=False,
    )


def fixture_options(
    home: Path, channel_url: str, index_url: str | None = None, **overrides: Any
) -> ResolveOptions:
    """Resolve options for the fixture channel (and index): store and cache under *home*,
    linux-64, no host environment; *overrides* replace any field."""
    fields: dict[str, Any] = {
        "store": LocalStore(home / "store"),
        "cache_dir": home / "cache",
        "platforms": ("linux-64",),
        "default_channels": (channel_url,),
        "env": {},
    }
    if index_url is not None:
        fields["index_url"] = index_url
    return ResolveOptions(**{**fields, **overrides})


def archive_manifest(
    packed: bytes, codec: Literal["zst", "gz"] = "zst", files: int = 1, unpacked_size: int = 10_000
) -> Manifest:
    """A manifest for a hand-made archive *packed*, for feeding the extractor directly
    (the hash is not checked there)."""
    return Manifest(
        env_id="e" * 32,
        platform="linux-64",
        build_prefix="/b" * 80,
        codec=codec,
        size=len(packed),
        sha256="0" * 64,
        files=files,
        unpacked_size=unpacked_size,
        relocations=(),
    )
