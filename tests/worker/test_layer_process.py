"""The layer process: a second process that fetches a large hydrate's layers beside it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from _helpers import outlives_its_parent, process_ends, s3_env

import envmgr.worker.assembly
import envmgr.worker.layer_process
from envmgr.build.once import BuildOptions, build_and_store
from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.worker.env_cache import COMPLETE, env_dir
from envmgr.worker.hydrate import HashMismatchError, HydrateError, hydrate
from envmgr.worker.layer_process import LayerProcess, wanted
from fixtures.tcp_proxy import FaultProxy, Faults


@pytest.fixture(scope="module")
def layered(mixed_lock, tmp_path_factory) -> LocalStore:
    """The mixed env built as layers into a local store."""
    home = tmp_path_factory.mktemp("layered")
    store = LocalStore(home / "store")
    build_and_store(mixed_lock, BuildOptions(store=store, cache_dir=home / "c"))
    return store


def _tree(prefix: Path) -> dict[str, str]:
    """Each file and link under *prefix*: its bytes (the prefix taken out), its mode and
    whether it is linked (to its layer) or the env's own."""
    found = {}
    for path in sorted(prefix.rglob("*")):
        rel = path.relative_to(prefix).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {path.readlink()}"
        elif path.is_file():
            data = path.read_bytes().replace(str(prefix).encode(), b"<prefix>")
            info = path.stat()
            shared = "linked" if info.st_nlink > 1 else "own"
            found[rel] = f"{hashlib.sha256(data).hexdigest()[:16]} {info.st_mode:o} {shared}"
    return found


@pytest.fixture(autouse=True)
def _started_anew(monkeypatch):
    """This test process may run threads (pytest-xdist's): its hydrates start their layer
    process as a new interpreter, never by a fork. Forked ones run in a python of their
    own (:func:`_hydrate_apart`)."""
    monkeypatch.setattr(envmgr.worker.layer_process, "_forkable", lambda: False)


def _children(monkeypatch) -> list:
    """Each job the hydrates hand to a layer process from now on, with what came back."""
    seen: list = []
    real = LayerProcess.fetch

    def fetch(self, job, task):
        placed = real(self, job, task)
        seen.append((job.layer.layer.package.split()[1], placed))
        return placed

    monkeypatch.setattr(LayerProcess, "fetch", fetch)
    return seen


def _started(monkeypatch) -> list:
    """Every layer process the hydrates start from now on (``None`` where none could)."""
    started: list = []
    real_start = LayerProcess.start

    def start(store_):
        child = real_start(store_)
        started.append(child)
        return child

    monkeypatch.setattr(LayerProcess, "start", staticmethod(start))
    return started


def test_a_large_hydrate_starts_a_layer_process_only_where_it_pays(monkeypatch):
    monkeypatch.delenv("ENVMGR_LAYER_PROCESS", raising=False)
    assert wanted(30, 700 << 20) and not wanted(30, 100 << 20) and not wanted(0, 700 << 20)
    monkeypatch.setenv("ENVMGR_LAYER_PROCESS", "0")
    assert not wanted(30, 700 << 20)
    monkeypatch.setenv("ENVMGR_LAYER_PROCESS", "1")
    assert wanted(1, 0) and not wanted(0, 0)
    monkeypatch.setattr(envmgr.worker.layer_process, "workers", lambda: 1)
    assert not wanted(30, 700 << 20)  # one core: nothing to share
    # A store it cannot open the same (given its own client), or no python to run it.
    assert LayerProcess.start(S3Store("s3://b/p", client=object())) is None
    monkeypatch.setattr(sys, "executable", "/opt/app/bin/uwsgi")
    assert LayerProcess.start(LocalStore(Path("/nonexistent-store"))) is None


