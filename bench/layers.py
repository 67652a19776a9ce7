"""Package layers (format 3) against one archive per env (format 2), from one S3 store.

    python bench/layers.py [--repeat 3]

Envs (python from the fixture channel, wheels from pip's configured index, torch's CPU wheel
from pip's find-links): ``ds`` (numpy, pandas, scipy, scikit-learn, matplotlib, pyarrow),
``torch`` (ds + torch 2.13.0) and ``ds+tab`` (ds + tabulate). In one run, medians of
``--repeat`` where it says so, every cold run from an empty cache:

- **store**: the three envs built as layers into one store, against the bytes of their
  distinct layers, and against the same three built as one archive each;
- **incremental build**: ds + tabulate built from its lock after ds (the solve is not timed),
  against ds's cold build, with the bytes uploaded besides manifests;
- **host reuse**: ds + tabulate hydrated on a host that holds ds, against the same cold;
- **cold hydrate** of torch on an empty host: layers against one archive on loopback, and
  each through a proxy that gives every connection 15 MB/s and 30 ms before its first byte,
  with the CPU the store and the proxy spent on each (they share the hydrate's cores here,
  which S3 and a real network do not) and the throttled side's total against loopback's;
- **first import** of torch after a layered hydrate, against the same import warm.

Where the hosts are matters as much as what envmgr does. On an ext4 file system *without a
journal*, every file created within a minute or five of deleting many others costs a scan of
the freed inodes (``recently_deleted`` in the kernel): on this machine's root file system,
creating 20,000 small files took 5-6 s of CPU after such deletions, against 0.3 s on a
journaled ext4 and 0.2 s on tmpfs. It took 65% of a torch hydrate's CPU there, made each row
depend on what the row before it deleted, and flattered host reuse (its cold side creates
35,000 inodes, the reused side few). So ``--host-dir DIR`` puts every hydrate's host cache
(host reuse, torch) under *DIR*, each deleted after its row, and the run warns when the
hosts are on an ext4 without a journal. Without it they go in the run's temp dir and stay
until the run ends (about 25 GB with ``--repeat 3``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hydrate import BENCH_CACHE, DS, Row, _lock_for, timed  # noqa: E402

MB = 1e6


def _ds_tab_lock(work: Path, cache: Path):  # noqa: ANN202
    """ds + tabulate: :func:`bench.hydrate._lock_for`'s ds with one small pure package more."""
    import bench.hydrate

    saved = bench.hydrate.DS
    bench.hydrate.DS = (*DS, "tabulate")
    try:
        return _lock_for("ds", work, None, cache)
    finally:
        bench.hydrate.DS = saved


def _stored(client, prefix: str) -> dict[str, int]:  # noqa: ANN001
    sizes = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
        for item in page.get("Contents", []):
            sizes[item["Key"][len(prefix) :]] = int(item["Size"])
    return sizes


def _build(lock, url: str, client, *, layers: bool) -> float:  # noqa: ANN001
    from envmgr.build.once import BuildOptions, build_and_store
    from envmgr.cache.s3 import S3Store

    options = BuildOptions(
        store=S3Store(url, client=client), cache_dir=BENCH_CACHE / "cache", layers=layers
    )
    start = time.monotonic()
    build_and_store(lock, options)
    return time.monotonic() - start


