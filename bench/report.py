"""Run every benchmark in one go and write ``bench/RESULTS.md``.

    bench/run            (or: python bench/report.py [--out bench/RESULTS.md] [--only a.py,b.py])

Runs ``pypi_resolve.py`` (envmgr vs uv vs pip, against pip's configured index),
``resolve_profile.py`` (a cold resolve's phases beside uv's time), ``pack.py``
(envmgr vs conda-pack vs ``tar | zstd``), ``hydrate.py`` (envmgr vs download + untar vs a
per-package install, on the SeaweedFS fixture) and ``layers.py`` (package layers vs one archive
per env), each in its own process, and writes their
tables (times and ratios, envmgr and its peers side by side) under a description of the
machine. A benchmark that fails is written down with its error, not left out. ``--only``
runs the named scripts and replaces just their sections, each dated, in the file as it is.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BENCHMARKS: tuple[tuple[str, str, list[str]], ...] = (
    ("PyPI resolution", "pypi_resolve.py", []),
    ("Where a resolve's time goes", "resolve_profile.py", ["--repeat", "3"]),
    ("Packing", "pack.py", []),
    ("Hydrating", "hydrate.py", ["--repeat", "3"]),
    ("Package layers", "layers.py", ["--repeat", "3"]),
)


def _machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GB RAM"
    except OSError:
        pass
    tools = []
    for tool, args in (("uv", ["--version"]), ("conda-pack", ["--version"]), ("zstd", ["-V"])):
        found = Path(sys.executable).parent / tool
        command = str(found) if found.exists() else tool
        try:
            out = subprocess.run([command, *args], capture_output=True, text=True, check=False)
            tools.append((out.stdout or out.stderr).strip().splitlines()[0])
        except OSError:
            tools.append(f"{tool}: not installed")
    return [
        f"- {platform.platform()}, {cpu}, {os.cpu_count()} cores, {memory}",
        f"- Python {platform.python_version()}; " + "; ".join(tools),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--only", default="", help="comma-separated scripts to run again")
    args = parser.parse_args(argv)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - {script for _t, script, _e in BENCHMARKS}
    if unknown:
        parser.error(f"--only: no benchmark {', '.join(sorted(unknown))}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sections = []
    failed = 0
    total = time.monotonic()
    for title, script, extra in BENCHMARKS:
        if only and script not in only:
            continue
        print(f"== {title} ({script})", flush=True)
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(ROOT / "bench" / script), *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        seconds = time.monotonic() - start
        print(result.stdout, flush=True)
        body = result.stdout.rstrip()
        if result.returncode != 0:
            failed += 1
            body += f"\n\nFAILED (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}"
        doc = (ROOT / "bench" / script).read_text().split('"""')[1].strip()
        when = f" on {started}" if only else ""
        sections.append(
            f"## {title}\n\n`python bench/{script} {' '.join(extra)}`".rstrip()
            + f"{when} ({seconds:.0f} s)\n\n{doc.splitlines()[0]}\n\n```\n{body}\n```\n"
        )
    if only:
        args.out.write_text(_replace_sections(args.out.read_text(), sections))
        print(f"wrote {args.out}")
        return 1 if failed else 0
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            f"Written by `bench/run` on {started} in {time.monotonic() - total:.0f} s.",
            "Every table puts envmgr and its peers side by side, measured in the same run on",
            "the same machine; ratios are against the first row unless a column says otherwise.",
            "",
            "Machine:",
            "",
            *_machine(),
            "",
            *sections,
        ]
    )
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 1 if failed else 0


def _replace_sections(text: str, sections: list[str]) -> str:
    """*text* (a RESULTS.md) with each of *sections* put in place of the section of the same
    ``## title`` (or added at the end)."""
    head, *old = text.split("\n## ")
    parts = {part.split("\n", 1)[0]: "## " + part for part in old}
    for section in sections:
        parts[section.split("\n", 1)[0].removeprefix("## ")] = section
    return "\n".join([head.rstrip("\n") + "\n", *(p.rstrip("\n") + "\n" for p in parts.values())])


if __name__ == "__main__":
    raise SystemExit(main())
