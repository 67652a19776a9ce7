"""Hydrating an env on a worker, side by side, from one S3 store (the SeaweedFS fixture).

    python bench/hydrate.py [--packages numpy,tabulate,...] [--repeat 3]

In one run, on the same env: envmgr's cold hydrate (a whole ``python -m envmgr.bootstrap``
process); a plain boto3 download of the same archive followed by ``tar --zstd -x``; building
the env from per-package files fetched from the same store (the Metaflow way, with py-rattler
and installer); the warm bootstrap as a whole process; and 16 concurrent cold hydrates of one
env on one host. Prints a table of times and ratios. Medians of ``--repeat`` runs; cold
hydrate and download + untar alternate which goes first, and their ratio is also given as the
median of the per-run pairs, because this machine's disk speed drifts between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    from envmgr.build import BuildOptions, build_and_store, create_prefix
    from envmgr.cache.layout import archive_key
    from envmgr.cache.local import LocalStore
    from envmgr.cache.s3 import S3Store
    from envmgr.lock import PlatformLock
    from envmgr.resolution import ResolveOptions, resolve_specs
    from envmgr.spec import CondaDep, EnvSpec
    from fixtures.conda_channel import cached_channel
    from fixtures.s3_server import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", default="numpy,tabulate,python-dateutil,requests,pip")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bench-hydrate-") as tmp,
        launch(Path(tmp) / "s3") as s3,
    ):
        work = Path(tmp)
        client = s3.client()
        client.create_bucket(Bucket="bench")
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": s3.region,
        }
        url = "s3://bench/envs"
        store = S3Store(url, client=client)
        options = ResolveOptions(
            store=LocalStore(work / "locks"),
            cache_dir=work / "cache",
            platforms=("linux-64",),
            default_channels=(cached_channel().as_uri(),),
            env={},
        )
        spec = EnvSpec(
            python="3.11.*", conda=tuple(CondaDep.parse(p) for p in args.packages.split(","))
        )
        lock = resolve_specs({"bench": spec}, options)[0].lock
        manifest = build_and_store(
            lock, BuildOptions(store=store, cache_dir=work / "cache")
        ).manifest
        print(
            f"env {lock.env_id}: {len(lock.packages)} packages, archive "
            f"{manifest.size / 1e6:.1f} MB, unpacked {manifest.unpacked_size / 1e6:.1f} MB"
        )

        def bootstrap(cache: Path) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "envmgr.bootstrap",
                    "--store",
                    url,
                    "--env-id",
                    lock.env_id,
                    "--cache-dir",
                    str(cache),
                    "--json",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        def timed_bootstrap(cache: Path) -> tuple[float, dict]:
            start = time.monotonic()
            proc = bootstrap(cache)
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(err)
            return time.monotonic() - start, json.loads(out)

        cold, plain, per_package, warm = [], [], [], []
        for i in range(args.repeat):
            # This disk's speed drifts a lot between runs: alternate which goes first, and
            # compare each pair (see the ratio printed at the end).
            if i % 2 == 0:
                cold.append(timed_bootstrap(work / f"cold{i}")[0])
            target = work / f"plain{i}"
            target.mkdir()
            # The peer is a whole process too: a worker pays for starting python and boto3.
            script = (
                "import boto3, subprocess, sys; "
                "boto3.client('s3').download_file('bench', sys.argv[1], sys.argv[2]); "
                "subprocess.run(['tar', '--zstd', '-xf', sys.argv[2], '-C', sys.argv[3]], "
                "check=True)"
            )
            start = time.monotonic()
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    script,
                    f"envs/{archive_key('linux-64', lock.env_id)}",
                    str(work / f"plain{i}.tar.zst"),
                    str(target),
                ],
                env=env,
                check=True,
            )
            plain.append(time.monotonic() - start)
            if i % 2 == 1:
                cold.append(timed_bootstrap(work / f"cold{i}")[0])

        # The Metaflow way: every package file from the store, installed on the worker.
        for package in lock.packages:
            client.upload_file(_local(package.url), "bench", f"pkgs/{package.sha256}")
        for i in range(args.repeat):
            start = time.monotonic()
            files = work / f"pkgs{i}"
            files.mkdir()
            moved = []
            for package in lock.packages:
                name = package.url.rsplit("/", 1)[-1]
                client.download_file("bench", f"pkgs/{package.sha256}", str(files / name))
                moved.append(replace(package, url=(files / name).as_uri()))
            create_prefix(
                PlatformLock(platform="linux-64", packages=tuple(moved)),
                work / f"pp{i}",
                work / f"ppcache{i}",
            )
            per_package.append(time.monotonic() - start)

        for _ in range(10):
            warm.append(timed_bootstrap(work / "cold0")[0])

        concurrent, downloads = [], []
        for i in range(args.repeat):
            start = time.monotonic()
            procs = [bootstrap(work / f"many{i}") for _ in range(16)]
            results = [json.loads(p.communicate()[0]) for p in procs]
            concurrent.append(time.monotonic() - start)
            downloads.append(sum(r["downloaded"] for r in results))
        many = _median(concurrent)

    base = _median(cold)
    rows = [
        ("envmgr cold hydrate (bootstrap process)", base, ""),
        ("boto3 download + tar --zstd -x (process)", _median(plain), ""),
        ("per-package build from the store", _median(per_package), "in-process (Metaflow's way)"),
        ("envmgr warm bootstrap (process)", _median(warm), ""),
        (
            "16 concurrent cold hydrates, one host",
            many,
            f"downloads per run: {', '.join(map(str, downloads))}",
        ),
    ]
    print(f"{'what':<42}{'seconds':>9}{'vs cold':>10}")
    for what, seconds, note in rows:
        print(f"{what:<42}{seconds:>9.3f}{seconds / base:>9.2f}x  {note}")
    pairs = sorted(c / p for c, p in zip(cold, plain, strict=True))
    print(
        f"cold / plain download+untar: {base / _median(plain):.2f}x of medians, "
        f"{_median(pairs):.2f}x median of pairs ({pairs[0]:.2f}x-{pairs[-1]:.2f}x); "
        f"per-package / cold: {_median(per_package) / base:.2f}x; "
        f"16 concurrent / one cold: {many / base:.2f}x"
    )
    return 0


def _local(url: str) -> str:
    """The path of a package from the (file://) fixture channel."""
    from urllib.parse import unquote, urlsplit

    if not url.startswith("file://"):
        raise RuntimeError(f"this benchmark uses the fixture channel only, not {url}")
    return unquote(urlsplit(url).path)


if __name__ == "__main__":
    raise SystemExit(main())
