"""Real Metaflow flows with envmgr behind @conda / @pypi (the metaflow_extensions package)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import bare_worker, s3_env

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "fixtures" / "flows" / "mixedflow.py"
SEEN = re.compile(r"SEEN (\w+) (\(.*\))$")


def _flow_env(home: Path, channel_url: str, **extra: str) -> dict[str, str]:
    """What a user's shell has: the extension on the path, envmgr pointed at the fixtures."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "USER": "envmgr-test",
        "METAFLOW_HOME": str(home),
        "ENVMGR_STORE": (home / "store").as_uri(),
        "ENVMGR_CACHE_DIR": str(home / "cache"),
        "ENVMGR_CHANNELS": channel_url,
        # The host pretends to have a GPU: `mixed` needs CUDA 12 and runs here; no other
        # step's lock may change because of it.
        "CONDA_OVERRIDE_CUDA": "12.4",
        **extra,
    }


@pytest.fixture(scope="module")
def runs(conda_channel, pypi_index, tmp_path_factory):
    """Run the flow twice and return both outputs: the second time with a narrower foreach
    (a parameter; no step's spec changes, so no env may be solved or built again)."""
    home = tmp_path_factory.mktemp("mf")
    (home / "tmp").mkdir()
    env = _flow_env(home, conda_channel.url, PIP_INDEX_URL=pypi_index.url, TMPDIR=str(home / "tmp"))
    outputs = []
    for width in ("10", "2"):
        run = ["run", "--max-workers", "4", "--width", width]
        result = subprocess.run(
            [sys.executable, str(FLOW), "--environment=conda", *run],
            capture_output=True,
            text=True,
            cwd=home,
            env=env,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    return home, env, outputs


def _seen(output: str) -> dict[str, list[tuple[str, dict]]]:
    found: dict[str, list[tuple[str, dict]]] = {}
    for line in output.splitlines():
        match = SEEN.search(line)
        if match:
            prefix, versions = ast.literal_eval(match.group(2))
            found.setdefault(match.group(1), []).append((prefix, versions))
    return found


def _env_locks(
    home: Path, env: dict, output: str, store=None, variants: dict | None = None
) -> dict[str, dict]:
    """Per step, the versions in the lock of the env the task recorded in its metadata (and
    in *variants*, when given, the ``envmgr_variant`` it recorded)."""
    run_id = re.search(r"run-id (\d+)", output).group(1)
    code = (
        "import json; from metaflow import Run, namespace; namespace(None); "
        f"run = Run('EnvmgrFlow/{run_id}'); out = {{}}\n"
        "for step in run:\n"
        "    task = next(iter(step))\n"
        "    meta = {m.name: m.value for m in task.metadata}\n"
        "    out[step.id] = [meta.get('envmgr_env_id'), meta.get('envmgr_variant')]\n"
        "print(json.dumps(out))"
    )
    ids = json.loads(
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=home,
            env=env,
            check=True,
        ).stdout
    )
    from envmgr.cache.layout import env_lock_key
    from envmgr.locks.lock import read_conda_lock

    locks = {}
    for step, (env_id, variant) in ids.items():
        if env_id:
            if variants is not None:
                variants[step] = variant
            path = home / "store" / "envs" / "linux-64" / env_id / "conda-lock.yml"
            if store is not None:
                path = home / f"{env_id}.yml"
                store.get_file(env_lock_key("linux-64", env_id), path)
            packages = read_conda_lock(path).for_platform("linux-64").packages
            locks[step] = {p.name: p.version for p in packages}
    return locks


def test_every_step_sees_its_locked_versions(runs):
    home, env, (first, _second) = runs
    seen = _seen(first)
    assert sorted(seen) == ["end", "fan", "fetch", "mixed", "off", "start"]
    variants: dict[str, str] = {}
    locks = _env_locks(home, env, first, variants=variants)
    cuda = "linux-64, CUDA >= 12 (fixture-torch 2.5.1 cuda126_h0_200)"
    assert variants == {**dict.fromkeys(locks, "linux-64, CPU"), "mixed": cuda}, variants
    for step, tasks in seen.items():
        if step == "off":
            continue
        for prefix, versions in tasks:
            assert prefix.startswith(str(home / "cache" / "envs")), (step, prefix)
            for name, version in versions.items():
                assert locks[step][name] == version, (step, name)
    assert seen["fan"][0][1]["tabulate"] == "0.9.0" and seen["fetch"][0][1]["six"] == "1.17.0"
    assert {"python-dateutil", "colorama"} <= set(seen["mixed"][0][1])
    assert "off" not in locks  # @conda(disabled=True) runs with the host's python
    assert not seen["off"][0][0].startswith(str(home / "cache"))


