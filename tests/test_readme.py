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


def _guide() -> tuple[dict[str, str], list[str]]:
    """Files shown in the guide (blocks starting ``# NAME``) and its ``$`` commands, in order."""
    text = (ROOT / "README.md").read_text()
    files: dict[str, str] = {}
    commands: list[str] = []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S):
        if lang == "console":
            commands += [line[2:] for line in body.splitlines() if line.startswith("$ ")]
        elif lang in ("python", "yaml") and body.startswith("# "):
            files[body.splitlines()[0][2:].strip()] = body
    return files, commands


def test_every_guide_command_runs_as_printed(conda_channel, pypi_index, tmp_path):
    """The user guide, run top to bottom in a fresh directory; only `diff` may exit 1 (it
    reports differences that way)."""
    import os
    import subprocess
    import sys

    files, commands = _guide()
    assert {"flow.py", "environment.yml"} <= files.keys()
    assert len(commands) >= 20
    work = tmp_path / "work"
    work.mkdir()
    for name, body in files.items():
        (work / name).write_text(body)
    script = "".join(f"{cmd}\nprintf '\\n@@ {i} %s\\n' $?\n" for i, cmd in enumerate(commands))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
        "ENVMGR_CHANNELS": conda_channel.url,
        "PIP_INDEX_URL": pypi_index.url,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "METAFLOW_HOME": str(tmp_path / "metaflow"),
        "USER": "envmgr-test",
    }
    env.pop("ENVMGR_STORE", None)
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        check=False,
        timeout=900,
    )
    chunks = re.split(r"\n@@ (\d+) (\d+)\n", "\n" + result.stdout)
    codes = {int(chunks[i]): int(chunks[i + 1]) for i in range(1, len(chunks) - 1, 3)}
    outputs = {int(chunks[i]): chunks[i - 1] for i in range(1, len(chunks) - 1, 3)}
    assert len(codes) == len(commands), result.stderr[-3000:]
    for i, cmd in enumerate(commands):
        allowed = (0, 1) if cmd.startswith("envmgr diff") else (0,)
        assert codes[i] in allowed, f"{cmd!r} exited {codes[i]}:\n{outputs[i]}\n{result.stderr}"
    by_command = dict(zip(commands, (outputs[i] for i in range(len(commands))), strict=True))
    run = next(out for cmd, out in by_command.items() if cmd.startswith("envmgr run"))
    assert run.strip().endswith("0.9.0")
    # Round trips: the explicit file and the requirements give back the train env.
    train_env = (
        next(out for cmd, out in by_command.items() if cmd.startswith("envmgr hydrate demo/train"))
        .strip()
        .split("/envs/")[1]
        .split("/")[0]
    )
    for cmd, out in by_command.items():
        if cmd.startswith(("envmgr resolve --lockfile", "envmgr resolve -r")):
            assert f"env {train_env[:12]}" in out, (cmd, out)
    assert "numpy 2.1.3" in result.stdout and "tabulate 0.9.0" in result.stdout  # the flow ran
    # GPU steps: train is locked for CUDA, start and end are not; a node with an older driver
    # is refused before anything is downloaded.
    gpu = by_command[next(c for c in commands if c.startswith("envmgr resolve gpuflow.py"))]
    cuda_lines = [line.split()[0] for line in gpu.splitlines() if line.endswith("CUDA >= 12")]
    assert cuda_lines == ["train"], gpu
    node = by_command[next(c for c in commands if c.startswith("CONDA_OVERRIDE_CUDA=11.8"))]
    assert node.strip() == "refused", node  # the bootstrap's line went to stderr
    assert "needs CUDA >= 12 (fixture-torch 2.5.1 cuda126_h0_200)" in result.stderr
    assert "this node's driver supports CUDA 11.8" in result.stderr
    # Laptop -> cluster: the worker command hydrated the linux-aarch64 env built on this host.
    pod = next(out for cmd, out in by_command.items() if "--platform linux-aarch64 --cache" in cmd)
    python = Path(pod.strip().splitlines()[-1])
    assert python.parts[-5:-3] == ("pod-cache", "envs") and python.name == "python", pod
    with python.resolve().open("rb") as handle:
        assert handle.read(20)[18] == 183  # e_machine: an aarch64 interpreter
