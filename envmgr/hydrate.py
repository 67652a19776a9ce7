"""Hydrate an env at task start: from the store to ``<cache>/envs/<env_id>``, once per host.

A warm call is one ``stat``: the env directory exists only when complete, because it is
published by renaming a finished temp directory into place. A cold call takes a per-env
``flock`` (the kernel releases it if the holder dies), streams the archive once through sha256
and the decompressor into a safe extractor writing a temp directory beside the final one,
checks the hash, relocates the listed files for the final path, writes the completion marker
and renames the directory into place. Concurrent callers wait on the lock and return the
published env; temp directories of killed callers are removed by the next one.

If the store has the env's lock but no archive for this platform, the error names the
``envmgr build`` command that makes one (any host can: builds are cross-platform). A caller
with a full envmgr install may opt in to building here (``build_if_missing=True``; the
build-once lease keeps other workers waiting); only that path imports the builder.

This module imports only the standard library (and, lazily, the store and archive modules);
it sits on every task's start path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from envmgr.errors import EnvmgrError
from envmgr.ids import EnvId, check_under, parse_env_id, parse_platform
from envmgr.progress import tracked

if TYPE_CHECKING:
    from envmgr.archive import Manifest
    from envmgr.cache.store import Store
    from envmgr.progress import Progress, Task

__all__ = [
    "COMPLETE",
    "HashMismatchError",
    "HydrateError",
    "Hydrated",
    "env_dir",
    "file_lock",
    "hydrate",
]

#: The marker file inside a published env; it holds the manifest's sha256.
COMPLETE = ".envmgr-complete"


class HydrateError(EnvmgrError):
    """An env could not be hydrated; names the env, the store and what to do."""


class HashMismatchError(HydrateError):
    """The downloaded archive does not match its manifest's sha256."""


class Hydrated(NamedTuple):
    """A published env (a named tuple: ``dataclasses`` costs the worker's start ~15 ms)."""

    prefix: Path
    env_id: str
    downloaded: bool  # this call fetched the archive (False: it was already here)
    seconds: float

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"


def env_dir(cache_dir: Path, env_id: str) -> Path:
    """``<cache>/envs/<env_id>``; raises ``BadIdError`` unless *env_id* is an env id."""
    return cache_dir / "envs" / parse_env_id(env_id, where="env id")


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on *path* (created if needed); the kernel drops it if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lock_path(cache_dir: Path, env_id: str, kind: str = "hydrate") -> Path:
    return cache_dir / "envs" / ".locks" / f"{parse_env_id(env_id, where='env id')}.{kind}"


def touch(prefix: Path) -> None:
    """Record a use of the env (``envmgr gc`` removes the least recently used first)."""
    with contextlib.suppress(OSError):
        os.utime(prefix / COMPLETE)


def hydrate(
    env_id: str,
    store: Store,
    cache_dir: Path,
    *,
    platform: str | None = None,
    build_if_missing: bool = False,
    progress: Progress | None = None,
) -> Hydrated:
    """Return the published env *env_id* under *cache_dir*, fetching it if needed;
    *progress* sees the download (and a build, when this worker must build).

    Raises ``BadIdError`` (before touching anything) when *env_id* or *platform* is not one,
    ``HydrateError`` (no archive and no lock, relocation impossible, a manifest of another
    env), ``HashMismatchError``, ``ArchiveError`` (unsafe archive) or ``StoreError``.
    """
    start = time.monotonic()
    env_id = parse_env_id(env_id, where="hydrate")
    if platform is not None:
        platform = parse_platform(platform, where="hydrate")
    final = env_dir(cache_dir, env_id)
    if (final / COMPLETE).is_file():
        touch(final)
        return Hydrated(
            prefix=final, env_id=env_id, downloaded=False, seconds=time.monotonic() - start
        )
    _check_writable(cache_dir, lock_path(cache_dir, env_id))
    with file_lock(lock_path(cache_dir, env_id)):
        if (final / COMPLETE).is_file():  # published while we waited for the lock
            return Hydrated(
                prefix=final, env_id=env_id, downloaded=False, seconds=time.monotonic() - start
            )
        _remove_leftovers(final)
        if platform is None:
            from envmgr.platforms import host_platform  # noqa: PLC0415

            platform = host_platform()
        from envmgr.cache.store import StoreError  # noqa: PLC0415

        try:
            manifest = _manifest(store, platform, env_id, cache_dir, build_if_missing, progress)
        except StoreError as exc:
            raise HydrateError(
                f"env {env_id}: cannot read it from the store: {exc.message}", hint=exc.hint
            ) from None
        _fetch_and_publish(store, manifest, final, progress)
    from envmgr.cache.usage import record_use  # noqa: PLC0415

    record_use(store, platform, env_id)  # a cold start here: `store gc` keeps used envs
    return Hydrated(prefix=final, env_id=env_id, downloaded=True, seconds=time.monotonic() - start)


