"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from envmgr.archive.manifest import Chunk, Manifest
from envmgr.cache.local import LocalStore
from envmgr.resolve.resolution_cache import ResolveOptions

ROOT = Path(__file__).resolve().parent.parent


def run_envmgr(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The ``envmgr`` command as users run it, in a child process."""
    return subprocess.run(
        [sys.executable, "-c", "from envmgr.cli.app import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=dict(env) if env is not None else dict(os.environ),
        check=False,
    )


def envmgr_here(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The ``envmgr`` command run in this process, for checks of what it prints and exits
    with where no process boundary is under test (a child interpreter costs ~0.7 s of CPU).
    *env* replaces the environment for the call; everything is restored afterwards."""
    import contextlib
    import io

    from envmgr.cli._common import STATE
    from envmgr.cli.app import _run_app

    def no_exec(*_args: object) -> None:  # `envmgr run` would replace the test process
        raise AssertionError("envmgr_here cannot run a command in an env: use run_envmgr")

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, Path.cwd()
    saved_exec, os.execvpe = os.execvpe, no_exec
    code: int | str | None = 0
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd or ROOT)
        sys.argv = ["envmgr", *args]
        STATE.verbose, STATE.quiet = 0, False
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                _run_app()
            except SystemExit as exc:
                code = exc.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.execvpe = saved_exec
        STATE.verbose, STATE.quiet = 0, False
    if isinstance(code, str):
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(list(args), code or 0, out.getvalue(), err.getvalue())


def on_a_terminal(*args: str, env: Mapping[str, str], cwd: Path | None = None) -> tuple[int, str]:
    """The ``envmgr`` command with stdin, stdout and stderr on a pseudo-terminal: its exit
    code and everything the terminal showed."""
    import pty
    import select
    import time

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", "from envmgr.cli.app import main; main()", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=cwd or Path.cwd(),
        env={**env, "TERM": "xterm-256color", "COLUMNS": "120"},
    )
    os.close(follower)
    shown = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown.append(chunk)
    os.close(leader)
    return process.wait(timeout=60), b"".join(shown).decode(errors="replace")


def fixture_options(
    home: Path, channel_url: str, index_url: str | None = None, **overrides: Any
) -> ResolveOptions:
    """Resolve options for the fixture channel (and index): store and cache under *home*,
    linux-64, no host environment; *overrides* replace any field."""
    fields: dict[str, Any] = {
        "store": LocalStore(home / "store"),
        "cache_dir": home / "cache",
        "platforms": ("linux-64",),
        "default_channels": (channel_url,),
        "env": {},
    }
    if index_url is not None:
        fields["index_url"] = index_url
    return ResolveOptions(**{**fields, **overrides})


def archive_manifest(
    packed: bytes,
    codec: Literal["zst", "gz"] = "zst",
    files: int = 1,
    unpacked_size: int = 10_000,
    chunks: tuple[Chunk, ...] = (),
) -> Manifest:
    """A manifest for a hand-made archive *packed*, for feeding the extractor directly
    (format 1's hash is not checked there; format 2's *chunks* are)."""
    return Manifest(
        chunks=chunks,
        env_id="e" * 32,
        platform="linux-64",
        build_prefix="/b" * 80,
        codec=codec,
        size=len(packed),
        sha256="0" * 64,
        files=files,
        unpacked_size=unpacked_size,
        relocations=(),
    )


def framed(
    raw: bytes, cuts: list[int], conts: list[bool] | None = None
) -> tuple[bytes, tuple[Chunk, ...]]:
    """*raw* (tar bytes) as format-2 frames cut at the offsets *cuts*, the frame after each
    cut flagged as a continuation or not by *conts* (default: not); returns the archive and
    its index, true to the bytes (hostile tests then make the index lie)."""
    import hashlib

    import zstandard

    bounds = [0, *sorted({c for c in cuts if 0 < c < len(raw)}), len(raw)]
    flags = [False, *(conts or [False] * len(bounds))]
    out = b""
    chunks = []
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        frame = zstandard.ZstdCompressor().compress(raw[start:end])
        chunks.append(
            Chunk(
                offset=len(out),
                size=len(frame),
                raw=end - start,
                sha256=hashlib.sha256(frame).hexdigest(),
                cont=number > 0 and flags[number],
            )
        )
        out += frame
    return out, tuple(chunks)


def s3_env(server: Any) -> dict[str, str]:
    """The AWS variables that point boto3 at the test world's SeaweedFS."""
    return {
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def bare_worker(root: Path, aws: Mapping[str, str]) -> tuple[Path, dict[str, str]]:
    """A remote worker's image and environment under *root*: a python that has boto3 and
    zstandard but not envmgr, an empty HOME, no channel and no index (closed ports); only S3
    answers. Returns (its python, its environment)."""
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "image")], check=True)
    image_site = next((root / "image" / "lib").glob("python3*/site-packages"))
    # The test venv's packages without its .pth files, so envmgr's editable install is absent.
    (image_site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (root / "home").mkdir(exist_ok=True)
    env = {
        "PATH": f"{root / 'image' / 'bin'}:/usr/bin:/bin",
        "HOME": str(root / "home"),
        **aws,
        "ENVMGR_CHANNELS": "http://127.0.0.1:9/",
        "PIP_INDEX_URL": "http://127.0.0.1:9/",
    }
    python = root / "image" / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import envmgr"], cwd=root, capture_output=True)
    assert probe.returncode != 0, "the worker image must not have envmgr"
    return python, env


def ship_bootstrap(sandbox: Path) -> None:
    """Copy what the Metaflow code package ships for the bootstrap into *sandbox*."""
    import shutil

    from envmgr.worker.shipped import worker_sources

    for source, arcname in worker_sources():
        (sandbox / arcname).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, sandbox / arcname)


def run_bootstrap(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    python: Path | str = sys.executable,
) -> subprocess.CompletedProcess[str]:
    """``python -m envmgr.bootstrap ARGS`` as a worker runs it, in a child process."""
    return subprocess.run(
        [str(python), "-m", "envmgr.bootstrap", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        check=False,
    )


def process_ends(pid: int, within: float) -> bool:
    """Whether process *pid* (a grandchild of the test: a hydrate's helper) ends within
    *within* seconds; one that does not is killed."""
    import contextlib
    import signal
    import time

    deadline = time.monotonic() + within
    stat_file = Path(f"/proc/{pid}/stat")
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if stat_file.read_text().rpartition(")")[2].split()[0] != "Z":
                time.sleep(0.05)
                continue
        return True  # gone, or a zombie nobody reaped: it ended
    os.kill(pid, signal.SIGKILL)  # the test's own grandchild
    return False


def outlives_its_parent(code: str, *, settle: float = 0.0) -> bool:
    """Whether the process that ``python -c code`` starts (the code prints its pid, then
    sleeps) outlives that python killed with -9 by 10 s (*settle*: seconds to wait before
    the kill)."""
    import time

    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        time.sleep(settle)
        parent.kill()
        parent.wait()
        return not process_ends(child, 10)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]
