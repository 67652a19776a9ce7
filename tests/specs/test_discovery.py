"""envmgr.discover reads every step's merged spec from a flow file without running it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import envmgr
from envmgr.errors import SpecError
from envmgr.specs.decorators import ATTRIBUTE
from envmgr.specs.discovery import discover_source

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "fixtures" / "flows" / "envflow.py"

_DISCOVER = """
import json, sys
{block}
import envmgr
specs = envmgr.discover(sys.argv[1])
print(json.dumps({{k: v.to_dict() for k, v in specs.items()}}, sort_keys=True))
"""


def _discover_in_subprocess(block: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _DISCOVER.format(block=block), str(FLOW)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


def test_flow_with_base_and_conda_pypi_mixed_steps():
    specs = envmgr.discover(FLOW)
    assert sorted(specs) == ["end", "fetch", "prepare", "report", "start"]
    kinds = {name: spec.kind for name, spec in specs.items()}
    assert kinds == {
        "start": "conda",
        "prepare": "conda",
        "fetch": "mixed",
        "report": "mixed",
        "end": "conda",
    }
    assert all(spec.python == "3.11.*" for spec in specs.values())
    assert [str(d) for d in specs["prepare"].conda] == ["numpy 2.1.*", "python-dateutil 2.9.*"]
    assert [str(d) for d in specs["fetch"].conda] == ["numpy >=2"]
    assert [str(d) for d in specs["fetch"].pypi] == ["requests[socks]>=2.31", "six==1.17.0"]
    assert [str(d) for d in specs["report"].conda] == ["numpy >=2", "tabulate 0.9.*"]
    assert [str(d) for d in specs["report"].pypi] == ["colorama"]
    assert specs["start"].spec_id == specs["end"].spec_id


def test_same_specs_with_and_without_metaflow_installed():
    assert importlib.util.find_spec("metaflow") is not None  # the test extra installs it
    with_metaflow = _discover_in_subprocess("import metaflow")
    # A None entry in sys.modules makes every `import metaflow` fail, as if not installed.
    without = _discover_in_subprocess("sys.modules['metaflow'] = None")
    assert with_metaflow == without
    assert with_metaflow == {k: v.to_dict() for k, v in envmgr.discover(FLOW).items()}


def test_example_flow_is_a_real_metaflow_flow(tmp_path):
    env = {**os.environ, "USER": "envmgr-test", "METAFLOW_HOME": str(tmp_path)}
    shown = subprocess.run(
        [sys.executable, str(FLOW), "--environment=conda", "show"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert "Step report" in shown.stdout + shown.stderr


def test_plain_module_of_decorated_functions():
    path = ROOT / "fixtures" / "flows" / "plain_steps.py"
    specs = envmgr.discover(path)
    assert sorted(specs) == ["parse", "summarize"]
    assert specs["summarize"].kind == "conda" and specs["parse"].kind == "pypi"

    from fixtures.flows import plain_steps

    # The decorators attach the spec and change nothing else.
    assert plain_steps.summarize([1, 2]) == 2 and plain_steps.parse(" x ") == "x"
    assert plain_steps.summarize.__name__ == "summarize"
    assert [c.kind for c in getattr(plain_steps.parse, ATTRIBUTE)] == ["pypi"]
    assert not hasattr(plain_steps.helper, ATTRIBUTE)


def test_runtime_decorators_on_classes_methods_and_bare_use():
    @envmgr.conda_base(python="3.11")
    class Flow:
        @envmgr.conda
        def step_a(self):
            return "a"

    assert Flow().step_a() == "a"
    assert getattr(Flow, ATTRIBUTE)[0].kwargs == {"python": "3.11"}
    assert getattr(Flow.step_a, ATTRIBUTE)[0].kwargs == {}
    with pytest.raises(TypeError):
        envmgr.pypi("not-a-function")


def test_aliases_constants_and_dict_calls():
    source = """
import metaflow as mf
from envmgr import pypi as pip_deps
BASE = {"numpy": "1.26.*"}
CHANNELS = ["conda-forge", "pytorch"]

@mf.conda_base(libraries=BASE, channels=CHANNELS)
class F(mf.FlowSpec):
    @mf.step
    def start(self):
        pass

    @pip_deps(packages=dict(requests=">=2"))
    @mf.step
    def fetch(self):
        pass
"""
    specs = discover_source(source, "f.py")
    assert specs["start"].channels == ("conda-forge", "pytorch")
    assert [str(d) for d in specs["fetch"].pypi] == ["requests>=2"]


def test_unrelated_decorators_are_not_steps():
    source = """
from functools import cache
def conda(**kw):
    return lambda f: f

@conda(libraries={"x": "1"})
def not_ours():
    pass

@cache
def other():
    pass
"""
    assert discover_source(source, "f.py") == {}


def test_every_problem_of_a_flow_file_at_once():
    source = """
from metaflow import FlowSpec, step, conda, pypi, conda_base
import os

@conda_base(python=os.environ["PY"])
class F(FlowSpec):
    @conda(libraries={"numpy": ">>1"})
    @conda(libraries={"pandas": ""})
    @step
    def start(self):
        pass

    @pypi(packages={"requests": 2})
    @step
    def end(self):
        pass
"""
    with pytest.raises(SpecError) as info:
        discover_source(source, "flow.py")
    text = str(info.value)
    assert "line 5: not a literal" in text and "@conda_base python" in text
    assert "step 'start': @conda: given twice" in text
    assert "step 'end': @pypi packages['requests']" in text


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read: no such flow file"):
        envmgr.discover(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("def broken(:\n")
    with pytest.raises(SpecError, match=r"bad.py:1.*not valid Python"):
        envmgr.discover(bad)


METAFLOW_FLOW = """
import metaflow as mf
from metaflow import FlowSpec, conda, pypi, step, kubernetes as k8s