def test_a_foreach_of_ten_tasks_hydrates_once(runs):
    home, _env, (first, _second) = runs
    fans = _seen(first)["fan"]
    assert len(fans) == 10 and len({prefix for prefix, _ in fans}) == 1
    envs = [p for p in (home / "cache" / "envs").iterdir() if len(p.name) == 32]
    assert len(envs) == 4  # start/join/end share the base env; fan, fetch, mixed


def test_runs_leave_nothing_in_the_temp_dir(runs):
    """The envs file for the code package lives as long as the run's process, not longer
    (a file per run once collected in /tmp)."""
    home, _env, _outputs = runs
    assert sorted(p.name for p in (home / "tmp").iterdir()) == []


def test_second_run_solves_and_builds_nothing(runs):
    _home, _env, (first, second) = runs
    built = re.compile(r"envmgr: .+: linux-64 env [0-9a-f]{12} \(")
    lines = [line for line in second.splitlines() if built.search(line)]
    assert len(lines) == 4
    assert all("(cached lock, stored already)" in line for line in lines), lines
    assert any("solved, built" in line for line in first.splitlines())
    # Layered: each line says how many of its package layers the run built and the bytes.
    layered = re.compile(r"\(solved, built (its \d+|\d+ of its \d+|on its \d+ stored) package ")
    assert all(layered.search(line) for line in first.splitlines() if "solved, built" in line)