def test_a_layer_process_makes_the_env_this_process_makes(
    mixed_lock, layered, s3_server, s3_bucket, tmp_path, monkeypatch
):
    """From a local store and from S3: the env, its links and its counts are the same
    whether the layer process fetched some of its layers, all of them (one layer thread,
    which finds it free each time), or this process fetched all. With the helper's
    threshold lowered to 1,000 files, python's layer and numpy's are linked by the child's
    own link helper as they unpack."""
    monkeypatch.setattr(envmgr.worker.assembly, "HELPER_FILES", 1000)
    for name, value in s3_env(s3_server).items():
        monkeypatch.setenv(name, value)
    s3 = S3Store(f"s3://{s3_bucket}/p", endpoint_url=s3_server.endpoint_url)
    for key in layered.list(""):
        s3.put(key, layered.get(key) or b"")
    seen = _children(monkeypatch)
    for store in (layered, s3):
        made = {}
        # Host dirs of one length: the binary prefix pads to it.
        for mode, streams in (("0", ""), ("1", ""), ("1", "1")):
            monkeypatch.setenv("ENVMGR_LAYER_PROCESS", mode)
            monkeypatch.setenv("ENVMGR_LAYER_STREAMS", streams)
            host = tmp_path / f"{store.url[:2]}{mode}{streams or 'x'}"
            result = hydrate(mixed_lock.env_id, store, host, platform="linux-64")
            got = (_tree(result.prefix), result.layers_fetched, result.linked, result.copied)
            made[mode + streams] = got
        assert made["0"] == made["1"] == made["11"], store.url
        assert made["1"][1] == 8 and made["1"][2] > 4000
        took = [(package, placed) for package, placed in seen if placed is not None]
        assert len(took) > 8, seen  # some of the first hydrate's, all 8 of the last one's
        last = dict(took[-8:])
        for package in ("python", "numpy"):
            assert last[package].names == [] and last[package].linked > 1000, last[package]
        assert last["pip"].names and last["pip"].linked == 0, last["pip"]
        seen.clear()


def _flipped(layered: LocalStore, root: Path) -> tuple[LocalStore, str, bytes]:
    """A copy of *layered* at *root* whose largest layer has one byte flipped: the store,
    that layer's key and its good bytes."""
    store = LocalStore(root)
    for key in layered.list(""):
        store.put(key, layered.get(key) or b"")
    largest = max((k for k in store.list("layers/") if k.endswith(".tar.zst")), key=store.size)
    good = store.get(largest) or b""
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    store.put(largest, bytes(bad))
    return store, largest, good


def test_a_lying_layer_fails_the_same_in_the_layer_process(
    mixed_lock, layered, tmp_path, monkeypatch
):
    """A flipped byte in the largest layer, fetched by the layer process: the same error
    line as here, nothing published, the process gone; the repaired store hydrates."""
    store, largest, good = _flipped(layered, tmp_path / "store")
    said = {}
    started = _started(monkeypatch)
    for mode in ("0", "1"):
        monkeypatch.setenv("ENVMGR_LAYER_PROCESS", mode)
        cache = tmp_path / f"host{mode}"
        with pytest.raises(HashMismatchError) as failed:
            hydrate(mixed_lock.env_id, store, cache, platform="linux-64")
        said[mode] = str(failed.value)
        assert not env_dir(cache, mixed_lock.env_id).exists()
        assert not list((cache / "layers").glob(".tmp-*"))
        assert not list((cache / "envs").glob(".tmp-*"))
    assert said["0"] == said["1"] and largest in said["1"]
    assert len(started) == 1 and started[0].proc.returncode is not None
    store.put(largest, good)
    assert hydrate(mixed_lock.env_id, store, tmp_path / "host1", platform="linux-64").downloaded


def test_stopping_the_rest_never_replaces_the_error_that_stopped_the_hydrate(
    mixed_lock, layered, tmp_path, monkeypatch
):
    """Once in CI, a flipped byte failed a hydrate with ``ValueError: PyMemoryView_FromBuffer():
    info->buf must not be NULL``: a pipe closed while another thread flushed it, as the
    hydrate stopped its helpers. Whatever stopping them raises, the error is the hash's,
    and the layer process and the link helper still end."""
    store, _largest, _good = _flipped(layered, tmp_path / "store")
    started = _started(monkeypatch)
    real_kill, real_abandon = LayerProcess.kill, envmgr.worker.assembly.Assembly.abandon

    def kill(self):
        real_kill(self)
        raise ValueError("PyMemoryView_FromBuffer(): info->buf must not be NULL")

    def abandon(self):
        real_abandon(self)
        raise ValueError("flush of closed file")

    monkeypatch.setattr(LayerProcess, "kill", kill)
    monkeypatch.setattr(envmgr.worker.assembly.Assembly, "abandon", abandon)
    monkeypatch.setattr(envmgr.worker.assembly, "HELPER_FILES", 0)  # a helper from the start
    monkeypatch.setenv("ENVMGR_LAYER_PROCESS", "1")
    with pytest.raises(HashMismatchError):
        hydrate(mixed_lock.env_id, store, tmp_path / "host", platform="linux-64")
    assert len(started) == 1 and started[0].proc.returncode is not None
    assert not env_dir(tmp_path / "host", mixed_lock.env_id).exists()


