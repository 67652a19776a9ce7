"""Progress as a user sees it: live lines on a terminal (a real pseudo-terminal here) with a
✓ or a red ✗, and plain phase lines off a terminal."""

from __future__ import annotations

import re

from _helpers import on_a_terminal, run_envmgr


def test_a_failed_solve_is_drawn_as_a_failure(world):
    env = {k: v for k, v in world.items() if k != "NO_COLOR"}
    code, out = on_a_terminal("resolve", "--conda", "no-such-package", "-p", "linux-64", env=env)
    assert code == 1, out
    assert "✗" in out and "✓" not in out, out
    assert "solve command line linux-64" in out
    assert "\x1b[1;31merror\x1b[0m: " in out  # error: in red
    assert "no package named 'no-such-package'" in out

    plain = {**env, "NO_COLOR": "1"}
    code, out = on_a_terminal("resolve", "--conda", "no-such-package", "-p", "linux-64", env=plain)
    assert code == 1
    assert "✗" in out and "✓" not in out
    assert "envmgr: error: " in out and "\x1b[1;31m" not in out


def test_a_finished_solve_gets_a_check_mark(world):
    code, out = on_a_terminal("resolve", "--conda", "tabulate", "-p", "linux-64", env=world)
    assert code == 0, out
    assert "✓" in out and "✗" not in out
    assert "bytes" not in out  # a solve is a phase, not a byte bar


def test_off_a_terminal_each_slow_phase_is_one_line(world, tmp_path):
    spec = ["--conda", "python=3.11", "--conda", "tabulate"]
    every = {**world, "ENVMGR_PROGRESS_AFTER": "0"}  # every phase counts as slow here
    built = run_envmgr("build", *spec, "-p", "linux-64", env=every)
    assert built.returncode == 0, built.stderr
    lines = built.stderr.splitlines()
    phases = [line.split()[1] for line in lines if line.endswith(" ...")]
    assert phases == ["solve", "install", "bytecode", "pack", "upload"], built.stderr
    assert lines[0] == "envmgr: solve command line linux-64 ..."

    ran = run_envmgr("run", *spec, "--", "python", "-c", "print(1)", env=every)
    assert ran.returncode == 0 and ran.stdout == "1\n"
    assert [line.split()[1] for line in ran.stderr.splitlines()] == ["hydrate"]
    quiet = run_envmgr("-q", "run", *spec, "--", "python", "-c", "print(1)", env=every)
    assert quiet.stderr == ""
    fast = run_envmgr("resolve", *spec, "-p", "linux-64", env=every)  # cached: no phase
    assert fast.stderr == ""


def test_progress_bars_on_a_terminal_and_not_when_piped(world, tmp_path):
    lock = tmp_path / "l.yml"
    spec = ("--conda", "numpy", "--python", "3.11", "--pypi", "colorama")
    assert run_envmgr("resolve", *spec, "-o", str(lock), env=world).returncode == 0
    code, shown = on_a_terminal("build", "--from-lock", str(lock), env=world)
    assert code == 0, shown
    for label in ("install ", "pack ", "upload "):
        assert label in shown, shown
    assert "━" in shown and "MB" in shown and "4/4" in shown  # bars, sizes, package counts
    env_id = re.search(r"env ([0-9a-f]{12})", shown)
    assert env_id is not None
    fresh = {**world, "ENVMGR_CACHE_DIR": str(tmp_path / "fresh")}
    code, shown = on_a_terminal("hydrate", str(lock), env=fresh)
    assert code == 0 and "hydrate " in shown and "━" in shown, shown
    # Piped: the same work prints results only.
    piped = run_envmgr("hydrate", str(lock), env={**world, "ENVMGR_CACHE_DIR": str(tmp_path / "p")})
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout.strip().endswith("/bin/python")
    code, shown = on_a_terminal(
        "-q", "hydrate", str(lock), env={**fresh, "ENVMGR_CACHE_DIR": str(tmp_path / "q")}
    )
    assert code == 0 and "━" not in shown and "hydrate " not in shown
    # On a terminal, solves show too.
    code, shown = on_a_terminal("resolve", "--conda", "tabulate", "--python", "3.11", env=world)
    assert code == 0 and "solve " in shown, shown
