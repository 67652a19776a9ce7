"""A second process that fetches layers, so a large cold hydrate uses every core.

Unpacking a layer is Python for each file (its tar header, its write, the note of what to
link), and the threads of one process take turns on its interpreter lock. A hydrate whose
missing layers are large (:func:`wanted`) starts one child process: each layer thread that
finds it free hands it its layer (largest first), and fetches the next one itself while the
child works. The child reads the layer from the store, checks each frame and unpacks it into
the temp directory :func:`~envmgr.worker.layers.with_layer` gave, places the layer's copies and
symlinks in the env (and, for a layer of many files, its links, by a link helper of its own
as it unpacks), and answers with the files still to link. The hydrate keeps everything
else: the layer's lock and publish, the other links, the env layer, the relocation. A cold
torch hydrate from loopback on 2 cores, 6 rounds interleaved: 3.91 s against 4.31 s without
the child.

The child is forked where that is safe (:func:`_forkable`: Linux, and no other thread yet,
which the hydrate sees to): it has the hydrate's modules and S3 session already, and starts
its first layer at once. Elsewhere it is a new interpreter, which spends 0.3 s of CPU on its
imports and its S3 client first. A cold torch hydrate on a journaled ext4, 8 rounds
interleaved: 3.23 s forked against 3.41 s started anew, one archive 3.35 s.

The child speaks JSON lines: the hydrate writes one job at a time (to a new interpreter, the
store first); the child answers ``{"read": bytes}`` lines as it reads, then ``{"done": ...}``
or ``{"error": ...}``. It ignores SIGINT (the hydrate stops it) and exits when its input ends,
so a hydrate killed with -9 leaves none behind. A child that dies leaves its layer to the
thread that handed it over, which fetches it itself.

Standard library only (with the archive and store packages): workers import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, NamedTuple

from envmgr.archive.frames import workers
from envmgr.archive.manifest import Manifest
from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.cache.store import Store
from envmgr.errors import EnvmgrError
from envmgr.knobs import env_choice
from envmgr.progress import NullTask, Task
from envmgr.worker import assembly
from envmgr.worker.assembly import (
    HELPER_BATCH,
    Child,
    EnvMirror,
    Linker,
    LinkHelper,
    end_child,
)
from envmgr.worker.download import download

__all__ = ["LayerJob", "LayerProcess", "Placed", "process_mode", "wanted"]

#: Missing layers holding at least this many installed bytes start a child
#: (``ENVMGR_LAYER_PROCESS``: ``0`` never, ``1`` for any missing layer). Started as a new
#: interpreter, it costs 0.3 s of CPU (botocore's import and client), which a smaller
#: hydrate would wait for.
_PROCESS_BYTES = 256 << 20
#: The child says how far it has read once per this many bytes.
_REPORT = 4 << 20

_CHILD = (
    "import json, sys\n"
    "sys.path[:] = json.loads(sys.argv[1])\n"
    "from envmgr.worker.layer_process import serve\n"
    "serve()\n"
)


def process_mode() -> str:
    """``ENVMGR_LAYER_PROCESS``: ``0`` (never a child), ``1`` (for any missing layer) or
    ``auto`` (the default); raises ``SettingError`` for anything else."""
    return env_choice("ENVMGR_LAYER_PROCESS", ("0", "1", "auto"), "auto")


def wanted(missing: int, installed: int) -> bool:
    """Whether a hydrate with *missing* layers to fetch, which install *installed* bytes
    (0: not known), should start a child: never on one core, nor where
    ``ENVMGR_LAYER_PROCESS=0``."""
    setting = process_mode()
    if setting == "0" or workers() < 2 or not missing:
        return False
    return setting == "1" or installed >= _PROCESS_BYTES


class LayerJob(NamedTuple):
    """One layer for the child: *layer* from the store's *key* into the temp directory
    *into*, its copies and links placed in the env directory *dest*."""

    layer: Manifest
    key: str
    into: Path
    dest: Path
    what: str
    streams: int


class Placed(NamedTuple):
    """What the child did: whether its mirror heard of every file (see
    :func:`envmgr.archive.unpack.unpack`), the files still to link (names in the layer),
    and how many it linked and copied into the env."""

    mirrored: bool
    names: list[str]
    linked: int
    copied: int


def _reopen(store: Store) -> dict[str, Any] | None:
    """What opens *store* in another process, or ``None`` when it cannot be opened there
    the same (an S3 store given its own client)."""
    if isinstance(store, LocalStore):
        return {"local": str(store.root)}
    if isinstance(store, S3Store):
        return store.reopen_args()
    return None


def _open(args: dict[str, Any]) -> Store:
    if "local" in args:
        return LocalStore(Path(args["local"]))
    return S3Store(args["url"], endpoint_url=args.get("endpoint"), threads=args["threads"])


def _forkable() -> bool:
    """Whether this process may fork its layer process rather than start an interpreter:
    on Linux (elsewhere, system libraries may not survive a fork without an exec), with no
    other thread running (one could hold a lock, botocore's or the allocator's, that the
    child would then wait on forever). ``/proc`` counts threads that Python did not start."""
    if sys.platform != "linux":
        return False
    try:
        return sum(1 for _ in Path("/proc/self/task").iterdir()) == 1
    except OSError:
        return False


class _Forked:
    """A forked layer process, with what :class:`LayerProcess` and
    :func:`~envmgr.worker.assembly.end_child` use of a ``subprocess.Popen``."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"layer process {self.pid}", timeout or 0)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _fork(store: Store) -> _Forked:
    """Fork the layer process; the child serves *store* (its own S3 client, from this
    process's session) on two pipes and never returns. It closes the parent's ends, so its
    input ends when the parent does, and its output and errors go nowhere."""
    jobs_read, jobs_write = os.pipe()
    answers_read, answers_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(jobs_write)
            os.close(answers_read)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            forked = store.forked() if isinstance(store, S3Store) else store
            _serve(forked, os.fdopen(jobs_read, "rb"), os.fdopen(answers_write, "wb"))
        finally:
            os._exit(0)
    os.close(jobs_read)
    os.close(answers_write)
    return _Forked(pid, os.fdopen(jobs_write, "wb"), os.fdopen(answers_read, "rb"))


