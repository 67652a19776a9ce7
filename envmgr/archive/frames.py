"""Archive format 2: one tar stream cut into independently decodable zstd frames.

The frames, concatenated, are an ordinary ``.tar.zst`` (``zstd -d`` and ``tar --zstd -x`` read
it whole); the manifest lists each frame's offset, size, decoded size and sha256, and whether
it goes on with the last member of the frame before (a file larger than a frame). Frames are
cut only where a member ends, except inside a file's data, so a run of frames that starts with
a non-continuation frame is a tar stream of whole members: a *job*.

:class:`ChunkWriter` (the builder) compresses frames on all cores and writes them in order.
:func:`unpack_chunks` (the worker) reads the archive as one stream, checks each frame's hash
before anything decodes it, and hands the jobs to one thread per core, each decoding and
writing its members while the download goes on; at most a few frames per thread wait in memory.

This module imports only the standard library and, when called, zstandard: it is on the
worker's path.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import IO, Any

from envmgr.archive.extract import SMALL_FILE, Extractor, write_file
from envmgr.archive.manifest import ArchiveError, Chunk, ChunkDigestError, Manifest

__all__ = ["CheckedFrames", "ChunkWriter", "unpack_chunks", "workers"]


def workers() -> int:
    """Threads that decode or compress frames: one per core this process may use, 2 to 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


_local = threading.local()
_DECODERS: list[ThreadPoolExecutor] = []
_DECODERS_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_DECODERS.clear)


def _decoders() -> ThreadPoolExecutor:
    """The process's frame decoders, one per core: an env's layers unpack at once, and more
    decoding threads than cores only pass the GIL around (measured on torch's 250 layers:
    a pool per layer spent 2 s of CPU in GIL handovers)."""
    with _DECODERS_LOCK:
        if not _DECODERS:
            _DECODERS.append(ThreadPoolExecutor(workers(), thread_name_prefix="envmgr-unpack"))
        return _DECODERS[0]


def _compress(raw: bytes, level: int) -> tuple[bytes, str]:
    """One frame (with its decoded size in the header) and its sha256; one thread each."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None or _local.level != level:
        import zstandard  # noqa: PLC0415

        compressor = _local.compressor = zstandard.ZstdCompressor(
            level=level, write_content_size=True
        )
        _local.level = level
    frame = compressor.compress(raw)
    return frame, hashlib.sha256(frame).hexdigest()


class ChunkWriter:
    """Receives tar bytes and member ends from :func:`envmgr.archive.pack.pack`; writes frames of
    about *chunk_size* decoded bytes to *out* in order, compressed on *threads* threads
    (0: :func:`workers`). Single-threaded frames: the same input gives the same bytes
    whatever the thread count."""

    def __init__(self, out: Any, *, level: int, threads: int, chunk_size: int) -> None:
        self.out = out
        self.level = level
        self.chunk_size = chunk_size
        self.buffer = bytearray()
        self.cont = False  # whether the frame being filled continues a member
        self.offset = 0
        self.chunks: list[Chunk] = []
        self.threads = threads or workers()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="envmgr-pack")
        self.pending: deque[tuple[Future[tuple[bytes, str]], int, bool]] = deque()

    def write(self, data: bytes) -> None:
        """Tar bytes; inside a member, a full frame is cut here and the next continues it."""
        view = memoryview(data)
        while view:
            room = self.chunk_size - len(self.buffer)
            self.buffer += view[:room]
            view = view[room:]
            if len(self.buffer) >= self.chunk_size:
                self._cut(next_cont=True)

    def member_end(self) -> None:
        if len(self.buffer) >= self.chunk_size // 2:
            self._cut(next_cont=False)

    def _cut(self, *, next_cont: bool) -> None:
        if not self.buffer:
            return
        raw = bytes(self.buffer)
        self.buffer.clear()
        self.pending.append((self.pool.submit(_compress, raw, self.level), len(raw), self.cont))
        self.cont = next_cont
        while len(self.pending) > 2 * self.threads:  # bounds the memory of frames in flight
            self._write_one()

    def _write_one(self) -> None:
        future, raw, cont = self.pending.popleft()
        frame, sha256 = future.result()
        self.out.write(frame)
        self.chunks.append(
            Chunk(offset=self.offset, size=len(frame), raw=raw, sha256=sha256, cont=cont)
        )
        self.offset += len(frame)

    def close(self) -> tuple[Chunk, ...]:
        """Cut the last frame, write every frame; returns the index."""
        self._cut(next_cont=False)
        while self.pending:
            self._write_one()
        self.pool.shutdown()
        return tuple(self.chunks)

    def abandon(self) -> None:
        """After an error (or :meth:`close`): stop the threads, drop what is left."""
        for future, _raw, _cont in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


_END = None  # a job's last frame was handed over
_ABORT = object()  # stop: another job or the download failed


class _AbortedError(Exception):
    pass


class _JobReader:
    """The decoded tar bytes of one job, frame after frame, as the download hands them over."""

    def __init__(self, frames: queue.SimpleQueue[Any], slots: threading.Semaphore) -> None:
        import zstandard  # noqa: PLC0415

        self.frames = frames
        self.slots = slots
        self.decoder = zstandard.ZstdDecompressor()
        self.view = memoryview(b"")
        self.done = False

    def _next(self) -> bool:
        item = self.frames.get()
        if item is _ABORT:
            raise _AbortedError
        if item is _END:
            self.done = True
            return False
        number, chunk, frame = item
        self.slots.release()
        import zstandard  # noqa: PLC0415

        try:
            declared = zstandard.get_frame_parameters(frame).content_size
            if declared != chunk.raw:
                raise ArchiveError(
                    f"chunk {number} declares {declared} decoded bytes, its index says {chunk.raw}"
                )
            data = self.decoder.decompress(frame)
        except zstandard.ZstdError as exc:
            raise ArchiveError(f"chunk {number} does not decode: {exc}") from None
        if len(data) != chunk.raw:
            raise ArchiveError(f"chunk {number} decodes to {len(data)} bytes, not {chunk.raw}")
        self.view = memoryview(data)
        return True

    def read(self, size: int = -1) -> memoryview:
        """Up to *size* bytes of the current frame, uncopied: a view of the decoded frame,
        which stays as it is (copying each file's bytes out of it held the GIL for 0.1-0.2 s
        of a torch hydrate)."""
        while not self.view:
            if self.done or not self._next():
                return memoryview(b"")
        if size < 0 or size >= len(self.view):
            out, self.view = self.view, memoryview(b"")
        else:
            out, self.view = self.view[:size], self.view[size:]
        return out

    def exact(self, size: int) -> bytes:
        """*size* bytes, across frames if need be; fewer only where the job ends."""
        return bytes(self.exact_view(size))

    def exact_view(self, size: int) -> bytes | memoryview:
        """:meth:`exact`, uncopied when the bytes lie in one frame."""
        if len(self.view) >= size:
            out, self.view = self.view[:size], self.view[size:]
            return out
        parts = []
        while size > 0 and (piece := self.read(size)):
            parts.append(piece)
            size -= len(piece)
        return b"".join(parts)

    def drain(self) -> None:
        """Take the job's frames a stream that ended early (at a zero block) left."""
        while not self.done:
            self.view = memoryview(b"")
            self._next()


