"""The env cache of this host: which envs are here, how big, when last used; removing old ones.

Envs live in ``<cache>/envs/<env_id>``; a running ``envmgr run`` holds a shared ``flock`` on
``<cache>/envs/.locks/<env_id>.use`` for as long as its command runs, and :func:`gc` never
removes an env whose use lock it cannot take exclusively.

Format-3 envs are made of links into the package layers under ``<cache>/layers/`` (see
:mod:`envmgr.worker.layers`) and name them in :data:`LAYERS`. An env's size counts only its
own files (those no layer shares); :func:`gc` removes a layer once no remaining env names it
and no hydrate is assembling from it (its shared ``.use`` lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from envmgr.fs import pid_alive, read_small, write_atomic
from envmgr.ids import check_under, is_env_id, parse_env_id

__all__ = [
    "COMPLETE",
    "LAYERS",
    "LocalEnv",
    "complete_marker",
    "drop_layers",
    "env_dir",
    "exec_in_env",
    "gc",
    "held_layers",
    "hold_for_use",
    "list_envs",
    "lock_path",
    "marker_cuda",
    "open_use_lock",
    "pack_dir_prefix",
    "parse_age",
    "parse_size",
    "record_steps",
    "recorded_steps",
    "sweep_dead_pack_dirs",
    "touch",
]

#: The marker file inside a published env; it holds the manifest's sha256, and for an env
#: that needs CUDA a second line ``cuda MINIMUM PACKAGE...`` (see :func:`complete_marker`).
COMPLETE = ".envmgr-complete"
#: The most read of a marker, a layer list or a step record of this host's cache (torch's
#: layer list is 1 kB): a file there can be replaced by anything, a FIFO included.
_MARKER_BYTES = 1 << 20
#: In a format-3 env: the layers it links to, one id per line.
LAYERS = ".envmgr-layers"


def env_dir(cache_dir: Path, env_id: str) -> Path:
    """``<cache>/envs/<env_id>``; raises ``BadIdError`` unless *env_id* is an env id."""
    return cache_dir / "envs" / parse_env_id(env_id, where="env id")


def lock_path(cache_dir: Path, env_id: str, kind: str = "hydrate") -> Path:
    """The ``flock`` file of *env_id*'s *kind* (``hydrate``: one publisher per host;
    ``use``: held shared by every process running in the env)."""
    return cache_dir / "envs" / ".locks" / f"{parse_env_id(env_id, where='env id')}.{kind}"


def complete_marker(sha256: str, cuda: tuple[str, ...] = ()) -> str:
    """The text of an env's :data:`COMPLETE` marker (*cuda*: the manifest's ``cuda``)."""
    return f"{sha256}\n" + (f"cuda {cuda[0]} {cuda[1]}\n" if cuda else "")


def marker_cuda(prefix: Path) -> tuple[str, ...]:
    """The ``cuda`` of the manifest the env at *prefix* was published from (``()``: a CPU
    env, or one published by an envmgr that did not record it)."""
    try:
        raw = read_small(prefix / COMPLETE, _MARKER_BYTES)
        lines = raw.decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ()
    for line in lines[1:3]:
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "cuda":
            return (parts[1], parts[2])
    return ()


def touch(prefix: Path) -> None:
    """Record a use of the env (``envmgr gc`` removes the least recently used first)."""
    with contextlib.suppress(OSError):
        os.utime(prefix / COMPLETE)


class LocalEnv(NamedTuple):
    """An env in this host's env cache. (A named tuple: this module is on the worker's warm
    start path, where ``dataclasses`` costs ~6 ms.)"""

    env_id: str
    prefix: Path
    size: int  #: its own bytes: files it shares with a layer count there
    last_used: float
    steps: tuple[str, ...]
    layers: tuple[str, ...] = ()  #: the layers it links to (format 3)


def _size(path: Path, *, own: bool = False) -> int:
    """Bytes of the files below *path*; with *own*, only files not linked from elsewhere."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                info = Path(dirpath, name).lstat()
                if not own or info.st_nlink == 1:
                    total += info.st_size
    return total


def _layers_of(prefix: Path) -> tuple[str, ...]:
    with contextlib.suppress(OSError):
        listed = read_small(prefix / LAYERS, _MARKER_BYTES).decode(errors="replace")
        return tuple(line for line in listed.split() if is_env_id(line))
    return ()


def _meta_path(cache_dir: Path, env_id: str) -> Path:
    return cache_dir / "envs" / ".meta" / f"{parse_env_id(env_id, where='env id')}.json"


def record_steps(cache_dir: Path, env_id: str, steps: Iterable[str]) -> None:
    """Remember which steps used an env (shown by ``envmgr ls``)."""
    path = _meta_path(cache_dir, env_id)
    known: list[str] = []
    with contextlib.suppress(OSError, ValueError):
        known = list(json.loads(read_small(path, _MARKER_BYTES)).get("steps", []))
    merged = sorted(set(known) | set(steps))
    write_atomic(path, json.dumps({"steps": merged}))


