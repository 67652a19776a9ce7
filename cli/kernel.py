"""``envmgr kernel``: a step's env (or any env) as a Jupyter kernel (see :mod:`envmgr.kernels`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from envmgr.cli._common import STATE, emit_json, fail
from envmgr.cli._inputs import ChannelOpt, ExtraIndexOpt, IndexOpt, JsonOpt, StoreOpt
from envmgr.cli._targets import FlowOptions
from envmgr.config import load
from envmgr.errors import EnvmgrError
from envmgr.kernels import (
    Kernel,
    default_kernel_name,
    has_ipykernel,
    install_kernel,
    is_kernel_name,
    kernels_dir,
    list_kernels,
    remove_kernel,
)

__all__ = ["kernel_command"]


def _emit(action: str, where: Path, kernels: list[Kernel]) -> None:
    emit_json(
        {"action": action, "kernels_dir": str(where), "kernels": [k.to_dict() for k in kernels]}
    )


def kernel_command(
    target: Annotated[
        str | None,
        typer.Argument(
            help="FLOW.py:step, an env id (or its first 8+ digits), an env name[:tag] or a "
            "lock file; not with --list."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="The kernel's name (default: from TARGET)."),
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Take the kernel away.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="Show envmgr's kernels.")] = False,
    store: StoreOpt = None,
    channel: ChannelOpt = [],
    index_url: IndexOpt = None,
    extra_index_url: ExtraIndexOpt = [],
    as_json: JsonOpt = False,
) -> None:
    """Install a Jupyter kernel that runs TARGET's env (hydrated here; ipykernel must be in
    the env), so a notebook explores with exactly a step's packages."""
    where = kernels_dir()
    if list_:
        if target is not None or remove:
            fail("--list takes no TARGET and no --remove")
        kernels = list_kernels(where)
        if as_json:
            _emit("listed", where, kernels)
        elif not STATE.quiet:
            for kernel in kernels:
                typer.echo(f"{kernel.name:<32} env {kernel.env_id[:12]}  {kernel.target}")
        return
    if name is not None and not is_kernel_name(name.lower()):
        fail(f"--name {name!r}: use up to 64 ASCII letters, digits, '-', '.' and '_'")
    if target is None and (name is None or not remove):
        fail("give a TARGET (e.g. flow.py:train), or --list")
    kernel_name = name.lower() if name is not None else default_kernel_name(str(target))
    if remove:
        removed = remove_kernel(where, kernel_name)
        if as_json:
            _emit("removed", where, [removed])
        elif not STATE.quiet:
            typer.echo(f"removed kernel {removed.name}")
        return
    from envmgr.cli.envs import hydrate_for  # noqa: PLC0415 - hydrating imports much

    options = FlowOptions(
        store=store,
        channel=tuple(channel),
        index_url=index_url,
        extra_index_url=tuple(extra_index_url),
    )
    prefix = hydrate_for(str(target), options)
    if not has_ipykernel(prefix):
        raise EnvmgrError(
            f"{target}: env {prefix.name[:12]} has no ipykernel, which a Jupyter kernel runs",
            hint='add it to the spec (e.g. @pypi(packages={"ipykernel": ""}) on the step, '
            "or --pypi ipykernel) and run `envmgr kernel` again",
        )
    config = load(flags={"store": store})
    kernel = install_kernel(
        where,
        kernel_name,
        env_id=prefix.name,
        target=str(target),
        store=str(config["store"]),
        cache_dir=Path(config["cache_dir"]),
    )
    if as_json:
        _emit("installed", where, [kernel])
    elif not STATE.quiet:
        typer.echo(f"kernel {kernel.name} (env {kernel.env_id[:12]}) installed in {kernel.path}")