class _Exact:
    """A member's data: exactly *size* bytes of *reader*, else the archive is damaged."""

    def __init__(self, reader: _JobReader, size: int) -> None:
        self.reader = reader
        self.left = size

    def read(self, size: int) -> memoryview:
        if self.left <= 0:
            return memoryview(b"")
        data = self.reader.read(min(size, self.left))
        if not data:
            raise ArchiveError("damaged archive: a member's data is cut short")
        self.left -= len(data)
        return data


_BLOCK = 512
_ZERO = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")


def _number(field: bytes) -> int:
    """A header's number: octal, or GNU's base-256 for large values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        raise ArchiveError("damaged archive: a header holds a bad number") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _extract_job(reader: _JobReader, extractor: Extractor, order: int) -> None:
    """The members of one job, read straight from the decoded frames: the GNU tar that
    :func:`envmgr.archive.pack.pack` writes (ustar headers, ``././@LongLink`` names), files,
    directories and symlinks; anything else (pax headers, hard links, devices) is refused."""
    long_name = long_link = None
    number = 0
    while True:
        header = reader.exact(_BLOCK)
        if len(header) < _BLOCK:
            if header:
                raise ArchiveError("damaged archive: a member header is cut short")
            return  # the job ends where a member ends
        if header == _ZERO:
            return  # the archive's end
        stored = _number(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise ArchiveError("damaged archive: a member header's checksum does not match")
        kind = header[156:157]
        size = _number(header[124:136])
        padding = -size % _BLOCK
        if kind in (b"L", b"K"):
            if size > 1 << 16:
                raise ArchiveError("damaged archive: a long name of more than 64 KiB")
            value = _text(reader.exact(size))
            reader.exact(padding)
            if kind == b"L":
                long_name = value
            else:
                long_link = value
            continue
        name = long_name if long_name is not None else _text(header[:100])
        if long_name is None and header[257:263] == b"ustar\0" and header[345] != 0:
            name = _text(header[345:500]) + "/" + name  # POSIX ustar's name prefix
        link = long_link if long_link is not None else _text(header[157:257])
        long_name = long_link = None
        mode = _number(header[100:108])
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"
        is_file = kind in _FILE_TYPES
        if kind == b"5":
            name = name.rstrip("/") or name
        name, target = extractor.admit(name, is_file=is_file, size=size)
        if kind == b"5":
            extractor.add_dir(target, mode)
        elif kind == b"2":
            extractor.add_link((order, number), name, link)
        elif is_file:
            mode = extractor.file_mode(mode)
            if size <= SMALL_FILE:
                data = reader.exact_view(size)
                if len(data) != size:
                    raise ArchiveError("damaged archive: a member's data is cut short")
                write_file(target, data, mode)
            else:
                data = None
                write_file(target, _Exact(reader, size), mode)  # type: ignore[arg-type]
            if extractor.mirror is not None:
                extractor.mirror.file(name, target, data)
        else:
            raise ArchiveError(
                f"member {name!r} is a link, device, FIFO or tar extension (type {kind!r}); refused"
            )
        if padding and len(reader.exact(padding)) != padding:
            raise ArchiveError("damaged archive: a member's padding is cut short")
        number += 1


def _digest_error(number: int, count: int, chunk: Chunk) -> ChunkDigestError:
    return ChunkDigestError(
        f"chunk {number} of {count} (bytes {chunk.offset}-{chunk.offset + chunk.size - 1}) "
        "does not match its sha256 in the manifest"
    )


def _short_error(number: int, count: int, chunk: Chunk, got: int, size: int) -> ArchiveError:
    return ArchiveError(
        f"archive ends at byte {chunk.offset + got}, inside chunk {number} of {count} "
        f"(its manifest says {size} bytes)"
    )


class CheckedFrames:
    """The archive's bytes as they are read, each frame checked against its hash before
    it is passed on: for a worker without the zstandard module, whose ``zstd`` program then
    decodes the whole stream on one core. The first mismatch is kept in ``error`` and
    raised; a stream longer than the index is refused too."""

    def __init__(self, source: IO[bytes], manifest: Manifest) -> None:
        self.source = source
        self.manifest = manifest
        self.number = 0
        self.error: ArchiveError | None = None

    def read(self, size: int = -1) -> bytes | memoryview:
        chunks = self.manifest.chunks
        if self.number >= len(chunks):
            if self.source.read(1):
                self.error = ArchiveError(
                    f"archive is longer than its manifest's {self.manifest.size} bytes"
                )
                raise self.error
            return b""
        chunk = chunks[self.number]
        frame = _read_exact(self.source, chunk.size)
        if len(frame) != chunk.size:
            self.error = _short_error(
                self.number, len(chunks), chunk, len(frame), self.manifest.size
            )
            raise self.error
        if hashlib.sha256(frame).hexdigest() != chunk.sha256:
            self.error = _digest_error(self.number, len(chunks), chunk)
            raise self.error
        self.number += 1
        return frame


def _read_exact(source: IO[bytes], size: int) -> bytes | memoryview:
    """*size* bytes of *source* (fewer at its end); what one read gave is handed on uncopied."""
    first = source.read(size)
    if len(first) >= size or not first:
        return first
    parts = [first]
    size -= len(first)
    while size > 0:
        data = source.read(size)
        if not data:
            break
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def unpack_chunks(source: IO[bytes], extractor: Extractor, manifest: Manifest) -> None:
    """Read the format-2 archive *source* once, in order; extract each job on a thread.

    Raises ``ChunkDigestError`` when a frame's bytes do not match the index (before it is
    decoded), ``ArchiveError`` when the archive is shorter or longer than its index or a frame
    does not decode to its declared size, or whatever the extractor raises; on any error the
    other jobs stop at their next member or frame.
    """
    count = len(manifest.chunks)
    pool = _decoders()
    # Frames read but not yet decoded: the download runs this far ahead of the threads.
    slots = threading.Semaphore(2 * workers() + 2)
    failed = threading.Event()
    jobs: list[tuple[queue.SimpleQueue[Any], Future[None]]] = []

    def run(frames: queue.SimpleQueue[Any], order: int) -> None:
        try:
            reader = _JobReader(frames, slots)
            _extract_job(reader, extractor, order)
            reader.drain()
        except BaseException:
            failed.set()
            raise

    ended = False
    try:
        for number, chunk in enumerate(manifest.chunks):
            while not slots.acquire(timeout=0.2):
                if failed.is_set():
                    break
            if failed.is_set():
                break
            frame = _read_exact(source, chunk.size)
            if len(frame) != chunk.size:
                raise _short_error(number, count, chunk, len(frame), manifest.size)
            if hashlib.sha256(frame).hexdigest() != chunk.sha256:
                raise _digest_error(number, count, chunk)
            if not chunk.cont:
                if jobs:
                    jobs[-1][0].put(_END)
                frames: queue.SimpleQueue[Any] = queue.SimpleQueue()
                jobs.append((frames, pool.submit(run, frames, len(jobs))))
            jobs[-1][0].put((number, chunk, frame))
        else:
            jobs[-1][0].put(_END)
            if source.read(1):
                raise ArchiveError(f"archive is longer than its manifest's {manifest.size} bytes")
        ended = True
    finally:
        if not ended or failed.is_set():
            for frames, _future in jobs:
                frames.put(_ABORT)
        # Jobs run in a shared pool in the order they were queued: each ends after its own
        # frames, which were all read before any later job's.
        wait([future for _frames, future in jobs])
    errors = [error for _q, f in jobs if (error := f.exception()) is not None]
    real = [e for e in errors if not isinstance(e, _AbortedError)]
    if real:
        raise real[0]
    if errors:
        raise ArchiveError("damaged archive: a job stopped early")
