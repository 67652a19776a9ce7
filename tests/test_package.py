"""envmgr installs as envmgr, envmgr.cli and envmgr.cache, and nothing generic at the top."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from typer.testing import CliRunner

import envmgr
from envmgr.cli.app import app

ROOT = Path(__file__).resolve().parent.parent


def test_version_and_help():
    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"envmgr {envmgr.__version__}"
    helped = runner.invoke(app, ["--help"])
    assert helped.exit_code == 0 and "Usage" in helped.output


def test_usage_error_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-c", "from envmgr.cli.app import main; main()", "--no-such-flag"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--no-such-flag" in result.stderr


@pytest.mark.parametrize("name", ["cli", "cache"])
def test_folder_names_are_not_importable_at_top_level(name):
    # The checkout is on sys.path here (pytest's pythonpath), so the folder is found: the
    # package itself must refuse the generic name.
    with pytest.raises(ImportError, match=f"envmgr.{name}"):
        importlib.import_module(name)


def _venv_with_outer_deps(path: Path) -> Path:
    """A venv without pip whose interpreter also sees this venv's site-packages (for deps)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    Path(site.strip(), "outer-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_pip_install_gives_the_three_import_names(tmp_path, editable):
    source = tmp_path / "src"
    for item in ("envmgr", "cli", "cache", "metaflow_extensions"):
        shutil.copytree(
            ROOT / item, source / item, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    for item in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / item, source / item)
    python = _venv_with_outer_deps(tmp_path / "venv")
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
    ]
    install += ["-e", str(source)] if editable else [str(source)]
    subprocess.run(install, check=True, capture_output=True, cwd=tmp_path)

    def run(*args: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, cwd=cwd, check=False)

    # From the checkout itself the source tree shadows the install: it must import the same.
    in_checkout = run(str(python), "-c", "import envmgr.cli, envmgr.cache", cwd=source)
    assert in_checkout.returncode == 0, in_checkout.stderr

    ok = run(str(python), "-c", "import envmgr, envmgr.cli, envmgr.cache; print(envmgr.__file__)")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith(str(source if editable else tmp_path / "venv"))
    for name in ("cli", "cache"):
        refused = run(str(python), "-c", f"import {name}")
        assert refused.returncode != 0 and "ModuleNotFoundError" in refused.stderr
    helped = run(str(tmp_path / "venv" / "bin" / "envmgr"), "--help")
    assert helped.returncode == 0 and "Usage" in helped.stdout
    if not editable:
        site = Path(ok.stdout.strip()).parent.parent
        assert not (site / "cli").exists() and not (site / "cache").exists()
        assert (site / "envmgr" / "cli" / "app.py").is_file()
        # Metaflow discovers the extension among installed files.
        assert (
            site / "metaflow_extensions" / "envmgr" / "plugins" / "mfextinit_envmgr.py"
        ).is_file()
