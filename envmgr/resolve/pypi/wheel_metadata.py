"""A wheel's ``METADATA`` without the whole wheel: the zip's central directory and one member.

The index client asks for the last bytes of a wheel with an HTTP range request, finds the
``.dist-info/METADATA`` member in the central directory (:func:`central_directory`,
:func:`find_member`) and reads just that member (:func:`read_local_member`); a local or fully
downloaded wheel is read with :mod:`zipfile` (:func:`wheel_metadata`).
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from pathlib import Path
from urllib.parse import unquote, urlsplit

from envmgr.locks.lock import strip_credentials
from envmgr.resolve.pypi.pages import DistFile, PackageIndexError

__all__ = [
    "central_directory",
    "find_member",
    "local_metadata",
    "metadata_from_wheel",
    "read_local_member",
    "wheel_metadata",
]


def wheel_metadata(archive: zipfile.ZipFile) -> bytes | None:
    """The bytes of a wheel's ``<name>.dist-info/METADATA``, or ``None`` when it has none."""
    for name in archive.namelist():
        if name.count("/") == 1 and name.endswith(".dist-info/METADATA"):
            return archive.read(name)
    return None


def local_metadata(dist: DistFile) -> bytes:
    """The METADATA of a wheel on this machine (its hash is checked when it is installed)."""
    path = Path(unquote(urlsplit(dist.url).path))
    try:
        with zipfile.ZipFile(path) as archive:
            data = wheel_metadata(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PackageIndexError(f"{path}: cannot read the wheel ({exc})") from None
    if data is None:
        raise PackageIndexError(f"{dist.filename}: no .dist-info/METADATA in the wheel")
    return data


def metadata_from_wheel(data: bytes, dist: DistFile) -> bytes:
    if hashlib.sha256(data).hexdigest() != dist.sha256:
        raise PackageIndexError(
            f"{dist.filename}: download does not match its sha256 ({strip_credentials(dist.url)})"
        )
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        metadata = wheel_metadata(archive)
    if metadata is None:
        raise PackageIndexError(f"{dist.filename}: no .dist-info/METADATA in the wheel")
    return metadata


def central_directory(tail: bytes) -> tuple[int, int]:
    """(offset, size) of the zip central directory from the file's last bytes."""
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        raise ValueError("no end of central directory")
    size, offset = struct.unpack("<II", tail[pos + 12 : pos + 20])
    if offset == 0xFFFFFFFF:  # zip64
        loc = tail.rfind(b"PK\x06\x07", 0, pos)
        if loc < 0:
            raise ValueError("zip64 without locator")
        rel = tail.rfind(b"PK\x06\x06", 0, loc)
        if rel < 0:
            raise ValueError("zip64 record not in the tail")
        size, offset = struct.unpack("<QQ", tail[rel + 40 : rel + 56])
    return offset, size


def find_member(directory: bytes) -> tuple[int, int, int] | None:
    """(local header offset, compressed size, method) of ``*.dist-info/METADATA``."""
    pos = 0
    while directory.startswith(b"PK\x01\x02", pos):
        (method,) = struct.unpack("<H", directory[pos + 10 : pos + 12])
        (compressed,) = struct.unpack("<I", directory[pos + 20 : pos + 24])
        name_len, extra_len, comment_len = struct.unpack("<HHH", directory[pos + 28 : pos + 34])
        (offset,) = struct.unpack("<I", directory[pos + 42 : pos + 46])
        name = directory[pos + 46 : pos + 46 + name_len].decode("utf-8", "replace")
        if name.count("/") == 1 and name.endswith(".dist-info/METADATA"):
            return offset, compressed, method
        pos += 46 + name_len + extra_len + comment_len
    return None


def read_local_member(chunk: bytes, compressed: int, method: int) -> bytes | None:
    if not chunk.startswith(b"PK\x03\x04"):
        return None
    name_len, extra_len = struct.unpack("<HH", chunk[26:30])
    start = 30 + name_len + extra_len
    raw = chunk[start : start + compressed]
    if len(raw) < compressed:
        return None
    if method == 0:
        return raw
    if method == 8:
        return zlib.decompress(raw, -15)
    return None
