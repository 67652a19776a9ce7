"""Worker processes of a build: one per share of the work, run at once, none outliving it.

The bytecode writers (a python of the target's version) and the wheel installers (this
interpreter) are such workers. Each gets its share as a file, and dies with the builder: the
kernel kills it when the builder dies (``PR_SET_PDEATHSIG``), it exits at once if the builder
is already gone, and an interrupted builder kills the ones still running.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["GUARD", "run_shares"]

#: The first lines of every worker's script: argv[1] is the builder's pid, argv[2] its share.
GUARD = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(3)  # the builder is already gone
"""


def run_shares(
    command: Sequence[str], script: str, shares: Sequence[str], env: Mapping[str, str]
) -> list[tuple[int, str, str]]:
    """Run ``command -c GUARD+script PID SHARE_FILE`` once per text in *shares*, all at once;
    returns (exit code, stdout, stderr) of each, in order."""
    workers: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="envmgr-work-") as tmp:
        try:
            for number, share in enumerate(shares):
                listing = Path(tmp) / f"{number}.txt"
                listing.write_text(share, encoding="utf-8")
                workers.append(
                    subprocess.Popen(
                        [*command, "-c", GUARD + script, str(os.getpid()), str(listing)],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=dict(env),
                    )
                )
            outputs = [worker.communicate() for worker in workers]
        finally:
            for worker in workers:  # only alive when we are being interrupted
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
    return [
        (worker.returncode, out, err) for worker, (out, err) in zip(workers, outputs, strict=True)
    ]
