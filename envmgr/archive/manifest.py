"""An archive's manifest: what a worker trusts about it, read and checked before any byte.

A :class:`Manifest` names the env (id, platform), the archive (codec, size, sha256, format 2's
frames as :class:`Chunk` values), what unpacking it yields (files, bytes) and what must be
relocated (:class:`Relocation`). It is written last to the store and checked against the key
it was read from. The errors of the whole archive package live here too.

Format 3 (package layers) uses the same shape twice. A *layer manifest*
(``layers/<layer_id>/manifest.json``) describes one package's archive; its ``layer`` names the
package (:class:`LayerRef`) and ``paths`` lists what it puts into a prefix. An *env manifest*
lists its ``layers`` in install order; its own archive fields describe the env layer (what no
single package owns), its ``removes`` the paths the env layer takes away. Both are relocated
from ``build_prefix``, the one placeholder every layer is packed against.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from envmgr.errors import EnvmgrError
from envmgr.ids import BadIdError, parse_env_id, parse_layer_id, parse_platform

__all__ = [
    "CHUNK_SIZE",
    "MANIFEST_FORMAT",
    "MANIFEST_FORMATS",
    "READ_SIZE",
    "ArchiveError",
    "Chunk",
    "ChunkDigestError",
    "Codec",
    "LayerRef",
    "Manifest",
    "Relocation",
    "WriteError",
    "safe_name",
]

MANIFEST_FORMAT = 2
#: The manifest formats this reader accepts: 1 (one stream), 2 (indexed frames), 3 (layers).
MANIFEST_FORMATS = (1, 2, 3)
#: The most layers one env may list, and paths one layer may name: bounds what a hostile
#: manifest can make a reader fetch or hold.
MAX_LAYERS = 20_000
MAX_LAYER_PATHS = 2_000_000
Codec = Literal["zst", "gz"]
RelocationMode = Literal["text", "binary", "symlink"]

#: Uncompressed bytes per frame of a format-2 archive (a frame may run to twice this).
CHUNK_SIZE = 8 << 20
#: The most one frame may decode to: bounds what a hostile index can make a reader allocate.
MAX_CHUNK_RAW = 64 << 20
#: How much of a file or stream is read at once.
READ_SIZE = 1 << 20


class ArchiveError(EnvmgrError):
    """An archive is unsafe, damaged or cannot be relocated to the asked prefix."""


class ChunkDigestError(ArchiveError):
    """A downloaded frame of a format-2 archive does not match its hash in the manifest."""


class WriteError(EnvmgrError):
    """The target filesystem refused a write (full, over quota, file too large, read-only);
    the archive itself may be fine."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


#: Errors that say "this disk", not "this archive".
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EMFILE}
)


def _plain(name: str) -> bool:
    """True when *name* is a relative POSIX path with nothing to normalise: no leading
    ``/`` or ``./``, no ``//``, ``/./``, ``..`` or backslash, no trailing ``/`` or ``/.``.
    Substring tests: a regex took 2 us a name, 76 ms for torch's layer manifests."""
    return not (
        not name
        or name == "."
        or name[0] == "/"
        or name[-1] == "/"
        or name.startswith("./")
        or name.endswith("/.")
        or "//" in name
        or "/./" in name
        or ".." in name
        or "\\" in name
    )


def safe_name(name: str) -> str:
    """*name* as a plain relative POSIX path; ``ArchiveError`` when it is absolute or climbs."""
    if _plain(name):
        return name  # nothing to normalise: the common case, without a PurePosixPath
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise ArchiveError(f"unsafe member name {name!r}")
    return pure.as_posix()


