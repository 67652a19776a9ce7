"""Hydrating an env on a worker, side by side with its peers, from one S3 store (SeaweedFS).

    python bench/hydrate.py [--envs fixture,ds,torch] [--repeat 3]

Envs: ``fixture`` (11 conda packages from the fixture channel), ``ds`` (python from the fixture
channel + numpy, pandas, scipy, scikit-learn, matplotlib, pyarrow from pip's configured index)
and ``torch`` (ds + the torch 2.13.0 CPU wheel in pip's find-links directory, given as
``--find-links``). For each, in one run with the order alternating and every cold run from an
empty cache, medians of ``--repeat``: envmgr's cold hydrate (a whole bootstrap process); the
GET of the stored bytes alone; a plain process doing a boto3 download + ``tar --zstd -x``; GNU
tar alone on the local archive (the CPU floor); ``uv pip install`` of the same pinned wheels
from a local directory with an empty uv cache, without and with ``--compile-bytecode``; the
per-package install as a process (every package file from the store, py-rattler + installer,
the Metaflow way); the warm bootstrap; the first import after a cold hydrate against the same
import warm; for the fixture env 16 concurrent cold hydrates; for the real envs the build
(install, bytecode, pack, upload) against uv's install with bytecode. Prints sizes, file counts,
wall and CPU seconds (the process and its children), ratios, the goals and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DS = ("numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "pyarrow")
IMPORTS = {"fixture": "numpy", "ds": "pandas", "torch": "torch"}
#: Wheels and conda packages survive runs here: downloads are not what is measured.
BENCH_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "envmgr-bench"


@dataclass
class Row:
    what: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def w(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def c(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(row: Row, command: list[str], env: dict[str, str] | None = None) -> str:
    """Run *command* to its end; add its wall and CPU seconds (with its children) to *row*."""
    cpu = _children_cpu()
    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    row.wall.append(time.monotonic() - start)
    row.cpu.append(_children_cpu() - cpu)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}…: {done.stderr.strip()[-1500:]}")
    return done.stdout


def _files(prefix: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(prefix))


def _lock_for(name: str, work: Path, s3_store, cache: Path):  # noqa: ANN001, ANN202
    from envmgr.cache.local import LocalStore
    from envmgr.resolve.pypi.pip_config import pip_sources
    from envmgr.resolve.resolution_cache import ResolveOptions, resolve_specs
    from envmgr.specs.deps import CondaDep, PypiDep
    from envmgr.specs.model import EnvSpec
    from fixtures.conda_channel import cached_channel

    index, extra, _links = pip_sources()
    options = ResolveOptions(
        store=LocalStore(work / "locks"),
        cache_dir=cache,
        platforms=("linux-64",),
        default_channels=(cached_channel().as_uri(),),
        env={},
        index_url=index,
        extra_index_urls=tuple(u for u in extra if not u.startswith("file:")),
    )
    if name == "fixture":
        conda = ["numpy", "tabulate", "python-dateutil", "requests", "pip"]
        spec = EnvSpec(python="3.11.*", conda=tuple(CondaDep.parse(p) for p in conda))
    else:
        pypi = [*DS, "torch==2.13.0"] if name == "torch" else list(DS)
        links = ("/opt/wheels",) if name == "torch" and Path("/opt/wheels").is_dir() else ()
        spec = EnvSpec(
            python="3.11.*",
            pypi=tuple(PypiDep.parse(p) for p in pypi),
            find_links=tuple(Path(p).as_uri() for p in links),
        )
    return resolve_specs({name: spec}, options)[0].lock


def bench_env(name: str, repeat: int, work: Path, s3, client) -> list[str]:  # noqa: ANN001
    from envmgr.build.once import BuildOptions, build_and_store
    from envmgr.build.wheels import fetch_wheel
    from envmgr.cache.layout import archive_key
    from envmgr.cache.s3 import S3Store

    aws = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_DEFAULT_REGION": s3.region,
    }
    url = f"s3://bench/{name}"
    store = S3Store(url, client=client)
    cache = BENCH_CACHE / "cache"
    lock = _lock_for(name, work, store, cache)
    lines = []
    build = Row("envmgr build: install, bytecode, pack, upload")
    cpu = _self_cpu() + _children_cpu()
    start = time.monotonic()
    options = BuildOptions(store=store, cache_dir=cache, layers=False)  # the one archive peers get
    manifest = build_and_store(lock, options).manifest
    build.wall.append(time.monotonic() - start)
    build.cpu.append(_self_cpu() + _children_cpu() - cpu)  # with the bytecode workers
    key = f"{name}/{archive_key('linux-64', lock.env_id)}"
    local_archive = work / f"{name}.tar.zst"
    client.download_file("bench", key, str(local_archive))
    wheels = [p for p in lock.packages if p.manager == "pypi"]
    wheel_dir = work / f"{name}-wheels"
    wheel_dir.mkdir()
    for wheel in wheels:
        path = fetch_wheel(wheel.url, wheel.sha256, cache / "wheels")
        os.link(path, wheel_dir / path.name)
    pins = work / f"{name}-pins.txt"
    pins.write_text("".join(f"{p.name}=={p.version}\n" for p in wheels))

    def bootstrap(cache_dir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "envmgr.bootstrap",
            "--store",
            url,
            "--env-id",
            lock.env_id,
            "--cache-dir",
            str(cache_dir),
            "--json",
        ]

    get_script = (
        "import boto3, sys; body = boto3.client('s3').get_object(Bucket='bench', "
        "Key=sys.argv[1])['Body']\nwhile body.read(1 << 20): pass"
    )
    plain_script = (
        "import boto3, subprocess, sys; "
        "boto3.client('s3').download_file('bench', sys.argv[1], sys.argv[2]); "
        "subprocess.run(['tar', '--zstd', '-xf', sys.argv[2], '-C', sys.argv[3]], check=True)"
    )
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    python = shutil.which("python3.11") or sys.executable
    cold = Row("envmgr cold hydrate (bootstrap process)")
    # A real network (#32): 15 MB/s per connection, 30 ms before each request's first byte.
    from fixtures.tcp_proxy import FaultProxy, Faults

    host, port = s3.endpoint_url.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy((host, int(port))).start()
    proxy.faults = Faults(bandwidth=15e6, first_byte=0.03)
    slow_net = {**aws, "AWS_ENDPOINT_URL": proxy.url}
    throttled = Row("cold hydrate, 15 MB/s + 30 ms per connection")
    throttled_parts = Row("  the same with ENVMGR_S3_PARTS=4")
    get = Row("GET of the archive alone (boto3 process)")
    plain = Row("boto3 download + tar --zstd -x (process)")
    tar = Row("GNU tar --zstd -x of the local archive")
    uv_plain = Row("uv pip install, empty cache, no bytecode")
    uv_pyc = Row("uv pip install --compile-bytecode")
    first = Row(f"first `import {IMPORTS[name]}` after a cold hydrate")
    again = Row(f"`import {IMPORTS[name]}` again (warm)")
    real = name != "fixture"

    def run_cold(i: int) -> None:
        out = json.loads(timed(cold, bootstrap(work / f"{name}-cold{i}"), aws))
        timed(first, [out["python"], "-c", f"import {IMPORTS[name]}"])
        for _ in range(3):
            timed(again, [out["python"], "-c", f"import {IMPORTS[name]}"])
        # One sample per round on each side: the median of the three warm imports.
        again.wall[-3:] = [statistics.median(again.wall[-3:])]
        again.cpu[-3:] = [statistics.median(again.cpu[-3:])]

    def run_throttled(i: int, parts: bool) -> None:
        env = {**slow_net, "ENVMGR_S3_PARTS": "4"} if parts else slow_net
        row = throttled_parts if parts else throttled
        timed(row, bootstrap(work / f"{name}-slow{i}{'p' if parts else ''}"), env)

    def run_plain(i: int) -> None:
        target = work / f"{name}-plain{i}"
        target.mkdir()
        timed(
            plain,
            [sys.executable, "-c", plain_script, key, str(work / "dl.tar.zst"), str(target)],
            aws,
        )

    def run_tar(i: int) -> None:
        target = work / f"{name}-tar{i}"
        target.mkdir()
        timed(tar, ["tar", "--zstd", "-xf", str(local_archive), "-C", str(target)])

    def run_get(_i: int) -> None:
        timed(get, [sys.executable, "-c", get_script, key], aws)

    def run_uv(i: int, compile_pyc: bool) -> None:
        venv = work / f"{name}-uv{i}{'c' if compile_pyc else ''}"
        subprocess.run([uv, "venv", "-q", "--python", python, str(venv)], check=True)
        command = [
            uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--no-index",
            "--no-deps", "--find-links", str(wheel_dir), "--cache-dir", str(venv) + ".cache",
            "-r", str(pins),
        ]  # fmt: skip
        timed(
            uv_pyc if compile_pyc else uv_plain,
            command + (["--compile-bytecode"] if compile_pyc else []),
        )

    measures: list[Callable[[int], None]] = [
        run_cold,
        run_plain,
        run_tar,
        run_get,
        lambda i: run_throttled(i, False),
        lambda i: run_throttled(i, True),
    ]
    if real:
        measures += [lambda i: run_uv(i, False), lambda i: run_uv(i, True)]
    for i in range(repeat):
        order = measures if i % 2 == 0 else measures[::-1]
        for measure in order:
            measure(i)
            _clean(work, name)
    proxy.stop()
    per_package = _per_package(name, lock, work, client, aws, repeat)
    warm = Row("envmgr warm bootstrap (process)")
    warm_cache = work / f"{name}-warm"
    timed(Row("-"), bootstrap(warm_cache), aws)
    start_only = Row("python -c pass (the interpreter's own start)")
    for _ in range(10):
        timed(warm, bootstrap(warm_cache), aws)
        timed(start_only, [sys.executable, "-c", "pass"])
    rows = [cold, throttled, throttled_parts, get, plain, tar]
    if real:
        rows += [uv_plain, uv_pyc]
    rows += [per_package, warm, start_only, first, again]
    if name == "fixture":
        rows.append(_concurrent(bootstrap, work, aws, repeat))
    if real:
        rows.append(build)
    shutil.rmtree(warm_cache, ignore_errors=True)
    lines.append(
        f"env {name} ({lock.env_id[:12]}): {len(lock.packages)} packages, archive "
        f"{manifest.size / 1e6:.0f} MB in {len(manifest.chunks) or 1} frames, unpacked "
        f"{manifest.unpacked_size / 1e6:.0f} MB, {manifest.files} files"
    )
    lines.append(f"{'what':<50}{'wall s':>9}{'cpu s':>9}{'vs cold':>9}  note")
    for row in rows:
        lines.append(
            f"{row.what:<50}{row.w:>9.3f}{row.c:>9.2f}{row.w / cold.w:>8.2f}x  {row.note}".rstrip()
        )
    pairs = sorted(c / p for c, p in zip(cold.wall, plain.wall, strict=True))
    goals = [
        f"cold / plain process {cold.w / plain.w:.2f}x (median of pairs "
        f"{statistics.median(pairs):.2f}x; goal <= 0.7x)",
        f"cold CPU / GNU tar's CPU {cold.c / tar.c:.2f}x (goal <= 1.2x)",
    ]
    if real:
        goals += [
            f"cold / uv without bytecode {cold.w / uv_plain.w:.2f}x (goal < 1x)",
            f"cold / uv --compile-bytecode {cold.w / uv_pyc.w:.2f}x (goal <= 0.5x)",
            f"build / uv --compile-bytecode {build.w / uv_pyc.w:.2f}x (goal <= 2x)",
        ]
    else:
        goals.append(f"cold / per-package process {cold.w / per_package.w:.2f}x (goal < 1x)")
    goals.append(
        f"throttled / loopback cold {throttled.w / cold.w:.2f}x, with 4 parts "
        f"{throttled_parts.w / cold.w:.2f}x (#32's goal for format 3: <= 1.25x)"
    )
    goals.append(f"first import / warm import {first.w / again.w:.2f}x (goal <= 1.1x)")
    goals.append(f"warm bootstrap {warm.w * 1000:.0f} ms (goal < 40 ms on an idle machine)")
    lines += ["goals: " + "; ".join(goals), ""]
    return lines


def _clean(work: Path, name: str) -> None:
    for path in work.glob(f"{name}-*"):
        if path.is_dir() and not path.name.endswith(("-wheels", "-warm")):
            shutil.rmtree(path, ignore_errors=True)


_PER_PACKAGE = """
import json, sys
from dataclasses import replace
from pathlib import Path
import boto3
from envmgr.build.prefix import create_prefix
from envmgr.locks.lock import read_conda_lock
lock = read_conda_lock(Path(sys.argv[1])).for_platform("linux-64")
work = Path(sys.argv[2])
files = work / "files"
files.mkdir(parents=True)
client = boto3.client("s3")
moved = []
for package in lock.packages:
    name = package.url.split("#")[0].rsplit("/", 1)[-1]
    client.download_file("bench", f"pkgs/{package.sha256}", str(files / name))
    moved.append(replace(package, url=(files / name).as_uri()))
