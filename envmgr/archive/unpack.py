"""Unpack an archive stream into a directory: verified, bounded, never outside it.

:func:`unpack` refuses members that would escape the target (absolute paths, ``..``, links
pointing outside, devices) and more bytes than the manifest declares, in either format.
Format 2 is decoded on all cores as the frames arrive (:mod:`.frames`); without the
zstandard module the ``zstd`` program decodes one stream, each frame still checked.
"""

from __future__ import annotations

import gzip
import tarfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from envmgr.archive.extract import Extractor, Mirror, write_file
from envmgr.archive.frames import CheckedFrames, unpack_chunks
from envmgr.archive.manifest import READ_SIZE, WRITE_ERRNOS, ArchiveError, Manifest, WriteError

__all__ = ["unpack"]

#: At most this many small files (so at most 1 GiB) wait for the write pool.
_IN_FLIGHT = 256


def unpack(
    source: IO[bytes],
    dest: Path,
    manifest: Manifest,
    *,
    read_only: bool = False,
    mirror: Mirror | None = None,
) -> bool:
    """Extract the archive stream *source* into the empty or new directory *dest*; returns
    whether *mirror* was told of every member (format 2 decoded here: else it was not used).

    Raises ``ArchiveError`` for unsafe members (absolute or ``..`` names, links pointing out
    of *dest*, devices, FIFOs), and when the members exceed the manifest's declared size or
    file count; for format 2 also ``ChunkDigestError`` when a frame does not match its hash
    (each frame is checked before it is decoded; format 1's hash is the caller's to check).
    Modes are capped at 0755 and the process umask: a shared cache never gets group- or
    world-writable files from an archive. With *read_only*, files are created without write
    permission (a host's shared layers).
    """
    dest.mkdir(parents=True, exist_ok=True)
    parallel = bool(manifest.chunks) and _has_zstandard()
    extractor = Extractor(
        dest,
        manifest,
        defer_links=parallel,
        read_only=read_only,
        mirror=mirror if parallel else None,
    )
    try:
        if parallel:
            unpack_chunks(source, extractor, manifest)
            extractor.make_links()
        elif manifest.chunks:  # no zstandard here: the zstd program, one stream, frames checked
            checked = CheckedFrames(source, manifest)
            failures: tuple[type[BaseException], ...] = (*_stream_errors(), ArchiveError)
            try:  # the zstd feeder reads every frame (and checks for more) before it ends
                _unpack_stream(checked, extractor, manifest, program=True)  # type: ignore[arg-type]
            except failures:
                if checked.error is not None:  # the cause, not the broken stream it made
                    raise checked.error from None
                raise
        else:
            _unpack_stream(source, extractor, manifest)
        extractor.tree.check_links()
        extractor.mirror_links()
        extractor.unpacked = True
    except _stream_errors() as exc:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise WriteError(f"cannot write under {dest}: {exc.strerror}", code=exc.errno) from None
        if isinstance(exc, FileExistsError):
            raise ArchiveError(f"archive repeats a member ({exc.filename})") from None
        raise ArchiveError(f"damaged archive: {exc}") from None
    finally:
        if not extractor.unpacked:  # a refused or broken archive leaves no link for a loose reader
            extractor.tree.drop_links()
    extractor.set_dir_modes()
    return extractor.mirror is not None


def _unpack_stream(
    source: IO[bytes], extractor: Extractor, manifest: Manifest, *, program: bool = False
) -> None:
    """One stream, decoded here (with the ``zstd`` program when *program*); small files are
    written by a pool of threads while the stream goes on (file creation is slow on many
    filesystems and releases the GIL)."""
    if manifest.codec == "zst":
        stream: Any = _ZstdProcess(source) if program else _zstd_reader(source)
    else:
        stream = gzip.GzipFile(fileobj=source, mode="rb")
    with (
        ThreadPoolExecutor(max_workers=8, thread_name_prefix="envmgr-unpack") as pool,
        stream,
        tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 16) as tar,
    ):
        writes: list[Future[None]] = []

        def write_later(target: str, data: bytes, mode: int) -> None:
            writes.append(pool.submit(write_file, target, data, mode))
            if len(writes) >= _IN_FLIGHT:  # bound the memory held by the pool
                for write in writes:
                    write.result()
                writes.clear()

        extractor.extract(tar, write_later)
        for write in writes:
            write.result()


