"""``python flow.py --environment=conda environment resolve|build|show`` on a flow whose envs
only a run can know (a computed python, a Config-driven @pypi, @conda through --with)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import run_envmgr
from test_metaflow import _flow_env, _seen

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "fixtures" / "flows" / "computedflow.py"
#: `end` has no decorator of its own: it gets this one, as `run --with` gives it.
WITH = 'conda:libraries={"colorama": ""}'
ENV_LINE = re.compile(r"envmgr: (.+): (\S+) env ([0-9a-f]{12}) \((.+)\)$")


def _flow(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FLOW), "--environment=conda", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )


@pytest.fixture(scope="module")
def commands(conda_channel, pypi_index, tmp_path_factory):
    """resolve, show, build and show again, then the run; every output."""
    home = tmp_path_factory.mktemp("mfcmd")
    env = _flow_env(home, conda_channel.url, PIP_INDEX_URL=pypi_index.url)
    out = {}
    for name, args in {
        "unresolved": ("environment", "--with", WITH, "show"),
        "resolve": ("environment", "--with", WITH, "resolve", "--json"),
        "show": ("environment", "--with", WITH, "show", "--json"),
        "build": ("environment", "--with", WITH, "build", "--json"),
        "shown": ("environment", "--with", WITH, "show"),
        "run": ("run", "--with", WITH),
    }.items():
        out[name] = _flow(env, home, *args)
    return home, env, out


def test_the_static_reader_cannot_read_this_flow_and_says_what_to_run(commands):
    home, env, _out = commands
    refused = run_envmgr("build", str(FLOW), env=env, cwd=home)
    assert refused.returncode != 0
    assert "not a literal" in refused.stderr
    assert "environment build" in refused.stderr, refused.stderr


def test_show_before_resolve_names_the_steps_and_the_command(commands):
    _home, _env, out = commands
    shown = out["unresolved"]
    assert shown.returncode != 0
    message = shown.stdout + shown.stderr
    assert "no lock yet for" in message and "environment resolve" in message, message
    assert "Traceback" not in message


def test_resolve_locks_every_step_and_builds_nothing(commands):
    _home, _env, out = commands
    assert out["resolve"].returncode == 0, out["resolve"].stderr[-3000:]
    rows = json.loads(out["resolve"].stdout)["envs"]
    assert sorted(s for r in rows for s in r["steps"]) == ["end", "middle", "start"]
    assert all(r["platform"] == "linux-64" and not r["cached"] for r in rows)
    shown = json.loads(out["show"].stdout)["envs"]
    assert {r["env_id"] for r in shown} == {r["env_id"] for r in rows}
    assert not any(r["stored"] for r in shown)


def test_build_makes_exactly_the_envs_the_run_uses(commands):
    home, _env, out = commands
    assert out["build"].returncode == 0, out["build"].stderr[-3000:]
    built = {s: r["env_id"] for r in json.loads(out["build"].stdout)["envs"] for s in r["steps"]}
    resolved = {
        s: r["env_id"] for r in json.loads(out["resolve"].stdout)["envs"] for s in r["steps"]
    }
    assert built == resolved
    assert "in the store" in out["shown"].stdout and "not built" not in out["shown"].stdout
    run = out["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    output = run.stdout + run.stderr
    lines = [ENV_LINE.search(line) for line in output.splitlines()]
    used = {step: m.group(3) for m in lines if m for step in m.group(1).split(", ")}
    assert used == {step: env_id[:12] for step, env_id in built.items()}
    states = {m.group(4) for m in lines if m}
    assert states == {"cached lock, stored already"}, states
    seen = _seen(output)
    assert seen["start"][0][1]["tabulate"] == "0.9.0"  # the Config's @pypi
    assert seen["middle"][0][1]["six"] == "1.17.0"
    assert "colorama" in seen["end"][0][1]  # from --with only
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    for step, env_id in built.items():
        prefix = home / "cache" / "envs" / env_id
        assert list(prefix.glob(f"lib/python{python}/site-packages")), (step, python)


def test_a_step_that_is_not_in_the_flow_is_one_line(commands):
    home, env, _out = commands
    one = _flow(env, home, "environment", "--with", WITH, "resolve", "--step", "middle", "--json")
    assert one.returncode == 0, one.stderr[-2000:]
    assert [r["steps"] for r in json.loads(one.stdout)["envs"]] == [["middle"]]
    wrong = _flow(env, home, "environment", "build", "--step", "trian")
    assert wrong.returncode != 0
    assert "has no step 'trian'" in wrong.stderr and "Traceback" not in wrong.stderr


NETFLIXEXT_FLOW = """
import os
from metaflow import FlowSpec, named_env, named_env_base, step


def seen():
    import contextlib, importlib.metadata as m, sys

    out = dict()
    for name in ("tabulate", "six"):
        with contextlib.suppress(m.PackageNotFoundError):
            out[name] = m.version(name)
    return sys.prefix, out


@named_env_base(name="team/tab:stable")
class NamedFlow(FlowSpec):
    @named_env(name="team/tab")
    @step
    def start(self):
        print("SEEN start", seen())
        self.next(self.again)

    @named_env(pathspec=os.environ["EARLIER"])
    @step
    def again(self):
        print("SEEN again", seen())
        self.next(self.end)

    @step
    def end(self):
        print("SEEN end", seen())


if __name__ == "__main__":
    NamedFlow()
