"""The fixture conda channel holds real, installable, relocatable conda packages."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import rattler
from rattler import Channel
from rattler.exceptions import SolverError

from fixtures.condapkg import PLACEHOLDER

HOST_PREFIX_LEN = len(str(Path(sys.base_prefix).resolve()))
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _solve(channel, specs, platform="linux-64"):
    return asyncio.run(
        rattler.solve(
            sources=[Channel(channel.url)],
            specs=specs,
            platforms=[platform, "noarch"],
            virtual_packages=[
                rattler.GenericVirtualPackage(
                    rattler.PackageName("__unix"), rattler.Version("0"), rattler.BuildString("0")
                )
            ],
        )
    )


def _install(records, prefix: Path, cache: Path) -> Path:
    asyncio.run(
        rattler.install(records, target_prefix=prefix, cache_dir=cache, show_progress=False)
    )
    return prefix


@pytest.fixture(scope="module")
def package_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pkgs")


@pytest.fixture(scope="module")
def data_env(conda_channel, tmp_path_factory, package_cache) -> Path:
    records = _solve(
        conda_channel,
        ["python 3.*", "numpy", "python-dateutil", "tabulate", "requests", "prefix-demo"],
    )
    return _install(records, tmp_path_factory.mktemp("envs") / "data", package_cache)


def _repodata(channel, subdir):
    data = json.loads((channel.path / subdir / "repodata.json").read_text())
    return {**data.get("packages", {}), **data.get("packages.conda", {})}


def test_channel_layout(conda_channel):
    assert conda_channel.url.startswith("file://")
    names = {
        r["name"] for sub in ("linux-64", "noarch") for r in _repodata(conda_channel, sub).values()
    }
    assert {"python", "pip", "numpy"} <= names
    assert len(names - {"python", "pip", "numpy"}) >= 6
    osx = {r["name"] for r in _repodata(conda_channel, "osx-arm64").values()}
    assert "fixture-osx-only" in osx
    assert "fixture-osx-only" not in names


def test_packages_carry_metadata_rattler_trusts(conda_channel):
    linux = _repodata(conda_channel, "linux-64")
    numpy = next(r for r in linux.values() if r["name"] == "numpy")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"python {pyver}.*" in numpy["depends"]
    noarch = _repodata(conda_channel, "noarch")
    dateutil = next(r for r in noarch.values() if r["name"] == "python-dateutil")
    assert dateutil["noarch"] == "python"
    assert any(d.startswith("six") for d in dateutil["depends"])
    assert {r["version"] for r in noarch.values() if r["name"] == "tabulate"} == {"0.8.10", "0.9.0"}


def test_env_from_channel_imports_numpy_dateutil_tabulate(data_env):
    python = data_env / "bin" / "python"
    out = subprocess.run(
        [
            str(python),
            "-c",
            "import sys, numpy, dateutil, tabulate, requests; "
            "print(sys.prefix); print(numpy.arange(3).sum())",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=CLEAN_ENV,
    ).stdout.split()
    assert out == [str(data_env), "3"]


def test_console_scripts_point_at_the_env(data_env):
    # tabulate (noarch) gets its script from info/link.json; numpy's f2py was written with a
    # placeholder shebang: both must run the env's python.
    for script in ("tabulate", "f2py"):
        first = (data_env / "bin" / script).read_text().splitlines()[0]
        assert first.startswith(f"#!{data_env}/bin/python"), (script, first)
    table = subprocess.run(
        [str(data_env / "bin" / "tabulate")],
        input="a 1\nb 2\n",
        capture_output=True,
        text=True,
        check=True,
        env=CLEAN_ENV,
    ).stdout
    assert "a" in table and "2" in table
    version = subprocess.run(
        [str(data_env / "bin" / "f2py"), "-v"],
        capture_output=True,
        text=True,
        check=True,
        env=CLEAN_ENV,
    ).stdout.strip()
    assert version.startswith("2.")


def test_text_and_binary_placeholders_are_replaced(data_env):
    conf = (data_env / "etc" / "prefix-demo.conf").read_text()
    assert conf == f"prefix = {data_env}\ndata = {data_env}/share/demo\n"
    said = subprocess.run(
        [str(data_env / "bin" / "prefix-demo")],
        capture_output=True,
        text=True,
        check=True,
        env=CLEAN_ENV,
    ).stdout.strip()
    assert said == f"prefix-demo installed in {data_env}"
    blob = (data_env / "share" / "prefix-demo" / "prefix.bin").read_bytes()
    start = blob.index(b"PREFIX=") + len(b"PREFIX=")
    field = blob[start : start + len(PLACEHOLDER)]
    assert field == str(data_env).encode() + b"\0" * (len(PLACEHOLDER) - len(str(data_env)))
    assert len(blob) == 2 + len("PREFIX=") + len(PLACEHOLDER) + 1 + 256


@pytest.mark.parametrize("length", ["shorter", "longer"])
def test_python_runs_from_shorter_and_longer_prefixes(conda_channel, package_cache, length):
    with tempfile.TemporaryDirectory(prefix="e", dir="/tmp") as tmp:
        prefix = Path(tmp) / "p"
        if length == "longer":
            prefix = Path(tmp) / ("long-" * 30) / "env"
        assert (len(str(prefix)) < HOST_PREFIX_LEN) == (length == "shorter")
        _install(_solve(conda_channel, ["python"]), prefix, package_cache)
        code = (
            "import sys, ssl, sqlite3, ctypes, sysconfig; "
            "print(sys.prefix); print(sysconfig.get_config_var('prefix')); "
            "print(sqlite3.connect(':memory:').execute('select 1').fetchone()[0])"
        )
        out = subprocess.run(
            [str(prefix / "bin" / "python3"), "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env=CLEAN_ENV,
        ).stdout.split()
        assert out == [str(prefix), str(prefix), "1"]
        config = subprocess.run(
            [str(prefix / "bin" / "python3-config"), "--prefix"],
            capture_output=True,
            text=True,
            check=True,
            env=CLEAN_ENV,
        ).stdout.strip()
        assert config == str(prefix)
        # Nothing in the env points back at the interpreter it was made from.
        runpath = subprocess.run(
            ["readelf", "-d", str(prefix / "bin" / "python3")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert sys.base_prefix not in runpath and "$ORIGIN" in runpath


def test_pip_package_installs_and_runs(conda_channel, tmp_path, package_cache):
    prefix = _install(_solve(conda_channel, ["python", "pip"]), tmp_path / "env", package_cache)
    out = subprocess.run(
        [str(prefix / "bin" / "pip"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        env={**CLEAN_ENV, "PIP_CONFIG_FILE": os.devnull},
    )
    assert str(prefix) in out.stdout


def test_solver_fixtures_pick_versions_and_conflict(conda_channel):
    names = {r.name.normalized: str(r.version) for r in _solve(conda_channel, ["fixture-beta 1.*"])}
    assert names == {"fixture-beta": "1.0", "fixture-alpha": "1.5"}
    newest = {r.name.normalized: str(r.version) for r in _solve(conda_channel, ["fixture-beta"])}
    assert newest == {"fixture-beta": "2.0", "fixture-alpha": "2.0"}
    old_tabulate = {
        r.name.normalized: str(r.version)
        for r in _solve(conda_channel, ["python", "tabulate <0.9"])
    }
    assert old_tabulate["tabulate"] == "0.8.10"
    with pytest.raises(SolverError):
        _solve(conda_channel, ["fixture-beta 2.*", "fixture-gamma"])


def test_osx_only_package_solves_for_osx_arm64_only(conda_channel):
    osx = {
        r.name.normalized
        for r in _solve(conda_channel, ["fixture-osx-only", "python", "tabulate"], "osx-arm64")
    }
    assert {"fixture-osx-only", "python", "tabulate"} <= osx
    with pytest.raises(SolverError):
        _solve(conda_channel, ["fixture-osx-only"], "linux-64")
