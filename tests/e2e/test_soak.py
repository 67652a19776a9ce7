"""Load: two hosts (separate caches) run many tasks over several specs against one S3 store
at once, with only the locks stored up front (the workers have a full envmgr and opt in to
building). Each env must be built once in all, downloaded once per host, and every task must
run in the env of its lock.

The full soak (50 tasks, 5 specs) is ``-m slow``; a short variant runs by default.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _helpers import fixture_options
from test_faults import _upstream

from envmgr.build.once import offer_lock
from envmgr.cache.s3 import S3Store
from envmgr.locks.lock import PlatformLock
from envmgr.resolve.resolution_cache import resolve_specs
from envmgr.specs.deps import CondaDep, PypiDep
from envmgr.specs.model import EnvSpec
from fixtures.tcp_proxy import FaultProxy

SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "numpy": (("numpy",), ()),
    "tabulate": (("tabulate",), ()),
    "six": ((), ("six",)),
    "colorama": ((), ("colorama",)),
    "both": (("numpy", "python-dateutil"), ("colorama",)),
}
MODULES = {"numpy": "numpy", "tabulate": "tabulate", "six": "six", "colorama": "colorama",
           "python-dateutil": "dateutil"}  # fmt: skip


def _locks(names, conda_channel, pypi_index, home: Path) -> dict[str, PlatformLock]:
    options = fixture_options(home / "resolve", conda_channel.url, pypi_index.url)
    specs = {
        name: EnvSpec(
            python="3.11.*",
            conda=tuple(CondaDep.parse(c) for c in SPECS[name][0]),
            pypi=tuple(PypiDep.parse(p) for p in SPECS[name][1]),
        )
        for name in names
    }
    return {r.steps[0]: r.lock for r in resolve_specs(specs, options)}


def _task(store_url: str, lock: PlatformLock, cache: Path, env: dict[str, str]) -> dict:
    """One task as a worker runs it: bootstrap the env, then import its packages."""
    boot = subprocess.run(
        [sys.executable, "-m", "envmgr.bootstrap", "--store", store_url, "--env-id",
         lock.env_id, "--cache-dir", str(cache), "--json", "--build-if-missing"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert boot.returncode == 0, boot.stderr
    started = json.loads(boot.stdout)
    wanted = {p.name: p.version for p in lock.packages if p.name in MODULES}
    versions = f"{{n: m.version(n) for n in {sorted(wanted)!r}}}"
    probe = (
        "import importlib.metadata as m, json, sys; "
        f"print(json.dumps({{'prefix': sys.prefix, 'versions': {versions}}}))"
    )
    ran = subprocess.run(
        [started["python"], "-c", probe], capture_output=True, text=True, env=env, check=False
    )
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout)
    return {**started, "seen": seen, "wanted": wanted}


def _soak(tasks: int, names: list[str], conda_channel, pypi_index, s3_server, bucket, tmp_path):
    locks = _locks(names, conda_channel, pypi_index, tmp_path)
    url = f"s3://{bucket}/soak"
    admin = S3Store(url, client=s3_server.client())
    for lock in locks.values():
        offer_lock(admin, lock)  # only the locks: the first task of each env builds it
    proxy = FaultProxy(_upstream(s3_server)).start()  # to count the workers' requests
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
        "ENVMGR_CACHE_DIR": str(tmp_path / "unused"),
    }
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    rng = random.Random(7)  # noqa: S311 - a reproducible task order, not a secret
    plan = [(hosts[i % 2], locks[rng.choice(names)]) for i in range(tasks)]
    for name in names:  # every spec on every host at least once
        plan += [(host, locks[name]) for host in hosts if (host, locks[name]) not in plan]
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda job: (job, _task(url, job[1], job[0], env)), plan))
    finally:
        proxy.stop()
    for (host, lock), result in results:
        assert result["seen"]["versions"] == result["wanted"], (host, lock.env_id)
        assert Path(result["seen"]["prefix"]) == host / "envs" / lock.env_id
    for host in hosts:
        for lock in locks.values():
            mine = [r for (h, task), r in results if h == host and task.env_id == lock.env_id]
            assert sum(r["downloaded"] for r in mine) == 1, (host.name, lock.env_id)
    keys = list(admin.list("envs/"))
    for lock in locks.values():
        manifests = [k for k in keys if k.endswith(f"{lock.env_id}/manifest.json")]
        assert len(manifests) == 1
    # Built once: one manifest PUT (the commit point of a build) per env, from all tasks.
    puts = [
        r
        for r in proxy.counters.requests
        if r.startswith("PUT ") and "/envs/" in r and "/manifest.json" in r
    ]
    assert sorted(p.split("/")[-2] for p in puts) == sorted(k.env_id for k in locks.values())
    assert not list(admin.list("leases/"))
    return results


def test_two_hosts_share_envs_short(conda_channel, pypi_index, s3_server, s3_bucket, tmp_path):
    _soak(12, ["six", "colorama"], conda_channel, pypi_index, s3_server, s3_bucket, tmp_path)


@pytest.mark.slow
def test_two_hosts_fifty_tasks_five_specs(
    conda_channel, pypi_index, s3_server, s3_bucket, tmp_path
):
    _soak(50, list(SPECS), conda_channel, pypi_index, s3_server, s3_bucket, tmp_path)