_ENVIRONMENT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("userflow", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from metaflow.plugins import ENVIRONMENTS
flow = module.EnvmgrFlow(use_cli=False)
environment = [e for e in ENVIRONMENTS if e.TYPE == "conda"][0](flow)
environment.init_environment(lambda line: None)
step = sys.argv[2]
print(json.dumps({"commands": environment.bootstrap_commands(step, "s3"),
                  "executable": environment.executable(step),
                  # the contents: the envs file goes when this process does
                  "package": [[open(src, encoding="utf-8").read(), arc]
                              for src, arc, _ in environment.add_to_package()]}))
"""


def test_remote_bootstrap_commands_run_in_a_bare_sandbox(
    conda_channel, pypi_index, s3_server, s3_bucket, tmp_path
):
    aws = s3_env(s3_server)
    env = _flow_env(
        tmp_path,
        conda_channel.url,
        **aws,
        PIP_INDEX_URL=pypi_index.url,
        ENVMGR_STORE=f"s3://{s3_bucket}/mf",
        ENVMGR_CACHE_DIR=str(tmp_path / "laptop-cache"),
    )
    out = subprocess.run(
        [sys.executable, "-c", _ENVIRONMENT, str(FLOW), "fetch"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    remote = json.loads(out.stdout.strip().splitlines()[-1])
    # The worker: an empty directory and HOME, no channel, no index; only S3 answers. Its
    # python has boto3 and zstandard but not envmgr: the bootstrap comes in the code package.
    sandbox = tmp_path / "pod"
    sandbox.mkdir()
    for text, arcname in remote["package"]:  # what the code package holds
        (sandbox / arcname).parent.mkdir(parents=True, exist_ok=True)
        (sandbox / arcname).write_text(text, encoding="utf-8")
    _python, worker = bare_worker(tmp_path, aws)
    script = " && ".join(
        [
            *remote["commands"],
            f"{remote['executable']} -c 'import six, sys; print(sys.prefix, six.__version__)'",
        ]
    )
    ran = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, cwd=sandbox, env=worker, check=False
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    prefix, version = ran.stdout.strip().splitlines()[-1].split()
    assert prefix.startswith(str(sandbox / ".envmgr" / "envs")) and version == "1.17.0"


def test_a_bad_spec_stops_the_run_before_any_task(conda_channel, tmp_path):
    flow = tmp_path / "badflow.py"
    flow.write_text(
        "from metaflow import FlowSpec, step, conda\n"
        "class BadFlow(FlowSpec):\n"
        "    @conda(libraries={'numpy': '>>1'})\n"
        "    @step\n"
        "    def start(self):\n"
        "        self.next(self.end)\n"
        "    @step\n"
        "    def end(self):\n"
        "        pass\n"
        "if __name__ == '__main__':\n"
        "    BadFlow()\n"
    )
    env = _flow_env(tmp_path, conda_channel.url)
    result = subprocess.run(
        [sys.executable, str(flow), "--environment=conda", "run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "step 'start'" in output and "numpy >>1" in output
    assert "Traceback" not in output and "Task is starting" not in output


@pytest.mark.parametrize(
    ("decorators", "named"),
    [
        (("", "    @conda(libraries={'six': '1.17.0'})\n"), "@conda decorator on step 'start'"),
        (("", "    @pypi(packages={'six': '1.17.0'})\n"), "@pypi decorator on step 'start'"),
        (("@conda_base(python='3.11')\n", ""), "@conda_base decorator on flow OneFlow"),
    ],
    ids=["conda", "pypi", "conda_base"],
)
def test_without_an_envmgr_environment_the_run_is_refused_like_stock(
    conda_channel, tmp_path, decorators, named
):
    """It ran on the host's python and failed in user code (or passed with other versions);
    stock Metaflow refuses at start, naming the flag."""
    flow_deco, step_deco = decorators
    flow = _one_step_flow(tmp_path / "plainflow.py", step_deco.strip(), flow_deco)
    result = subprocess.run(
        [sys.executable, str(flow), "run"],
        capture_output=True, text=True, cwd=tmp_path, env=_flow_env(tmp_path, conda_channel.url),
        check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{named} requires --environment=conda or --environment=pypi" in output, output
    assert "TASK RAN" not in output and "Traceback" not in output


def test_s3_datastore_flow_stores_envs_under_the_datastore(
    conda_channel, pypi_index, s3_server, s3_bucket, tmp_path
):
    from envmgr.cache.s3 import S3Store

    env = _flow_env(
        tmp_path,
        conda_channel.url,
        PIP_INDEX_URL=pypi_index.url,
        METAFLOW_DEFAULT_DATASTORE="s3",
        METAFLOW_DEFAULT_METADATA="local",
        METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{s3_bucket}/metaflow",
        METAFLOW_S3_ENDPOINT_URL=s3_server.endpoint_url,
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
    )
    env.pop("ENVMGR_STORE", None)
    # CI pre-builds the flow: the datastore (and so boto3 in every env, and the store under
    # the datastore's root) comes from Metaflow's configuration, as for the run.
    from _helpers import run_envmgr

    built = run_envmgr("build", str(FLOW), "--json", env=env, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    prebuilt = json.loads(built.stdout)
    assert prebuilt["store"] == f"s3://{s3_bucket}/metaflow/envmgr"
    result = subprocess.run(
        # Two fan tasks at once (the foreach of ten runs on the local datastore above).
        [sys.executable, str(FLOW), "--environment=conda", "run", "--max-workers", "4",
         "--width", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"store s3://{s3_bucket}/metaflow/envmgr" in output
    lines = [
        line for line in output.splitlines() if re.search(r"envmgr: .+ env [0-9a-f]{12} ", line)
    ]
    assert len(lines) == 4 and all("(cached lock, stored already)" in line for line in lines)
    for row in prebuilt["envs"]:
        assert f"env {row['env_id'][:12]} " in output, row
    store = S3Store(f"s3://{s3_bucket}/metaflow/envmgr", client=s3_server.client())
    locks = _env_locks(tmp_path, env, output, store)
    seen = _seen(output)
    for step in ("start", "fetch", "mixed", "end"):
        for _prefix, versions in seen[step]:
            for name, version in versions.items():
                assert locks[step][name] == version, (step, name)
    assert len(seen["fan"]) == 2


PARITY_FLOW = """
import contextlib
from metaflow import FlowSpec, conda, pypi, step


def seen():
    import importlib.metadata as m
    import sys

    out = {}
    for n in ("six", "tabulate", "requests", "numpy"):
        with contextlib.suppress(m.PackageNotFoundError):
            out[n] = m.version(n)
    return sys.prefix, out


class ParityFlow(FlowSpec):
    @step
    def start(self):
        print("SEEN start", seen())
        self.next(self.fetch)

    @pypi(packages={"six": "1.17.0"}, python="3.11")
    @step
    def fetch(self):
        print("SEEN fetch", seen())
        self.next(self.named)

    @conda(name="team/tab:stable")
    @step
    def named(self):
        print("SEEN named", seen())
        self.next(self.end)

    @conda(libraries={"numpy": ">=2"})
    @step
    def end(self):
        print("SEEN end", seen())


if __name__ == "__main__":
    ParityFlow()
"""

_RUNNER = """
import json, sys
from metaflow import Run, Runner, namespace

with Runner(sys.argv[1], show_output=False, environment="conda") as runner:
    result = runner.run(max_workers=2)
    print(result.stdout + result.stderr)
    print("STATUS " + result.status)
    print("run-id " + result.run.id)
"""

_RUN_ENVS = """
import json, sys
from metaflow import Run, namespace

namespace(None)
out = {}
for step in Run(sys.argv[1]):
    for task in step:
        meta = task.metadata_dict
        out.setdefault(step.id, []).append([meta.get("envmgr_env_id"), meta.get("envmgr_env_name")])
print(json.dumps(out))
"""


def _run_envs(home: Path, env: dict, pathspec: str) -> dict[str, list[list[str | None]]]:
    out = subprocess.run(
        [sys.executable, "-c", _RUN_ENVS, pathspec],
        capture_output=True, text=True, cwd=home, env=env, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parity(conda_channel, pypi_index, tmp_path_factory):
    """A named env, then ``envmgr build flow.py``, then a Runner API run of the same flow,
    then a resume: what each printed and recorded."""
    from _helpers import run_envmgr

    home = tmp_path_factory.mktemp("parity")
    env = _flow_env(home, conda_channel.url, PIP_INDEX_URL=pypi_index.url)
    flow = home / "parityflow.py"
    flow.write_text(PARITY_FLOW)
    made = run_envmgr(
        "build", "--conda", "tabulate=0.9.0", "--conda", "requests", "--python", "3.11",
        "--json", env=env, cwd=home,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    named_id = json.loads(made.stdout)["envs"][0]["env_id"]
    aliased = run_envmgr("alias", named_id, "team/tab:stable", env=env, cwd=home)
    assert aliased.returncode == 0, aliased.stderr
    built = run_envmgr("build", str(flow), "--json", env=env, cwd=home)
    assert built.returncode == 0, built.stderr
    rows = json.loads(built.stdout)["envs"]
    ran = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(flow)],
        capture_output=True, text=True, cwd=home, env=env, check=False,
    )  # fmt: skip
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0 and "STATUS successful" in output, output[-3000:]
    run_id = re.search(r"run-id (\d+)", output).group(1)
    resumed = subprocess.run(
        [sys.executable, str(flow), "--environment=conda", "resume", "named"],
        capture_output=True, text=True, cwd=home, env=env, check=False,
    )  # fmt: skip
    resume_output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resume_output[-3000:]
    resume_id = re.search(r"run-id (\d+)", resume_output).group(1)
    return {
        "home": home,
        "env": env,
        "named_id": named_id,
        "rows": rows,
        "output": output,
        "run": _run_envs(home, env, f"ParityFlow/{run_id}"),
        "resume_output": resume_output,
        "resume": _run_envs(home, env, f"ParityFlow/{resume_id}"),
    }


def test_build_and_a_runner_run_give_every_step_the_same_env(parity):
    built = {step: row["env_id"] for row in parity["rows"] for step in row["steps"]}
    assert sorted(built) == ["end", "fetch", "named", "start"]
    ran = {step: tasks[0][0] for step, tasks in parity["run"].items()}
    assert ran == built
    # The run solved and built nothing: `envmgr build flow.py` had made every env.
    lines = [line for line in parity["output"].splitlines() if re.search(r"envmgr: .+ env ", line)]
    assert lines and not any("solved" in line or "built" in line.split("(")[-1] for line in lines)
    assert sum("(cached lock, stored already)" in line for line in lines) == 3, lines
    # The undecorated step got the launching python's series and Metaflow's requests.
    assert "'requests'" in next(
        line for line in parity["output"].splitlines() if "SEEN start" in line
    )


def test_a_named_env_step_runs_in_it_and_records_the_name(parity):
    from _helpers import run_envmgr

    flow = str(parity["home"] / "parityflow.py")
    resolved = run_envmgr("resolve", flow, env=parity["env"], cwd=parity["home"])
    assert resolved.returncode == 0, resolved.stderr
    assert "named env team/tab:stable: used as it is, never resolved" in resolved.stdout
    seen = _seen(parity["output"])
    prefix, versions = seen["named"][0]
    assert prefix.endswith(parity["named_id"]) and versions["tabulate"] == "0.9.0"
    assert parity["run"]["named"][0] == [parity["named_id"], "team/tab:stable"]
    assert (
        f"named: linux-64 env {parity['named_id'][:12]} (named team/tab:stable)" in parity["output"]
    )


def test_resume_reuses_the_original_runs_envs(parity):
    assert parity["resume"] == {
        step: [[env_id, name] for env_id, name in tasks] for step, tasks in parity["run"].items()
    }
    assert "solved" not in parity["resume_output"]
    assert "Cloning" in parity["resume_output"] or "clon" in parity["resume_output"].lower()


def test_show_of_a_flow_step_is_the_env_the_run_used(parity):
    from _helpers import run_envmgr

    flow = parity["home"] / "parityflow.py"
    for step in ("start", "named"):
        shown = run_envmgr(
            "show", f"{flow}:{step}", "--json", env=parity["env"], cwd=parity["home"]
        )
        assert shown.returncode == 0, shown.stderr
        assert parity["run"][step][0][0] in shown.stdout


def _one_step_flow(path: Path, decorator: str, flow_decorator: str = "") -> Path:
    """A two-step flow (class OneFlow) whose start has *decorator* and prints TASK RAN."""
    path.write_text(
        "from metaflow import FlowSpec, conda, conda_base, pypi, step\n"
        f"{flow_decorator}class OneFlow(FlowSpec):\n"
        f"    {decorator}\n"
        "    @step\n"
        "    def start(self):\n"
        "        print('TASK RAN')\n"
        "        self.next(self.end)\n"
        "    @step\n"
        "    def end(self):\n"
        "        pass\n"
        "if __name__ == '__main__':\n"
        "    OneFlow()\n"
    )
    return path


def test_a_named_env_missing_for_the_steps_platform_stops_the_run(
    conda_channel, pypi_index, tmp_path
):
    from _helpers import run_envmgr

    env = _flow_env(tmp_path, conda_channel.url, PIP_INDEX_URL=pypi_index.url)
    lock = tmp_path / "mac.yml"
    made = run_envmgr(
        "resolve", "--conda", "tabulate", "--python", "3.11", "--platform", "osx-arm64",
        "-o", str(lock), env=env, cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert run_envmgr("alias", str(lock), "team/mac:stable", env=env, cwd=tmp_path).returncode == 0
    for name, needle in (
        ("team/mac:stable", "named env team/mac:stable has no linux-64 env"),
        ("team/nope:stable", "no env named team/nope:stable"),
    ):
        flow = _one_step_flow(tmp_path / "oneflow.py", f"@conda(name={name!r})")
        result = subprocess.run(
            [sys.executable, str(flow), "--environment=conda", "run"],
            capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode != 0 and needle in output, output[-2000:]
        assert "TASK RAN" not in output and "Traceback" not in output


def test_a_failed_sdist_build_in_a_run_shows_its_cause(conda_channel, sdist_index, tmp_path):
    from _helpers import run_envmgr

    env = _flow_env(tmp_path, conda_channel.url, PIP_INDEX_URL=sdist_index.url)
    env["ENVMGR_CACHE_DIR"] = str(tmp_path / "cache")
    flow = _one_step_flow(
        tmp_path / "oneflow.py", "@pypi(packages={'broken-native': '1.0'}, python='3.11')"
    )
    result = subprocess.run(
        [sys.executable, str(flow), "--environment=conda", "run"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "broken_native-1.0.tar.gz failed" in output
    assert "envmgr_missing_header.h: No such file or directory" in output
    assert "whole log: " + str(tmp_path / "cache") in output
    assert "This error originates from a subprocess" not in output and "TASK RAN" not in output
    # `envmgr build --json` hands the error over whole, as data.
    built = run_envmgr("build", str(flow), "--json", env=env, cwd=tmp_path)
    assert built.returncode == 1
    error = json.loads(built.stdout)["error"]
    assert error["type"] == "SdistBuildError"
    assert any("envmgr_missing_header.h" in line for line in error["lines"])
    assert Path(error["log"]).is_file()


def test_the_checkout_root_is_a_metaflow_workspace(tmp_path):
    """The editable install and the checkout's own metaflow_extensions are one extension."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        USER="envmgr-test",
        METAFLOW_HOME=str(tmp_path),
        METAFLOW_DATASTORE_SYSROOT_LOCAL=str(tmp_path),
    )
    code = (
        "import metaflow.plugins as p; "
        "print(sorted({e.TYPE: e.__module__ for e in p.ENVIRONMENTS}.items()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "('conda', 'metaflow_extensions.envmgr.plugins.envmgr_environment')" in result.stdout
    shown = subprocess.run(
        [sys.executable, "fixtures/flows/mixedflow.py", "--environment=conda", "show"],
        capture_output=True, text=True, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert shown.returncode == 0 and "Conflicts" not in shown.stderr, shown.stderr[-2000:]
