"""PyPI resolution, side by side: envmgr, uv and pip on the same requirement sets and index.

    python bench/pypi_resolve.py [--index-url URL] [--sets datasci,webapi,...]

For each set, in one run: envmgr cold (empty HTTP and metadata cache) and warm (same cache,
``--force`` so it really resolves again), ``uv pip compile`` cold and warm, and
``pip install --dry-run --report`` (no cache), all for linux-64 / manylinux_2_28, CPython 3.11,
against the same index (pip's configured one by default). Prints times, ratios, and how many
packages got the same version as uv, with the differences.

Needs the network (the index) and ``uv`` (``pip install uv``); envmgr's conda part (python
and pip) comes from the offline fixture channel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETS: dict[str, list[str]] = {
    "datasci": ["pandas", "scikit-learn", "scipy", "matplotlib", "seaborn", "statsmodels"],
    "webapi": [
        "fastapi",
        "uvicorn[standard]",
        "pydantic",
        "sqlalchemy",
        "psycopg[binary]",
        "alembic",
        "httpx",
    ],
    "markers": [
        "requests[socks]",
        "tomli; python_version < '3.11'",
        "pywin32; sys_platform == 'win32'",
        "uvloop; sys_platform != 'win32'",
        "colorama; os_name == 'nt'",
        "rich",
        "click",
        "typer",
    ],
    "mltrack": ["mlflow-skinny", "optuna", "xgboost", "lightgbm"],
    "cloudio": ["boto3", "s3fs", "pyarrow", "fsspec", "polars", "duckdb"],
}
PIP_PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


def _timed(
    cmd: list[str], env: dict[str, str], cwd: Path
) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    return time.monotonic() - start, result


def _envmgr(
    reqs: list[str], index: str, channel: str, work: Path, cache: Path, warm: bool
) -> tuple[float, dict[str, str]]:
    env = {**os.environ, "ENVMGR_CACHE_DIR": str(cache), "ENVMGR_STORE": (work / "store").as_uri()}
    cmd = [
        sys.executable,
        "-c",
        "from envmgr.cli.app import main; main()",
        "resolve",
        "--python",
        "3.11",
        "--platform",
        "linux-64",
        "--channel",
        channel,
        "--index-url",
        index,
        "--json",
    ]
    for req in reqs:
        cmd += ["--pypi", req]
    if warm:
        cmd.append("--force")
    seconds, result = _timed(cmd, env, work)
    if result.returncode != 0:
        raise RuntimeError(f"envmgr failed: {result.stderr.strip()}")
    # Like uv's output, the result is the lock in the store; no conda-lock file is written.
    spec_id = json.loads(result.stdout)["envs"][0]["spec_id"]
    entry = json.loads((work / "store" / "locks" / spec_id / "linux-64.json").read_text())
    return seconds, {p["name"]: p["version"] for p in entry["packages"] if p["manager"] == "pypi"}


def _uv(reqs: list[str], index: str, work: Path, cache: Path) -> tuple[float, dict[str, str]]:
    req = work / "requirements.in"
    req.write_text("\n".join(reqs) + "\n")
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    cmd = [
        uv,
        "pip",
        "compile",
        str(req),
        "--python-platform",
        "x86_64-manylinux_2_28",
        "--python-version",
        "3.11",
        "--index-url",
        index,
        "--cache-dir",
        str(cache),
        "--no-header",
        "--no-annotate",
        "--quiet",
    ]
    seconds, result = _timed(cmd, {**os.environ}, work)
    if result.returncode != 0:
        raise RuntimeError(f"uv failed: {result.stderr.strip()}")
    found = {}
    for line in result.stdout.splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            from packaging.utils import canonicalize_name

            found[canonicalize_name(name)] = version.strip()
    return seconds, found


def _pip(reqs: list[str], index: str, work: Path) -> float:
    req = work / "requirements.txt"
    req.write_text("\n".join(reqs) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--target",
        str(work / "target"),
        "--report",
        str(work / "report.json"),
        "--index-url",
        index,
        "--no-cache-dir",
        "--quiet",
        "-r",
        str(req),
    ]
    for platform in PIP_PLATFORMS:
        cmd += ["--platform", platform]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    seconds, result = _timed(cmd, env, work)
    if result.returncode != 0:
        raise RuntimeError(f"pip failed: {result.stderr.strip()[-400:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    from envmgr.resolvers.pypi.index import pip_index_urls
    from fixtures.conda_channel import cached_channel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-url", default=None, help="default: pip's configured index")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated set names")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    index = args.index_url or pip_index_urls()[0]
    channel = cached_channel().as_uri()
    rows = []
    for name in args.sets.split(","):
        reqs = SETS[name]
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            work = Path(tmp)
            for sub in ("em", "uv", "pip"):
                (work / sub).mkdir()
            em_cold, em_versions = _envmgr(reqs, index, channel, work / "em", work / "emc", False)
            em_warm, _ = _envmgr(reqs, index, channel, work / "em", work / "emc", True)
            uv_cold, uv_versions = _uv(reqs, index, work / "uv", work / "uvc")
            uv_warm, _ = _uv(reqs, index, work / "uv", work / "uvc")
            pip_time = _pip(reqs, index, work / "pip")
        same = sum(1 for k, v in em_versions.items() if uv_versions.get(k) == v)
        diffs = {
            k: (em_versions.get(k), uv_versions.get(k))
            for k in sorted(set(em_versions) | set(uv_versions))
            if em_versions.get(k) != uv_versions.get(k)
        }
        rows.append(
            {
                "set": name,
                "packages": len(em_versions),
                "envmgr_cold": em_cold,
                "envmgr_warm": em_warm,
                "uv_cold": uv_cold,
                "uv_warm": uv_warm,
                "pip": pip_time,
                "same_as_uv": same,
                "differences": diffs,
            }
        )
    header = (
        f"{'set':<9}{'pkgs':>5}{'em cold':>9}{'em warm':>9}{'uv cold':>9}{'uv warm':>9}"
        f"{'pip':>8}{'cold/uv':>9}{'warm/uvc':>9}{'cold/pip':>9}{'same':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['set']:<9}{r['packages']:>5}{r['envmgr_cold']:>8.2f}s{r['envmgr_warm']:>8.2f}s"
            f"{r['uv_cold']:>8.2f}s{r['uv_warm']:>8.2f}s{r['pip']:>7.2f}s"
            f"{r['envmgr_cold'] / r['uv_cold']:>8.2f}x{r['envmgr_warm'] / r['uv_cold']:>8.2f}x"
            f"{r['envmgr_cold'] / r['pip']:>8.2f}x"
            f"{r['same_as_uv']:>4}/{len(set(r['differences']) | set()) + r['same_as_uv']:<3}"
        )
    for r in rows:
        for package, (ours, theirs) in r["differences"].items():
            print(f"  {r['set']}: {package}: envmgr {ours or '-'}, uv {theirs or '-'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
