"""Every user of an env holds its use lock: ``envmgr gc`` never removes an env while
``python -m envmgr.bootstrap --exec`` or ``envmgr run`` runs a command in it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from _helpers import run_bootstrap
from test_ids import A, _stored_env

from envmgr.cache.local import LocalStore
from envmgr.worker.env_cache import COMPLETE, env_dir, gc


def _wait_until_started(task: subprocess.Popen[str], marker: Path) -> None:
    """Until the task's command has written *marker* (it fails if the task ends first)."""
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert task.poll() is None, task.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_bootstrap_exec_holds_the_env_for_the_commands_lifetime(tmp_path):
    store = LocalStore(tmp_path / "store")
    _stored_env(store, tmp_path, A, "a\n")
    cache = tmp_path / "cache"
    started = tmp_path / "started"
    task = subprocess.Popen(
        [sys.executable, "-m", "envmgr.bootstrap", "--store", store.url, "--env-id", A,
         "--platform", "linux-64", "--cache-dir", str(cache), "--exec", "sh", "-c",
         f'echo "$ENVMGR_ENV_ID $CONDA_PREFIX" > {started}; sleep 3'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_until_started(task, started)
    assert started.read_text().split() == [A, str(env_dir(cache, A))]
    removed, busy, _layers = gc(cache, max_size=0)  # the task's env is in use: kept
    assert removed == [] and [e.env_id for e in busy] == [A]
    assert (env_dir(cache, A) / COMPLETE).is_file()
    task.communicate(timeout=60)
    assert task.returncode == 0
    removed, busy, _layers = gc(cache, max_size=0)  # done: now it goes
    assert [e.env_id for e in removed] == [A] and busy == []


def test_bootstrap_exec_passes_the_exit_code_and_finds_the_envs_programs(tmp_path):
    store = LocalStore(tmp_path / "store")
    _stored_env(store, tmp_path, A, "#!/bin/sh\necho env-program\n")
    (tmp_path / f"prefix-{A[:4]}" / "bin" / "which").chmod(0o755)
    args = ["--store", store.url, "--env-id", A, "--platform", "linux-64",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert run_bootstrap(*args, "--exec", "sh", "-c", "exit 7").returncode == 7
    missing = run_bootstrap(*args, "--exec", "no-such-program-xyz")
    assert missing.returncode == 127 and "cannot run 'no-such-program-xyz'" in missing.stderr
    usage = run_bootstrap(*args, "--exec")
    assert usage.returncode == 2


def test_envmgr_run_holds_the_use_lock_while_its_command_runs(tmp_path):
    store = LocalStore(tmp_path / "store")
    _stored_env(store, tmp_path, A, "a\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "ENVMGR_CACHE_DIR": str(cache), "ENVMGR_STORE": store.url}
    started = tmp_path / "started"
    task = subprocess.Popen(
        [sys.executable, "-c", "from envmgr.cli.app import main; main()", "run", A, "--",
         "sh", "-c", f"touch {started}; sleep 3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_until_started(task, started)
    removed, busy, _layers = gc(cache, max_size=0)
    assert removed == [] and [e.env_id for e in busy] == [A]
    task.communicate(timeout=60)
    assert task.returncode == 0
