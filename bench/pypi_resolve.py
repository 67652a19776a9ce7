"""PyPI resolution, side by side: envmgr, uv and pip on the same requirement sets and index.

    python bench/pypi_resolve.py [--index-url URL] [--sets small,datasci,...] [--repeat 3]

For each set, in one run: envmgr cold (empty HTTP and metadata cache) and ``uv pip compile``
cold, interleaved, ``--repeat`` rounds each (medians, wall and CPU seconds); then once each
envmgr warm (same cache, ``--force`` so it really resolves again), uv warm and
``pip install --dry-run --report`` (no cache, this host: linux-64, CPython 3.11), all for
linux-64 / manylinux_2_28, CPython 3.11, against the same index (pip's configured one by
default; the ``fixture-*`` sets use the fixture world's trait sdists on a local index). Prints
times, ratios, and how many packages got the same version as uv, with the differences; for
an unsatisfiable set the times are the times to the verdict. Last, for the ``small`` set:
``envmgr resolve`` of an unchanged spec (answered from its cached lock) and
``envmgr --version``, as whole processes.

Needs the network (the index) and ``uv`` (``pip install uv``); envmgr's conda part (python
and pip) comes from the offline fixture channel.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETS: dict[str, list[str]] = {
    # The resolve-speed issue's ten everyday requirements (about 20 packages).
    "small": [
        "requests",
        "rich",
        "click",
        "tabulate",
        "attrs",
        "packaging",
        "pyyaml",
        "six",
        "python-dateutil",
        "typing-extensions",
    ],
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
    # Public-style sets with sdists: an old pin whose sdist has a C extension and only old
    # wheels (gensim 3.8.3), an sdist-only release that is the only solution beside a pin
    # (sentence-transformers 2.2.2 with transformers 4.30.1), pure sdist-only projects.
    "oldpins": ["gensim==3.8.3", "smart-open<6", "spacy==2.3.9"],
    "sdistonly": ["sentence-transformers", "transformers==4.30.1"],
    "puresdist": ["langdetect==1.0.9", "docopt==0.6.2", "pyyaml"],
    # Unsatisfiable: tensorflow 2.0.0 has no cp311 file; the verdict should come at once.
    "unsat": ["tensorflow==2.0.0", "gensim", "pandas<1"],
    # The fixture world's traits on a local index (fixtures/sdists.py), offline.
    "fixture-traits": [
        "st-like",
        "tf-like==4.30.1",
        "static-meta",
        "dyn-meta",
        "slow-native",
        "pure-sdist",
        "wheel-twin==3.8.3",
    ],
    "fixture-unsat": ["tf-old==2.0.0", "slow-native", "dyn-meta", "st-like"],
}
#: Sets that must fail: the time is the time to the verdict.
UNSATISFIABLE = {"unsat", "fixture-unsat"}


#: CPU seconds (user + system) of the last process :func:`_timed` ran.
LAST_CPU = [0.0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(
    cmd: list[str], env: dict[str, str], cwd: Path
) -> tuple[float, subprocess.CompletedProcess[str]]:
    cpu = _children_cpu()
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    LAST_CPU[0] = _children_cpu() - cpu
    return time.monotonic() - start, result


def _envmgr(
    reqs: list[str], index: str, channel: str, work: Path, cache: Path, warm: bool
) -> tuple[float, dict[str, str]]:
    """One ``envmgr resolve`` process, as the installed command runs it."""
    env = {**os.environ, "ENVMGR_CACHE_DIR": str(cache), "ENVMGR_STORE": (work / "store").as_uri()}
    cmd = [
        sys.executable,
        "-m",
        "envmgr",
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
        return seconds, {"<verdict>": result.stderr.strip().splitlines()[-1][:160]}
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
        return seconds, {"<verdict>": "unsatisfiable"}
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
        "--report",
        str(work / "report.json"),
        "--index-url",
        index,
        "--no-cache-dir",
        "--quiet",
        "-r",
        str(req),
    ]
    # No --platform: it would forbid sdists; this host is linux-64 with CPython 3.11 already.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    seconds, _result = _timed(cmd, env, work)
    return seconds


def _fixture_index() -> Any:
    """The fixture world's wheels and trait sdists behind a local index; compiling a C
    extension takes 30 s there, as a real one would."""
    from fixtures.pypi_index import PypiIndexServer
    from fixtures.sdists import write_sdist_world
    from fixtures.wheels import fetch_wheels

    house = Path(tempfile.mkdtemp(prefix="bench-sdist-world-"))
    for wheel in fetch_wheels().glob("*.whl"):
        os.link(wheel, house / wheel.name)
    write_sdist_world(house)
    os.environ["ENVMGR_FIXTURE_COMPILE_SECONDS"] = "30"
    return PypiIndexServer(house).start()


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _set_row(name: str, reqs: list[str], index: str, channel: str, repeat: int) -> dict[str, Any]:
    """One set: envmgr and uv cold, interleaved, *repeat* rounds; then warm and pip once."""
    em_cold: list[float] = []
    em_cpu: list[float] = []
    uv_cold: list[float] = []
    uv_cpu: list[float] = []
    em_versions: dict[str, str] = {}
    uv_versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        work = Path(tmp)
        for round_ in range(repeat):
            em, uv = work / f"em{round_}", work / f"uv{round_}"
            em.mkdir()
            uv.mkdir()
            runs = [("em", em), ("uv", uv)]
            for tool, where in runs if round_ % 2 == 0 else runs[::-1]:
                if tool == "em":
                    seconds, em_versions = _envmgr(reqs, index, channel, where, where / "c", False)
                    em_cold.append(seconds)
                    em_cpu.append(LAST_CPU[0])
                else:
                    seconds, uv_versions = _uv(reqs, index, where, where / "c")
                    uv_cold.append(seconds)
                    uv_cpu.append(LAST_CPU[0])
        em_warm, _ = _envmgr(reqs, index, channel, work / "em0", work / "em0" / "c", True)
        uv_warm, _ = _uv(reqs, index, work / "uv0", work / "uv0" / "c")
        (work / "pip").mkdir()
        pip_time = _pip(reqs, index, work / "pip")
    same = sum(1 for k, v in em_versions.items() if uv_versions.get(k) == v)
    diffs = {
        k: (em_versions.get(k), uv_versions.get(k))
        for k in sorted(set(em_versions) | set(uv_versions))
        if em_versions.get(k) != uv_versions.get(k)
    }
    return {
        "set": name,
        "packages": len(em_versions),
        "envmgr_cold": _median(em_cold),
        "envmgr_cold_cpu": _median(em_cpu),
        "envmgr_warm": em_warm,
        "uv_cold": _median(uv_cold),
        "uv_cold_cpu": _median(uv_cpu),
        "uv_warm": uv_warm,
        "pip": pip_time,
        "rounds": repeat,
        "same_as_uv": same,
        "differences": diffs,
    }


def _quick_rows(index: str, channel: str, repeat: int) -> dict[str, tuple[float, float]]:
    """The small set's unchanged spec (``envmgr resolve`` answered from its cached lock) and
    ``envmgr --version``: medians of *repeat*, (wall, CPU) seconds."""
    found: dict[str, list[tuple[float, float]]] = {"cached lock": [], "--version": []}
    with tempfile.TemporaryDirectory(prefix="bench-quick-") as tmp:
        work = Path(tmp)
        _envmgr(SETS["small"], index, channel, work, work / "c", False)
        for _ in range(repeat):
            seconds, _ = _envmgr(SETS["small"], index, channel, work, work / "c", False)
            found["cached lock"].append((seconds, LAST_CPU[0]))
            seconds, result = _timed(
                [sys.executable, "-m", "envmgr", "--version"], {**os.environ}, work
            )
            if result.returncode != 0:
                raise SystemExit(f"envmgr --version failed: {result.stderr.strip()[-300:]}")
            found["--version"].append((seconds, LAST_CPU[0]))
    return {k: (_median([w for w, _ in v]), _median([c for _, c in v])) for k, v in found.items()}


def main(argv: list[str] | None = None) -> int:
    from envmgr.resolve.pypi.pip_config import pip_index_urls
    from fixtures.conda_channel import cached_channel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-url", default=None, help="default: pip's configured index")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated set names")
    parser.add_argument("--repeat", type=int, default=3, help="cold rounds per set (medians)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    index = args.index_url or pip_index_urls()[0]
    channel = cached_channel().as_uri()
    fixture_index = None
    rows = []
    print(f"load at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in args.sets.split(","):
        set_index = index
        if name.startswith("fixture-"):
            fixture_index = fixture_index or _fixture_index()
            set_index = fixture_index.url
        rows.append(_set_row(name, SETS[name], set_index, channel, args.repeat))
    header = (
        f"{'set':<11}{'pkgs':>5}{'em cold':>9}{'cpu':>7}{'uv cold':>9}{'cpu':>7}{'cold/uv':>9}"
        f"{'em warm':>9}{'uv warm':>9}{'pip':>8}{'warm/uvc':>9}{'cold/pip':>9}{'same':>8}"
    )
    print(f"cold: medians of {args.repeat}, envmgr and uv interleaved; warm and pip: one run")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['set']:<11}{r['packages']:>5}"
            f"{r['envmgr_cold']:>8.2f}s{r['envmgr_cold_cpu']:>6.2f}s"
            f"{r['uv_cold']:>8.2f}s{r['uv_cold_cpu']:>6.2f}s"
            f"{r['envmgr_cold'] / r['uv_cold']:>8.2f}x"
            f"{r['envmgr_warm']:>8.2f}s{r['uv_warm']:>8.2f}s{r['pip']:>7.2f}s"
            f"{r['envmgr_warm'] / r['uv_cold']:>8.2f}x{r['envmgr_cold'] / r['pip']:>8.2f}x"
            f"{r['same_as_uv']:>4}/{len(r['differences']) + r['same_as_uv']:<3}"
        )
    for r in rows:
        for package, (ours, theirs) in r["differences"].items():
            print(f"  {r['set']}: {package}: envmgr {ours or '-'}, uv {theirs or '-'}")
    quick = _quick_rows(index, channel, args.repeat)
    for what, (wall, cpu) in quick.items():
        label = (
            "envmgr resolve, unchanged spec (small)"
            if what == "cached lock"
            else "envmgr --version"
        )
        print(f"{label:<40}{wall:>7.2f}s wall{cpu:>6.2f}s cpu")
    if args.json:
        args.json.write_text(json.dumps({"sets": rows, "quick": quick}, indent=2))
    print(f"load at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
