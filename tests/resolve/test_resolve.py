"""envmgr resolve: conda specs into conda-lock files, for any platform, through the cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from _helpers import envmgr_here, fixture_options

from envmgr.cache.local import LocalStore
from envmgr.cache.store import RECORD_BYTES
from envmgr.locks.lock import (
    Lock,
    LockedPackage,
    PlatformLock,
    read_conda_lock,
    strip_credentials,
    write_conda_lock,
)
from envmgr.platforms import virtual_packages
from envmgr.resolve.resolution_cache import resolve_specs
from envmgr.specs.deps import CondaDep
from envmgr.specs.model import EnvSpec
from fixtures.conda_channel import copy_channel, index_channel
from fixtures.condapkg import PackageMeta, write_conda_package

ROOT = Path(__file__).resolve().parents[2]
CONDA_FLOW = ROOT / "fixtures" / "flows" / "condaflow.py"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private store and cache for one test (the CLI reads them from the environment)."""
    env = {
        "ENVMGR_STORE": (tmp_path / "store").as_uri(),
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "store").mkdir()  # an existing store (a new one is announced on stderr)
    return tmp_path


def resolve_json(*args: str) -> list[dict]:
    result = envmgr_here("resolve", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["envs"]


def test_lock_file_with_old_tabulate_that_conda_lock_renders(home, conda_channel):
    out = home / "x.yml"
    result = envmgr_here(
        "resolve",
        "--conda",
        "python=3.11",
        "--conda",
        "tabulate<0.9",
        "--conda",
        "python-dateutil",
        "--channel",
        conda_channel.url,
        "--platform",
        "linux-64",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    lock = read_conda_lock(out)
    packages = lock.for_platform("linux-64").names()
    assert packages["tabulate"].version.startswith("0.8.")
    assert {"python", "python-dateutil", "six"} <= set(packages)
    assert all(len(p.sha256) == 64 and p.md5 for p in packages.values())
    render = subprocess.run(
        [str(Path(sys.executable).parent / "conda-lock"), "render", "-k", "explicit", str(out)],
        capture_output=True,
        text=True,
        cwd=home,
        check=False,
    )
    assert render.returncode == 0, render.stderr
    explicit = (home / "conda-linux-64.lock").read_text()
    assert "@EXPLICIT" in explicit and "tabulate-0.8.10" in explicit


def test_second_call_is_cached_and_never_reads_the_channel(home, tmp_path):
    channel = copy_channel(tmp_path / "channel")
    args = [
        "--conda",
        "python",
        "--conda",
        "tabulate",
        "--channel",
        channel.as_uri(),
        "--platform",
        "linux-64",
    ]
    first = resolve_json(*args)
    assert first[0]["cached"] is False
    channel.rename(tmp_path / "channel-gone")
    second = resolve_json(*args)
    assert second[0]["cached"] is True
    assert second[0]["env_id"] == first[0]["env_id"]
    assert second[0]["spec_id"] == first[0]["spec_id"]
    forced = envmgr_here("resolve", *args, "--force")
    assert forced.returncode == 1 and "channel-gone" not in forced.stderr
    assert str(channel) in forced.stderr and "Traceback" not in forced.stderr


@pytest.mark.parametrize("platform", ["osx-arm64", "linux-aarch64", "linux-64"])
def test_resolving_for_other_platforms(home, conda_channel, platform):
    envs = resolve_json(
        "--conda",
        "python=3.11",
        "--conda",
        "tabulate",
        "--conda",
        "six",
        "--channel",
        conda_channel.url,
        "--platform",
        platform,
    )
    assert envs[0]["platform"] == platform and envs[0]["packages"] == 3
    osx_only = envmgr_here(
        "resolve",
        "--conda",
        "fixture-osx-only",
        "--channel",
        conda_channel.url,
        "--platform",
        platform,
    )
    if platform == "osx-arm64":
        assert osx_only.returncode == 0, osx_only.stderr
    else:
        assert osx_only.returncode == 1
        assert "no package named 'fixture-osx-only'" in osx_only.stderr
        assert platform in osx_only.stderr


def test_flow_steps_with_equal_specs_share_one_solve(home, conda_channel):
    envs = resolve_json(str(CONDA_FLOW), "--channel", conda_channel.url)
    assert [e["steps"] for e in envs] == [["start", "end"], ["prepare", "train"], ["report"]]
    assert len({e["spec_id"] for e in envs}) == 3
    assert all(e["cached"] is False for e in envs)
    store = LocalStore(home / "store")
    assert len(list(store.list("locks/"))) == 3  # one solve per distinct spec
    lock_dir = home / "locks"
    result = envmgr_here(
        "resolve", str(CONDA_FLOW), "--channel", conda_channel.url, "--lock-dir", str(lock_dir)
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in lock_dir.iterdir()) == [
        f"{s}.conda-lock.yml" for s in ("end", "prepare", "report", "start", "train")
    ]
    report = read_conda_lock(lock_dir / "report.conda-lock.yml").for_platform("linux-64")
    assert report.names()["tabulate"].version == "0.8.10"
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5 and all("cached" in line for line in lines)


def test_unsatisfiable_flow_step_is_one_line_naming_step_and_packages(home, conda_channel):
    flow = home / "badflow.py"
    flow.write_text(
        "from metaflow import FlowSpec, step, conda\n"
        "class Bad(FlowSpec):\n"
        "    @conda(libraries={'fixture-beta': '2.*', 'fixture-gamma': ''})\n"
        "    @step\n"
        "    def start(self):\n"
        "        pass\n"
    )
    result = envmgr_here("resolve", str(flow), "--channel", conda_channel.url)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "step 'start'" in lines[0] and "fixture-beta" in lines[0]
    assert "fixture-gamma" in lines[0] and "fixture-alpha" in lines[0]
    verbose = envmgr_here("-vv", "resolve", str(flow), "--channel", conda_channel.url)
    assert "Traceback" in verbose.stderr and "conflicts" in verbose.stderr


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("tabulat", "no package named 'tabulat'"),
        ("python 3.12.*", "no version of python matches 3.12.*"),
    ],
)
def test_unknown_package_is_one_line(home, conda_channel, spec, needle):
    result = envmgr_here("resolve", "--conda", spec, "--channel", conda_channel.url)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and needle in result.stderr
    assert "command line" in result.stderr