def _tree_cpu(pid: int) -> float:
    """CPU seconds of process *pid* and the processes under it (Linux's ``/proc``; 0 where
    there is none): the store's launcher and its ``weed``."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        here = todo.pop()
        try:
            fields = Path(f"/proc/{here}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{here}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _self_cpu() -> float:
    """This process's CPU seconds: while a hydrate runs, its proxy's threads are all it does."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _bootstrap(url: str, env_id: str, cache: Path) -> list[str]:
    return [sys.executable, "-m", "envmgr.bootstrap", "--store", url, "--env-id", env_id,
            "--cache-dir", str(cache), "--json"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from fixtures.s3_server import launch
    from fixtures.tcp_proxy import FaultProxy, Faults

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only-torch", action="store_true", help="only the torch hydrate rows")
    parser.add_argument(
        "--host-dir",
        type=Path,
        default=None,
        help="where every hydrate's host cache goes, each deleted after its row "
        "(default: the run's temp dir, kept to its end)",
    )
    args = parser.parse_args(argv)
    repeat = args.repeat
    print(f"load at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp,
        launch(Path(tmp) / "s3") as s3,
    ):
        work = Path(tmp)
        hosts, keep = (args.host_dir, False) if args.host_dir else (work / "hosts", True)
        hosts.mkdir(parents=True, exist_ok=True)
        device = _unjournaled_ext4(hosts)
        kept = "kept to the end" if keep else "each deleted after its row"
        print(f"host caches under {hosts} ({kept})")
        if device:
            print(
                f"  warning: {hosts} is on {device}, an ext4 without a journal: files created "
                "soon after deletions cost a scan of the freed inodes; give --host-dir on "
                "another file system (a journaled one, or tmpfs)"
            )
        client = s3.client()
        client.create_bucket(Bucket="bench")
        aws = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint_url,
               "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
               "AWS_DEFAULT_REGION": s3.region}  # fmt: skip
        host, port = s3.endpoint_url.removeprefix("http://").rsplit(":", 1)
        proxy = FaultProxy((host, int(port))).start()
        proxy.faults = Faults(bandwidth=15e6, first_byte=0.03)
        slow = {**aws, "AWS_ENDPOINT_URL": proxy.url}
        cache = BENCH_CACHE / "cache"
        locks = {
            "ds": _lock_for("ds", work, None, cache),
            "torch": _lock_for("torch", work, None, cache),
            "ds+tab": _ds_tab_lock(work, cache),
        }

        if args.only_torch:
            _build(locks["torch"], "s3://bench/three", client, layers=True)
            _build(locks["torch"], "s3://bench/two", client, layers=False)
            _torch(
                locks["torch"].env_id, hosts, repeat, aws, slow, keep=keep, store_pid=s3.process.pid
            )
            proxy.stop()
            return 0
        # Store: the three envs as layers in one store, and as one archive each.
        seconds = {}
        for name, lock in locks.items():
            seconds[f"3 {name}"] = _build(lock, "s3://bench/three", client, layers=True)
            seconds[f"2 {name}"] = _build(lock, "s3://bench/two", client, layers=False)
        three, two = _stored(client, "three/"), _stored(client, "two/")
        layer_bytes = sum(size for key, size in three.items() if key.startswith("layers/"))
        print("\nstore: ds, torch and ds+tabulate built into one store")
        print(f"  layers (format 3): {sum(three.values()) / MB:9.1f} MB in the store, "
              f"{layer_bytes / MB:.1f} MB of distinct layers: "
              f"{sum(three.values()) / layer_bytes:.3f}x (goal <= 1.05x)")  # fmt: skip
        print(f"  one archive each (format 2): {sum(two.values()) / MB:9.1f} MB: "
              f"{sum(two.values()) / sum(three.values()):.2f}x the layered store")  # fmt: skip
        print(
            "  builds in this order (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
        )

        # Incremental build: ds + tabulate from its lock after ds, against ds cold.
        cold_build, incremental = Row("ds cold build from its lock"), Row("ds + tabulate after ds")
        uploaded = []
        for i in range(repeat):
            url = f"s3://bench/inc{i}"
            cold_build.wall.append(_build(locks["ds"], url, client, layers=True))
            before = _stored(client, f"inc{i}/")
            incremental.wall.append(_build(locks["ds+tab"], url, client, layers=True))
            new = {k: v for k, v in _stored(client, f"inc{i}/").items() if k not in before}
            data = sum(v for k, v in new.items() if not k.endswith("manifest.json"))
            uploaded.append((data, sum(new.values()) - data))
        print("\nincremental build (medians of", repeat, "; solves not counted)")
        print(f"  {cold_build.what:<40} {cold_build.w:8.2f} s")
        print(f"  {incremental.what:<40} {incremental.w:8.2f} s  "
              f"{incremental.w / cold_build.w:.3f}x (goal <= 0.10x)")  # fmt: skip
        data, manifests = uploaded[-1]
        print(f"  uploaded besides manifests: {data / 1e3:.1f} kB (goal <= 1 MB); "
              f"manifests {manifests / 1e3:.1f} kB")  # fmt: skip

        # Host reuse: ds + tabulate on a host that holds ds.
        url = "s3://bench/three"
        cold_tab, reuse = Row("ds + tabulate, cold host"), Row("ds + tabulate, host holds ds")
        shown = {}
        for i in range(repeat):
            cold = hosts / f"tab{i}"
            timed(cold_tab, _bootstrap(url, locks["ds+tab"].env_id, cold), aws)
            warm = hosts / f"reuse{i}"
            subprocess_run(_bootstrap(url, locks["ds"].env_id, warm), aws)
            shown = json.loads(timed(reuse, _bootstrap(url, locks["ds+tab"].env_id, warm), aws))
            if not keep:
                shutil.rmtree(cold)
                shutil.rmtree(warm)
        print(f"\nhost reuse (medians of {repeat})")
        print(f"  {cold_tab.what:<40} {cold_tab.w:8.2f} s")
        print(f"  {reuse.what:<40} {reuse.w:8.2f} s  {reuse.w / cold_tab.w:.3f}x (goal <= 0.25x)")
        layers = shown.get("layers", {})
        print(
            f"  layers fetched {layers.get('fetched')}, files linked {layers.get('linked')}, "
            f"written (relocated copies, the env layer) {layers.get('copied')}"
        )

        _torch(locks["torch"].env_id, hosts, repeat, aws, slow, keep=keep, store_pid=s3.process.pid)
        proxy.stop()
    print(f"\nload at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def _unjournaled_ext4(path: Path) -> str | None:
    """The device of the file system *path* is on when that is an ext4 without a journal
    (Linux), else ``None``."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    found = ("", "", "")
    for line in mounts:
        device, point, kind = [*line.split(), "", "", ""][:3]
        point = point.replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(found[1]):
            found = (device, point, kind)
    device, _point, kind = found
    if kind != "ext4":
        return None
    try:
        task = Path(f"/sys/fs/ext4/{Path(device).name}/journal_task").read_text()
    except OSError:
        return None
    return device if task.strip() == "<none>" else None


def _torch(
    torch: str,
    host: Path,
    repeat: int,
    aws: dict[str, str],
    slow: dict[str, str],
    *,
    keep: bool,
    store_pid: int,
) -> None:
    """Cold hydrate of torch: layers against one archive, loopback and throttled; the first
    import after a layered hydrate against the same import warm. Each host cache is made
    under *host*, and deleted after its row unless *keep*. The CPU the store (the process
    *store_pid* and its ``weed``) and the proxy spend on each hydrate is printed beside it:
    on this machine they share the hydrate's cores, which a real network and S3 do not."""
    rows = {
        ("3", "loop"): Row("torch, layers, loopback"),
        ("2", "loop"): Row("torch, one archive, loopback"),
        ("3", "slow"): Row("torch, layers, 15 MB/s + 30 ms"),
        ("2", "slow"): Row("torch, one archive, 15 MB/s + 30 ms"),
    }
    first, again = Row("first `import torch` after a layered hydrate"), Row("warm import")
    # The same first import after a one-archive hydrate: on a disk still writing back the
    # 1.5 GB a hydrate wrote, a first import is slower whatever the format; this row says how
    # much of the layered row's gap is the disk's, not the links'.
    first2 = Row("first `import torch` after a one-archive hydrate")
    served: dict[tuple[str, str], list[float]] = {key: [] for key in rows}
    relayed: dict[tuple[str, str], list[float]] = {key: [] for key in rows}
    for i in range(repeat):
        order = list(rows) if i % 2 == 0 else list(reversed(rows))
        for fmt, net in order:
            target = host / f"torch-{fmt}{net}{i}"
            shutil.rmtree(target, ignore_errors=True)
            store = "s3://bench/three" if fmt == "3" else "s3://bench/two"
            network = slow if net == "slow" else aws
            before = _tree_cpu(store_pid), _self_cpu()
            out = json.loads(timed(rows[fmt, net], _bootstrap(store, torch, target), network))
            served[fmt, net].append(_tree_cpu(store_pid) - before[0])
            relayed[fmt, net].append(_self_cpu() - before[1])
            if (fmt, net) == ("3", "loop"):
                timed(first, [out["python"], "-c", "import torch"])
                timed(again, [out["python"], "-c", "import torch"])
            elif (fmt, net) == ("2", "loop"):
                timed(first2, [out["python"], "-c", "import torch"])
            if not keep:
                shutil.rmtree(target)
    print(f"\ncold hydrate of torch, empty host (medians of {repeat}, order alternating)")
    base = rows["3", "loop"]
    host_cpu = {}
    for key, row in rows.items():
        store_cpu, proxy_cpu = median(served[key]), median(relayed[key])
        host_cpu[key] = row.c + store_cpu + proxy_cpu
        print(f"  {row.what:<40} {row.w:8.2f} s wall {row.c:7.2f} s cpu  {row.w / base.w:.2f}x"
              f"   store {store_cpu:.2f} s, proxy {proxy_cpu:.2f} s cpu")  # fmt: skip
    print(
        f"  goals: layers / one archive on loopback {base.w / rows['2', 'loop'].w:.2f}x "
        f"(<= 1.0x); layers throttled / loopback {rows['3', 'slow'].w / base.w:.2f}x (<= 1.25x)"
    )
    print(
        "  CPU of hydrate + store + proxy, all on this host's cores: layers throttled "
        f"{host_cpu['3', 'slow']:.2f} s / loopback {host_cpu['3', 'loop']:.2f} s = "
        f"{host_cpu['3', 'slow'] / host_cpu['3', 'loop']:.2f}x"
    )
    print(
        f"  {first.what}: {first.w:.2f} s, warm {again.w:.2f} s: "
        f"{first.w / again.w:.2f}x (goal <= 1.1x)"
    )
    print(f"  {first2.what}: {first2.w:.2f} s: {first2.w / again.w:.2f}x the warm import")


def subprocess_run(command: list[str], env: dict[str, str]) -> None:
    import subprocess

    subprocess.run(command, env=env, check=True, capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main())
