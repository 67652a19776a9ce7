"""Progress as a user sees it: live lines on a terminal (a real pseudo-terminal here) with a
✓ or a red ✗, and plain phase lines off a terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from _helpers import ROOT, run_envmgr


def _on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run envmgr with stdout and stderr on a pseudo-terminal; its exit code and output."""
    main, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", "from envmgr.cli.app import main; main()", *args],
        stdin=child,
        stdout=child,
        stderr=child,
        cwd=ROOT,
        env={**env, "TERM": "xterm-256color", "COLUMNS": "120"},
        close_fds=True,
    )
    os.close(child)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(main)
    return process.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_a_failed_solve_is_drawn_as_a_failure(world):
    env = {k: v for k, v in world.items() if k != "NO_COLOR"}
    code, out = _on_a_terminal("resolve", "--conda", "no-such-package", "-p", "linux-64", env=env)
    assert code == 1, out
    assert "✗" in out and "✓" not in out, out
    assert "solve command line linux-64" in out
    assert "\x1b[1;31merror\x1b[0m: " in out  # error: in red
    assert "no package named 'no-such-package'" in out

    plain = {**env, "NO_COLOR": "1"}
    code, out = _on_a_terminal("resolve", "--conda", "no-such-package", "-p", "linux-64", env=plain)
    assert code == 1
    assert "✗" in out and "✓" not in out
    assert "envmgr: error: " in out and "\x1b[1;31m" not in out


def test_a_finished_solve_gets_a_check_mark(world):
    code, out = _on_a_terminal("resolve", "--conda", "tabulate", "-p", "linux-64", env=world)
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