class Placed(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @k8s(cpu=2)
    @pypi(packages={"six": "1.17.0"})
    @step
    def train(self):
        self.next(self.score)

    @mf.batch
    @conda(name="team/score:stable")
    @step
    def score(self):
        self.next(self.end)

    @conda(disabled=True)
    @step
    def end(self):
        pass
"""


def test_read_flow_knows_every_metaflow_step_where_it_runs_and_its_named_env():
    from envmgr.specs.discovery import read_flow_source
    from envmgr.specs.flows import Placement

    found = read_flow_source(METAFLOW_FLOW, "placed.py")
    assert found.is_metaflow and found.metaflow_steps == {"start", "train", "score", "end"}
    # start has no decorator: a run gives it the (empty) base env all the same.
    assert sorted(found.specs) == ["end", "start", "train"]
    assert found.names == {"score": "team/score:stable"}
    assert found.placements["train"] == Placement(remote="kubernetes")
    assert found.placements["score"] == Placement(remote="batch")
    assert found.placements["start"] == Placement()


def test_run_specs_complete_a_step_like_a_run(monkeypatch):
    """On a host without Metaflow too (its pins are then envmgr's copy of them)."""
    from envmgr.specs import flows
    from envmgr.specs.discovery import read_flow_source
    from envmgr.specs.flows import run_settings, run_specs

    monkeypatch.delenv("ENVMGR_REMOTE_PLATFORM", raising=False)
    monkeypatch.setattr(flows, "_metaflow_config", lambda: None)
    found = read_flow_source(METAFLOW_FLOW, "placed.py")
    specs = run_specs(found.specs, found.placements, run_settings("s3", "3.12"))
    assert sorted(specs) == ["start", "train"]  # end is disabled, score is named
    assert specs["start"].python == "3.12.*"
    assert [str(d) for d in specs["start"].conda] == ["boto3 >=1.14.0", "requests >=2.21.0"]
    # A PyPI-only step gets Metaflow's packages from PyPI, as stock does.
    assert [str(d) for d in specs["train"].pypi] == [
        "boto3>=1.14.0",
        "requests>=2.21.0",
        "six==1.17.0",
    ]
    assert specs["train"].platforms == ("linux-64",)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--datastore", "nope"), "--datastore: unknown datastore 'nope'"),
        (("--python", "3..12"), "--python: bad python version '3..12'"),
    ],
)
def test_bad_run_settings_for_a_flow_are_one_line(tmp_path, args, needle):
    from _helpers import run_envmgr

    flow = tmp_path / "placed.py"
    flow.write_text(METAFLOW_FLOW)
    result = run_envmgr("build", str(flow), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_configs_and_mutators_are_named_since_a_read_cannot_apply_them():
    from envmgr.specs.discovery import read_flow_source

    source = (
        "from metaflow import FlowSpec, FlowMutator, Config, conda, step\n"
        "class Adds(FlowMutator):\n"
        "    def mutate(self, flow):\n"
        "        pass\n"
        "@Adds\n"
        "class F(FlowSpec):\n"
        "    cfg = Config('cfg', default='cfg.json')\n"
        "    @conda(packages={'six': ''})\n"
        "    @step\n"
        "    def start(self):\n"
        "        pass\n"
    )
    assert read_flow_source(source).dynamic == ("Config", "FlowMutator")
    assert read_flow_source(METAFLOW_FLOW).dynamic == ()


NAMED_ENV_FLOW = """
import metaflow as mf
from metaflow import FlowSpec, named_env, step
from metaflow import named_env_base as base


@base(name="team/tab:stable")
class NamedFlow(FlowSpec):
    @named_env(name="team/tab")
    @step
    def start(self):
        self.next(self.off)

    @mf.named_env(disabled=True)
    @step
    def off(self):
        self.next(self.end)

    @step
    def end(self):
        pass
"""


def test_netflixext_named_env_reads_as_a_named_env_of_envmgr():
    """``envmgr build flow.py`` reads netflixext's @named_env as the run does: a name (no
    tag: latest), the flow's @named_env_base for steps without their own, disabled."""
    from envmgr.specs.discovery import read_flow_source

    found = read_flow_source(NAMED_ENV_FLOW, "namedflow.py")
    assert found.names == {"start": "team/tab:latest", "end": "team/tab:stable"}
    assert set(found.specs) == {"off"} and found.specs["off"].disabled


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('@named_env(name="team/tab")', '@named_env(pathspec="NamedFlow/12/start")'),
            "step 'start': @named_env: namedflow.py:9: the env of a pathspec (or one fetched at "
            "task start) is looked up by a run; let the flow do it: python namedflow.py "
            "--environment=conda environment build",
        ),
        (
            (
                '@named_env(name="team/tab")',
                '@named_env(name="team/tab")\n    @mf.conda(python="3.11")',
            ),
            "step 'start': @named_env: runs the step in an env as it is; drop @conda",
        ),
        (('@named_env(name="team/tab")', "@named_env(nme=1)"), 'give name="team/env:tag"'),
    ],
)
def test_a_named_env_the_reader_cannot_use_is_one_line_each(change, message):
    from envmgr.specs.discovery import read_flow_source

    with pytest.raises(SpecError) as raised:
        read_flow_source(NAMED_ENV_FLOW.replace(*change), "namedflow.py")
    assert message in str(raised.value)