@dataclass(frozen=True, kw_only=True, slots=True, order=True)
class Relocation:
    path: str  # relative to the prefix, POSIX separators
    mode: RelocationMode


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerRef:
    """One package layer as an env manifest names it (and a layer manifest names itself)."""

    layer_id: str
    #: ``conda python 3.11.7`` / ``pypi tabulate 0.9.0``: for messages and ``show``.
    package: str
    #: The package file's sha256: a layer manifest must name the same.
    sha256: str

    def to_list(self) -> list[str]:
        return [self.layer_id, self.package, self.sha256]

    @classmethod
    def from_list(cls, data: Any) -> LayerRef:
        layer_id, package, sha256 = data
        if not isinstance(package, str) or not 0 < len(package) <= 300:
            raise ValueError("bad layer package name")
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"layer {package[:60]!r}: bad package sha256")
        return cls(
            layer_id=parse_layer_id(layer_id, where="layer id"), package=package, sha256=sha256
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Chunk:
    """One independently decodable zstd frame of a format-2 archive."""

    offset: int  # where its compressed bytes start in the archive
    size: int  # compressed bytes
    raw: int  # the tar bytes it decodes to
    sha256: str  # of the compressed bytes
    #: It goes on with the last member of the chunk before (a file larger than a chunk).
    cont: bool

    def to_list(self) -> list[Any]:
        return [self.offset, self.size, self.raw, self.sha256, self.cont]


def _chunks_from(data: Any, size: int, codec: str) -> tuple[Chunk, ...]:
    """The chunk index of a format-2 manifest, checked: the chunks tile the archive from
    byte 0 to *size* in order (no gap, overlap or byte past the end), each decodes to at most
    :data:`MAX_CHUNK_RAW`, the first starts a member. Raises ``ValueError`` naming the entry."""
    if codec != "zst":
        raise ValueError(f"format 2 needs codec zst, not {codec!r}")
    if not isinstance(data, list) or not data:
        raise ValueError("format 2 needs a non-empty chunk list")
    chunks = []
    end = 0
    for number, entry in enumerate(data):
        offset, length, raw, sha256, cont = entry
        if type(offset) is not int or type(length) is not int or type(raw) is not int:
            raise ValueError(f"chunk {number}: offsets and sizes must be integers")
        if offset != end:
            what = "overlaps the one before" if offset < end else "leaves a gap before it"
            raise ValueError(f"chunk {number} starts at byte {offset} and {what} (want {end})")
        if length <= 0 or not 0 < raw <= MAX_CHUNK_RAW:
            raise ValueError(f"chunk {number}: size {length} or raw size {raw} out of range")
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"chunk {number}: bad sha256")
        if not isinstance(cont, bool) or (cont and number == 0):
            raise ValueError(f"chunk {number}: bad continuation flag")
        end = offset + length
        if end > size:
            raise ValueError(f"chunk {number} ends at byte {end}, past the archive's {size}")
        chunks.append(Chunk(offset=offset, size=length, raw=raw, sha256=sha256, cont=cont))
    if end != size:
        raise ValueError(f"the chunks cover {end} of the archive's {size} bytes")
    return tuple(chunks)


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """What readers of a stored env trust; written to the store after the archive."""

    env_id: str
    platform: str
    build_prefix: str
    codec: Codec
    size: int
    sha256: str
    files: int
    unpacked_size: int
    relocations: tuple[Relocation, ...]
    envmgr_version: str = ""
    created: str = ""
    #: Packages whose conda link scripts the builder did not run (it runs no target code).
    link_scripts: tuple[str, ...] = ()
    #: Format 2: the frames, in order, that tile the archive; empty for format 1.
    chunks: tuple[Chunk, ...] = ()
    #: Each package's installed bytes (name, bytes), for ``envmgr show``; may be empty.
    package_sizes: tuple[tuple[str, int], ...] = ()
    #: Format 3, an env: its package layers in install order (the archive is its env layer).
    layers: tuple[LayerRef, ...] = ()
    #: Format 3, an env: paths of its layers that the env does not have.
    removes: tuple[str, ...] = ()
    #: Format 3, a layer: the package it holds (``env_id`` is then the layer id).
    layer: LayerRef | None = None
    #: Format 3, a layer: its files and links, sorted (what a builder checks for clobbers).
    paths: tuple[str, ...] = ()
    #: An env that needs a GPU: (the lowest CUDA its node's driver must support, the package
    #: that needs it), see :mod:`envmgr.cuda`; empty for a CPU env. Older readers ignore it.
    cuda: tuple[str, ...] = ()

    @property
    def format(self) -> int:
        if self.layers or self.layer is not None:
            return 3
        return 2 if self.chunks else 1

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": self.format,
            "env_id": self.env_id,
            "platform": self.platform,
            "build_prefix": self.build_prefix,
            "codec": self.codec,
            "size": self.size,
            "sha256": self.sha256,
            "files": self.files,
            "unpacked_size": self.unpacked_size,
            "relocations": [[r.path, r.mode] for r in self.relocations],
            "envmgr_version": self.envmgr_version,
            "created": self.created,
            "link_scripts": list(self.link_scripts),
        }
        if self.package_sizes:
            out["package_sizes"] = dict(self.package_sizes)
        if self.chunks:
            out["chunks"] = [chunk.to_list() for chunk in self.chunks]
        if self.layers:
            out["layers"] = [ref.to_list() for ref in self.layers]
            out["removes"] = list(self.removes)
        if self.layer is not None:
            out["layer"] = self.layer.to_list()
            out["paths"] = list(self.paths)
        if self.cuda:
            out["cuda"] = {"minimum": self.cuda[0], "package": self.cuda[1]}
        return out

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "manifest") -> Manifest:
        """Read :meth:`to_dict` output; raises ``ArchiveError`` on anything else."""
        try:
            if data["format"] not in MANIFEST_FORMATS:
                raise ValueError(
                    f"format {data['format']!r}; this envmgr reads formats 1 to 3 "
                    "(a newer envmgr wrote it?)"
                )
            codec = data["codec"]
            if codec not in ("zst", "gz"):
                raise ValueError(f"unknown codec {codec!r}")
            relocations = []
            for path, mode in data["relocations"]:
                if mode not in ("text", "binary", "symlink"):
                    raise ValueError(f"unknown relocation mode {mode!r}")
                relocations.append(Relocation(path=safe_name(str(path)), mode=mode))
            manifest = cls(
                env_id=parse_env_id(data["env_id"], where="env_id"),
                platform=parse_platform(data["platform"], where="platform"),
                build_prefix=str(data["build_prefix"]),
                codec=codec,
                size=int(data["size"]),
                sha256=str(data["sha256"]),
                files=int(data["files"]),
                unpacked_size=int(data["unpacked_size"]),
                relocations=tuple(relocations),
                envmgr_version=str(data.get("envmgr_version", "")),
                created=str(data.get("created", "")),
                link_scripts=tuple(str(name) for name in data.get("link_scripts", ())),
                package_sizes=tuple(
                    (str(name), int(size)) for name, size in data.get("package_sizes", {}).items()
                ),
                chunks=_chunks_from(data["chunks"], int(data["size"]), codec)
                if data["format"] in (2, 3)
                else (),
                **(_layer_fields(data) if data["format"] == 3 else {}),
                cuda=_cuda_field(data.get("cuda")),
            )
        except (KeyError, TypeError, ValueError, ArchiveError, BadIdError) as exc:
            raise ArchiveError(f"{where}: not an envmgr manifest ({exc})") from None
        if not re.fullmatch(r"[0-9a-f]{64}", manifest.sha256) or manifest.size < 0:
            raise ArchiveError(f"{where}: bad sha256 or size")
        if not manifest.build_prefix.startswith("/"):
            raise ArchiveError(f"{where}: build prefix must be absolute")
        return manifest