create_prefix(replace(lock, packages=tuple(moved)), work / "env", work / "cache")
"""


def _per_package(name: str, lock, work: Path, client, aws, repeat: int) -> Row:  # noqa: ANN001
    """Every package file from the store, installed on the worker (Metaflow's way)."""
    from envmgr.build.wheels import fetch_wheel
    from envmgr.locks.lock import Lock, write_conda_lock

    for package in lock.packages:
        if package.manager == "pypi":
            path = fetch_wheel(package.url, package.sha256, BENCH_CACHE / "cache" / "wheels")
        else:
            path = Path(_local(package.url))
        client.upload_file(str(path), "bench", f"pkgs/{package.sha256}")
    lock_file = work / f"{name}.conda-lock.yml"
    write_conda_lock(Lock(platforms=(lock,)), lock_file)
    row = Row("per-package install as a process (+ bytecode)", note="py-rattler + installer")
    for i in range(repeat):
        target = work / f"{name}-pp{i}"
        timed(row, [sys.executable, "-c", _PER_PACKAGE, str(lock_file), str(target)], aws)
        shutil.rmtree(target, ignore_errors=True)
    return row


def _concurrent(bootstrap, work: Path, aws, repeat: int) -> Row:  # noqa: ANN001
    row = Row("16 concurrent cold hydrates, one host")
    downloads = []
    for i in range(repeat):
        cpu = _children_cpu()
        start = time.monotonic()
        procs = [
            subprocess.Popen(
                bootstrap(work / f"fixture-many{i}"), env=aws, stdout=subprocess.PIPE, text=True
            )
            for _ in range(16)
        ]
        results = [json.loads(p.communicate()[0]) for p in procs]
        row.wall.append(time.monotonic() - start)
        row.cpu.append(_children_cpu() - cpu)
        downloads.append(sum(r["downloaded"] for r in results))
        shutil.rmtree(work / f"fixture-many{i}", ignore_errors=True)
    row.note = f"downloads per run: {', '.join(map(str, downloads))}"
    return row


def _local(url: str) -> str:
    """The path of a package from the (file://) fixture channel."""
    from urllib.parse import unquote, urlsplit

    if not url.startswith("file://"):
        raise RuntimeError(
            f"this benchmark takes conda packages from the fixture channel, not {url}"
        )
    return unquote(urlsplit(url).path)


def main(argv: list[str] | None = None) -> int:
    from fixtures.s3_server import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="fixture,ds,torch")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"load at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-hydrate-") as tmp,
        launch(Path(tmp) / "s3") as s3,
    ):
        client = s3.client()
        client.create_bucket(Bucket="bench")
        for name in args.envs.split(","):
            work = Path(tmp) / name
            work.mkdir()
            for line in bench_env(name, args.repeat, work, s3, client):
                print(line, flush=True)
            shutil.rmtree(work, ignore_errors=True)
    print(f"load at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