def _check_writable(cache_dir: Path, lock: Path) -> None:
    """One clear error, before anything else, when the cache cannot be written."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a+b"):
            pass
    except OSError as exc:
        raise HydrateError(
            f"cannot write the env cache {cache_dir}: {exc.strerror} ({exc.filename})",
            hint="point ENVMGR_CACHE_DIR (or --cache-dir) at a writable directory",
        ) from None


def _remove_leftovers(final: Path) -> None:
    """Temp dirs of callers that died, and an env dir without its marker (not ours)."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(check_under(stale, final.parent), ignore_errors=True)
    if final.is_symlink():
        final.unlink()  # never followed: it could point anywhere
    elif final.exists():
        shutil.rmtree(check_under(final, final.parent))


def _manifest(
    store: Store,
    platform: str,
    env_id: EnvId,
    cache_dir: Path,
    build_if_missing: bool,
    progress: Progress | None,
) -> Manifest:
    from envmgr.archive import Manifest  # noqa: PLC0415
    from envmgr.cache.layout import env_lock_key, manifest_key  # noqa: PLC0415

    key = manifest_key(platform, env_id)
    raw = store.get(key)
    if raw is not None:
        try:
            data = json.loads(raw)
        except ValueError:
            raise HydrateError(f"env {env_id}: {store.url}/{key} is not JSON") from None
        manifest = Manifest.from_dict(data, where=f"{store.url}/{key}")
        if manifest.env_id != env_id or manifest.platform != platform:
            raise HydrateError(
                f"env {env_id}: {store.url}/{key} describes env {manifest.env_id[:40]} for "
                f"{manifest.platform[:20]}, not the one under its key; nothing was published",
                hint="the store was altered: rebuild the env with `envmgr build`",
            )
        return manifest
    lock_key = env_lock_key(platform, env_id)
    if not store.exists(lock_key):
        raise HydrateError(
            f"env {env_id} has no archive and no lock for {platform} in {store.url}",
            hint="run `envmgr build` for this platform, or check the env id and the store",
        )
    if not build_if_missing:
        raise HydrateError(
            f"env {env_id} has no archive for {platform} in {store.url}; its lock is there, "
            f"so any machine with envmgr can build it: envmgr build --env {env_id} "
            f"--platform {platform} --store {store.url}"
        )
    built: Manifest = _build_here(store, platform, env_id, cache_dir, lock_key, progress).manifest
    return built


def _build_here(
    store: Store,
    platform: str,
    env_id: str,
    cache_dir: Path,
    lock_key: str,
    progress: Progress | None,
) -> Any:
    """A caller that opted in builds the env here (lazily importing the builder)."""
    try:
        from envmgr.build import BuildOptions, build_and_store, read_stored_lock  # noqa: PLC0415

        lock = read_stored_lock(store, platform, env_id)
    except ImportError as exc:
        raise HydrateError(
            f"env {env_id} has no archive for {platform} in {store.url}, and this worker "
            f"cannot build it ({exc.name} is not installed); build it anywhere with: envmgr "
            f"build --env {env_id} --platform {platform} --store {store.url}"
        ) from None
    if lock is None:
        raise HydrateError(f"env {env_id}: {store.url}/{lock_key} vanished")
    from envmgr.cache.store import StoreError  # noqa: PLC0415

    options = BuildOptions(store=store, cache_dir=cache_dir)
    if progress is not None:
        options = BuildOptions(store=store, cache_dir=cache_dir, progress=progress)
    try:
        return build_and_store(lock, options)
    except StoreError as exc:
        raise HydrateError(
            f"env {env_id} has no archive for {platform} in {store.url}, so this worker must "
            f"build it, but it cannot write to the store: {exc.message}",
            hint="run `envmgr build` where the store is writable, or give this worker write access",
        ) from None


