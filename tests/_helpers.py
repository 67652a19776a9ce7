"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

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