def _cuda_field(value: Any) -> tuple[str, ...]:
    """A manifest's ``cuda`` entry, checked: a version (or ``any``) and a package label."""
    if value is None:
        return ()
    minimum, package = str(value["minimum"]), str(value["package"])
    if not re.fullmatch(r"any|\d+(\.\d+){0,2}", minimum) or not 0 < len(package) <= 300:
        raise ValueError(f"cuda: bad entry {value!r}")
    return (minimum, package)


def _layer_fields(data: Any) -> dict[str, Any]:
    """The format-3 fields of a manifest: an env's ``layers`` (and ``removes``) or a layer's
    ``layer`` (and ``paths``), exactly one of the two, each bounded and checked."""
    if ("layers" in data) == ("layer" in data):
        raise ValueError("format 3 needs either layers (an env) or layer (a package layer)")
    if "layers" in data:
        entries = data["layers"]
        if not isinstance(entries, list) or not 0 < len(entries) <= MAX_LAYERS:
            raise ValueError("layers must be a non-empty list")
        layers = tuple(LayerRef.from_list(entry) for entry in entries)
        if len({ref.layer_id for ref in layers}) != len(layers):
            raise ValueError("a layer is listed twice")
        removes = data.get("removes", [])
        if not isinstance(removes, list) or len(removes) > MAX_LAYER_PATHS:
            raise ValueError("removes must be a list")
        return {"layers": layers, "removes": tuple(safe_name(str(p)) for p in removes)}
    paths = data["paths"]
    if not isinstance(paths, list) or len(paths) > MAX_LAYER_PATHS:
        raise ValueError("paths must be a list")
    return {
        "layer": LayerRef.from_list(data["layer"]),
        "paths": tuple(safe_name(str(p)) for p in paths),
    }
