"""The worker entry point: ``python -m envmgr.bootstrap --store URL --env-id ID`` (or
``--env-for PLATFORM=ID``, or ``--name NAME[:TAG]``); see :mod:`envmgr.worker.bootstrap`.

It imports only the standard library, boto3 (for ``s3://`` stores, on a cold call) and
zstandard (else the ``zstd`` program is used): no resolver, no conda-lock, no typer. The files
it needs are :func:`~envmgr.worker.shipped.worker_sources`, computed from its imports. Only
``--build-if-missing`` reaches further, to the builder of a full install, and says in one line
when this host has only the worker's files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from envmgr.worker.bootstrap import main as _main

if TYPE_CHECKING:
    from envmgr.archive.manifest import Manifest
    from envmgr.cache.store import Store
    from envmgr.ids import EnvId
    from envmgr.progress import Progress
    from envmgr.worker.hydrate import BuildMissing

__all__ = ["main"]


def _full_install_builder(store: Store, cache_dir: Path) -> BuildMissing:
    """``--build-if-missing``: build with the builder of a full install, imported only when
    an env must be built."""

    def build(platform: str, env_id: EnvId, progress: Progress | None) -> Manifest:
        try:
            from envmgr.build.once import BuildOptions, build_missing  # noqa: PLC0415
        except ImportError as exc:  # a worker with only the shipped files
            from envmgr.worker.hydrate import HydrateError  # noqa: PLC0415 - loaded already

            raise HydrateError(
                f"env {env_id} has no archive for {platform} in {store.url}, and this worker "
                f"cannot build it ({exc.name} is not installed); build it anywhere with: envmgr "
                f"build --env {env_id} --platform {platform} --store {store.url}"
            ) from None
        return build_missing(BuildOptions(store=store, cache_dir=cache_dir))(
            platform, env_id, progress
        )

    return build


def main(argv: list[str] | None = None) -> int:
    """``python -m envmgr.bootstrap ARGS``; returns the exit code."""
    return _main(argv, builder=_full_install_builder)


def _leave(code: int) -> NoReturn:
    """Exit with *code* once stdout and stderr are out, without tearing the interpreter down:
    every task start waits for this process to end, and freeing botocore's modules took
    40 ms of it. Nothing is left to finish by then: every pool, lock and temp directory was
    closed by the ``with`` that opened it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a reader that went away: the exit code still says what happened
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    _leave(main())
