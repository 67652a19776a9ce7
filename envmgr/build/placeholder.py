"""One placeholder prefix for every package layer, so a layer's bytes never name its env.

A layer is installed into a build prefix of its own, :data:`BUILD_PREFIX_LENGTH` characters
long, then every file that holds that prefix holds :data:`PLACEHOLDER` instead (conda-build's
way). Both have the same length, so binary files and bytecode keep their layout, and a worker
relocates the placeholder to wherever the env lives, as it relocated format 2's build prefix.
The records that hash installed files follow the rewrite: conda-meta's ``paths_data``
(``sha256_in_prefix``, or ``sha256`` of a generated entry point) and the rows of a wheel's
``RECORD``, so a layer agrees with itself.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import mmap
import os
import stat
from pathlib import Path

__all__ = ["BUILD_PREFIX_LENGTH", "PLACEHOLDER", "to_placeholder"]

#: Length of every build prefix; envs relocate to any path up to this long.
BUILD_PREFIX_LENGTH = 240
#: The prefix every layer is packed against: absolute, never a real directory, as long as a
#: build prefix.
PLACEHOLDER = ("/envmgr-layer-placeholder_" + "p" * BUILD_PREFIX_LENGTH)[:BUILD_PREFIX_LENGTH]

#: Files up to this size are searched in memory; larger ones through a memory map.
_READ_WHOLE = 8 << 20


def _holds(path: Path, needle: bytes, size: int) -> bool:
    with path.open("rb") as handle:
        if size <= _READ_WHOLE:
            return needle in handle.read()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return mapped.find(needle) != -1


def to_placeholder(prefix: Path, placeholder: str = PLACEHOLDER) -> dict[str, str]:
    """Rewrite *prefix* to *placeholder* in every regular file below it (bytecode is written
    after this, see :func:`envmgr.build.bytecode.compile_tree`'s ``shown_as``), then fix the
    hashes conda-meta and ``RECORD`` keep of those files. Returns the rewritten files
    (relative POSIX path → new sha256). Raises ``ValueError`` when the lengths differ.

    Cost: one read of every file (large ones through a memory map); writes only the hits."""
    needle, new = str(prefix).encode(), placeholder.encode()
    if len(needle) != len(new):
        raise ValueError(f"placeholder must be {len(needle)} characters, not {len(new)}")
    changed: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(prefix):
        for name in files:
            path = Path(dirpath, name)
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode) or not _holds(path, needle, info.st_size):
                continue
            data = path.read_bytes().replace(needle, new)
            mode = stat.S_IMODE(info.st_mode)
            path.chmod(mode | 0o200)
            path.write_bytes(data)
            path.chmod(mode)
            changed[path.relative_to(prefix).as_posix()] = hashlib.sha256(data).hexdigest()
    if changed:
        _fix_conda_meta(prefix, changed)
        _fix_records(prefix, changed)
    return changed


def _fix_conda_meta(prefix: Path, changed: dict[str, str]) -> None:
    for record in sorted((prefix / "conda-meta").glob("*.json")):
        data = json.loads(record.read_text())
        entries = data.get("paths_data", {}).get("paths", [])
        touched = False
        for entry in entries:
            digest = changed.get(str(entry.get("_path", "")))
            if digest is None:
                continue
            entry["sha256_in_prefix" if "sha256_in_prefix" in entry else "sha256"] = digest
            touched = True
        if touched or record.relative_to(prefix).as_posix() in changed:
            record.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _record_hash(hex_digest: str) -> str:
    raw = bytes.fromhex(hex_digest)
    return "sha256=" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _fix_records(prefix: Path, changed: dict[str, str]) -> None:
    for record in sorted(prefix.glob("lib/python*/site-packages/*.dist-info/RECORD")):
        site = record.parent.parent
        with record.open(newline="") as handle:
            rows = list(csv.reader(handle))
        touched = False
        for row in rows:
            if len(row) < 2 or not row[1]:
                continue
            rel = os.path.relpath(os.path.normpath(site / row[0]), prefix)
            digest = changed.get(Path(rel).as_posix())
            if digest is not None:
                row[1] = _record_hash(digest)
                touched = True
        if touched:
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows(rows)
            record.write_text(out.getvalue(), newline="")