"""


FIRST_FLOW = """
from metaflow import FlowSpec, named_env, step


class FirstFlow(FlowSpec):
    @named_env(name="team/tab")
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FirstFlow()
"""


@pytest.fixture(scope="module")
def netflixext(conda_channel, pypi_index, tmp_path_factory):
    """netflixext's sample shape: ``from metaflow import named_env``; two named envs (tags
    stable and latest) and a run whose ``again`` step reuses the env of an earlier run's
    ``start`` by pathspec."""
    home = tmp_path_factory.mktemp("nflx")
    env = _flow_env(home, conda_channel.url, PIP_INDEX_URL=pypi_index.url)
    ids = {}
    for name, pins in (
        ("team/tab:stable", ("tabulate=0.9.0", "requests")),
        ("team/tab:latest", ("six=1.17.0", "requests")),
        ("team/bare:latest", ("tabulate=0.9.0",)),  # no requests: Metaflow's tasks need it
    ):
        made = run_envmgr(
            "build", *(f"--conda={p}" for p in pins), "--python", "3.11", "--json",
            env=env, cwd=home,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        env_id = json.loads(made.stdout)["envs"][0]["env_id"]
        ids.setdefault(name.split(":")[1], env_id)
        aliased = run_envmgr("alias", env_id, name, env=env, cwd=home)
        assert aliased.returncode == 0, aliased.stderr
    first = home / "firstflow.py"
    first.write_text(FIRST_FLOW)
    flow = home / "namedflow.py"
    flow.write_text(NETFLIXEXT_FLOW)
    runs = []
    for path in (first, flow):
        ran = subprocess.run(
            [sys.executable, str(path), "--environment=conda", "run"],
            capture_output=True, text=True, env=env, cwd=home, check=False,
        )  # fmt: skip
        output = ran.stdout + ran.stderr
        assert ran.returncode == 0, output[-3000:]
        runs.append(output)
        run_id = re.search(r"run-id (\d+)", output).group(1)
        env.setdefault("EARLIER", f"FirstFlow/{run_id}/start")
    return home, env, ids, runs, flow


def test_a_netflixext_named_env_flow_runs_with_envmgr(netflixext):
    home, env, ids, runs, flow = netflixext
    shown = subprocess.run(
        [sys.executable, str(flow), "--environment=conda", "environment", "show"],
        capture_output=True, text=True, env=env, cwd=home, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"again            the env {env['EARLIER']} ran in: used as it is" in shown.stdout
    assert "end              named env team/tab:stable: used as it is" in shown.stdout
    seen = _seen(runs[1])
    assert seen["start"][0][0].endswith(ids["latest"])  # name without a tag: latest
    assert seen["again"][0][0].endswith(ids["latest"])  # the earlier run's start
    assert seen["end"][0][0].endswith(ids["stable"])  # the flow's @named_env_base
    assert seen["end"][0][1] == {"tabulate": "0.9.0"} and seen["start"][0][1] == {"six": "1.17.0"}
    assert f"again: linux-64 env {ids['latest'][:12]} (as FirstFlow/" in runs[1]
    assert "solved" not in runs[1] and "built" not in runs[1].replace("stored already", "")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Spec mistakes are Problems whatever reads them, each one line: their cases are in
        # test_metaflow_decorators.py::test_what_named_env_says_of_a_step.
        (
            ('@named_env(name="team/tab")', '@named_env(name="team/bare")'),
            "named team/bare:latest, linux-64) has no requests, which Metaflow's task code imports",
        ),
        (
            ('os.environ["EARLIER"]', '"FirstFlow/999999/start"'),
            "step 'again': @named_env(pathspec='FirstFlow/999999/start'): no such task",
        ),
    ],
)
def test_a_wrong_named_env_stops_the_run_in_one_line(netflixext, tmp_path, change, message):
    _home, env, _ids, _runs, flow = netflixext
    wrong = flow.parent / f"{tmp_path.name}.py"  # beside the first run's local metadata
    wrong.write_text(flow.read_text().replace(*change))
    ran = subprocess.run(
        [sys.executable, str(wrong), "--environment=conda", "run"],
        capture_output=True, text=True, env=env, cwd=flow.parent, check=False,
    )  # fmt: skip
    assert ran.returncode != 0
    assert message in ran.stderr, ran.stderr[-2000:]
    assert "Traceback" not in ran.stderr and "SEEN" not in ran.stdout


def test_the_static_reader_names_the_flows_own_command_for_configs(commands, tmp_path):
    """A flow that uses a Config but literal decorators reads fine; the warning says which
    command sees what the Config changes."""
    home, env, _out = commands
    flow = tmp_path / "configflow.py"
    flow.write_text(
        "from metaflow import Config, FlowSpec, conda, step\n"
        "class ConfigFlow(FlowSpec):\n"
        "    cfg = Config('cfg', default_value={})\n"
        "    @conda(libraries={'six': '1.17.0'})\n"
        "    @step\n"
        "    def start(self):\n"
        "        self.next(self.end)\n"
        "    @step\n"
        "    def end(self):\n"
        "        pass\n"
    )
    resolved = run_envmgr("resolve", str(flow), env=env, cwd=home)
    assert resolved.returncode == 0, resolved.stderr
    assert "uses Metaflow's Config" in resolved.stderr
    assert f"python {flow} --environment=conda environment build" in resolved.stderr