class _Hashing:
    """Counts (and for format 1, hashes) what the extractor reads; format 2's frames are
    each checked against their own hash, which covers every byte."""

    def __init__(self, source: IO[bytes], task: Task | None, *, digest: bool = True) -> None:
        self.source = source
        self.digest = hashlib.sha256()
        self.hashing = digest
        self.size = 0
        self.task = task

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        if self.hashing:
            self.digest.update(data)
        self.size += len(data)
        if self.task is not None:
            self.task.advance(len(data))
        return data

    def readinto(self, target: Any) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)


def _fetch_and_publish(
    store: Store, manifest: Manifest, final: Path, progress: Progress | None = None
) -> None:
    from envmgr.archive import (  # noqa: PLC0415
        ArchiveError,
        ChunkDigestError,
        WriteError,
        relocate,
        unpack,
    )
    from envmgr.cache.layout import archive_key  # noqa: PLC0415
    from envmgr.cache.store import StoreError  # noqa: PLC0415

    key = archive_key(manifest.platform, manifest.env_id, manifest.codec)
    binary = any(r.mode == "binary" for r in manifest.relocations)
    if binary and len(str(final)) > len(manifest.build_prefix):
        raise HydrateError(
            f"env {manifest.env_id}: {final} is longer than its build prefix "
            f"({len(manifest.build_prefix)} characters)",
            hint="use a shorter ENVMGR_CACHE_DIR",
        )
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        source = store.open(key)
        if source is None:
            raise HydrateError(
                f"env {manifest.env_id}: the manifest is in {store.url} but "
                f"the archive {key} is not",
                hint="run `envmgr build` again",
            )
        label = f"hydrate {manifest.env_id[:12]}"
        tracking = (
            tracked(progress, label, total=manifest.size)
            if progress is not None
            else contextlib.nullcontext(None)
        )
        with tracking as task, source:
            hashing = _Hashing(source, task, digest=not manifest.chunks)
            try:
                unpack(hashing, tmp, manifest)  # type: ignore[arg-type]
            except ChunkDigestError as exc:
                raise HashMismatchError(
                    f"env {manifest.env_id}: the archive {key} in {store.url} does not match "
                    f"its manifest ({exc.message}); nothing was published",
                    hint="rebuild it with `envmgr build` or restore the object",
                ) from None
            except ArchiveError:
                if manifest.chunks:  # each frame was checked before it was decoded
                    raise
                # A damaged download usually breaks the stream first: say so if the bytes
                # do not match, which is the actionable cause.
                while hashing.read(1 << 20):
                    pass
                if hashing.digest.hexdigest() == manifest.sha256:
                    raise
            while hashing.read(1 << 20):  # the tar end padding the extractor left unread
                pass
            got = hashing.digest.hexdigest() if hashing.hashing else manifest.sha256
            if got != manifest.sha256 or hashing.size != manifest.size:
                what = (
                    f"sha256 {got[:16]}…, want {manifest.sha256[:16]}…"
                    if got != manifest.sha256
                    else f"{hashing.size} bytes, want {manifest.size}"
                )
                raise HashMismatchError(
                    f"env {manifest.env_id}: the archive {key} in {store.url} does not match "
                    f"its manifest ({what}); nothing was published",
                    hint="rebuild it with `envmgr build` or restore the object",
                )
        relocate(tmp, manifest, str(final))
        (tmp / COMPLETE).write_text(manifest.sha256 + "\n")
        tmp.rename(final)
    except StoreError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HydrateError(
            f"env {manifest.env_id}: download failed: {exc.message}; nothing was published",
            hint=exc.hint,
        ) from None
    except (WriteError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) else exc.message
        raise HydrateError(
            f"env {manifest.env_id}: cannot write it under {final.parent}: {reason}; "
            "nothing was published",
            hint="free space there (`envmgr gc`) or point ENVMGR_CACHE_DIR at a larger disk",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
