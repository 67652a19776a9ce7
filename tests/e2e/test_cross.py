"""Any host builds any platform's env, running nothing of the target: a linux-aarch64 env
built on this x86-64 host, hydrated by a bare worker and run under qemu; the same archive
whatever the build host; bytecode for the target; link scripts never run."""

from __future__ import annotations

import json
import os
import platform
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import (
    bare_worker,
    fixture_options,
    run_bootstrap,
    run_envmgr,
    s3_env,
    ship_bootstrap,
)

from envmgr.build.once import BuildOptions, build_and_store, create_prefix
from envmgr.cache.layout import manifest_key
from envmgr.cache.local import LocalStore
from envmgr.resolve.resolution_cache import resolve_specs
from envmgr.specs.deps import CondaDep
from envmgr.specs.model import EnvSpec
from envmgr.worker.hydrate import hydrate
from envmgr.worker.layers import fetch_layer_manifests
from fixtures.python_arm64 import qemu_command, qemu_problem

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the cross-platform tests build on an x86-64 host"
)


def _arm64_or_skip(channel) -> None:
    """Skip (or, with ENVMGR_REQUIRE_ARM64=1 as in CI, fail) naming why aarch64 cannot run."""
    unavailable = channel.path / "linux-aarch64" / "UNAVAILABLE.txt"
    problem = unavailable.read_text().strip() if unavailable.exists() else qemu_problem()
    if problem is None:
        return
    if os.environ.get("ENVMGR_REQUIRE_ARM64"):
        pytest.fail(f"linux-aarch64 is required here: {problem}")
    pytest.skip(f"linux-aarch64 binaries cannot run here: {problem}")


def _pyc_flags(path: Path) -> int:
    """The PEP 552 flags word of a .pyc (3: checked hash)."""
    with path.open("rb") as handle:
        return int(struct.unpack("<4sI", handle.read(8))[1])


def _compiled_from_source(verbose_stderr: str, prefix: Path) -> list[str]:
    """Modules of *prefix* that ``python -v`` compiled from source instead of using a .pyc."""
    return [
        m.group(1)
        for m in re.finditer(r"^# code object from '?(.+?\.py)'?$", verbose_stderr, re.M)
        if m.group(1).startswith(str(prefix))
    ]


