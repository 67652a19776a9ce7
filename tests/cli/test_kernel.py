"""``envmgr kernel``: a flow step's env as a real Jupyter kernel (ipykernel and jupyter_client
from real wheels), started the way Jupyter starts it, from the kernelspec."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from _helpers import run_envmgr
from _shapes import shaped

from fixtures.pypi_index import PypiIndexServer
from fixtures.wheels import fetch_kernel_wheels, fetch_wheels

FLOW = """
from metaflow import FlowSpec, pypi, step


class KernelFlow(FlowSpec):
    @pypi(packages={"tabulate": "0.9.0"}, python="3.11")
    @step
    def start(self):
        self.next(self.train)

    @pypi(packages={"tabulate": "0.8.10", "ipykernel": "6.29.5"}, python="3.11")
    @step
    def train(self):
        self.next(self.end)

    @step
    def end(self):
        pass
"""

#: Run with the env's python: jupyter_client (ipykernel's dependency) starts the kernel by
#: its name from the kernelspec, as Jupyter does, and runs one cell.
CELL = """
import sys
from jupyter_client.manager import start_new_kernel

manager, client = start_new_kernel(kernel_name=sys.argv[1], startup_timeout=120)
try:
    out = []
    client.execute_interactive(
        "import sys, tabulate; print(tabulate.__version__, sys.prefix)",
        output_hook=out.append, timeout=120,
    )
    print("CELL", *[m["content"]["text"].strip() for m in out if m["msg_type"] == "stream"])
finally:
    client.stop_channels()
    manager.shutdown_kernel(now=True)
"""


@pytest.fixture(scope="module")
def kernel_world(conda_channel, tmp_path_factory):
    """The fixture wheels and ipykernel's behind one index; a user's shell and a flow file."""
    home = tmp_path_factory.mktemp("kernel")
    wheels = home / "wheels"
    wheels.mkdir()
    for source in (fetch_wheels(), fetch_kernel_wheels()):
        for wheel in source.glob("*.whl"):
            if not (wheels / wheel.name).exists():
                os.link(wheel, wheels / wheel.name)
    server = PypiIndexServer(wheels).start()
    (home / "store").mkdir()
    (home / "flow.py").write_text(FLOW)
    env = {
        **os.environ,
        "ENVMGR_CACHE_DIR": str(home / "cache"),
        "ENVMGR_STORE": (home / "store").as_uri(),
        "ENVMGR_CHANNELS": conda_channel.url,
        "PIP_INDEX_URL": server.url,
        "JUPYTER_DATA_DIR": str(home / "jupyter"),
        "HOME": str(home),
    }
    try:
        yield home, env
    finally:
        server.stop()


def test_a_steps_kernel_runs_the_locked_versions_and_goes_away(kernel_world):
    home, env = kernel_world
    made = run_envmgr("kernel", "flow.py:train", "--json", env=env, cwd=home)
    assert made.returncode == 0, made.stderr
    (out,) = shaped("kernel", made.stdout)["kernels"]
    assert out["name"] == "envmgr-flow-train"
    spec_file = home / "jupyter" / "kernels" / "envmgr-flow-train" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    assert spec["language"] == "python" and "{connection_file}" in spec["argv"]
    assert spec["metadata"]["envmgr"]["env_id"] == out["env_id"]
    prefix = home / "cache" / "envs" / out["env_id"]
    ran = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", CELL, "envmgr-flow-train"],
        capture_output=True, text=True, env=env, cwd=home, timeout=300, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    cell = ran.stdout.strip().splitlines()[-1]
    assert cell == f"CELL 0.8.10 {prefix}", cell  # train's lock, not start's 0.9.0
    # gc removes the env no kernel runs in now; the kernel's command hydrates it again.
    collected = run_envmgr("gc", "--older-than", "0s", env=env, cwd=home)
    assert collected.returncode == 0 and not prefix.exists(), collected.stderr
    argv = spec["argv"]
    probe = [
        *argv[: argv.index("--") + 1],
        "python",
        "-c",
        "import tabulate as t; print(t.__version__)",
    ]
    again = subprocess.run(
        probe, capture_output=True, text=True, env={**env, **spec["env"]}, cwd=home, check=False
    )
    assert again.stdout.strip() == "0.8.10" and prefix.is_dir(), again.stderr[-3000:]
    listed = run_envmgr("kernel", "--list", "--json", env=env, cwd=home)
    assert [k["name"] for k in shaped("kernel", listed.stdout)["kernels"]] == [out["name"]]
    removed = run_envmgr("kernel", "flow.py:train", "--remove", env=env, cwd=home)
    assert removed.returncode == 0, removed.stderr
    assert not spec_file.parent.exists()
    assert json.loads(run_envmgr("kernel", "--list", "--json", env=env).stdout)["kernels"] == []


def test_an_env_without_ipykernel_says_what_to_add_and_installs_nothing(kernel_world):
    home, env = kernel_world
    refused = run_envmgr("kernel", "flow.py:start", env=env, cwd=home)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no ipykernel, which a Jupyter kernel runs" in lines[0]
    assert '@pypi(packages={"ipykernel": ""})' in lines[0]
    assert not (home / "jupyter" / "kernels" / "envmgr-flow-start").exists()


def test_remove_leaves_other_kernels_alone(kernel_world):
    home, env = kernel_world
    theirs = home / "jupyter" / "kernels" / "python3"
    theirs.mkdir(parents=True)
    (theirs / "kernel.json").write_text(json.dumps({"argv": ["python3"], "language": "python"}))
    refused = run_envmgr("kernel", "--name", "python3", "--remove", env=env, cwd=home)
    assert refused.returncode != 0 and "is not envmgr's" in refused.stderr
    kept = run_envmgr("kernel", "flow.py:train", "--name", "python3", env=env, cwd=home)
    assert kept.returncode != 0 and "is not envmgr's; envmgr leaves it alone" in kept.stderr
    assert json.loads((theirs / "kernel.json").read_text())["argv"] == ["python3"]
    bad = run_envmgr("kernel", "flow.py:train", "--name", "../x", env=env, cwd=home)
    assert bad.returncode == 2 and "--name '../x'" in bad.stderr