def test_a_hydrate_that_fails_before_its_downloads_ends_its_layer_process(
    mixed_lock, layered, tmp_path, monkeypatch
):
    """The layers' manifests gone from the store: the hydrate fails with its one line at
    the first manifest it reads, before any layer is handed over, and the layer process it
    had started ends with it."""
    store = LocalStore(tmp_path / "store")
    for key in layered.list(""):
        if not (key.startswith("layers/") and key.endswith("manifest.json")):
            store.put(key, layered.get(key) or b"")
    started = _started(monkeypatch)
    monkeypatch.setenv("ENVMGR_LAYER_PROCESS", "1")
    cache = tmp_path / "host"
    with pytest.raises(HydrateError, match="is not in"):
        hydrate(mixed_lock.env_id, store, cache, platform="linux-64")
    assert len(started) == 1 and started[0].proc.returncode is not None
    assert not env_dir(cache, mixed_lock.env_id).exists()


def test_a_layer_process_that_dies_leaves_its_layers_to_the_hydrate(
    mixed_lock, layered, tmp_path, monkeypatch
):
    """A process that cannot start, one that dies on its first layer after writing part of
    it, and two that answer nonsense (a result without names, a count of bytes read that is
    no number): the hydrate fetches their layers itself, and the env
    is the one it makes alone (host dirs of one length: the binary prefix pads to it)."""
    monkeypatch.setenv("ENVMGR_LAYER_PROCESS", "0")
    alone = hydrate(mixed_lock.env_id, layered, tmp_path / "solo", platform="linux-64")
    expected = (_tree(alone.prefix), alone.layers_fetched, alone.linked, alone.copied)
    monkeypatch.setenv("ENVMGR_LAYER_PROCESS", "1")
    seen = _children(monkeypatch)
    half = (
        "import json, pathlib, sys\n"
        "sys.stdin.readline(); job = json.loads(sys.stdin.readline())\n"
        "into = pathlib.Path(job['into']); (into / 'lib').mkdir(parents=True)\n"
        "(into / 'lib' / 'half').write_bytes(b'x'); sys.exit(9)\n"
    )
    nonsense = "import sys\nsys.stdin.readline(); sys.stdin.readline()\nprint('{\"done\": 1}')\n"
    bad_read = (  # then waits: the hydrate must see it is wrong
        "import sys, time\nsys.stdin.readline(); sys.stdin.readline()\n"
        'print(\'{"read": "x"}\', flush=True); time.sleep(60)\n'
    )
    for name, code in (
        ("nopy", "import sys; sys.exit(3)"),
        ("half", half),
        ("what", nonsense),
        ("read", bad_read),
    ):
        monkeypatch.setattr(envmgr.worker.layer_process, "_CHILD", code)
        result = hydrate(mixed_lock.env_id, layered, tmp_path / name, platform="linux-64")
        got = (_tree(result.prefix), result.layers_fetched, result.linked, result.copied)
        assert got == expected, name
        assert seen and all(placed is None for _package, placed in seen), name
        seen.clear()


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "new-interpreter"])
def test_the_layer_process_ends_when_its_hydrate_is_killed(forked, tmp_path):
    """kill -9 of a hydrate leaves no layer process behind, forked or started anew: its
    input ends, and it exits."""
    code = (
        "import sys, time; from pathlib import Path\n"
        "import envmgr.worker.layer_process as lp\n"
        f"assert lp._forkable() is True; lp._forkable = lambda: {forked}\n"
        "from envmgr.cache.local import LocalStore\n"
        f"child = lp.LayerProcess.start(LocalStore(Path({str(tmp_path)!r})))\n"
        f"assert isinstance(child.proc, lp._Forked) is {forked}\n"
        "print(child.proc.pid, flush=True); time.sleep(60)"
    )
    # Waited past its imports, for a job.
    assert not outlives_its_parent(code, settle=0.5), "the layer process outlived its hydrate"


_CLI = """
import sys
import envmgr.worker.layer_process as lp
from envmgr.cli import main

real_fork = lp._fork
def fork(store):
    forked = real_fork(store)
    print("layer process forked", file=sys.stderr, flush=True)  # main() ends with os._exit
    return forked
lp._fork = fork
sys.argv = ["envmgr", *sys.argv[1:]]
main()
"""


