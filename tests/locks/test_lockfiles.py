"""Lock files of other tools, written by the real tools: pylock.toml by pip and uv, uv.lock by
uv, pixi.lock through py-rattler's lock API; and envmgr's own pylock.toml read back by uv and
by envmgr to the same env id."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from test_cli import _env_id, invoke, shaped, sub

from envmgr import __version__
from envmgr.errors import EnvmgrError
from envmgr.locks.formats import detect_format
from envmgr.locks.lock import read_conda_lock
from envmgr.locks.pylock import read_pypi_lock
from envmgr.locks.python_target import PythonTarget

UV = str(Path(sys.executable).with_name("uv"))
REQUIREMENTS = "python-dateutil\nrequests[socks]\n"
PROJECT = """\
[project]
name = "demo"
version = "0.1"
requires-python = ">=3.11"
dependencies = ["python-dateutil", "requests[socks]", "colorama; sys_platform == 'win32'"]
"""


def _tool(*args: str, cwd: Path, index: str) -> None:
    """A real tool against the fixture index only, with no user configuration."""
    env = {
        **os.environ,
        "UV_INDEX_URL": index,
        "UV_CACHE_DIR": str(cwd / ".uv-cache"),
        "UV_NO_CONFIG": "1",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_PYTHON": sys.executable,
    }
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def tool_locks(world, pypi_index, tmp_path) -> dict[str, Path]:
    """The same requirements locked by uv (pylock.toml and uv.lock) and pip (pylock.toml)."""
    (tmp_path / "req.in").write_text(REQUIREMENTS)
    _tool(UV, "pip", "compile", "req.in", "--format", "pylock.toml", "-o", "pylock.uv.toml",
          "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
          cwd=tmp_path, index=pypi_index.url)  # fmt: skip
    _tool(sys.executable, "-m", "pip", "lock", "--isolated", "--quiet", "--index-url",
          pypi_index.url, "-r", "req.in", "-o", "pylock.pip.toml",
          cwd=tmp_path, index=pypi_index.url)  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(PROJECT)
    _tool(UV, "lock", cwd=project, index=pypi_index.url)
    return {
        "uv pylock": tmp_path / "pylock.uv.toml",
        "pip pylock": tmp_path / "pylock.pip.toml",
        "uv.lock": project / "uv.lock",
    }


def test_locks_written_by_pip_and_uv_give_the_env_of_their_requirements(world, tool_locks):
    expected = _env_id(sub("resolve", "-r", "req.in", "--python", "3.11", "--json", env=world))
    for label, path in tool_locks.items():
        adopted = sub("resolve", "--lockfile", str(path), "--json", env=world)
        assert _env_id(adopted) == expected, label
        shown = shaped("show", sub("show", str(path), "--json", env=world).stdout)
        names = {p["name"] for p in shown["platforms"][0]["packages"]}
        assert {"python", "pip", "requests", "pysocks", "six"} <= names, label
        assert "colorama" not in names, label  # uv.lock: only on win32
    # A user's way: build from the file, then run a command in its env.
    built = sub("build", "--from-lock", str(tool_locks["uv.lock"]), env=world)
    assert built.returncode == 0, built.stderr
    probe = "import dateutil, requests, socks; print(requests.__version__)"
    ran = sub("run", str(tool_locks["pip pylock"]), "--", "python", "-c", probe, env=world)
    assert ran.returncode == 0 and ran.stdout.strip() == "2.32.3", ran.stderr


def test_uv_lock_is_selected_by_the_targets_markers_and_tags(world, tool_locks):
    found = read_pypi_lock(tool_locks["uv.lock"], "uv.lock")
    assert found.python_spec() == "3.11"  # requires-python >=3.11: its lowest series

    def files(platform: str) -> dict[str, str]:
        target = PythonTarget(platform=platform, python="3.11.7")
        return {p.name: p.url.rsplit("/", 1)[-1] for p in found.select(target)}

    linux, windows, mac = files("linux-64"), files("win-64"), files("osx-arm64")
    assert "colorama" not in linux and "colorama" in windows
    assert linux["charset-normalizer"] == "charset_normalizer-3.4.0-py3-none-any.whl"
    assert mac["charset-normalizer"].endswith("-cp311-cp311-macosx_11_0_arm64.whl")
    assert linux["pysocks"].startswith("PySocks-")  # the extra requests[socks] asks for
    assert "demo" not in linux  # the workspace member itself is the user's code


def test_exported_pylock_is_read_back_to_the_same_env_and_uv_installs_it(world, tmp_path):
    spec = (
        "--conda",
        "numpy",
        "--python",
        "3.11",
        "--pypi",
        "colorama",
        "--pypi",
        "python-dateutil",
    )
    env_id = _env_id(invoke("resolve", *spec, "-o", "env.lock.yml", "--json"))
    exported = sub("export", "env.lock.yml", "--format", "pylock", "-o", "pylock.toml", env=world)
    assert exported.returncode == 0, exported.stderr
    from packaging.pylock import Pylock

    data = tomllib.loads((tmp_path / "pylock.toml").read_text())
    pylock = Pylock.from_dict(data)  # packaging's own validation of PEP 751
    assert pylock.created_by == "envmgr"
    assert {str(p.name) for p in pylock.packages} == {"colorama", "python-dateutil", "six"}
    dateutil = next(p for p in pylock.packages if p.name == "python-dateutil")
    assert dateutil.dependencies == [{"name": "six"}]
    assert data["tool"]["envmgr"]["env_id"] == env_id
    assert _env_id(sub("resolve", "--lockfile", "pylock.toml", "--json", env=world)) == env_id
    # uv installs the same PyPI packages from it.
    venv = tmp_path / "venv"
    _tool(UV, "venv", str(venv), cwd=tmp_path, index="http://127.0.0.1:9/")
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "UV_CACHE_DIR": str(tmp_path / "uvc")}
    installed = subprocess.run([UV, "pip", "install", "--no-config", "-r", "pylock.toml"],
                               cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    check = subprocess.run([venv / "bin" / "python", "-c", "import dateutil, colorama, six"])
    assert check.returncode == 0
    # The exported conda-lock carries every pip package's dependencies and the version;
    # through pylock.toml only their names (PEP 751 dependencies name no versions).
    for source, six in (("env.lock.yml", "six >=1.5"), ("pylock.toml", "six")):
        conda_lock = invoke("export", source, "--format", "conda-lock").stdout
        lock = read_conda_lock_text(tmp_path, conda_lock)
        pypi = {p.name: p for p in lock.platforms[0].packages if p.manager == "pypi"}
        assert pypi["python-dateutil"].depends == (six,), source
        assert lock.envmgr_version == __version__


def read_conda_lock_text(where: Path, text: str):  # type: ignore[no-untyped-def]
    path = where / "exported.conda-lock.yml"
    path.write_text(text)
    return read_conda_lock(path)


def test_pixi_lock_written_through_py_rattler_is_read_whole(world, conda_channel, tmp_path):
    import rattler

    spec = ("--conda", "numpy", "--python", "3.11", "--pypi", "colorama")
    env_id = _env_id(invoke("resolve", *spec, "-o", "env.lock.yml", "--json"))
    colorama = next(
        p
        for p in read_conda_lock(tmp_path / "env.lock.yml").platforms[0].packages
        if p.name == "colorama"
    )
    records = asyncio.run(
        rattler.solve(
            [conda_channel.url], ["python 3.11.*", "numpy", "pip"], platforms=["linux-64", "noarch"]
        )
    )
    platform = rattler.LockPlatform("linux-64")
    lock_file = rattler.LockFile([platform])
    for record in records:
        lock_file.add_conda_package("default", platform, record)
    lock_file.add_pypi_package("default", platform, "colorama", colorama.version,
                               f"{colorama.url}#sha256={colorama.sha256}")  # fmt: skip
    lock_file.set_channels("default", [rattler.LockChannel(conda_channel.url)])
    lock_file.to_path(str(tmp_path / "pixi.lock"))
    assert detect_format(tmp_path / "pixi.lock") == "pixi.lock"
    assert _env_id(sub("resolve", "--lockfile", "pixi.lock", "--json", env=world)) == env_id
    diffed = sub("diff", "env.lock.yml", "pixi.lock", env=world)
    assert diffed.returncode == 0 and "(same packages)" in diffed.stdout


UNSUPPORTED = {
    "requirements.txt": ("six==1.17.0\nrequests>=2  # comment\n", "a requirements file", "-r "),
    "environment.yml": ("name: x\ndependencies:\n  - numpy\n", "an environment.yml", "-f "),
    "poetry.lock": ('[[package]]\nname = "six"\n\n[metadata]\ncontent-hash = "ab"\n',
                    "a poetry.lock", "poetry export"),
    "pyproject.toml": ('[project]\nname = "x"\n', "a pyproject.toml", "uv lock"),
    "Pipfile.lock": ('{"_meta": {}, "default": {}}', "a Pipfile.lock", "pipenv"),
    "Cargo.lock": ('version = 3\n[[package]]\nname = "x"\n', "unknown tool", ""),
    "pixi.lock": ("version: 3\nenvironments: {}\npackages: []\n", "version 3", "pixi lock"),
    "notes.yml": ("a: [1, 2]\n", "unknown format", ""),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_a_file_that_is_not_a_lock_is_one_line_naming_it(world, tmp_path, name):
    text, what, hint = UNSUPPORTED[name]
    (tmp_path / name).write_text(text)
    for args in (("resolve", "--lockfile", name), ("show", name), ("build", "--from-lock", name)):
        result = sub(*args, env=world)
        assert result.returncode == 2, (args, result.stderr)
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1, line
        assert what in line and "it reads conda-lock" in line and hint in line, line
        assert "Traceback" not in line and "yaml" not in line.lower().replace(".yml", ""), line


HOSTILE_PYLOCK = {
    "vcs": ('[[packages]]\nname = "x"\nversion = "1"\n'
            '[packages.vcs]\ntype = "git"\nurl = "https://e.invalid/x.git"\n'
            'commit-id = "' + "a" * 40 + '"\n', "x is a VCS checkout"),
    "no sha256": ('[[packages]]\nname = "six"\nversion = "1.17.0"\n[[packages.wheels]]\n'
                  'url = "https://e.invalid/six-1.17.0-py3-none-any.whl"\n'
                  'hashes = { md5 = "' + "0" * 32 + '" }\n', "without a sha256"),
    "version 2": ('', "lock-version"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE_PYLOCK))
def test_pylock_entries_envmgr_cannot_build_are_refused_by_name(tmp_path, case):
    body, expected = HOSTILE_PYLOCK[case]
    version = "2.0" if case == "version 2" else "1.0"
    path = tmp_path / "pylock.toml"
    path.write_text(f'lock-version = "{version}"\ncreated-by = "test"\n{body}')
    with pytest.raises(EnvmgrError, match=expected):
        read_pypi_lock(path, detect_format(path))


def test_uv_lock_with_a_git_source_names_the_package(tmp_path):
    (tmp_path / "uv.lock").write_text(
        'version = 1\nrequires-python = ">=3.11"\n\n'
        '[[package]]\nname = "app"\nversion = "0.1"\nsource = { virtual = "." }\n'
        'dependencies = [{ name = "tool" }]\n\n'
        '[[package]]\nname = "tool"\nversion = "1.0"\n'
        'source = { git = "https://e.invalid/tool.git?rev=main#' + "b" * 40 + '" }\n'
    )
    found = read_pypi_lock(tmp_path / "uv.lock", detect_format(tmp_path / "uv.lock"))
    with pytest.raises(EnvmgrError, match="tool comes from a git source"):
        found.select(PythonTarget(platform="linux-64", python="3.11.7"))