def recorded_steps(cache_dir: Path, env_id: str) -> tuple[str, ...]:
    """The steps :func:`record_steps` remembered for *env_id* on this machine."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return tuple(
            json.loads(read_small(_meta_path(cache_dir, env_id), _MARKER_BYTES)).get("steps", ())
        )
    return ()


def list_envs(cache_dir: Path) -> list[LocalEnv]:
    """Published envs, most recently used first."""
    root = cache_dir / "envs"
    found = []
    for prefix in root.iterdir() if root.is_dir() else ():
        marker = prefix / COMPLETE
        if not is_env_id(prefix.name) or not marker.is_file():
            continue
        steps = recorded_steps(cache_dir, prefix.name)
        found.append(
            LocalEnv(
                env_id=prefix.name,
                prefix=prefix,
                size=_size(prefix, own=True),
                last_used=marker.stat().st_mtime,
                steps=steps,
                layers=_layers_of(prefix),
            )
        )
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def open_use_lock(cache_dir: Path, env_id: str) -> int:
    """Take the env's shared use lock, which keeps :func:`gc` away for as long as the
    returned descriptor (or a copy inherited by an exec'd command) is open."""
    path = lock_path(cache_dir, env_id, "use")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


@contextlib.contextmanager
def hold_for_use(cache_dir: Path, env_id: str) -> Iterator[int]:
    """:func:`open_use_lock` for the block; yields the descriptor."""
    fd = open_use_lock(cache_dir, env_id)
    try:
        yield fd
    finally:
        os.close(fd)


#: Variables of the calling environment that would make a command leave its env.
_FOREIGN = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
            "PYTHONSTARTUP")  # fmt: skip


