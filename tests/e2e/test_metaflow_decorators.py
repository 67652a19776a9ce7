"""The decorator objects behave like stock Metaflow 2.19's, as Metaflow registers them.

Code that inspects a step's packages (deployers, mutators, other extensions) reads
``attributes`` and ``is_attribute_user_defined``; these tests take the classes from Metaflow's
plugin registry (so they are what a flow gets) and check what that code sees.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

metaflow = pytest.importorskip("metaflow")
from metaflow.plugins import ENVIRONMENTS, FLOW_DECORATORS, STEP_DECORATORS  # noqa: E402

STEP = {d.name: d for d in STEP_DECORATORS}
FLOW = {d.name: d for d in FLOW_DECORATORS}
SERIES = f"{sys.version_info[0]}.{sys.version_info[1]}"
ALL = [STEP["conda"], STEP["pypi"], FLOW["conda_base"], FLOW["pypi_base"]]
CONDA_KINDS = [STEP["conda"], FLOW["conda_base"]]


def _load(path: Path, source: str, class_name: str):
    """The flow class in *source* (written to *path*), instantiated as Metaflow's runtime
    would without a CLI, and the conda environment for it."""
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flow = getattr(module, class_name)(use_cli=False)
    return flow, next(e for e in ENVIRONMENTS if e.TYPE == "conda")(flow)


def _initialised(cls, **attributes):
    deco = cls(attributes=attributes or None)
    deco.external_init()  # what Metaflow runs before any hook (it calls init)
    return deco


def test_the_registered_classes_are_envmgrs_with_stock_names():
    assert {
        name: (cls.__name__, cls.__module__.rsplit(".", 1)[-1])
        for name, cls in {**STEP, **FLOW}.items()
        if name in ("conda", "pypi", "conda_base", "pypi_base")
    } == {
        "conda": ("CondaStepDecorator", "envmgr_decorators"),
        "pypi": ("PyPIStepDecorator", "envmgr_decorators"),
        "conda_base": ("CondaFlowDecorator", "envmgr_decorators"),
        "pypi_base": ("PyPIFlowDecorator", "envmgr_decorators"),
    }


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_defaults_after_init(cls):
    deco = _initialised(cls)
    assert deco.attributes["packages"] == {}
    assert deco.attributes["python"] is None
    assert not deco.attributes["disabled"]
    assert not any(deco.is_attribute_user_defined(k) for k in deco.attributes)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_user_given_attributes_are_tracked(cls):
    deco = _initialised(cls, python="3.10")
    assert deco.is_attribute_user_defined("python")
    assert not deco.is_attribute_user_defined("packages")
    assert deco.attributes["python"] == "3.10"
    deco = _initialised(cls, packages={"numpy": "1.26"}, disabled=True)
    assert deco.is_attribute_user_defined("packages") and not deco.is_attribute_user_defined(
        "python"
    )
    assert deco.attributes["packages"] == {"numpy": "1.26"} and deco.attributes["disabled"] is True


@pytest.mark.parametrize("cls", CONDA_KINDS, ids=lambda c: c.name)
def test_libraries_are_merged_into_packages_which_win(cls):
    deco = _initialised(cls, libraries={"scipy": "1.11"})
    assert deco.attributes["packages"] == {"scipy": "1.11"}
    assert deco.attributes["libraries"] == {}
    assert deco.is_attribute_user_defined("packages") and deco.is_attribute_user_defined(
        "libraries"
    )
    deco = _initialised(
        cls, packages={"numpy": "2.1.3"}, libraries={"numpy": "2.0.0", "six": "1.17.0"}
    )
    assert deco.attributes["packages"] == {"numpy": "2.1.3", "six": "1.17.0"}
    assert deco.attributes["libraries"] == {}


def test_init_runs_for_every_class():
    """Metaflow calls ``init`` only when the class itself defines it."""
    assert all("init" in cls.__dict__ for cls in ALL)


FLOW_SOURCE = """
from metaflow import FlowSpec, conda, conda_base, pypi, pypi_base, step

@conda_base(libraries={"numpy": "2.1.*"}, python="3.11")
@pypi_base(packages={"six": "1.17.0"})
class AttrFlow(FlowSpec):
    @conda(packages={"tabulate": "0.9.*"}, libraries={"numpy": "2.0.*"})
    @step
    def start(self):
        self.next(self.fetch)

    @pypi(packages={"colorama": ""}, disabled=False)
    @step
    def fetch(self):
        self.next(self.end)

    @conda(disabled=True)
    @step
    def end(self):
        pass