_ZSTANDARD: list[Any] = []
_ZSTANDARD_LOCK = threading.Lock()


def _zstandard() -> Any:
    """The zstandard module, or ``None`` when it does not import here; imported once per
    process under a lock. Layers unpack on several threads, and an import that fails (a
    wheel of another platform on the path) must fail once, never hand another thread the
    half-made module."""
    with _ZSTANDARD_LOCK:
        if not _ZSTANDARD:
            try:
                import zstandard  # noqa: PLC0415
            except ImportError:
                _ZSTANDARD.append(None)
            else:
                _ZSTANDARD.append(zstandard)
        return _ZSTANDARD[0]


def _has_zstandard() -> bool:
    return _zstandard() is not None


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a damaged stream raises while it is decompressed and read as a tar."""
    errors: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, zlib.error)
    zstandard = _zstandard()
    return errors if zstandard is None else (*errors, zstandard.ZstdError)


def _zstd_reader(source: IO[bytes]) -> Any:
    """A decompressing reader: the zstandard module, else the ``zstd`` program (workers
    may bootstrap with the standard library and boto3 only)."""
    zstandard = _zstandard()
    if zstandard is None:
        return _ZstdProcess(source)
    return zstandard.ZstdDecompressor().stream_reader(source, closefd=False)


class _ZstdProcess:
    """``zstd -dc`` fed from *source* by a thread; reads its stdout. What zstd says on
    stderr goes into the error, not onto this process's stderr."""

    def __init__(self, source: IO[bytes]) -> None:
        import contextlib  # noqa: PLC0415
        import shutil as _shutil  # noqa: PLC0415
        import subprocess  # noqa: PLC0415
        import tempfile  # noqa: PLC0415
        import threading  # noqa: PLC0415

        program = _shutil.which("zstd")
        if program is None:
            raise ArchiveError(
                "cannot decompress a .tar.zst: neither the zstandard module nor "
                "the zstd program is installed",
                hint="pip install zstandard",
            )
        # A file, not a pipe: zstd can never block on what it says.
        self.said = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            [program, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.said
        )
        stdin = self.process.stdin
        self.error: BaseException | None = None

        def feed() -> None:
            try:
                while chunk := source.read(READ_SIZE):
                    stdin.write(chunk)  # type: ignore[union-attr]
            except BaseException as exc:  # reported when the reader finishes
                self.error = exc
            finally:
                # zstd may have stopped already: a broken pipe here is said by its exit.
                with contextlib.suppress(OSError):
                    stdin.close()  # type: ignore[union-attr]

        self.thread = threading.Thread(target=feed, daemon=True)
        self.thread.start()

    def read(self, size: int = -1) -> bytes:
        return self.process.stdout.read(size)  # type: ignore[union-attr]

    def __enter__(self) -> _ZstdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.process.stdout.read()  # type: ignore[union-attr]
        finally:
            self.process.stdout.close()  # type: ignore[union-attr]
            self.thread.join()
            code = self.process.wait()
            self.said.seek(0)
            said = " ".join(self.said.read(1024).decode(errors="replace").split())
            self.said.close()
        # zstd that stopped on a damaged stream breaks the feeder's pipe: its exit is the
        # cause. Any other feeder error (the source's: a frame that lies) comes first.
        if self.error is not None and not (code != 0 and isinstance(self.error, BrokenPipeError)):
            raise self.error
        if code != 0:
            raise ArchiveError(
                f"damaged archive: zstd failed with exit code {code}"
                + (f" ({said[:300]})" if said else "")
            )
