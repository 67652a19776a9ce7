"""Relocate an unpacked env: rewrite the build prefix to where the env now lives.

Text files by replacement; binary files by replacing inside each NUL-terminated string and
padding with NULs, so the new prefix must not be longer than the build prefix (the build
prefix is long on purpose); symlinks that hold the prefix are made again.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from pathlib import Path

from envmgr.archive.extract import inside
from envmgr.archive.manifest import ArchiveError, Manifest, Relocation

__all__ = ["relocate", "relocate_files"]


def _replace_binary(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace *old* by *new* inside NUL-terminated strings, padding each with NULs."""
    pattern = re.compile(re.escape(old) + rb"([^\0]*?)\0")

    def swap(match: re.Match[bytes]) -> bytes:
        whole = match.group(0)
        inner = whole[:-1].replace(old, new)
        return inner + b"\0" * (len(whole) - len(inner))

    return pattern.sub(swap, data)


def relocate(dest: Path, manifest: Manifest, new_prefix: str | None = None) -> None:
    """Rewrite the manifest's relocation list for the env now at *dest* (or *new_prefix*,
    where it will be published). Raises ``ArchiveError`` if binary files cannot hold it."""
    relocate_files(
        dest, manifest.relocations, manifest.build_prefix, new_prefix, f"env {manifest.env_id}"
    )


def relocate_files(
    dest: Path,
    relocations: Iterable[Relocation],
    build_prefix: str,
    new_prefix: str | None = None,
    what: str = "the env",
) -> None:
    """Rewrite *build_prefix* to *new_prefix* (default: *dest*) in the *relocations* of the
    tree at *dest*; *what* names it in errors. Each file is rewritten in place: none may be
    a link into a shared file."""
    relocations = tuple(relocations)
    new = (new_prefix or str(dest)).encode()
    old = build_prefix.encode()
    binary = [r for r in relocations if r.mode == "binary"]
    if binary and len(new) > len(old):
        raise ArchiveError(
            f"cannot relocate {what} to {new.decode()}: {len(binary)} binary "
            f"files hold the {len(old)}-character build prefix and the new prefix is longer",
            hint="use a shorter ENVMGR_CACHE_DIR",
        )
    for item in relocations:
        path = dest / item.path
        if not inside(dest, path.parent):
            raise ArchiveError(f"relocation entry {item.path!r} points outside the env")
        if item.mode == "symlink":
            if path.is_symlink():
                target = str(path.readlink()).replace(old.decode(), new.decode())
                path.unlink()
                path.symlink_to(target)
            continue
        if path.is_symlink() or not path.is_file():
            raise ArchiveError(f"relocation entry {item.path!r} is not a file in the env")
        data = path.read_bytes()
        changed = data.replace(old, new) if item.mode == "text" else _replace_binary(data, old, new)
        if changed != data:
            mode = stat.S_IMODE(path.stat().st_mode)
            path.chmod(mode | 0o200)
            path.write_bytes(changed)
            path.chmod(mode)
