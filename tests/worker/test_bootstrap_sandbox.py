"""Every mode of ``python -m envmgr.bootstrap`` on a worker that has exactly the shipped files:
an isolated interpreter (``-I``: no PYTHONPATH, no user site, no current directory) whose only
envmgr is the files :func:`envmgr.worker.shipped.worker_sources` lists, with boto3 and
zstandard and an S3 store. ``--name`` failed there once (``envmgr.names`` was not shipped)
while every test ran the bootstrap from the full install."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _helpers import bare_worker, s3_env, ship_bootstrap

from envmgr.build.once import BuildOptions, build_and_store, offer_lock
from envmgr.cache.names import set_alias
from envmgr.cache.s3 import S3Store
from envmgr.locks.lock import LockedPackage, PlatformLock

#: Runs the shipped bootstrap from the sandbox, nothing else on the path of envmgr.
_ENTRY = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
    "import envmgr; assert envmgr.__file__.startswith(sys.path[0]), envmgr.__file__; "
    "runpy.run_module('envmgr.bootstrap', run_name='__main__', alter_sys=True)"
)


@pytest.fixture(scope="module")
def pod(mixed_lock, s3_server, tmp_path_factory):
    """A store with the mixed env built and named, a lock-only env, and a worker pod."""
    root = tmp_path_factory.mktemp("pod")
    client = s3_server.client()
    client.create_bucket(Bucket="sandbox")
    store = S3Store("s3://sandbox/team", client=client)
    build_and_store(mixed_lock, BuildOptions(store=store, cache_dir=root / "laptop"))
    set_alias(store, "team/mixed:stable", {"linux-64": mixed_lock.env_id})
    lock_only = PlatformLock(
        platform="linux-64",
        packages=(
            *mixed_lock.packages,
            LockedPackage(manager="pypi", name="extra", version="1.0", sha256="1" * 64,
                          url="https://files.invalid/extra-1.0-py3-none-any.whl"),
        ),
    )  # fmt: skip
    offer_lock(store, lock_only)  # its lock is in the store, its archive is not
    sandbox = root / "sandbox"
    sandbox.mkdir()
    ship_bootstrap(sandbox)
    python, env = bare_worker(root, s3_env(s3_server))
    return {"python": python, "env": env, "sandbox": sandbox, "store": "s3://sandbox/team",
            "env_id": mixed_lock.env_id, "lock_only": lock_only.env_id,
            "cache": root / "worker-cache"}  # fmt: skip


def _bootstrap(pod, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(pod["python"]), "-I", "-c", _ENTRY, str(pod["sandbox"]),
         "--store", pod["store"], "--cache-dir", str(pod["cache"]), *args],
        capture_output=True, text=True, env=pod["env"], cwd=pod["sandbox"], check=False,
    )  # fmt: skip


def test_the_sandbox_holds_only_the_shipped_files(pod):
    sandbox = pod["sandbox"]
    shipped = sorted(p.relative_to(sandbox).as_posix() for p in sandbox.rglob("*.py"))
    assert "envmgr/cache/names.py" in shipped and "envmgr/worker/bootstrap.py" in shipped
    other_stages = ("build", "resolve", "specs", "locks", "cli")
    assert not [p for p in shipped if p.split("/")[1] in other_stages]


def test_every_mode_runs_on_the_shipped_files_alone(pod):
    first = _bootstrap(pod, "--env-id", pod["env_id"], "--json")
    assert first.returncode == 0, first.stderr
    cold = json.loads(first.stdout)
    assert cold["downloaded"] is True and Path(cold["python"]).is_file()
    layers = cold.pop("layers")  # format 3: what this cold start fetched, linked and copied
    assert layers["fetched"] == 8 and layers["linked"] > 4000 and layers["copied"] > 0

    by_name = _bootstrap(pod, "--name", "team/mixed:stable", "--json")
    assert by_name.returncode == 0, by_name.stderr
    assert json.loads(by_name.stdout) == {**cold, "downloaded": False}

    pairs = _bootstrap(pod, "--env-for", f"linux-64={pod['env_id']}",
                       "--env-for", f"linux-aarch64={'a' * 32}", "--shell")  # fmt: skip
    assert pairs.returncode == 0, pairs.stderr
    assert pairs.stdout.startswith(f"export ENVMGR_PREFIX={cold['prefix']} ")
    assert f"ENVMGR_ENV_ID={pod['env_id']}" in pairs.stdout

    ran = _bootstrap(pod, "--env-id", pod["env_id"], "--exec", "python", "-c",
                     "import sys, tabulate; print(sys.prefix)")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == cold["prefix"]

    plain = _bootstrap(pod, "--name", "team/mixed")  # the default tag is latest: not set
    assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1
    assert "team/mixed" in plain.stderr and "Traceback" not in plain.stderr


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("--name", ""), 2, "'' is not an env name (use lower-case letters"),
        (("--name", "Team/X"), 2, "'Team/X' is not an env name"),
        (("--name", "deadbeef12"), 2, "looks like an env id prefix"),
        (("--env-id", "../../etc"), 2, "is not an env id"),
        (("--env-for", "linux-64"), 2, "give PLATFORM=ENV_ID"),
        (("--env-for", f"osx-arm64={'b' * 32}"), 1, "this worker is linux-64"),
        (("--env-id", "c" * 32), 1, "no archive and no lock"),
    ],
)
def test_bad_arguments_are_one_line(pod, args, code, needle):
    out = _bootstrap(pod, *args)
    assert out.returncode == code, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_build_if_missing_without_the_builder_says_so_in_one_line(pod):
    out = _bootstrap(pod, "--env-id", pod["lock_only"], "--build-if-missing")
    assert out.returncode == 1
    assert f"env {pod['lock_only']} has no archive for linux-64" in out.stderr
    assert "this worker cannot build it (envmgr.build is not installed)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_an_empty_name_is_one_line_in_process_too(tmp_path, capsys):
    """--name '' printed a 10-line UnboundLocalError; then exit 1. A name that is no name is
    bad input: exit 2, the names module's rule in one line."""
    from envmgr import bootstrap

    code = bootstrap.main(["--name", "", "--store", str(tmp_path), "--cache-dir", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "envmgr: error: '' is not an env name (use lower-case letters, digits, '.', '_' or '-', "
        "optionally one '/' (team/name), then an optional :tag)"
    ]


def test_a_cold_start_imports_neither_boto3_nor_s3transfer(pod, tmp_path):
    """botocore alone reads a store: boto3's import pulls in s3transfer, 0.1 s of every cold
    task start that only uploads (builds) use."""
    # The bootstrap leaves through os._exit (no atexit): what was loaded is said on the way.
    entry = _ENTRY.replace(
        "runpy.run_module",
        "import os; leave = os._exit; os._exit = lambda code: (print('LOADED', sorted({m.split("
        "'.')[0] for m in sys.modules} & {'boto3', 's3transfer', 'botocore'}), file=sys.stderr,"
        " flush=True), leave(code)); runpy.run_module",
    )
    done = subprocess.run(
        [str(pod["python"]), "-I", "-c", entry, str(pod["sandbox"]), "--store", pod["store"],
         "--cache-dir", str(tmp_path / "cold"), "--env-id", pod["env_id"], "--json"],
        capture_output=True, text=True, env=pod["env"], cwd=pod["sandbox"], check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["downloaded"] is True
    assert "LOADED ['botocore']" in done.stderr, done.stderr