"""


@pytest.fixture(scope="module")
def flow(tmp_path_factory, monkeypatch_module):
    path = tmp_path_factory.mktemp("attrflow") / "attrflow.py"
    flow, environment = _load(path, FLOW_SOURCE, "AttrFlow")
    for deco in (d for decos in flow._flow_decorators.values() for d in decos):
        deco.external_init()
    for step in flow:
        for deco in step.decorators:
            deco.external_init()
            deco.step_init(flow, flow._graph, step.name, step.decorators, environment, None, print)
    return flow, environment


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("USER", "envmgr-test")
        yield patch


def _deco(flow, step, name):
    return next(d for d in getattr(flow, step).decorators if d.name == name)


def test_after_step_init_attributes_read_as_stock(flow):
    flow, _environment = flow
    start = _deco(flow, "start", "conda")
    # The flow's packages under the step's (the step's numpy wins), libraries emptied.
    assert start.attributes["packages"] == {"numpy": "2.0.*", "tabulate": "0.9.*"}
    assert start.attributes["libraries"] == {}
    assert start.attributes["python"] == "3.11"  # the flow's
    assert start.attributes["disabled"] is False
    assert start.is_attribute_user_defined("python")  # given on the flow, as stock counts it
    fetch = _deco(flow, "fetch", "pypi")
    assert fetch.attributes["packages"] == {"six": "1.17.0", "colorama": ""}
    assert _deco(flow, "end", "conda").attributes["disabled"] is True


def test_a_step_without_python_gets_the_launching_series(tmp_path):
    flow, environment = _load(
        tmp_path / "nopy.py",
        "from metaflow import FlowSpec, conda, step\n"
        "class NoPy(FlowSpec):\n"
        "    @conda(packages={'six': ''})\n"
        "    @step\n"
        "    def start(self):\n"
        "        self.next(self.end)\n"
        "    @step\n"
        "    def end(self):\n"
        "        pass\n",
        "NoPy",
    )
    deco = _deco(flow, "start", "conda")
    deco.external_init()
    deco.step_init(flow, flow._graph, "start", flow.start.decorators, environment, None, print)
    assert deco.attributes["python"] == SERIES
    assert not deco.is_attribute_user_defined("python")


def test_the_spec_comes_from_what_each_decorator_was_given(flow):
    """Merging the flow's attributes into the step's (for inspectors) does not change the env:
    the run's spec is the step's own arguments over the flow's, as ``envmgr build`` reads."""
    flow, environment = flow
    environment._datastore = "local"
    specs, names = environment._specs()
    assert names == {}
    assert sorted(specs) == ["fetch", "start"]  # end is disabled: the launching python
    assert [str(d) for d in specs["start"].conda] == [
        "numpy 2.0.*",
        "requests >=2.21.0",
        "tabulate 0.9.*",
    ]
    assert specs["start"].python == "3.11.*"
    assert [str(d) for d in specs["fetch"].pypi] == ["colorama", "six==1.17.0"]
    assert [str(d) for d in specs["fetch"].conda] == ["numpy 2.1.*", "requests >=2.21.0"]
    assert environment.is_disabled(flow.end) and not environment.is_disabled(flow.start)


def test_attribute_values_survive_the_decorator_spec_round_trip():
    """``--with conda:...`` carries attributes as a spec string. Metaflow reads an unquoted
    ``python=3.10`` as the number 3.1, so envmgr refuses numbers instead of guessing."""
    deco = _initialised(STEP["conda"], libraries={"numpy": "2.1"}, python="3.10")
    again = STEP["conda"].parse_decorator_spec(deco.make_decorator_spec().split(":", 1)[1])
    again.external_init()
    assert again.attributes["packages"] == {"numpy": "2.1"}
    from envmgr.errors import SpecError
    from envmgr.specs.decorators import DecoratorCall, layer_from_call

    with pytest.raises(SpecError, match=r"python: is the number 3.1; quote it"):
        layer_from_call(DecoratorCall(kind="conda", kwargs={"python": 3.1}), where="step 'a'")


PLACED_FLOW = """
from metaflow import FlowSpec, batch, conda, conda_base, kubernetes, pypi, step

@conda_base(libraries={"numpy": ">=2"})
class PlacedFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @kubernetes(cpu=1)
    @pypi(packages={"six": "1.17.0"})
    @step
    def train(self):
        self.next(self.tune)

    @batch(gpu="2", memory=16000)
    @step
    def tune(self):
        self.next(self.mac)

    @conda(libraries={"tabulate": "0.9.*"}, platforms=["osx-arm64"])
    @step
    def mac(self):
        self.next(self.end)

    @conda(name="team/env:stable")
    @step
    def end(self):
        pass
"""