def test_envmgr_hydrate_off_a_terminal_forks_its_layer_process(mixed_lock, layered, tmp_path):
    """``envmgr hydrate > log``: its progress line waits on a timer thread, which once made
    every CLI hydrate start its layer process as a new interpreter (0.3 s of CPU). The
    timer now starts after the fork."""
    ran = subprocess.run(
        [sys.executable, "-c", _CLI, "hydrate", mixed_lock.env_id, "--store", layered.url],
        env={
            **os.environ,
            "ENVMGR_LAYER_PROCESS": "1",
            "ENVMGR_CACHE_DIR": str(tmp_path / "host"),
            "ENVMGR_PROGRESS_AFTER": "30",  # a timer that is still waiting at the fork
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stderr.count("layer process forked") == 1, ran.stderr[-2000:]
    assert ran.stdout.strip().endswith("/bin/python")


_APART = """
import json, os, sys, threading
from pathlib import Path
import envmgr.worker.layer_process as lp
from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.worker.hydrate import hydrate

url, env_id, host, how = sys.argv[1:5]
alone = lp._forkable()
forks, took = [], []
real_fork, real_fetch = lp._fork, lp.LayerProcess.fetch

def fork(store):
    forks.append(real_fork(store))
    return forks[-1]

def fetch(self, job, task):
    placed = real_fetch(self, job, task)
    if placed is not None:
        took.append(job.layer.layer.package.split()[1])
    return placed

def die(store, job, say):  # the child's first layer: part of it written, then it is gone
    (Path(job["into"]) / "lib").mkdir(parents=True)
    (Path(job["into"]) / "lib" / "half").write_bytes(b"x")
    os._exit(9)

lp._fork, lp.LayerProcess.fetch = fork, fetch
if how == "die":
    lp._run = die
if how == "thread":  # another thread running: no fork
    threading.Thread(target=threading.Event().wait, daemon=True).start()
store = S3Store(url) if url.startswith("s3://") else LocalStore(Path(url))
said = {"alone": alone}
try:
    got = hydrate(env_id, store, Path(host), platform="linux-64")
    said.update(prefix=str(got.prefix), counts=[got.layers_fetched, got.linked, got.copied])
except Exception as exc:
    import traceback
    said.update(error=str(exc), type=type(exc).__name__, trace=traceback.format_exc())
said.update(forks=len(forks), ended=[f.returncode is not None for f in forks], took=took)
print(json.dumps(said))
"""


def _hydrate_apart(store: str, env_id: str, host: Path, how: str = "", **env: str) -> dict:
    """A hydrate with ``ENVMGR_LAYER_PROCESS=1`` in a python of its own, where nothing
    else runs, so its layer process is forked: what it made, how many it forked, whether
    they ended, and the layers they took (*how*: ``die``, each forked child dies on its
    first layer; ``thread``, a thread runs beside it)."""
    ran = subprocess.run(
        [sys.executable, "-c", _APART, store, env_id, str(host), how],
        env={**os.environ, "ENVMGR_LAYER_PROCESS": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(ran.stdout.splitlines()[-1])


def test_a_forked_layer_process_makes_the_env_this_process_makes(
    mixed_lock, layered, s3_server, s3_bucket, tmp_path, monkeypatch
):
    """A hydrate in a python where nothing else runs forks its layer process; from a local
    store and from S3 it makes the env this process makes alone, its links and counts the
    same, and the child ends with the hydrate. With a thread running, nothing is forked,
    and the env is the same."""
    s3 = S3Store(f"s3://{s3_bucket}/f", client=s3_server.client())
    for key in layered.list(""):
        s3.put(key, layered.get(key) or b"")
    monkeypatch.setenv("ENVMGR_LAYER_PROCESS", "0")
    alone = hydrate(mixed_lock.env_id, layered, tmp_path / "solo", platform="linux-64")
    expected = (_tree(alone.prefix), [alone.layers_fetched, alone.linked, alone.copied])
    aws = s3_env(s3_server)
    for host, store, how in (
        ("loca", str(layered.root), ""),
        ("s3ss", s3.url, ""),
        ("thrd", str(layered.root), "thread"),
    ):
        said = _hydrate_apart(store, mixed_lock.env_id, tmp_path / host, how, **aws)
        assert said["alone"] and "error" not in said, said
        assert (_tree(Path(said["prefix"])), said["counts"]) == expected, host
        if how == "thread":
            assert said["forks"] == 0 and said["took"], said  # started anew, and used
        else:
            assert said["forks"] == 1 and said["ended"] == [True] and said["took"], said


def test_a_forked_layer_process_that_fails_leaves_the_same_env_or_error(
    mixed_lock, layered, tmp_path, monkeypatch
):
    """A forked child that dies on its first layer after writing part of it: the hydrate
    fetches the layer itself and makes the same env. A flipped byte in the largest layer,
    fetched by a forked child: the line this process says, nothing published."""
    monkeypatch.setenv("ENVMGR_LAYER_PROCESS", "0")
    alone = hydrate(mixed_lock.env_id, layered, tmp_path / "solo", platform="linux-64")
    said = _hydrate_apart(str(layered.root), mixed_lock.env_id, tmp_path / "dies", "die")
    assert said["forks"] == 1 and said["took"] == [] and "error" not in said, said
    assert (_tree(Path(said["prefix"])), said["counts"]) == (
        _tree(alone.prefix),
        [alone.layers_fetched, alone.linked, alone.copied],
    )
    store, _largest, _good = _flipped(layered, tmp_path / "store")
    with pytest.raises(HashMismatchError) as here:
        hydrate(mixed_lock.env_id, store, tmp_path / "here", platform="linux-64")
    said = _hydrate_apart(str(store.root), mixed_lock.env_id, tmp_path / "lies")
    assert said["forks"] == 1 and said["ended"] == [True], said
    assert (said["type"], said["error"]) == ("HashMismatchError", str(here.value)), said
    assert not env_dir(tmp_path / "lies", mixed_lock.env_id).exists()
    assert not list((tmp_path / "lies" / "layers").glob(".tmp-*"))


def _layer_process_of(pid: int) -> int | None:
    """The layer process process *pid* started (not its link helper), if any: forked, it
    runs *pid*'s command line."""
    with contextlib.suppress(OSError, ValueError):
        parent = Path(f"/proc/{pid}/cmdline").read_bytes()
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/cmdline").read_bytes() == parent:
                        return int(child)
    return None


@pytest.mark.parametrize(
    ("process", "parts"),
    [(False, ""), (True, ""), (False, "4")],
    ids=["here", "layer-process", "ranged-parts"],
)
def test_ctrl_c_stops_a_hydrate_and_its_layer_process(
    process, parts, mixed_lock, layered, s3_server, s3_bucket, tmp_path
):
    """Ctrl-C at a terminal while the layers come through a proxy at 100 kB/s per
    connection (whole, they would take minutes; one 8 MiB frame, 80 s): the reads waiting
    on the network (one stream per layer, or parallel ranged parts) are woken, a layer
    process ignores the signal and is stopped by its hydrate, both are gone within
    seconds, and no env or half-written layer is published."""
    s3 = S3Store(f"s3://{s3_bucket}/p", client=s3_server.client())
    for key in layered.list(""):
        s3.put(key, layered.get(key) or b"")
    upstream = urlsplit(s3_server.endpoint_url)
    cache = tmp_path / "host"
    with FaultProxy((str(upstream.hostname), int(upstream.port or 80))) as proxy:
        proxy.faults = Faults(bandwidth=100e3)
        env = {**os.environ, **s3_env(s3_server), "AWS_ENDPOINT_URL": proxy.url}
        env["ENVMGR_LAYER_PROCESS"] = "1" if process else "0"
        env["ENVMGR_S3_PARTS"] = parts
        args = ["--store", s3.url, "--env-id", mixed_lock.env_id, "--cache-dir", str(cache)]
        hydrating = subprocess.Popen(
            [sys.executable, "-m", "envmgr.bootstrap", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group, as a shell's foreground job
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 60
            child = None
            while time.monotonic() < deadline and not list(cache.glob("layers/.tmp-*")):
                time.sleep(0.05)  # until layers are being unpacked
            child = _layer_process_of(hydrating.pid)
            assert (child is not None) == process
            time.sleep(1.5)  # the layer process past its imports, reading its layer
            assert hydrating.poll() is None
            sent = time.monotonic()
            os.killpg(hydrating.pid, signal.SIGINT)
            _out, err = hydrating.communicate(timeout=30)
            stopped = time.monotonic() - sent
        finally:
            if hydrating.poll() is None:
                os.killpg(hydrating.pid, signal.SIGKILL)
                hydrating.wait()
    assert hydrating.returncode != 0 and stopped < 3, (stopped, err)
    assert child is None or process_ends(child, 2), "the layer process outlived Ctrl-C"
    assert not (env_dir(cache, mixed_lock.env_id) / COMPLETE).exists()
    # Small layers may have come down whole before the signal: those are kept, published;
    # nothing half-written is.
    kept = [p for p in (cache / "layers").iterdir() if p.name != ".locks"]
    assert all((p / COMPLETE).is_file() and not p.name.startswith(".") for p in kept), kept
