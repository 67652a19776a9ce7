"""The README's two commands stay true: CI runs exactly the documented test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    commands = _readme_commands()
    assert len(commands) >= 2
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines
    assert "pytest" in commands[1] and "fixtures.demo" in commands[0]


def test_main_job_runs_every_step_in_its_env(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "fixtures.demo", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ran = [line for line in lines if " python 3." in line]
    assert len(ran) == 5 and all("python 3." in line for line in ran)
    fetch = next(line for line in ran if line.startswith("fetch"))
    assert "requests 2.32.3" in fetch and "pysocks" in fetch
    assert "tabulate 0.9.0" in next(line for line in ran if line.startswith("report"))