def test_unreachable_channel_names_the_url(home):
    result = envmgr_here(
        "resolve", "--conda", "tabulate", "--channel", "http://127.0.0.1:9/nowhere"
    )
    assert result.returncode == 1
    assert "http://127.0.0.1:9/nowhere" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--conda", "x", "--platform", "linux-32"],
        [str(CONDA_FLOW), "--conda", "x"],
        [],
        ["--conda", "numpy >>1"],
    ],
)
def test_usage_errors_exit_2(home, args):
    result = envmgr_here("resolve", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_check_detects_a_newer_package(home, tmp_path):
    channel = copy_channel(tmp_path / "channel")
    args = ["--conda", "fixture-alpha", "--channel", channel.as_uri(), "--platform", "linux-64"]
    assert resolve_json(*args)[0]["cached"] is False
    assert envmgr_here("resolve", *args, "--check").returncode == 0
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "share").mkdir()
        (Path(tmp) / "share" / "VERSION").write_text("2.5\n")
        write_conda_package(
            Path(tmp),
            PackageMeta(
                name="fixture-alpha", version="2.5", build="h0_0", subdir="noarch", noarch="generic"
            ),
            channel / "noarch",
        )
    index_channel(channel)
    drift = envmgr_here("resolve", *args, "--check")
    assert drift.returncode == 1 and "differ" in drift.stderr
    # --check does not replace the cached lock; a plain resolve still returns it.
    again = resolve_json(*args)
    assert again[0]["cached"] is True
    assert resolve_json(*args, "--force")[0]["env_id"] != again[0]["env_id"]


def test_specs_locking_the_same_packages_share_an_env(home, conda_channel):
    options = fixture_options(home, conda_channel.url)
    loose = EnvSpec(python="3.11.*", conda=(CondaDep.parse("tabulate"),))
    pinned = EnvSpec(python="3.*", conda=(CondaDep.parse("tabulate >=0.9"),))
    results = resolve_specs({"a": loose, "b": pinned}, options)
    assert results[0].spec_id != results[1].spec_id
    assert results[0].lock.env_id == results[1].lock.env_id