def exec_in_env(prefix: Path, command: list[str], use_fd: int) -> None:
    """Replace this process with *command* run inside the env at *prefix* (its ``bin`` first
    on ``PATH``, a bare program name found there first). *use_fd* (from :func:`hold_for_use`)
    is inherited, so ``gc`` leaves the env alone for as long as the command runs. Returns
    only by raising ``OSError`` when the command cannot be started."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env.update(
        {
            "PATH": f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "CONDA_PREFIX": str(prefix),
            "CONDA_DEFAULT_ENV": prefix.name,
            "PYTHONNOUSERSITE": "1",
            "ENVMGR_ENV_ID": prefix.name,
        }
    )
    program = command[0]
    if "/" not in program and (prefix / "bin" / program).exists():
        program = str(prefix / "bin" / program)
    os.set_inheritable(use_fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(program, [program, *command[1:]], env)  # noqa: S606


def _hostname() -> str:
    import socket  # noqa: PLC0415 - off the warm start path (one stat), which needs no host name

    return socket.gethostname()


def pack_dir_prefix() -> str:
    """The name prefix of a builder's temp pack dir under the env cache: host and pid, so the
    next build (or ``gc``) can tell the dirs of dead builders."""
    return f".pack-{_hostname()}-{os.getpid()}-"


def sweep_dead_pack_dirs(cache_dir: Path) -> list[Path]:
    """Remove the temp pack dirs that builders on this host left when they were killed."""
    removed = []
    host = _hostname()
    for path in cache_dir.glob(".pack-*") if cache_dir.is_dir() else ():
        owner, _, rest = path.name.removeprefix(".pack-").rpartition("-")[0].rpartition("-")
        if owner != host or not rest.isdigit():
            continue
        if pid_alive(int(rest)):
            continue
        shutil.rmtree(check_under(path, cache_dir), ignore_errors=True)
        removed.append(path)
    return removed


def parse_size(text: str) -> int:
    """``20G``, ``500M``, ``1.5T``, ``1024`` (bytes) → bytes; raises ``ValueError``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not match:
        raise ValueError(f"bad size {text!r}: use e.g. 500M or 20G")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(match.group(1)) * scale[match.group(2).upper()])


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` → seconds; raises ``ValueError``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text, re.I)
    if not match:
        raise ValueError(f"bad age {text!r}: use e.g. 7d, 12h or 30m")
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    return float(match.group(1)) * scale[match.group(2).lower()]


@contextlib.contextmanager
def _unused(use: Path) -> Iterator[bool]:
    """Whether nobody holds the use lock *use* (then it is held exclusively for the block,
    so nobody starts using it); never waits."""
    use.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(use, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _try_remove(cache_dir: Path, env: LocalEnv) -> bool:
    with _unused(lock_path(cache_dir, env.env_id, "use")) as free:
        if not free:
            return False  # a running `envmgr run` uses it
        # Unpublish first (atomic rename), then delete at leisure.
        doomed = env.prefix.with_name(f".tmp-{env.env_id}-gc-{os.getpid()}")
        env.prefix.rename(check_under(doomed, cache_dir / "envs"))
        shutil.rmtree(doomed, ignore_errors=True)
        return True


def gc(
    cache_dir: Path,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    dry_run: bool = False,
) -> tuple[list[LocalEnv], list[LocalEnv], list[tuple[str, int]]]:
    """Remove envs unused for *older_than* seconds, then least recently used ones until the
    total (envs' own files and the layers) is at most *max_size*, then the layers no
    remaining env links to, and the temp dirs of killed builders. Returns (envs removed,
    envs kept because in use, layers removed with their bytes); a dry run removes nothing
    and returns what it would remove (a layer a hydrate is assembling from is kept then)."""
    if not dry_run:
        sweep_dead_pack_dirs(cache_dir)
    envs = list_envs(cache_dir)
    layers = held_layers(cache_dir)
    users: dict[str, int] = {}
    for env in envs:
        for layer in env.layers:
            users[layer] = users.get(layer, 0) + 1
    now = time.time()
    removed: list[LocalEnv] = []
    busy: list[LocalEnv] = []
    total = sum(e.size for e in envs) + sum(layers.values())
    for env in sorted(envs, key=lambda e: e.last_used):
        too_old = older_than is not None and now - env.last_used > older_than
        too_big = max_size is not None and total > max_size
        if not (too_old or too_big):
            continue
        if dry_run or _try_remove(cache_dir, env):
            removed.append(env)
            total -= env.size
            for layer in env.layers:
                users[layer] -= 1
                if users[layer] == 0:
                    total -= layers.get(layer, 0)
        else:
            busy.append(env)
    if dry_run:
        return removed, busy, sorted((k, v) for k, v in layers.items() if not users.get(k))
    return removed, busy, gc_layers(cache_dir)


def held_layers(cache_dir: Path) -> dict[str, int]:
    """The bytes of each layer this host's cache holds, by layer id."""
    return {path.name: _size(path) for path in _layer_dirs(cache_dir)}


def _layer_dirs(cache_dir: Path) -> list[Path]:
    root = cache_dir / "layers"
    return [p for p in root.iterdir() if is_env_id(p.name)] if root.is_dir() else []


def layer_use_lock(cache_dir: Path, layer_id: str) -> Path:
    """The ``flock`` file a hydrate holds shared while it assembles from the layer."""
    return cache_dir / "layers" / ".locks" / f"{parse_env_id(layer_id, where='layer id')}.use"


def gc_layers(cache_dir: Path) -> list[tuple[str, int]]:
    """Remove the layers no published env links to and no hydrate is using; returns each
    removed layer's id and bytes."""
    wanted = {layer for env in list_envs(cache_dir) for layer in env.layers}
    removed = []
    for path in _layer_dirs(cache_dir):
        if path.name in wanted:
            continue
        with _unused(layer_use_lock(cache_dir, path.name)) as free:
            if not free:
                continue  # a hydrate is assembling an env from it
            if path.name in {layer for env in list_envs(cache_dir) for layer in env.layers}:
                continue  # published since we looked
            removed.append((path.name, _remove_layer(cache_dir, path)))
    return removed


def _remove_layer(cache_dir: Path, path: Path) -> int:
    """Unpublish the layer directory *path* (an atomic rename), delete it; returns its bytes.
    Envs linking its files keep them: a link outlives the name it was made from."""
    size = _size(path)
    doomed = path.with_name(f".tmp-{path.name}-gc-{os.getpid()}")
    path.rename(check_under(doomed, cache_dir / "layers"))
    shutil.rmtree(doomed, ignore_errors=True)  # read-only files, writable dirs
    return size


def drop_layers(
    cache_dir: Path, layer_ids: Iterable[str]
) -> tuple[list[LocalEnv], list[LocalEnv], list[str]]:
    """Remove the layers *layer_ids* and every env linking to one of them, so the next
    hydrate fetches them again; an env in use stays (its task goes on with the files it
    has), and so does a layer a hydrate is assembling from. Returns (envs removed, envs kept
    because in use, layers removed)."""
    doomed = set(layer_ids)
    removed: list[LocalEnv] = []
    busy: list[LocalEnv] = []
    for env in list_envs(cache_dir):
        if doomed.intersection(env.layers):
            (removed if _try_remove(cache_dir, env) else busy).append(env)
    layers = []
    for path in _layer_dirs(cache_dir):
        if path.name in doomed:
            with _unused(layer_use_lock(cache_dir, path.name)) as free:
                if free:
                    _remove_layer(cache_dir, path)
                    layers.append(path.name)
    return removed, busy, layers
