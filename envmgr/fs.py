"""Files written whole or not at all, and locks between processes of one host.

Every file envmgr writes outside the store's own objects (locks, page and resolution caches,
markers) goes through :func:`write_atomic`: a temp file beside the target, named
``.<name>.tmp-<host>-<pid>-<random>``, then one rename. A reader never sees half a file, and
the temps of writers on this host that died mid-write are removed by the next writer of the
same file (:func:`temp_beside`). Standard library only: this module ships to workers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "NotRegularFileError",
    "file_lock",
    "open_regular",
    "pid_alive",
    "read_small",
    "temp_beside",
    "write_atomic",
]


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False, *, remove: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on *path* (created if needed); the kernel drops it if we die.

    With *remove* (exclusive locks only), the holder removes the file as it lets go, so a
    lock per env or layer does not stay behind for each build (2,854 in a shared
    ``/tmp/envmgr-builds`` here after a few days of tests). A waiter that then gets the
    lock of the removed file opens the path again."""
    if remove and shared:
        raise ValueError("only an exclusive lock removes its file")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with path.open("a+b") as handle:
            fd = handle.fileno()
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            if remove and not _names(path, fd):
                fcntl.flock(fd, fcntl.LOCK_UN)  # removed while we waited: lock the new one
                continue
            try:
                yield
            finally:
                if remove:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                fcntl.flock(fd, fcntl.LOCK_UN)
            return


def _names(path: Path, fd: int) -> bool:
    """Whether *path* is still the file open as *fd*."""
    try:
        here, there = path.stat(), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def pid_alive(pid: int) -> bool:
    """True when a process *pid* exists on this host (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_beside(path: Path) -> Path:
    """A new, empty temp file in *path*'s directory (made if needed), named by host and pid;
    the temps of *path* left by writers on this host that are gone are removed on the way."""
    # Imported here: this module is on the worker's warm start path, which writes nothing.
    import socket  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in path.parent.glob(f".{path.name}.tmp-{host}-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{host}-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_atomic(path: Path, data: bytes | str) -> None:
    """*data* (text is written as UTF-8) into *path* through :func:`temp_beside` and a
    rename; on any failure the temp is removed and *path* is as it was."""
    tmp = temp_beside(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class NotRegularFileError(OSError):
    """A path that had to be a regular file is a FIFO, a device, a socket or a directory."""


def open_regular(path: Path) -> IO[bytes]:
    """*path* opened for reading if it is a regular file, else :class:`NotRegularFileError`:
    a FIFO would block its reader forever, a device has no end, and neither is ever a file
    envmgr wrote. It is checked on the open file, so a swap cannot slip in between."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: Path, limit: int) -> bytes:
    """The bytes of the small file *path* (a marker, a kept manifest), at most *limit*: a
    file of this host's caches can be replaced by anything. ``OSError`` when it is missing,
    not a regular file (:func:`open_regular`) or larger than *limit*."""
    with open_regular(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"more than {limit} bytes", str(path))
    return data