class LayerProcess:
    """The hydrate's side of one child (see the module's docstring). Threads share it; it
    takes one layer at a time."""

    def __init__(self, proc: Child) -> None:
        self.proc = proc
        self.gone = False
        self._free = threading.Lock()

    @classmethod
    def start(cls, store: Store) -> LayerProcess | None:
        """A child for *store*, or ``None`` when none can start: a store it cannot open, no
        interpreter to run it (this process may be embedded in a program that is no python,
        whose ``sys.executable`` is that program). Forked where :func:`_forkable`: a new
        interpreter spends 0.3 s of CPU on its imports and its S3 client before its first
        layer (a fork, 0.03 s), on a core the hydrate's other layers need."""
        args = _reopen(store)
        if args is None:
            return None
        try:
            if _forkable():
                return cls(_fork(store))
            if not Path(sys.executable or "-").name.startswith(("python", "pypy")):
                return None
            flags = ["-I", *(["-B"] if sys.flags.dont_write_bytecode else [])]
            child = cls(
                subprocess.Popen(
                    [sys.executable, *flags, "-c", _CHILD, json.dumps(sys.path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
            )
        except (OSError, ValueError):
            return None
        child._send({"store": args})
        return child

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError):  # it died, or kill() closed its pipe under us
            self.gone = True

    def fetch(self, job: LayerJob, task: Task | None) -> Placed | None:
        """*job* done by the child; ``None`` when it is busy with another or gone (then
        ``job.into`` is removed, for the caller to fetch the layer itself). Raises the
        error the child met, as its own type (``HashMismatchError``, ``ArchiveError``,
        ``StoreError``, ``OSError``, ...)."""
        if self.gone or not self._free.acquire(blocking=False):
            return None
        try:
            self._send(
                {
                    "layer": job.layer.to_dict(),
                    "key": job.key,
                    "into": str(job.into),
                    "dest": str(job.dest),
                    "what": job.what,
                    "streams": job.streams,
                    # Read here, where tests lower it, and passed on.
                    "helper_files": assembly.HELPER_FILES,
                }
            )
            answer = self._answer(task)
        finally:
            self._free.release()
        if answer is not None and "error" in answer and isinstance(answer["error"], dict):
            raise _rebuilt(answer["error"])
        try:
            done = answer["done"]  # type: ignore[index]
            names = done["names"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise TypeError(names)
            return Placed(bool(done["mirrored"]), names, int(done["linked"]), int(done["copied"]))
        except (TypeError, KeyError, ValueError):
            # Gone, or it spoke nonsense: what it left is removed, and the caller fetches
            # the layer itself.
            self.kill()
            shutil.rmtree(job.into, ignore_errors=True)
            return None

    def _answer(self, task: Task | None) -> dict[str, Any] | None:
        """The child's last word on the job; ``None`` if it ended (or spoke nonsense)
        first."""
        out: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        while not self.gone:
            try:
                line = out.readline()
                said = json.loads(line) if line else None
            except (OSError, ValueError):
                said = None
            if not isinstance(said, dict):
                return None
            if "read" in said:
                if not isinstance(said["read"], int):
                    return None
                if task is not None:
                    task.advance(said["read"])
                continue
            if "done" in said or "error" in said:
                return said
            return None
        return None

    def close(self) -> None:
        """End the child after its last job: its input ends, and it exits."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdout.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        """Stop it now (the hydrate failed or was interrupted, or the child misbehaved): a
        thread waiting for its answer hears its output end."""
        self.gone = True
        end_child(self.proc)


def _classes(root: type[BaseException]) -> dict[str, type[BaseException]]:
    found = {root.__name__: root}
    for sub in root.__subclasses__():
        found.update(_classes(sub))
    return found


def _rebuilt(error: dict[str, Any]) -> BaseException:
    """The child's error as the hydrate would have raised it."""
    kind = str(error.get("type", ""))
    if kind == "OSError":
        return OSError(error.get("errno") or 0, str(error.get("strerror")), error.get("filename"))
    cls = _classes(EnvmgrError).get(kind, EnvmgrError)
    made = cls.__new__(cls)
    EnvmgrError.__init__(made, str(error.get("message")), hint=error.get("hint"))  # type: ignore[arg-type]
    return made


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, EnvmgrError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    if isinstance(exc, OSError):
        return {
            "type": "OSError",
            "errno": exc.errno,
            "strerror": exc.strerror or str(exc),
            "filename": None if exc.filename is None else str(exc.filename),
        }
    return {"type": "EnvmgrError", "message": f"the layer process failed: {exc!r}"}


class _Reads(NullTask):
    """The child's progress: bytes read, said once per :data:`_REPORT`."""

    def __init__(self, say: Any) -> None:
        self.say = say
        self.pending = 0

    def advance(self, amount: int = 1) -> None:
        self.pending += amount
        if self.pending >= _REPORT:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.say({"read": self.pending})
            self.pending = 0


class _HelpedMirror(EnvMirror):
    """The child's mirror: the files to link go to a link helper of the child's own in
    batches as they are written, linked from the layer's temp directory (a link names the
    inode, which the layer's publish, a rename of that directory, keeps). Handed back to
    the hydrate to link once the layer is published, torch's 14,600 links came after its
    layer (0.2 s through a throttled link). Without a helper the names go back."""

    def __init__(
        self, root: str, linker: Linker, copy: frozenset[str], source: str, helped: bool
    ) -> None:
        super().__init__(root, linker, copy)
        self.source = source
        # A helper costs a process start: only for a layer of many files.
        self.helper = LinkHelper.start() if helped else None
        self._batch: list[str] = []
        self._guard = threading.Lock()

    def file(self, name: str, source: str, data: bytes | memoryview | None) -> None:
        if self.helper is None or name in self.copy:
            super().file(name, source, data)
            return
        self._parent(f"{self.root}/{name}")
        with self._guard:
            self._batch.append(name)
            if len(self._batch) >= HELPER_BATCH:
                self.helper.send(self.source, self.root, self._batch)
                self._batch = []

    def finish(self) -> None:
        """Wait for the helper; link here what it could not."""
        if self.helper is None:
            return
        if self._batch:
            self.helper.send(self.source, self.root, self._batch)
        made, left = self.helper.finish()
        self.linker.count(made, 0)
        for source, target in left:
            self.linker.place(source, target, False)

    def kill(self) -> None:
        if self.helper is not None:
            self.helper.kill()


def _run(store: Store, job: dict[str, Any], say: Any) -> None:
    reads = _Reads(say)
    mirror: _HelpedMirror | None = None
    try:
        layer = Manifest.from_dict(job["layer"], where=job["what"])
        linker = Linker(link=True)
        copy = frozenset(r.path for r in layer.relocations)
        helped = layer.files >= int(job["helper_files"])
        mirror = _HelpedMirror(job["dest"], linker, copy, job["into"], helped)
        mirrored = download(
            store,
            job["key"],
            layer,
            Path(job["into"]),
            reads,
            job["what"],
            streams=int(job["streams"]),
            read_only=True,
            mirror=mirror,
        )
        mirror.finish()
        reads.flush()
        done = {"mirrored": mirrored, "names": mirror.names}
        say({"done": {**done, "linked": linker.linked, "copied": linker.copied}})
    except BaseException as exc:  # every failure goes to the hydrate, as it was
        if mirror is not None:
            with contextlib.suppress(Exception):
                mirror.kill()
        say({"error": _error(exc)})


def serve() -> None:
    """The main of a child started as a new interpreter: the store on its first line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        store = _open(json.loads(sys.stdin.buffer.readline())["store"])
        _serve(store, sys.stdin.buffer, sys.stdout.buffer)
    os._exit(0)


def _serve(store: Store, jobs: IO[bytes], answers: IO[bytes]) -> None:
    """The child's main loop (see the module's docstring): ends the process when its input
    ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = threading.Lock()

    def say(message: dict[str, Any]) -> None:
        with lock:
            answers.write(json.dumps(message).encode() + b"\n")
            answers.flush()

    # A job runs on a thread while this one waits for the next line: the hydrate sends it
    # only after this job's answer, so until then the input can only end, which says the
    # hydrate is gone.
    with contextlib.suppress(OSError, ValueError):
        while line := jobs.readline():
            worker = threading.Thread(target=_run, args=(store, json.loads(line), say))
            worker.daemon = True
            worker.start()
    os._exit(0)
