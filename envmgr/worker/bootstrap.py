"""``python -m envmgr.bootstrap``: hydrate a step's env on a worker and print (or run) it.

``--env-id ID``, ``--env-for PLATFORM=ID`` (repeatable: the worker takes its own platform's)
or ``--name NAME[:TAG]`` (a named env, looked up in the store) chooses the env; it is
hydrated (see :mod:`envmgr.worker.hydrate`) and its python's path printed, or with ``--json``
the prefix, the python and whether this call downloaded the archive, or with ``--shell`` an
``export`` line for ``eval``; ``--exec CMD...`` then runs CMD in the env holding its use lock.

:func:`main` is four steps: :func:`parse` the arguments, :func:`choose_env`,
:func:`hydrate_env`, :func:`report`. A warm call (the env is already here) imports nothing
beyond this module, :mod:`envmgr.worker.env_cache` and the id parsers. Exit codes: 0 ok, 1 the
env could not be hydrated (one line on stderr says why), 2 bad arguments, 127 ``--exec`` could
not start its command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from envmgr.errors import EnvmgrError
from envmgr.ids import BadIdError, EnvId, parse_env_id, parse_platform
from envmgr.platforms import host_platform
from envmgr.worker.env_cache import COMPLETE, env_dir, exec_in_env, open_use_lock, touch

if TYPE_CHECKING:
    from envmgr.cache.store import Store
    from envmgr.worker.hydrate import BuildMissing

__all__ = ["Chosen", "UsageError", "choose_env", "hydrate_env", "main", "parse", "report"]

#: Makes the :data:`~envmgr.worker.hydrate.BuildMissing` callback for ``--build-if-missing``
#: from the store and the env cache; given by the entry point of a full install.
BuilderFactory = Callable[["Store", Path], "BuildMissing"]


class UsageError(EnvmgrError):
    """The arguments cannot work, found only once the env cache was looked at."""

    exit_code = 2


class Chosen(NamedTuple):
    env_id: EnvId
    platform: str | None  # None: this host's


def _parser() -> argparse.ArgumentParser:
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
        "--copy",
        action="store_true",
        help="copy the env's files out of the host's layer cache instead of hard-linking "
        "them (for a task that writes into its env as root; default ENVMGR_LINK=copy)",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="hydrate an env that needs CUDA on a node without a fitting NVIDIA driver (it "
        "runs on the CPU, or fails in the framework); default ENVMGR_ALLOW_CPU",
    )
    parser.add_argument(
        "--build-if-missing",
        action="store_true",
        help="build the env here when the store has its lock but no archive (needs a full "
        "envmgr install; workers normally only hydrate)",
    )
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments (argparse exits 2 with its usage for what it cannot parse), then checked
    for what needs no store: ``UsageError`` (one line, exit 2) for a ``--name`` that is no
    name (``''``), a ``--name`` without a store, or ``--exec`` without a command."""
    args = _parser().parse_args(argv)
    if args.name is not None:
        from envmgr.cache.names import parse_name  # noqa: PLC0415 - only --name reads names

        try:
            parse_name(args.name)
        except EnvmgrError as exc:
            raise UsageError(exc.message, hint=exc.hint) from None
    if args.name is not None and not args.store:
        raise UsageError("--name needs a store: pass --store or set ENVMGR_STORE")
    if args.exec_command is not None and not args.exec_command:
        raise UsageError("--exec needs a command, e.g. --exec python -c 'import pandas'")
    args.cache_dir = _cache_dir(args.cache_dir)
    return args


def _cache_dir(explicit: str | None) -> Path:
    """Absolute: the printed python must work from any directory."""
    if explicit:
        return Path(explicit).absolute()
    if os.environ.get("ENVMGR_CACHE_DIR"):
        return Path(os.environ["ENVMGR_CACHE_DIR"]).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(xdg) / "envmgr").absolute()


def choose_env(args: argparse.Namespace) -> Chosen:
    """The env the arguments name, every id parsed before any path is formed. Raises
    ``BadIdError`` (exit 2) for a malformed id, platform or pair, ``EnvmgrError`` (exit 1)
    when the worker's platform has no env or the name is not in the store."""
    platform = parse_platform(args.platform, where="--platform") if args.platform else None
    if args.env_id is not None:
        return Chosen(parse_env_id(args.env_id, where="--env-id"), platform)
    if args.env_for is not None:
        return _env_for_platform(args.env_for, platform)
    return Chosen(_env_of_name(args.name, args.store, platform), platform)


