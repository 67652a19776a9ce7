"""The worker entry point: ``python -m envmgr.bootstrap --store URL --env-id ID`` (or
``--name NAME[:TAG]``, a named env, looked up in the store).

Hydrates the env (see :mod:`envmgr.hydrate`) and prints its python's path, or with
``--json`` the prefix, the python and whether this call downloaded the archive. It imports only
the standard library, boto3 (for ``s3://`` stores, on a cold call) and zstandard (else the
``zstd`` program is used): no resolver, no conda-lock, no typer. Exit codes: 0 ok, 1 the env
could not be hydrated (one line on stderr says why), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["WORKER_MODULES", "main", "worker_sources"]

#: What this entry point imports on a worker (the Metaflow code package ships exactly these).
WORKER_MODULES = (
    "envmgr/__init__.py",
    "envmgr/errors.py",
    "envmgr/ids.py",
    "envmgr/bootstrap.py",
    "envmgr/hydrate.py",
    "envmgr/local_envs.py",
    "envmgr/archive.py",
    "envmgr/chunked.py",
    "envmgr/platforms.py",
    "envmgr/config.py",
    "envmgr/progress.py",
    "envmgr/cache/__init__.py",
    "envmgr/cache/store.py",
    "envmgr/cache/layout.py",
    "envmgr/cache/local.py",
    "envmgr/cache/s3.py",
    "envmgr/cache/usage.py",
)


def worker_sources() -> list[tuple[Path, str]]:
    """(file, archive name) of each of :data:`WORKER_MODULES` in this installation."""
    root = Path(__file__).resolve().parent
    out = []
    for arcname in WORKER_MODULES:
        relative = arcname.split("/", 1)[1]
        source = root / relative
        if not source.is_file() and relative.startswith("cache/"):
            source = root.parent / relative  # a checkout keeps cache/ beside envmgr/
        out.append((source, arcname))
    return out


def _cache_dir(explicit: str | None) -> Path:
    """Absolute: the printed python must work from any directory."""
    if explicit:
        return Path(explicit).absolute()
    if os.environ.get("ENVMGR_CACHE_DIR"):
        return Path(os.environ["ENVMGR_CACHE_DIR"]).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(xdg) / "envmgr").absolute()


def _env_of_name(name: str, store_url: str, platform: str | None) -> str:
    """The env id a named env points at for *platform* (default: this host's)."""
    from envmgr.cache import open_store  # noqa: PLC0415
    from envmgr.errors import EnvmgrError  # noqa: PLC0415
    from envmgr.names import lookup  # noqa: PLC0415
    from envmgr.platforms import host_platform  # noqa: PLC0415

    alias = lookup(open_store(store_url), name)
    platform = platform or host_platform()
    if platform not in alias.envs:
        raise EnvmgrError(
            f"{alias.ref} has no {platform} env (it has {', '.join(alias.envs) or 'none'})"
        )
    return alias.envs[platform]  # parsed as an env id when the entry was read


def _env_for_platform(pairs: list[str], platform: str | None) -> tuple[str, str]:
    """The env id for *platform* (default: this worker's) out of ``PLATFORM=ENV_ID`` pairs;
    raises ``BadIdError`` for a malformed pair (exit 2), ``EnvmgrError`` when the worker's
    platform has no env (exit 1)."""
    from envmgr.errors import EnvmgrError  # noqa: PLC0415
    from envmgr.ids import BadIdError, parse_env_id, parse_platform  # noqa: PLC0415
    from envmgr.platforms import host_platform  # noqa: PLC0415

    envs = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise BadIdError(f"--env-for {pair!r}: give PLATFORM=ENV_ID")
        envs[parse_platform(name, where="--env-for")] = parse_env_id(value, where="--env-for")
    platform = platform or host_platform()
    if platform not in envs:
        raise EnvmgrError(
            f"this worker is {platform}, and the step has envs for {', '.join(envs)} only",
            hint=f"add {platform} to the step's platforms (envmgr config remote_platform, "
            "ENVMGR_REMOTE_PLATFORM or @conda(platforms=[...])) and run again",
        )
    return envs[platform], platform


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m envmgr.bootstrap", description="Hydrate an env and print its python."
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--env-id", help="the env to hydrate")
    which.add_argument("--name", help="a named env (name[:tag]) in the store")
    which.add_argument(
        "--env-for",
        action="append",
        metavar="PLATFORM=ENV_ID",
        help="one env per platform (repeatable): this worker hydrates its own platform's",
    )
    parser.add_argument(
        "--store", default=os.environ.get("ENVMGR_STORE"), help="store URL (default ENVMGR_STORE)"
    )
    parser.add_argument("--cache-dir", default=None, help="default ENVMGR_CACHE_DIR")
    parser.add_argument("--platform", default=None, help="default: this host's")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON object")
    output.add_argument(
        "--shell",
        action="store_true",
        help="print `export ENVMGR_PREFIX=... ENVMGR_PYTHON=... ENVMGR_ENV_ID=...` for eval",
    )
    parser.add_argument(
        "--exec",
        dest="exec_command",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="then run CMD inside the env, holding its use lock for as long as CMD runs (so "
        "`envmgr gc` never removes it); must come last",
    )
    parser.add_argument(
        "--build-if-missing",
        action="store_true",
        help="build the env here when the store has its lock but no archive (needs a full "
        "envmgr install; workers normally only hydrate)",
    )
    args = parser.parse_args(argv)
    from envmgr.errors import EnvmgrError  # noqa: PLC0415
    from envmgr.ids import parse_env_id, parse_platform  # noqa: PLC0415

    try:  # before any path is formed: a bad id touches nothing
        if args.platform is not None:
            args.platform = parse_platform(args.platform, where="--platform")
        if args.env_id is not None:
            env_id: str = parse_env_id(args.env_id, where="--env-id")
        if args.env_for is not None:
            env_id, args.platform = _env_for_platform(args.env_for, args.platform)
    except EnvmgrError as exc:  # BadIdError: exit 2
        print(f"envmgr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    cache_dir = _cache_dir(args.cache_dir)
    if args.name is not None:
        if not args.store:
            parser.error("--store or ENVMGR_STORE is required with --name")
        try:
            env_id = _env_of_name(args.name, args.store, args.platform)
        except Exception as exc:  # EnvmgrError; imported lazily to keep the warm path short
            print(f"envmgr: error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 1)

    from envmgr.hydrate import COMPLETE, env_dir, touch  # noqa: PLC0415

    final = env_dir(cache_dir, env_id)
    if args.exec_command is not None:
        if not args.exec_command:
            parser.error("--exec needs a command")
        from envmgr.local_envs import open_use_lock  # noqa: PLC0415

        try:
            use_fd = open_use_lock(cache_dir, env_id)  # before hydrating: gc waits for us
        except OSError as exc:
            print(
                f"envmgr: error: cannot write the env cache {cache_dir}: {exc.strerror} "
                "(point ENVMGR_CACHE_DIR (or --cache-dir) at a writable directory)",
                file=sys.stderr,
            )
            return 1
    if (final / COMPLETE).is_file():  # warm: nothing else to import
        touch(final)
        downloaded = False
    else:
        if not args.store:
            parser.error("--store or ENVMGR_STORE is required when the env is not cached")
        from envmgr.cache import open_store  # noqa: PLC0415
        from envmgr.hydrate import hydrate  # noqa: PLC0415

        try:
            result = hydrate(
                env_id,
                open_store(args.store),
                cache_dir,
                platform=args.platform,
                build_if_missing=args.build_if_missing,
            )
        except EnvmgrError as exc:
            print(f"envmgr: error: {exc}", file=sys.stderr)
            return exc.exit_code
        downloaded = result.downloaded
    python = final / "bin" / "python"
    if args.exec_command:
        from envmgr.local_envs import exec_in_env  # noqa: PLC0415

        try:
            exec_in_env(final, args.exec_command, use_fd)
        except OSError as exc:
            print(
                f"envmgr: error: cannot run {args.exec_command[0]!r} in env {env_id}: "
                f"{exc.strerror}",
                file=sys.stderr,
            )
            return 127
    if args.shell:
        import shlex  # noqa: PLC0415

        print(
            f"export ENVMGR_PREFIX={shlex.quote(str(final))} "
            f"ENVMGR_PYTHON={shlex.quote(str(python))} ENVMGR_ENV_ID={env_id}"
        )
        return 0
    if args.json:
        print(
            json.dumps(
                {
                    "env_id": env_id,
                    "prefix": str(final),
                    "python": str(python),
                    "downloaded": downloaded,
                }
            )
        )
    else:
        print(python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
