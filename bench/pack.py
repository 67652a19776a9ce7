"""Packing, side by side on one env: envmgr (tar.zst, tar.gz) vs conda-pack (tar.zst, tar.gz)
vs plain ``tar | zstd``, then unpacking (envmgr's safe unpack + relocation vs plain untar).

    python bench/pack.py [--packages numpy,tabulate,...]

The env is installed from the offline fixture channel with envmgr's builder. Needs
``conda-pack`` (``pip install conda-pack``) and the ``tar`` and ``zstd`` commands where
available; missing peers are reported, not skipped silently.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    from envmgr.archive.manifest import CHUNK_SIZE
    from envmgr.archive.pack import pack
    from envmgr.archive.relocate import relocate
    from envmgr.archive.unpack import unpack
    from envmgr.build.once import build_prefix, create_prefix
    from envmgr.cache.local import LocalStore
    from envmgr.resolve.resolution_cache import ResolveOptions, resolve_specs
    from envmgr.specs.deps import CondaDep
    from envmgr.specs.model import EnvSpec
    from fixtures.conda_channel import cached_channel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", default="numpy,tabulate,python-dateutil,requests,pip")
    args = parser.parse_args(argv)
    rows: list[tuple[str, float, int, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        work = Path(tmp)
        options = ResolveOptions(
            store=LocalStore(work / "store"),
            cache_dir=work / "cache",
            platforms=("linux-64",),
            default_channels=(cached_channel().as_uri(),),
            env={},
        )
        spec = EnvSpec(
            python="3.11.*", conda=tuple(CondaDep.parse(p) for p in args.packages.split(","))
        )
        lock = resolve_specs({"bench": spec}, options)[0].lock
        prefix = build_prefix(lock.env_id, str(work / "b"))
        create_prefix(lock, prefix, work / "cache")
        size = sum(
            p.stat().st_size for p in prefix.rglob("*") if p.is_file() and not p.is_symlink()
        )
        print(f"env: {len(lock.packages)} packages, {size / 1e6:.1f} MB on disk")

        outputs: dict[str, Path] = {}
        results = {}
        for label, codec, level, chunk in (
            ("zst", "zst", 3, CHUNK_SIZE),
            ("zst-1", "zst", 3, None),
            ("gz", "gz", 6, None),
        ):
            out = work / f"envmgr-{label}.tar.{codec}"
            outputs[f"envmgr {label}"] = out

            def run(
                out: Path = out,
                codec: str = codec,
                level: int = level,
                chunk: int | None = chunk,
                label: str = label,
            ) -> None:
                with out.open("wb") as handle:
                    results[label] = pack(
                        prefix,
                        handle,
                        codec=codec,  # type: ignore[arg-type]
                        level=level,
                        chunk_size=chunk,
                        find_prefix=str(prefix),
                    )

            what = {"zst": "tar.zst, format 2", "zst-1": "tar.zst, format 1", "gz": "tar.gz"}[label]
            rows.append(
                (f"envmgr pack {what} (+ relocations)", _timed(run), out.stat().st_size, "")
            )
        conda_pack = shutil.which("conda-pack") or str(Path(sys.executable).parent / "conda-pack")
        for ext in ("tar.zst", "tar.gz"):
            out = work / f"conda-pack.{ext}"
            cmd = [
                conda_pack,
                "-p",
                str(prefix),
                "-o",
                str(out),
                "--quiet",
                "--n-threads",
                "-1",
                "--ignore-missing-files",
            ]
            seconds = _timed(lambda cmd=cmd: subprocess.run(cmd, check=False, capture_output=True))
            note = "" if out.exists() else "failed"
            rows.append(
                (f"conda-pack {ext}", seconds, out.stat().st_size if out.exists() else 0, note)
            )
        if shutil.which("tar") and shutil.which("zstd"):
            out = work / "plain.tar.zst"
            seconds = _timed(
                lambda: subprocess.run(
                    f"tar -C {prefix} -cf - . | zstd -q -3 -T0 -o {out}", shell=True, check=True
                )
            )
            rows.append(("plain tar | zstd -3 -T0", seconds, out.stat().st_size, ""))
        else:
            rows.append(("plain tar | zstd", 0.0, 0, "zstd command not installed"))

        packed = results["zst"]
        manifest = packed.manifest(
            env_id=lock.env_id, platform="linux-64", build_prefix=str(prefix)
        )
        dest = work / "u"

        def unpack_envmgr() -> None:
            with outputs["envmgr zst"].open("rb") as handle:
                unpack(handle, dest, manifest)
            relocate(dest, manifest)

        rows.append(("envmgr unpack + relocate (format 2)", _timed(unpack_envmgr), 0, "unpack"))
        plain = work / "plain-u"
        plain.mkdir()
        if shutil.which("zstd"):
            seconds = _timed(
                lambda: subprocess.run(
                    f"zstd -dc -T0 {outputs['envmgr zst']} | tar -C {plain} -xf -",
                    shell=True,
                    check=True,
                )
            )
            rows.append(("plain zstd -d | tar -x (same archive)", seconds, 0, "unpack"))
    base = next(r[1] for r in rows if r[0].startswith("envmgr pack tar.zst, format 2"))
    print(f"{'what':<48}{'seconds':>9}{'MB':>8}{'vs envmgr zst':>15}")
    for what, seconds, nbytes, note in rows:
        size = f"{nbytes / 1e6:.1f}" if nbytes else "-"
        print(f"{what:<48}{seconds:>9.2f}{size:>8}{seconds / base:>14.2f}x  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