def _env_of_name(name: str, store_url: str, platform: str | None) -> EnvId:
    """The env id a named env points at for *platform* (default: this host's)."""
    # Here and in hydrate_env: a warm start (one stat) imports nothing of the store.
    from envmgr.cache import open_store  # noqa: PLC0415
    from envmgr.cache.names import lookup  # noqa: PLC0415

    alias = lookup(open_store(store_url), name)
    platform = platform or host_platform()
    if platform not in alias.envs:
        raise EnvmgrError(
            f"{alias.ref} has no {platform} env (it has {', '.join(alias.envs) or 'none'})"
        )
    return parse_env_id(alias.envs[platform], where=f"{alias.ref}")


def _env_for_platform(pairs: list[str], platform: str | None) -> Chosen:
    """The env id for *platform* (default: this worker's) out of ``PLATFORM=ENV_ID`` pairs."""
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
    return Chosen(envs[platform], platform)


def hydrate_env(
    args: argparse.Namespace, chosen: Chosen, builder: BuilderFactory | None = None
) -> tuple[Path, bool, dict[str, int]]:
    """(prefix, downloaded, layers): the env from this host's env cache, else from the store;
    for a format-3 env *layers* counts the layers fetched and the files linked and copied. A
    warm env costs one ``stat`` and imports nothing more. Raises ``EnvmgrError``."""
    final = env_dir(args.cache_dir, chosen.env_id)
    if (final / COMPLETE).is_file():
        touch(final)
        return final, False, {}
    if not args.store:
        raise UsageError(
            f"env {chosen.env_id} is not in the env cache {args.cache_dir}, and no store "
            "was given: pass --store or set ENVMGR_STORE"
        )
    from envmgr.cache import open_store  # noqa: PLC0415
    from envmgr.worker.hydrate import hydrate  # noqa: PLC0415

    store = open_store(args.store)
    build = None
    if builder is not None and args.build_if_missing:
        build = builder(store, args.cache_dir)
    result = hydrate(
        chosen.env_id,
        store,
        args.cache_dir,
        platform=chosen.platform,
        build_missing=build,
        link=False if args.copy else None,
        check_gpu=not args.allow_cpu,
    )
    layers = {}
    if result.layers_fetched or result.linked or result.copied:
        layers = {
            "fetched": result.layers_fetched,
            "linked": result.linked,
            "copied": result.copied,
        }
    return result.prefix, result.downloaded, layers


def report(
    args: argparse.Namespace,
    env_id: str,
    prefix: Path,
    downloaded: bool,
    layers: dict[str, int] | None = None,
) -> None:
    """Print what the caller asked for: the python, a JSON object or an ``export`` line."""
    python = prefix / "bin" / "python"
    if args.shell:
        import shlex  # noqa: PLC0415 - only --shell quotes

        print(
            f"export ENVMGR_PREFIX={shlex.quote(str(prefix))} "
            f"ENVMGR_PYTHON={shlex.quote(str(python))} ENVMGR_ENV_ID={env_id}"
        )
    elif args.json:
        record: dict[str, object] = {"env_id": env_id, "prefix": str(prefix), "python": str(python)}
        if layers:
            record["layers"] = layers
        print(json.dumps({**record, "downloaded": downloaded}))
    else:
        print(python)


def _error(message: str) -> None:
    print(f"envmgr: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None, *, builder: BuilderFactory | None = None) -> int:
    """The bootstrap; *builder* makes ``--build-if-missing`` work (``envmgr.bootstrap``
    passes one that says in one line when this host has only the worker's files)."""
    try:
        args = parse(argv)
        chosen = choose_env(args)
    except EnvmgrError as exc:  # BadIdError: exit 2
        _error(str(exc))
        return exc.exit_code
    use_fd = -1
    if args.exec_command:
        try:
            use_fd = open_use_lock(args.cache_dir, chosen.env_id)  # before hydrating: gc waits
        except OSError as exc:
            _error(
                f"cannot write the env cache {args.cache_dir}: {exc.strerror} "
                "(point ENVMGR_CACHE_DIR (or --cache-dir) at a writable directory)"
            )
            return 1
    try:
        prefix, downloaded, layers = hydrate_env(args, chosen, builder)
    except EnvmgrError as exc:
        _error(str(exc))
        return exc.exit_code
    if args.exec_command:
        try:
            exec_in_env(prefix, args.exec_command, use_fd)
        except OSError as exc:
            _error(f"cannot run {args.exec_command[0]!r} in env {chosen.env_id}: {exc.strerror}")
            return 127
    report(args, chosen.env_id, prefix, downloaded, layers)
    return 0