def test_cuda_changes_the_virtual_packages_and_the_cache_entry(home, conda_channel):
    def run(cuda):
        options = fixture_options(home, conda_channel.url, cuda=cuda)
        return resolve_specs({"s": EnvSpec(conda=(CondaDep.parse("six"),))}, options)[0]

    assert run(None).cached is False
    assert run(None).cached is True
    with_cuda = run("12.1")
    assert with_cuda.cached is False and "__cuda=12.1=0" in with_cuda.lock.virtual_packages


def test_damaged_cache_entry_is_solved_again(home, conda_channel):
    """Not JSON, then more than a store record can be: each a miss, solved and replaced."""
    args = ["--conda", "six", "--channel", conda_channel.url, "--platform", "linux-64"]
    first = resolve_json(*args)[0]
    key = next((home / "store" / "locks").rglob("*.json"))
    key.write_text("{not json")
    again = resolve_json(*args)[0]
    assert again["cached"] is False and again["env_id"] == first["env_id"]
    with key.open("r+b") as handle:  # sparse: too large to be a lock, read only to its limit
        handle.truncate(RECORD_BYTES + 1)
    third = resolve_json(*args)[0]
    assert third["cached"] is False and third["env_id"] == first["env_id"]
    assert key.stat().st_size < 1 << 20  # replaced


def test_virtual_package_defaults_and_overrides():
    linux = {v.name: v.version for v in virtual_packages("linux-64", env={})}
    assert linux == {"__archspec": "1", "__glibc": "2.28", "__linux": "5.10", "__unix": "0"}
    osx = {v.name: v.version for v in virtual_packages("osx-arm64", env={})}
    assert osx["__osx"] == "12.0" and "__glibc" not in osx
    tuned = {
        v.name: v.version
        for v in virtual_packages(
            "linux-64",
            env={"CONDA_OVERRIDE_GLIBC": "2.17", "CONDA_OVERRIDE_CUDA": "11.8"},
            system={"__cuda": "12.1"},
        )
    }
    assert tuned["__glibc"] == "2.17" and tuned["__cuda"] == "12.1"
    # CONDA_OVERRIDE_CUDA says what the host has: it never enters a lock by itself.
    pretending = virtual_packages("linux-64", env={"CONDA_OVERRIDE_CUDA": "12.4"})
    assert "__cuda" not in {v.name for v in pretending}
    flag = virtual_packages("linux-64", env={}, cuda="12.2", system={"__cuda": "12.4"})
    assert {v.name: v.version for v in flag}["__cuda"] == "12.2"
    none = virtual_packages("linux-64", env={}, cuda="", system={"__cuda": "12.4"})
    assert "__cuda" not in {v.name for v in none}


def test_credentials_never_reach_lock_files(tmp_path):
    url = "https://user:s3cret@conda.example.org/t/tk-0123456789/private/noarch/x-1-0.conda"
    assert strip_credentials(url) == "https://conda.example.org/private/noarch/x-1-0.conda"
    package = LockedPackage(
        manager="conda",
        name="x",
        version="1",
        build="0",
        url=url,
        sha256="0" * 64,
        md5="0" * 32,
        subdir="noarch",
        noarch="generic",
    )
    lock = Lock(
        platforms=(
            PlatformLock(
                platform="linux-64",
                packages=(package,),
                channels=("https://user:s3cret@conda.example.org/t/tk-0123456789/private",),
            ),
        ),
        spec_id="abc",
        envmgr_version="0",
    )
    out = tmp_path / "lock.yml"
    write_conda_lock(lock, out)
    text = out.read_text()
    assert "s3cret" not in text and "tk-0123456789" not in text
    assert json.dumps(lock.platforms[0].to_dict()).count("s3cret") == 0
    assert read_conda_lock(out).platforms[0].packages == (package,)
    assert yaml.safe_load(text)["version"] == 1


def test_lock_files_round_trip(home, conda_channel):
    out = home / "multi.yml"
    result = envmgr_here(
        "resolve",
        "--conda",
        "python",
        "--conda",
        "tabulate",
        "--channel",
        conda_channel.url,
        "--platform",
        "linux-64",
        "--platform",
        "osx-arm64",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    lock = read_conda_lock(out)
    assert [p.platform for p in lock.platforms] == ["linux-64", "osx-arm64"]
    again = home / "again.yml"
    write_conda_lock(lock, again)
    assert read_conda_lock(again) == lock
    shutil.rmtree(home / "store")
