"""--locked and --frozen on resolve, build and run (uv's and pixi's habits), --check without a
cached lock, and ``run`` taking a spec instead of a TARGET."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from _helpers import envmgr_here, run_envmgr

from fixtures.conda_channel import copy_channel, index_channel
from fixtures.condapkg import PackageMeta, write_conda_package


def _publish_alpha(channel: Path, version: str) -> None:
    """A newer fixture-alpha in *channel*: what makes a cached lock drift."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "share").mkdir()
        (Path(tmp) / "share" / "VERSION").write_text(f"{version}\n")
        meta = PackageMeta(
            name="fixture-alpha", version=version, build="h0_0", subdir="noarch", noarch="generic"
        )
        write_conda_package(Path(tmp), meta, channel / "noarch")
    index_channel(channel)


def _locks(store: Path) -> list[Path]:
    return sorted((store / "locks").rglob("*")) if (store / "locks").is_dir() else []


def test_frozen_never_solves_and_locked_fails_when_a_lock_would_change(world, tmp_path):
    channel = copy_channel(tmp_path / "channel")
    args = ["--conda", "fixture-alpha", "-c", channel.as_uri(), "-p", "linux-64"]
    store = tmp_path / "store"

    frozen = envmgr_here("resolve", *args, "--frozen")
    assert frozen.returncode == 1, frozen.stderr
    assert frozen.stderr.strip().splitlines() == [
        f"envmgr: error: --frozen: {store.as_uri()} has no lock for command line linux-64 "
        "(resolve without --frozen first (the spec or its virtual packages changed since the "
        "last resolve))"
    ]
    assert _locks(store) == []  # nothing solved, nothing cached

    locked = envmgr_here("resolve", *args, "--locked")
    assert locked.returncode == 1
    assert "--locked: command line linux-64 has no lock in" in locked.stderr
    assert _locks(store) == []  # --locked never writes the cache

    check = envmgr_here("resolve", *args, "--check")
    assert check.returncode == 1
    assert "no cached lock to check for command line linux-64" in check.stderr
    assert "differ" not in check.stderr

    first = json.loads(envmgr_here("resolve", *args, "--json").stdout)["envs"][0]
    assert first["cached"] is False
    again = envmgr_here("resolve", *args, "--frozen", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["envs"][0] == {**first, "cached": True, "seconds": 0.0}
    assert envmgr_here("resolve", *args, "--locked").returncode == 0

    _publish_alpha(channel, "2.5")
    drift = envmgr_here("resolve", *args, "--locked")
    assert drift.returncode == 1
    assert drift.stderr.strip().splitlines() == [
        "envmgr: error: --locked: the lock of command line linux-64 would change (run envmgr "
        "resolve without --locked to update the locks)"
    ]
    # --frozen still uses the lock as it is, and the cached lock was not replaced.
    kept = json.loads(envmgr_here("resolve", *args, "--frozen", "--json").stdout)["envs"][0]
    assert kept["env_id"] == first["env_id"]
    assert envmgr_here("resolve", *args, "--frozen", "--force").returncode == 2


def test_locked_with_lock_dir_checks_the_committed_files(world, tmp_path):
    spec = tmp_path / "environment.yml"
    spec.write_text("dependencies:\n  - python=3.11\n  - tabulate\n")
    locks = tmp_path / "locks"
    args = ["-f", str(spec), "-p", "linux-64", "-o", str(locks / "env.conda-lock.yml")]

    missing = envmgr_here("resolve", *args, "--locked")
    assert missing.returncode == 1
    assert "does not exist (the lock would be written)" in missing.stderr
    assert not locks.exists()

    assert envmgr_here("resolve", *args).returncode == 0
    written = (locks / "env.conda-lock.yml").read_bytes()
    assert envmgr_here("resolve", *args, "--locked").returncode == 0, "current locks pass"
    assert (locks / "env.conda-lock.yml").read_bytes() == written, "and are not rewritten"

    spec.write_text("dependencies:\n  - python=3.11\n  - tabulate\n  - fixture-alpha\n")
    changed = envmgr_here("resolve", *args, "--locked")
    assert changed.returncode == 1
    assert f"--locked: {locks / 'env.conda-lock.yml'} would change (linux-64)" in changed.stderr
    assert (locks / "env.conda-lock.yml").read_bytes() == written


def test_build_and_run_frozen_and_locked(world, tmp_path):
    store = tmp_path / "store"
    spec = ["--conda", "python=3.11", "--conda", "tabulate"]

    frozen = envmgr_here("build", *spec, "-p", "linux-64", "--frozen")
    assert frozen.returncode == 1 and "--frozen:" in frozen.stderr
    assert not (store / "envs").exists() or not any((store / "envs").rglob("manifest.json"))
    ran = run_envmgr("run", *spec, "--frozen", "--", "python", "-V")
    assert ran.returncode == 1 and "--frozen:" in ran.stderr

    # run takes the spec resolve takes: resolved, built, stored and hydrated when new ...
    code = "import tabulate, sys; print(tabulate.__name__, sys.version_info[:2])"
    first = run_envmgr("run", *spec, "--", "python", "-c", code)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "tabulate (3, 11)"
    # ... and after that, --frozen and --locked find the lock and the env.
    for flag in ("--frozen", "--locked"):
        again = run_envmgr("run", *spec, flag, "--", "python", "-c", code)
        assert again.returncode == 0, again.stderr
        assert again.stdout == first.stdout
    built = envmgr_here("build", *spec, "-p", "linux-64", "--locked", "--json")
    assert built.returncode == 0, built.stderr
    row = json.loads(built.stdout)["envs"][0]
    assert row["status"] == "present"

    # show gives every package of a built env its installed size (the manifest's).
    shown = json.loads(envmgr_here("show", row["env_id"][:10], "--json").stdout)["platforms"][0]
    sizes = {p["name"]: p["installed_size"] for p in shown["packages"]}
    assert sizes.keys() == {"python", "tabulate"}
    assert sizes["python"] > 5_000_000 and 10_000 < sizes["tabulate"] < 1_000_000
    assert sum(sizes.values()) <= shown["archive"]["unpacked_size"]
    text = envmgr_here("show", row["env_id"]).stdout
    assert " installed  source" in text
    assert f"{sizes['python'] / 1e6:7.1f} MB" in text

    # Warm: the env is in this host's cache, so run builds nothing and reads no archive
    # (the store's envs may even be gone; its cached lock is all --frozen reads).
    shutil.rmtree(store / "envs")
    warm = run_envmgr("run", *spec, "--frozen", "--", "python", "-c", code)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout == first.stdout and not (store / "envs").exists()

    env_file = tmp_path / "environment.yml"
    env_file.write_text("dependencies:\n  - python=3.11\n  - tabulate\n")
    from_file = run_envmgr("run", "-f", str(env_file), "--", "python", "-c", code)
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == first.stdout


def test_run_usage_lines(world, tmp_path):
    wide = {**world, "COLUMNS": "300"}  # typer boxes usage errors; unwrapped here
    # Without --, the first word after TARGET that is no option of run starts the command
    # (`-c 1` went to --channel and the internet for a channel named 1).
    no_separator = envmgr_here("run", "flow.py:train", "python", "-c", "1", env=wide)
    assert no_separator.returncode == 2
    assert "flow.py" in no_separator.stderr and "channel" not in no_separator.stderr
    code = "import sys, tabulate; print(sys.argv[1:])"
    spec_no_separator = run_envmgr(
        "run", "--python", "3.11", "--conda", "tabulate", "python", "-c", code, "-p", "x", env=wide
    )
    assert spec_no_separator.returncode == 0, spec_no_separator.stderr
    assert spec_no_separator.stdout.strip() == "['-p', 'x']"
    both = envmgr_here("run", "flow.py:train", "--conda", "tabulate", "--", "python")
    assert both.returncode == 2
    assert "give a TARGET (flow.py:train) or -f/-r/--conda/--pypi/--python, not both" in both.stderr
    nothing = envmgr_here("run")
    assert nothing.returncode == 2 and "give a TARGET or a spec" in nothing.stderr