@pytest.mark.parametrize("datastore", ["local", "s3", "gs"])
def test_the_cli_and_the_extension_compute_the_same_specs(tmp_path, datastore, monkeypatch):
    """``envmgr build flow.py`` reads the file; the run reads the decorator objects. Both go
    through envmgr.specs.flows, so every step's spec id (and so its lock and env) is the same."""
    from envmgr.cuda import DEFAULT_CUDA
    from envmgr.specs.discovery import read_flow
    from envmgr.specs.flows import run_settings, run_specs

    monkeypatch.setenv("USER", "envmgr-test")
    monkeypatch.delenv("ENVMGR_REMOTE_PLATFORM", raising=False)
    monkeypatch.delenv("ENVMGR_CUDA", raising=False)
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "11.8")  # what the host has decides nothing
    path = tmp_path / "placed.py"
    flow, environment = _load(path, PLACED_FLOW, "PlacedFlow")
    environment._datastore = datastore
    for step in flow:
        if not any(d.name == "conda" for d in step.decorators):  # what decospecs() adds
            step.decorators.append(STEP["conda"](attributes=None))
        for deco in step.decorators:
            deco.external_init()
    run, run_names = environment._specs()

    found = read_flow(path)
    cli = run_specs(found.specs, found.placements, run_settings(datastore))
    assert {k: v.spec_id for k, v in cli.items()} == {k: v.spec_id for k, v in run.items()}
    assert sorted(run) == ["mac", "start", "train", "tune"]
    assert run_names == found.names == {"end": "team/env:stable"}
    assert run["train"].platforms == ("linux-64",)  # @kubernetes: the remote platform
    # @batch(gpu="2") asks for GPUs: locked for the cluster's CUDA; no other step is.
    assert dict(run["tune"].system) == {"__cuda": DEFAULT_CUDA}
    assert not any(dict(run[s].system) for s in ("start", "train", "mac"))
    assert run["mac"].platforms == ("osx-arm64",)
    names = {d.name for d in run["train"].pypi} | {d.name for d in run["train"].conda}
    if datastore == "s3":
        assert "boto3" in names
    if datastore == "gs":
        assert {"google-cloud-storage", "google-auth"} <= names


def test_envmgrs_copy_of_metaflows_task_packages_is_metaflows():
    """Without Metaflow installed, ``envmgr build flow.py`` uses its copy of the pins."""
    from metaflow import metaflow_config

    from envmgr.specs.flows import _TASK_PACKAGES, DATASTORES, task_packages

    for datastore in DATASTORES:
        assert metaflow_config.get_pinned_conda_libs(None, datastore) == _TASK_PACKAGES[datastore]
        assert task_packages(datastore) == _TASK_PACKAGES[datastore]


def _step(name, *decorators):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, decorators=list(decorators))


@pytest.mark.parametrize(
    ("decorators", "expected", "message"),
    [
        ((("named_env", {"name": "team/tab"}, True),), ("name", "team/tab"), None),
        ((("named_env", {"pathspec": "F/1/start"}, True),), ("pathspec", "F/1/start"), None),
        ((("named_env", {"disabled": True}, True),), ("disabled", True), None),
        # The environment's bare @conda on every step gives way; the user's does not.
        ((("named_env", {"name": "t/a"}, True), ("conda", {}, False)), ("name", "t/a"), None),
        (
            (("named_env", {"name": "t/a"}, True), ("pypi", {"packages": {"six": ""}}, True)),
            None,
            "runs the step in an env as it is; drop @pypi",
        ),
        (
            (("named_env", {"name": "t/a", "fetch_at_exec": True}, True),),
            ("name", "t/a"),
            "fixes a step's env when the run starts",
        ),
        ((("named_env", {"name": "t/a", "pathspec": "F/1/s"}, True),), None, ", not both"),
        ((("named_env", {}, True),), None, 'give name="team/env:tag" or pathspec='),
    ],
)
def test_what_named_env_says_of_a_step(decorators, expected, message):
    """netflixext's @named_env, read as the environment reads it (one Problem per mistake)."""
    from metaflow_extensions.envmgr.plugins.envmgr_steps import named_env

    decos = []
    for name, attributes, static in decorators:
        deco = STEP[name](attributes=attributes or None, statically_defined=static)
        if name != "named_env":
            deco._envmgr_own = attributes  # what step_init records for @conda/@pypi
        decos.append(deco)
    problems: list = []
    assert named_env(_step("start", *decos), None, problems) == expected
    assert [p.message for p in problems if message and message in p.message] or not message
    assert bool(problems) == bool(message)


def test_named_env_base_serves_steps_without_their_own():
    from metaflow_extensions.envmgr.plugins.envmgr_steps import named_env

    base = FLOW["named_env_base"](attributes={"name": "team/tab:stable"})
    own = STEP["conda"](attributes={"libraries": {"six": ""}}, statically_defined=True)
    own._envmgr_own = {"libraries": {"six": ""}}
    problems: list = []
    assert named_env(_step("a"), base, problems) == ("name", "team/tab:stable")
    assert named_env(_step("b", own), base, problems) is None and problems == []


@pytest.mark.parametrize("pathspec", ["F/../start", "F/1", "F/1/start/2/3", "F//start", "F/1/.x"])
def test_a_pathspec_that_is_not_one_is_refused_before_any_lookup(pathspec):
    from envmgr.errors import EnvmgrError
    from metaflow_extensions.envmgr.plugins.envmgr_environment import _pathspec_envs

    with pytest.raises(EnvmgrError, match="not a step or task pathspec"):
        _pathspec_envs(None, pathspec, ("linux-64",), step="again")  # no store is touched
