"""Where a cold ``envmgr resolve`` spends its time, as whole processes, beside uv's time.

    python bench/resolve_profile.py [--index-url URL] [--repeat 3]

For a small set (the ten requirements of the resolve-speed issue) and a large one (five of
``bench/pypi_resolve.py``'s sets together, about 200 packages), each run with empty caches:
``envmgr resolve`` with ``ENVMGR_PROFILE`` (see :mod:`envmgr.profile`), interleaved with
``uv pip compile`` on the same index and target (linux-64, CPython 3.11; envmgr's python
comes from the offline fixture channel). Then ``envmgr --version`` and a resolve answered from
the cached lock. Prints medians: wall and CPU seconds, and the phases: start (interpreter and
imports, the wall time before the command runs), cli (the command's imports and argument
parsing), config, gateway (py-rattler), store, conda, pypi (wall), and inside it http and
parse (thread time: prefetching threads overlap, so they can exceed pypi); "other" is the wall
time no phase covers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pypi_resolve import SETS, _uv  # noqa: E402

SMALL = SETS["small"]
LARGE = sorted(
    {r for name in ("datasci", "webapi", "markers", "mltrack", "cloudio") for r in SETS[name]}
)
PHASES = ("start", "cli", "config", "gateway", "store", "conda", "pypi", "http", "parse")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _envmgr(args: list[str], work: Path, cache: Path) -> dict[str, float]:
    """One ``envmgr ARGS`` process: wall, CPU and its phases."""
    profile = work / f"profile-{time.monotonic_ns()}.json"
    env = {
        **os.environ,
        "ENVMGR_CACHE_DIR": str(cache),
        "ENVMGR_STORE": (cache / "store").as_uri(),
        "ENVMGR_PROFILE": str(profile),
    }
    cpu = _children_cpu()
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "envmgr", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"envmgr {' '.join(args)} failed: {result.stderr.strip()[-400:]}")
    phases = json.loads(profile.read_text()) if profile.exists() else {}
    row = {"wall": wall, "cpu": _children_cpu() - cpu}
    row["start"] = wall - phases.get("command", {}).get("seconds", wall)
    for name in PHASES[1:]:
        row[name] = phases.get(name, {}).get("seconds", 0.0)
    covered = ("start", "cli", "config", "gateway", "store", "conda", "pypi")
    row["other"] = wall - sum(row[name] for name in covered)
    row["requests"] = phases.get("http", {}).get("count", 0)
    if args[0] == "resolve":
        row["packages"] = json.loads(result.stdout)["envs"][0]["packages"]
    row["mb"] = phases.get("http", {}).get("bytes", 0) / 1e6
    return row


def _resolve_args(reqs: list[str], channel: str, index: str) -> list[str]:
    args = ["resolve", "--python", "3.11", "--platform", "linux-64", "--channel", channel]
    args += ["--index-url", index, "--json"]
    for req in reqs:
        args += ["--pypi", req]
    return args


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def main(argv: list[str] | None = None) -> int:
    from envmgr.resolve.pypi.pip_config import pip_index_urls
    from fixtures.conda_channel import cached_channel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-url", default=None, help="default: pip's configured index")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    index = args.index_url or pip_index_urls()[0]
    channel = cached_channel().as_uri()
    header = f"{'':<22}{'wall':>7}{'cpu':>7}{'uv':>7}{'ratio':>7}  " + "".join(
        f"{p:>8}" for p in PHASES
    )
    print(header + f"{'other':>8}{'reqs':>6}{'MB':>6}")
    for label, reqs in (("small", SMALL), ("large", LARGE)):
        rows, uvs = [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
                work = Path(tmp)
                rows.append(_envmgr(_resolve_args(reqs, channel, index), work, work / "cache"))
                start = time.monotonic()
                _uv(reqs, index, work, work / "uv-cache")
                uvs.append(time.monotonic() - start)
        row, uv = _median(rows), statistics.median(uvs)
        label = f"{label} ({len(reqs)} -> {row['packages']:.0f})"
        phases = "".join(f"{row[p]:>8.2f}" for p in PHASES)
        print(
            f"{label:<22}{row['wall']:>7.2f}{row['cpu']:>7.2f}{uv:>7.2f}{row['wall'] / uv:>6.1f}x"
            f"  {phases}{row['other']:>8.2f}{row['requests']:>6.0f}{row['mb']:>6.1f}"
        )
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(tmp)
        _envmgr(_resolve_args(SMALL, channel, index), work, work / "cache")
        again = _resolve_args(SMALL, channel, index)
        cached = _median([_envmgr(again, work, work / "cache") for _ in range(args.repeat)])
        version = _median(
            [_envmgr(["--version"], work, work / "cache") for _ in range(args.repeat)]
        )
    phases = "".join(f"{cached[p]:>8.2f}" for p in PHASES)
    print(
        f"{'cached lock (small)':<22}{cached['wall']:>7.2f}{cached['cpu']:>7.2f}{'':>14}  {phases}"
    )
    print(f"{'--version':<22}{version['wall']:>7.2f}{version['cpu']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