def test_linux_aarch64_env_builds_here_hydrates_on_a_bare_worker_and_runs_under_qemu(
    conda_channel, s3_server, s3_bucket, tmp_path
):
    _arm64_or_skip(conda_channel)
    url = f"s3://{s3_bucket}/cluster"
    aws = s3_env(s3_server)
    laptop = {
        **os.environ,
        **aws,
        "ENVMGR_CACHE_DIR": str(tmp_path / "laptop"),
        "ENVMGR_CHANNELS": conda_channel.url,
    }
    built = run_envmgr(
        "build", "--conda", "python=3.11", "--conda", "numpy", "--platform", "linux-aarch64",
        "--store", url, "--json", env=laptop,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (row,) = json.loads(built.stdout)["envs"]
    assert row["platform"] == "linux-aarch64" and row["status"] == "built"
    shown = run_envmgr("show", row["env_id"], "--store", url, "--json", env=laptop)
    assert shown.returncode == 0, shown.stderr
    packages = {p["name"]: p for p in json.loads(shown.stdout)["platforms"][0]["packages"]}
    assert packages["numpy"]["version"] == "2.1.3"
    assert packages["python"]["build"] == "h311_debian_0"  # the real interpreter

    sandbox = tmp_path / "pod"
    sandbox.mkdir()
    ship_bootstrap(sandbox)
    python, worker = bare_worker(tmp_path, aws)
    hydrated = run_bootstrap(
        "--store", url, "--env-id", row["env_id"], "--platform", "linux-aarch64",
        "--cache-dir", str(sandbox / ".envmgr"), "--json",
        env=worker, cwd=sandbox, python=python,
    )  # fmt: skip
    assert hydrated.returncode == 0, hydrated.stderr
    result = json.loads(hydrated.stdout)
    assert result["downloaded"] is True
    prefix = Path(result["prefix"])
    with (prefix / "bin" / "python3.11").open("rb") as handle:
        header = handle.read(20)
    assert header[:4] == b"\x7fELF" and struct.unpack("<H", header[18:20])[0] == 183  # aarch64

    code = (
        "import json, numpy, platform, sys; print(json.dumps({'numpy': numpy.__version__, "
        "'machine': platform.machine(), 'prefix': sys.prefix, 'sum': int(numpy.arange(10).sum()),"
        " 'cached': numpy.__cached__}))"
    )
    ran = subprocess.run(
        qemu_command(prefix / "bin" / "python", "-v", "-c", code),
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    assert seen == {
        "numpy": "2.1.3",
        "machine": "aarch64",
        "prefix": str(prefix),
        "sum": 45,
        "cached": seen["cached"],
    }
    assert Path(seen["cached"]).is_file() and _pyc_flags(Path(seen["cached"])) == 3
    # Every module of the env came from its shipped bytecode: nothing compiled at import.
    assert _compiled_from_source(ran.stderr, prefix) == []
    assert ran.stderr.count(" matches ") > 100  # "<pyc> matches <py>": bytecode used


@pytest.fixture(scope="module")
def linkscript_lock(conda_channel, tmp_path_factory):
    home = tmp_path_factory.mktemp("linkscript")
    spec = EnvSpec(python="3.11.*", conda=(CondaDep.parse("fixture-linkscript"),))
    return resolve_specs({"s": spec}, fixture_options(home, conda_channel.url))[0].lock


def test_same_lock_same_archive_whatever_the_build_host(mixed_lock, tmp_path):
    """Native, "as if on osx-arm64", and with a tool python from the channel for bytecode:
    one archive. Separate caches and stores stand for separate machines."""
    manifests = {}
    for name, extra in {
        "native": {},
        "mac": {"host": "osx-arm64"},
        "tools": {"bytecode": "tools"},
    }.items():
        store = LocalStore(tmp_path / name / "store")
        options = BuildOptions(store=store, cache_dir=tmp_path / name / "cache", **extra)
        manifests[name] = build_and_store(mixed_lock, options).manifest
    assert len({m.sha256 for m in manifests.values()}) == 1, {
        k: m.sha256 for k, m in manifests.items()
    }
    assert len({m.size for m in manifests.values()}) == 1
    # The tool python was installed from the lock's own channel for this (linux-64) host.
    tools = list((tmp_path / "tools" / "cache" / "tools").glob("python-*-linux-64"))
    assert [t.name for t in tools] == [f"python-{mixed_lock.names()['python'].version}-linux-64"]
    assert (tools[0] / ".complete").is_file()


def test_the_env_ships_checked_hash_bytecode_its_python_uses(mixed_lock, tmp_path):
    store = LocalStore(tmp_path / "store")
    build_and_store(mixed_lock, BuildOptions(store=store, cache_dir=tmp_path / "b"))
    prefix = hydrate(mixed_lock.env_id, store, tmp_path / "cache").prefix
    lib = prefix / "lib" / "python3.11"
    sources = [p for p in lib.rglob("*.py") if "site-packages" in p.parts or p.parent == lib]
    assert len(sources) > 500
    missing = [
        p for p in sources if not (p.parent / "__pycache__" / f"{p.stem}.cpython-311.pyc").is_file()
    ]
    assert missing == []
    assert {_pyc_flags(p) for p in lib.rglob("*.pyc")} == {3}
    code = "import numpy, tabulate, dateutil.parser, colorama, json, asyncio"
    ran = subprocess.run(
        [str(prefix / "bin" / "python"), "-v", "-c", code],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert _compiled_from_source(ran.stderr, prefix) == []


def test_link_scripts_are_never_run_and_are_named(linkscript_lock, tmp_path):
    store = LocalStore(tmp_path / "store")
    outcome = build_and_store(linkscript_lock, BuildOptions(store=store, cache_dir=tmp_path / "c"))
    assert outcome.manifest.link_scripts == ("fixture-linkscript",)
    stored = json.loads(store.get(manifest_key("linux-64", linkscript_lock.env_id)) or b"")
    assert stored["link_scripts"] == ["fixture-linkscript"]
    prefix = hydrate(linkscript_lock.env_id, store, tmp_path / "cache").prefix
    assert (prefix / "bin" / ".fixture-linkscript-post-link.sh").is_file()
    assert not (prefix / "LINK-SCRIPT-RAN").exists()
    # The CLI says so in one warning line on stderr.
    lock_file = tmp_path / "l.conda-lock.yml"
    from envmgr.locks.lock import Lock, write_conda_lock

    write_conda_lock(Lock(platforms=(linkscript_lock,)), lock_file)
    env = {**os.environ, "ENVMGR_CACHE_DIR": str(tmp_path / "cli")}
    cli = run_envmgr(
        "build", "--from-lock", str(lock_file), "--store", (tmp_path / "s2").as_uri(), env=env
    )
    assert cli.returncode == 0, cli.stderr
    warnings = [line for line in cli.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "fixture-linkscript" in warnings[0], cli.stderr


def test_create_prefix_takes_foreign_locks_and_the_host_as_values(conda_channel, tmp_path):
    """A linux-aarch64 lock (solved here) installs here; a stdlib worker that finds no
    archive names the exact command that builds one."""
    _arm64_or_skip(conda_channel)
    options = fixture_options(tmp_path, conda_channel.url, platforms=("linux-aarch64",))
    spec = EnvSpec(python="3.11.*", conda=(CondaDep.parse("numpy"),))
    lock = resolve_specs({"s": spec}, options)[0].lock
    made = create_prefix(lock, tmp_path / "prefix", tmp_path / "cache", host="osx-arm64")
    assert made.bytecode_files > 900 and made.link_scripts == ()
    meta = json.loads(next((tmp_path / "prefix" / "conda-meta").glob("numpy-*.json")).read_text())
    assert meta["subdir"] == "linux-aarch64" and meta["link"]["type"] == 3

    from envmgr.build.once import offer_lock

    store = LocalStore(tmp_path / "store")
    offer_lock(store, lock)
    args = ["--store", store.url, "--env-id", lock.env_id, "--platform", "linux-aarch64"]
    worker = run_bootstrap(*args, "--cache-dir", str(tmp_path / "w"))
    assert worker.returncode == 1
    command = f"envmgr build --env {lock.env_id} --platform linux-aarch64 --store {store.url}"
    assert command in worker.stderr and len(worker.stderr.strip().splitlines()) == 1
    built = run_envmgr(*command.split()[1:], env={**os.environ, "ENVMGR_CACHE_DIR": str(tmp_path)})
    assert built.returncode == 0, built.stderr
    again = run_bootstrap(*args, "--cache-dir", str(tmp_path / "w"))
    assert again.returncode == 0, again.stderr


# Loads a flow, runs the extension's start-of-run work (resolve, build, store) and prints what
# a remote pod would get for one step; with "--with kubernetes" attached, like the CLI flag.
_FLOW_REMOTE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("userflow", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from metaflow.plugins import ENVIRONMENTS
flow = getattr(module, sys.argv[2])(use_cli=False)
if sys.argv[4:] == ["--with-kubernetes"]:
    from metaflow.decorators import _attach_decorators
    _attach_decorators(flow, ["kubernetes"])
environment = [e for e in ENVIRONMENTS if e.TYPE == "conda"][0](flow)
if sys.argv[4:] == ["--with-kubernetes"]:
    print(json.dumps({k: list(v.platforms) for k, v in environment._specs()[0].items()}))
    raise SystemExit(0)
lines = []
environment.init_environment(lines.append)
step = sys.argv[3]
print(json.dumps({"log": lines, "envs": environment.envmgr_envs,
                  "commands": environment.bootstrap_commands(step, "s3"),
                  "executable": environment.executable(step),
                  # the contents: the envs file goes when this process does
                  "package": [[open(src, encoding="utf-8").read(), arc]
                              for src, arc, _ in environment.add_to_package()]}))
"""
REMOTE_FLOW = Path(__file__).resolve().parents[2] / "fixtures" / "flows" / "remoteflow.py"


def _flow_child(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _FLOW_REMOTE, str(REMOTE_FLOW), "RemoteFlow", *args],
        capture_output=True, text=True, env=env, cwd=cwd, check=False,
    )  # fmt: skip


def test_a_kubernetes_step_on_graviton_gets_a_linux_aarch64_env_its_pod_runs(
    conda_channel, s3_server, s3_bucket, tmp_path
):
    _arm64_or_skip(conda_channel)
    from fixtures.python_arm64 import worker_python

    aws = s3_env(s3_server)
    laptop = {
        **os.environ,
        **aws,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "USER": "envmgr-test",
        "METAFLOW_HOME": str(tmp_path),
        "ENVMGR_STORE": f"s3://{s3_bucket}/mf",
        "ENVMGR_CACHE_DIR": str(tmp_path / "laptop"),
        "ENVMGR_CHANNELS": conda_channel.url,
        "ENVMGR_REMOTE_PLATFORM": "linux-aarch64",
    }
    out = _flow_child(["train"], laptop, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    remote = json.loads(out.stdout.strip().splitlines()[-1])
    host = "linux-64"
    assert {step: sorted(e["envs"]) for step, e in remote["envs"].items()} == {
        "start": [host],
        "train": ["linux-aarch64"],
        "end": [host],
    }
    assert any("train: linux-aarch64 env" in line for line in remote["log"]), remote["log"]

    # The pod: the code package in an empty directory, a stock arm64 python with boto3 (under
    # qemu), an empty HOME, only S3 reachable. It detects its own platform.
    sandbox = tmp_path / "pod"
    sandbox.mkdir()
    for text, arcname in remote["package"]:
        (sandbox / arcname).parent.mkdir(parents=True, exist_ok=True)
        (sandbox / arcname).write_text(text, encoding="utf-8")
    import sysconfig

    python = worker_python(conda_channel.path, tmp_path / "arm64", [sysconfig.get_path("purelib")])
    worker = {
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        **aws,
        "ENVMGR_CHANNELS": "http://127.0.0.1:9/",
        "PIP_INDEX_URL": "http://127.0.0.1:9/",
    }
    probe = "import envmgr.platforms as p; print(p.host_platform())"
    assert subprocess.run(
        ["python", "-c", probe], capture_output=True, text=True, env=worker, cwd=sandbox,
        check=True,
    ).stdout.strip() == "linux-aarch64"  # fmt: skip
    user_code = "import numpy, platform; print('SEEN', numpy.__version__, platform.machine())"
    qemu = " ".join(qemu_command())
    script = " && ".join([*remote["commands"], f'{qemu} {remote["executable"]} -c "{user_code}"'])
    ran = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, cwd=sandbox, env=worker,
        check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert ran.stdout.strip().splitlines()[-1] == "SEEN 2.1.3 aarch64"
    env_id = remote["envs"]["train"]["envs"]["linux-aarch64"]
    assert (sandbox / ".envmgr" / "envs" / env_id / ".envmgr-complete").is_file()


def test_with_kubernetes_on_the_command_line_makes_every_step_remote(conda_channel, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "USER": "envmgr-test",
        "METAFLOW_HOME": str(tmp_path),
        "ENVMGR_REMOTE_PLATFORM": "linux-aarch64",
    }
    out = _flow_child(["start", "--with-kubernetes"], env, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    platforms = json.loads(out.stdout.strip().splitlines()[-1])
    assert platforms == {s: ["linux-aarch64"] for s in ("start", "train", "end")}
    env["ENVMGR_REMOTE_PLATFORM"] = "linux-armv7"
    bad = _flow_child(["start", "--with-kubernetes"], env, tmp_path)
    assert bad.returncode != 0 and "is not a platform" in bad.stderr


def _s3_datastore(s3_server, s3_bucket) -> dict[str, str]:
    """Metaflow's S3 datastore in the test world (deploys need one)."""
    return {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{s3_bucket}/metaflow",
        "METAFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "METAFLOW_KUBERNETES_NAMESPACE": "default",
    }


def _deploying_laptop(conda_channel, s3_server, s3_bucket, tmp_path) -> dict[str, str]:
    """The shell of a user who deploys to a Graviton cluster: the S3 datastore, the store
    under it, remote steps on linux-aarch64."""
    laptop = {
        **os.environ,
        **s3_env(s3_server),
        **_s3_datastore(s3_server, s3_bucket),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "USER": "envmgr-test",
        "METAFLOW_HOME": str(tmp_path),
        "ENVMGR_CACHE_DIR": str(tmp_path / "laptop"),
        "ENVMGR_CHANNELS": conda_channel.url,
        "ENVMGR_REMOTE_PLATFORM": "linux-aarch64",
    }
    laptop.pop("ENVMGR_STORE", None)
    return laptop


def test_argo_workflows_json_carries_the_bootstrap_a_graviton_pod_runs(
    conda_channel, s3_server, s3_bucket, tmp_path
):
    """``argo-workflows create --only-json`` (offline: it needs only the S3 datastore and the
    kubernetes client library): the pod command in the template downloads the code package
    from S3, hydrates the step's linux-aarch64 env and runs it (under qemu here)."""
    _arm64_or_skip(conda_channel)
    from fixtures.python_arm64 import worker_python

    aws = s3_env(s3_server)
    datastore = _s3_datastore(s3_server, s3_bucket)
    laptop = _deploying_laptop(conda_channel, s3_server, s3_bucket, tmp_path)
    deployed = subprocess.run(
        [sys.executable, str(REMOTE_FLOW), "--environment=conda", "argo-workflows", "create",
         "--only-json"],
        capture_output=True, text=True, env=laptop, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    # Argo puts @kubernetes on every step: each gets its linux-aarch64 env, built at deploy.
    assert deployed.stderr.count(": linux-aarch64 env ") == 3, deployed.stderr
    template = json.loads(deployed.stdout)
    (train,) = [t for t in template["spec"]["templates"] if t["name"] == "train"]
    command = train["container"]["command"][2]
    assert "python -m envmgr.bootstrap" in command and "--env-for linux-aarch64=" in command
    # The pod, up to the user's step: what Metaflow runs before it, then our bootstrap, then
    # the env's python (closing the subshell Metaflow opens around the step).
    cut = command.index("export ENVMGR_SPEC_ID=")
    cut = command.index(" && ", cut)
    user_code = "import numpy, platform, sys; print('SEEN', numpy.__version__, platform.machine())"
    qemu = " ".join(qemu_command())
    script = f'{command[:cut]} && {qemu} $ENVMGR_PYTHON -s -c "{user_code}")'
    script = re.sub(r"\{\{[^}]*\}\}", "x", script)  # Argo's template parameters
    sandbox = tmp_path / "pod"
    sandbox.mkdir()
    python = worker_python(conda_channel.path, tmp_path / "arm64", [_pure_site()])
    pod_env = {e["name"]: e["value"] for e in train["container"]["env"] if e.get("value")}
    worker = {
        **pod_env,
        **aws,
        **datastore,
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1",  # the image has boto3
    }
    ran = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, cwd=sandbox, env=worker,
        check=False, timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert ran.stdout.strip().splitlines()[-1] == "SEEN 2.1.3 aarch64", ran.stdout[-2000:]
    assert "Code package downloaded." in ran.stdout


def _pure_site() -> str:
    import sysconfig

    return sysconfig.get_path("purelib")


def test_an_osx_arm64_env_with_a_real_macos_wheel_builds_here(conda_channel, pypi_index, tmp_path):
    """Structural: the osx-arm64 env of a real macOS arm64 wheel (compiled modules and a
    console script) built on this Linux host has what a Mac needs."""
    from envmgr.specs.deps import PypiDep

    options = fixture_options(tmp_path, conda_channel.url, pypi_index.url, platforms=("osx-arm64",))
    spec = EnvSpec(python="3.11.*", pypi=(PypiDep.parse("charset-normalizer==3.4.0"),))
    lock = resolve_specs({"s": spec}, options)[0].lock
    wheel = lock.names()["charset-normalizer"]
    assert "macosx_11_0_arm64" in wheel.url  # the platform wheel, not its pure twin
    store = LocalStore(tmp_path / "store")
    manifest = build_and_store(lock, BuildOptions(store=store, cache_dir=tmp_path / "b")).manifest
    assert manifest.platform == "osx-arm64"
    prefix = hydrate(lock.env_id, store, tmp_path / "cache", platform="osx-arm64").prefix
    site = prefix / "lib" / "python3.11" / "site-packages" / "charset_normalizer"
    for name in ("md.cpython-311-darwin.so", "md__mypyc.cpython-311-darwin.so"):
        header = (site / name).read_bytes()[:8]
        magic, cputype = struct.unpack("<II", header)
        assert magic == 0xFEEDFACF and cputype == 0x0100000C, name  # Mach-O 64, arm64
    script = prefix / "bin" / "normalizer"
    assert os.access(script, os.X_OK)
    # The build prefix is too long for a shebang: installer's /bin/sh trampoline execs the
    # env's python, relocated to where the env now is.
    head = script.read_text().splitlines()[:3]
    assert head[0] == "#!/bin/sh" and f"exec' {prefix}/bin/python3.11 " in head[1], head
    layers = fetch_layer_manifests(store, manifest.layers).values()
    relocations = {(r.path, r.mode) for layer in layers if layer for r in layer.relocations}
    assert ("bin/normalizer", "text") in relocations
    python_meta = next((prefix / "conda-meta").glob("python-*.json"))
    assert json.loads(python_meta.read_text())["subdir"] == "osx-arm64"
    dist = next(site.parent.glob("charset_normalizer-3.4.0.dist-info"))
    assert (dist / "INSTALLER").read_text() == "envmgr\n"
    assert (dist / "RECORD").is_file()
    pycs = list((site / "__pycache__").glob("*.cpython-311.pyc"))
    assert len(pycs) >= 8 and {_pyc_flags(p) for p in pycs} == {3}


def test_a_prebuild_for_a_deploy_leaves_the_deploy_nothing_to_solve_or_build(
    conda_channel, s3_server, s3_bucket, tmp_path
):
    """``environment --for DEPLOY build`` gives every step the compute decorator that deploy
    attaches (so start and end become linux-aarch64 steps too); the deploy then finds every
    env in the store, and each pod command names one that is there. Step Functions' @batch
    and Argo's and Airflow's @kubernetes ask for the same envs here, so the second pre-build
    finds them stored. (Step Functions' ``create`` calls AWS even with ``--only-json``: only
    its pre-build is run.)"""
    _arm64_or_skip(conda_channel)
    from envmgr.cache.layout import manifest_key
    from envmgr.cache.s3 import S3Store

    laptop = _deploying_laptop(conda_channel, s3_server, s3_bucket, tmp_path)
    flow = [sys.executable, str(REMOTE_FLOW), "--environment=conda"]
    prebuilt = {}
    for deploy in ("step-functions", "argo-workflows"):
        built = subprocess.run(
            [*flow, "environment", "--for", deploy, "build", "--json"],
            capture_output=True, text=True, env=laptop, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr[-3000:]
        prebuilt[deploy] = json.loads(built.stdout)
        rows = prebuilt[deploy]["envs"]
        assert sorted(s for r in rows for s in r["steps"]) == ["end", "start", "train"]
        assert {r["platform"] for r in rows} == {"linux-aarch64"}
    assert {r["status"] for r in prebuilt["argo-workflows"]["envs"]} == {"present"}
    # The file reader (no run) with the same --for makes the same envs.
    read = run_envmgr(
        "build", str(REMOTE_FLOW), "--for", "airflow", "--json", env=laptop, cwd=tmp_path
    )
    assert read.returncode == 0, read.stderr[-3000:]
    by_step = {s: r["env_id"] for r in json.loads(read.stdout)["envs"] for s in r["steps"]}
    assert by_step == {s: r["env_id"] for r in rows for s in r["steps"]}
    from envmgr.specs.flows import DEPLOY_DECORATORS
    from metaflow_extensions.envmgr.plugins.envmgr_cli import DEPLOYS

    assert tuple(sorted(DEPLOY_DECORATORS)) == DEPLOYS
    store = S3Store(prebuilt["argo-workflows"]["store"], client=s3_server.client())
    for deploy in ("argo-workflows", "airflow"):
        create = ["--only-json"] if deploy == "argo-workflows" else [str(tmp_path / "dag.py")]
        deployed = subprocess.run(
            [*flow, deploy, "create", *create],
            capture_output=True, text=True, env=laptop, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        lines = [
            line for line in deployed.stderr.splitlines() if re.search(r"envmgr: .+ env ", line)
        ]
        assert len(lines) == len(rows), deployed.stderr
        assert all("(cached lock, stored already)" in line for line in lines), lines
        text = deployed.stdout if deploy == "argo-workflows" else (tmp_path / "dag.py").read_text()
        named = set(re.findall(r"--env-for linux-aarch64=([0-9a-f]{32})", text))
        assert named == {r["env_id"] for r in rows}
        assert all(store.exists(manifest_key("linux-aarch64", env_id)) for env_id in named)
