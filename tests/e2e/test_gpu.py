"""GPU steps get CUDA builds, CPU steps CPU builds, whatever the machine that resolves has; a
worker whose driver cannot run an env says so before it downloads anything.

The fixture channel's ``fixture-torch`` has a CPU build and CUDA 11.8/12.6 builds shaped like
conda-forge's pytorch (``__cuda`` in depends, ``cuda-version``, build number 200); the flow is
``fixtures/flows/gpuflow.py``: CPU ``start`` and ``end`` around ``@kubernetes(gpu=GPUS)``
``train``. Everything runs in process except what a worker runs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _helpers import ROOT, envmgr_here

from envmgr.cuda import CudaNeed, check_node, cuda_need, node_cuda
from envmgr.locks.lock import LockedPackage
from envmgr.worker import bootstrap

FLOW = ROOT / "fixtures" / "flows" / "gpuflow.py"
SHA = "0" * 64


@pytest.fixture
def world(tmp_path, monkeypatch, conda_channel):
    """A private store and cache, the fixture channel, no CUDA setting and no override."""
    monkeypatch.setenv("ENVMGR_STORE", (tmp_path / "store").as_uri())
    monkeypatch.setenv("ENVMGR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ENVMGR_CHANNELS", conda_channel.url)
    monkeypatch.setenv("USER", "envmgr-test")
    for name in (
        "ENVMGR_CUDA",
        "CONDA_OVERRIDE_CUDA",
        "ENVMGR_ALLOW_CPU",
        "ENVMGR_REMOTE_PLATFORM",
    ):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "store").mkdir()
    return tmp_path


def _variants(*args: str) -> dict[str, tuple[str, str]]:
    """``{step: (env id, variant)}`` of ``envmgr resolve gpuflow.py ARGS --json``."""
    result = envmgr_here("resolve", str(FLOW), *args, "--json")
    assert result.returncode == 0, result.stderr
    return {
        step: (env["env_id"], env["variant"])
        for env in json.loads(result.stdout)["envs"]
        for step in env["steps"]
    }


def test_the_step_decides_the_build_not_the_host(world, monkeypatch):
    cuda126 = "linux-64, CUDA >= 12 (fixture-torch 2.5.1 cuda126_h0_200)"
    locks = _variants()
    assert {step: variant for step, (_id, variant) in locks.items()} == {
        "start": "linux-64, CPU",
        "train": cuda126,
        "end": "linux-64, CPU",
    }
    # The host pretending to have a GPU (or having none) changes no lock.
    for host in ("12.4", "11.8", ""):
        monkeypatch.setenv("CONDA_OVERRIDE_CUDA", host)
        assert _variants() == locks, host
    # --cuda host asks for the host's GPU, for every step; --cuda none for none.
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.4")
    assert {s: v for s, (_i, v) in _variants("--cuda", "host").items()} == dict.fromkeys(
        locks, cuda126
    )
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "")
    assert _variants("--cuda", "host") == _variants("--cuda", "none")
    assert _variants("--cuda", "none")["train"][1] == "linux-64, CPU"
    monkeypatch.delenv("CONDA_OVERRIDE_CUDA")
    # A cluster on CUDA 11.8 drivers: the setting moves the GPU step only.
    monkeypatch.setenv("ENVMGR_CUDA", "11.8")
    older = _variants()
    assert older["train"][1] == "linux-64, CUDA >= 11 (fixture-torch 2.5.1 cuda118_h0_200)"
    assert older["start"] == locks["start"] and older["end"] == locks["end"]
    # The text output says it too, on the GPU step's line only.
    monkeypatch.delenv("ENVMGR_CUDA")
    lines = envmgr_here("resolve", str(FLOW)).stdout.splitlines()
    assert [line.split()[0] for line in lines if line.endswith("CUDA >= 12")] == ["train"]


@pytest.mark.parametrize(
    ("decorator", "message"),
    [
        ("@kubernetes(gpu=GPUS)", None),  # a module-level literal is read
        ("@kubernetes(gpu='two')", "@kubernetes(gpu='two'): not a number of GPUs"),
        ("@kubernetes(gpu=int(GPUS))", "@kubernetes gpu: line 19: not a literal"),
    ],
)
def test_a_gpu_count_the_file_reader_cannot_use_is_named(world, decorator, message):
    source = FLOW.read_text().replace("@kubernetes(gpu=GPUS, memory=8192)", decorator)
    flow = world / "flow.py"
    flow.write_text(source)
    result = envmgr_here("resolve", str(flow), "--json")
    if message is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "train" in result.stderr


def test_show_says_which_cuda_an_env_needs(world):
    train = envmgr_here("show", f"{FLOW}:train")
    assert train.returncode == 0, train.stderr
    assert (
        "  variant  CUDA >= 12 (fixture-torch 2.5.1 cuda126_h0_200), locked for __cuda 12.6"
        in train.stdout.splitlines()
    )
    start = envmgr_here("show", f"{FLOW}:start", "--json")
    row = json.loads(start.stdout)["platforms"][0]
    assert row["variant"] == "linux-64, CPU" and row["cuda"] is None


def _bootstrap(capsys, env_id: str, cache: Path, *extra: str) -> tuple[int, str, str]:
    store = (cache.parent / "store").as_uri()
    code = bootstrap.main(["--store", store, "--env-id", env_id, "--cache-dir", str(cache), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_worker_checks_its_driver_before_it_downloads(world, monkeypatch, capsys):
    built = envmgr_here("build", str(FLOW), "--json")
    assert built.returncode == 0, built.stderr
    ids = _variants()
    train, start = ids["train"][0], ids["start"][0]
    cache = world / "worker"

    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "11.8")  # a driver for CUDA 11.8 only
    code, _out, err = _bootstrap(capsys, train, cache)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"env {train} (linux-64) needs CUDA >= 12 (fixture-torch 2.5.1 cuda126_h0_200)" in err
    assert "this node's driver supports CUDA 11.8 (CONDA_OVERRIDE_CUDA)" in err
    assert "ENVMGR_CUDA" in err and "--allow-cpu" in err
    assert not (cache / "envs" / train).exists()
    assert not any((cache / "layers").glob("*")) if (cache / "layers").exists() else True

    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "")  # no GPU at all
    code, _out, err = _bootstrap(capsys, train, cache)
    assert code == 1 and "this node has no GPU (CONDA_OVERRIDE_CUDA is empty)" in err, err
    assert "@kubernetes(gpu=1)" in err and not (cache / "envs" / train).exists()
    code, out, err = _bootstrap(capsys, start, cache)  # a CPU env runs anywhere
    assert code == 0, err

    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.2")  # minor version compatibility
    code, out, err = _bootstrap(capsys, train, cache, "--json")
    assert code == 0, err
    prefix = Path(json.loads(out)["prefix"])
    assert (prefix / "share" / "fixture-torch" / "VARIANT").read_text() == "cuda126\n"
    ran = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", "import tabulate; print(tabulate.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.stdout.strip() == "0.9.0", ran.stderr

    assert _task_metadata(monkeypatch, prefix, train)["envmgr_variant"] == (
        "linux-64, CUDA >= 12 (fixture-torch 2.5.1 cuda126_h0_200)"
    )

    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "")
    code, out, err = _bootstrap(capsys, train, world / "cpu-node", "--allow-cpu")
    assert code == 0, err  # on purpose: the same env on a CPU node
    cpu_prefix = Path(out.strip()).parent.parent
    code, out, err = _bootstrap(capsys, start, world / "cpu-node")
    start_prefix = Path(out.strip()).parent.parent
    assert _task_metadata(monkeypatch, start_prefix, start)["envmgr_variant"] == "linux-64, CPU"
    assert cpu_prefix != start_prefix


def _task_metadata(monkeypatch, prefix: Path, env_id: str) -> dict[str, str]:
    """What the @conda decorator records for a task that runs on the env at *prefix*."""
    import sys

    pytest.importorskip("metaflow")
    from metaflow.plugins import STEP_DECORATORS

    recorded: dict[str, str] = {}

    class Metadata:
        def register_metadata(self, run_id, step_name, task_id, data):
            recorded.update({datum.field: datum.value for datum in data})

    deco = next(d for d in STEP_DECORATORS if d.name == "conda")(attributes=None)
    with monkeypatch.context() as patch:
        patch.setattr(sys, "prefix", str(prefix))  # the task runs on its env's python
        patch.setenv("ENVMGR_ENV_ID", env_id)
        deco.task_pre_step("train", None, Metadata(), "1", "2", None, None, 0, 0, None, None)
    return recorded


def _package(name: str, version: str, build: str = "", *depends: str, manager: str = "conda"):
    return LockedPackage(
        manager=manager,  # type: ignore[arg-type]
        name=name,
        version=version,
        build=build,
        url=f"https://example.invalid/{name}-{version}",
        sha256=SHA,
        depends=depends,
    )


def test_what_a_lock_needs_from_the_driver_in_real_world_shapes():
    assert cuda_need([_package("numpy", "2.1.3", "py311h0_0", "python >=3.11")]) is None
    bare = cuda_need([_package("jaxlib", "0.4.35", "cuda120py311h0_200", "__cuda")])
    assert bare == CudaNeed(minimum="any", package="jaxlib 0.4.35 cuda120py311h0_200")
    ranged = [
        _package("cupy", "13.3.0", "py311h0_2", "__cuda >=11.2,<13", "cuda-version >=11.2"),
        _package("cuda-version", "12.6", "h7480c83_3"),
    ]
    assert cuda_need(ranged) == CudaNeed(minimum="12", package="cupy 13.3.0 py311h0_2")
    assert cuda_need([_package("x", "1", "0", "__cuda 12.4.*")]).minimum == "12.4"  # type: ignore[union-attr]
    wheels = [
        _package("torch", "2.5.1+cu124", manager="pypi"),
        _package("nvidia-cublas-cu12", "12.4.5.8", manager="pypi"),
    ]
    assert cuda_need(wheels) == CudaNeed(minimum="12", package="torch 2.5.1+cu124")
    assert cuda_need([_package("torch", "2.5.1+cpu", manager="pypi")]) is None
    need = CudaNeed(minimum="12", package="torch 2.5.1+cu124")
    assert check_node(need, "12.0", "the NVIDIA driver") is None
    assert check_node(None, None, "no NVIDIA driver") is None
    refused = check_node(need, "11.8", "the NVIDIA driver")
    assert refused is not None and "supports CUDA 11.8" in refused[0]


def test_the_node_override_is_checked():
    assert node_cuda({"CONDA_OVERRIDE_CUDA": "12.4"}) == ("12.4", "CONDA_OVERRIDE_CUDA")
    assert node_cuda({"CONDA_OVERRIDE_CUDA": " "})[0] is None
    with pytest.raises(ValueError, match="CONDA_OVERRIDE_CUDA: 'twelve' is not a CUDA version"):
        node_cuda({"CONDA_OVERRIDE_CUDA": "twelve"})
    have, source = node_cuda({})  # this machine: no NVIDIA driver
    assert have is None and "libcuda" in source


def _torch_index(root: Path) -> str:
    """A static (PEP 503, file://) index per PyTorch backend, each with its own torch wheel,
    as PyTorch serves them; the ``torch_index`` template for them."""
    import hashlib
    from urllib.parse import quote

    from fixtures.wheelmaker import make_wheel

    for backend in ("cpu", "cu118", "cu126"):
        page = root / backend / "torch"
        wheel = make_wheel(page, "torch", f"2.5.1+{backend}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        link = f'<a href="{quote(wheel.name)}#sha256={digest}">{wheel.name}</a>'
        (page / "index.html").write_text(f"<html><body>{link}</body></html>\n")
    return f"{root.as_uri()}/{{backend}}/"


PYPI_GPU_FLOW = """
from metaflow import FlowSpec, batch, pypi, pypi_base, step


@pypi_base(packages={"torch": "2.5.1"}, python="3.11")
class TorchFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @batch(gpu=1)
    @pypi(packages={"six": ""})
    @step
    def train(self):
        self.next(self.end)

    @step
    def end(self):
        pass
"""


def test_pypi_steps_take_torch_from_the_index_of_their_cuda(world, monkeypatch, pypi_index):
    from fixtures.wheelmaker import make_wheel

    monkeypatch.setenv("PIP_INDEX_URL", pypi_index.url)
    monkeypatch.setenv("ENVMGR_TORCH_INDEX", _torch_index(world / "torch-index"))
    newer = world / "links"
    make_wheel(newer, "torch", "3.0.0")  # elsewhere, newer: never taken while pinned
    flow = world / "torchflow.py"
    flow.write_text(PYPI_GPU_FLOW)
    result = envmgr_here("resolve", str(flow), "--find-links", str(newer), "--json")
    assert result.returncode == 0, result.stderr
    variants = {s: e["variant"] for e in json.loads(result.stdout)["envs"] for s in e["steps"]}
    assert variants == {
        "start": "linux-64, CPU",
        "train": "linux-64, CUDA >= 12 (torch 2.5.1+cu126)",
        "end": "linux-64, CPU",
    }
    built = envmgr_here("build", str(flow), "--json")  # file:// wheels install as any other
    assert built.returncode == 0, built.stderr
    shown = json.loads(envmgr_here("show", f"{flow}:train", "--json").stdout)["platforms"][0]
    torch = next(p for p in shown["packages"] if p["name"] == "torch")
    assert torch["version"] == "2.5.1+cu126" and torch["installed_size"]
    monkeypatch.setenv("ENVMGR_CUDA", "11.8")
    older = envmgr_here("resolve", str(flow), "--json")
    assert "CUDA >= 11 (torch 2.5.1+cu118)" in older.stdout, older.stderr
    # Without the setting, torch comes from the spec's indexes like any package.
    monkeypatch.delenv("ENVMGR_TORCH_INDEX")
    plain = envmgr_here(
        "resolve", "--pypi", "torch", "--python", "3.11", "--find-links", str(newer)
    )
    assert plain.returncode == 0, plain.stderr
    assert "CUDA" not in plain.stdout


def test_bad_cuda_and_torch_index_settings_are_one_line(world, monkeypatch):
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "abc")
    host = envmgr_here("resolve", "--conda", "six", "--cuda", "host")
    assert host.returncode == 1 and len(host.stderr.strip().splitlines()) == 1, host.stderr
    assert "--cuda host: CONDA_OVERRIDE_CUDA: 'abc' is not a CUDA version" in host.stderr
    monkeypatch.delenv("CONDA_OVERRIDE_CUDA")
    monkeypatch.setenv("ENVMGR_TORCH_INDEX", "notaurl")
    torch = envmgr_here("resolve", "--pypi", "six", "--python", "3.11")
    assert torch.returncode == 2, torch.stderr
    assert torch.stderr.strip() == (
        "envmgr: error: ENVMGR_TORCH_INDEX: torch_index: index URL 'notaurl' must be an "
        "http://, https:// or file:// URL"
    )
