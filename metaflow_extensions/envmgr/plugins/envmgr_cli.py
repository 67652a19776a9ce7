"""``python flow.py --environment=conda environment resolve|build|show``: a flow's envs, run
by the flow itself.

Metaflow builds the real graph first (Configs, mutators, computed decorator arguments,
top-level ``--with``), so these commands see exactly the specs ``run`` uses: they ask the same
:meth:`CondaEnvironment.plan` and call the same ``envmgr resolve|build --specs-json`` child.
``--for argo-workflows|step-functions|airflow`` first attaches the compute decorator that deploy
puts on every step, so each step's env is made for the platform the deploy runs it on, and a
deploy afterwards finds them all in the store.
"""

from __future__ import annotations

import json
from typing import Any

from metaflow._vendor import click

from metaflow_extensions.envmgr.plugins.envmgr_steps import is_pathspec, own_kwargs

__all__ = ["cli"]

#: The deploy commands ``--for`` knows (:data:`envmgr.specs.flows.DEPLOY_DECORATORS` says
#: which decorator each attaches; this module is loaded on workers, which lack that module).
DEPLOYS = ("airflow", "argo-workflows", "step-functions")


@click.group()
def cli() -> None:
    pass


@cli.group(help="Resolve, build or show the envs of this flow's steps (envmgr).")
@click.option(
    "--for",
    "deploy",
    type=click.Choice(DEPLOYS),
    default=None,
    help="Make each step's env for the platform this deploy runs it on (its compute "
    "decorator on every step), so the deploy finds them built.",
)
@click.option(
    "--with",
    "decospecs",
    multiple=True,
    help="Add a decorator to every step, as `run --with` does (e.g. conda:python=3.11).",
)
@click.pass_obj
def environment(obj: Any, deploy: str | None, decospecs: tuple[str, ...]) -> None:
    from metaflow import decorators
    from metaflow.exception import MetaflowException

    from metaflow_extensions.envmgr.plugins.envmgr_environment import CondaEnvironment

    if not isinstance(obj.environment, CondaEnvironment):
        raise MetaflowException(
            "envmgr: `environment` needs an envmgr environment: run "
            f"`python {obj.flow.script_name} --environment=conda environment ...` "
            "(or --environment=pypi)"
        )
    from envmgr.specs.flows import DEPLOY_DECORATORS

    added = [*decospecs, *([DEPLOY_DECORATORS[deploy]] if deploy else [])]
    if decospecs:
        # Metaflow has already given every step without @conda a bare one (the environment's
        # default decorator); `run --with` comes before that default, so it comes here too.
        defaults = {spec.split(":", 1)[0] for spec in obj.environment.decospecs()}
        names = {spec.split(":", 1)[0] for spec in decospecs} & defaults
        for step in obj.flow:
            step.decorators[:] = [
                deco
                for deco in step.decorators
                if deco.name not in names or deco.statically_defined or own_kwargs(deco)
            ]
    if added:
        decorators._attach_decorators(obj.flow, added)
        decorators._process_late_attached_decorator(
            [spec.split(":", 1)[0] for spec in added],
            obj.flow,
            obj.graph,
            obj.environment,
            obj.flow_datastore,
            obj.logger,
        )
        obj.graph = obj.flow._graph


def _steps_option(command: Any) -> Any:
    command = click.option(
        "--step",
        "steps",
        multiple=True,
        help="Only this step (repeat for several); all steps when not given.",
    )(command)
    return click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")(command)


def _plan(obj: Any, steps: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str], str]:
    from metaflow.exception import MetaflowException

    known = [step.name for step in obj.flow]
    unknown = [s for s in steps if s not in known]
    if unknown:
        raise MetaflowException(
            f"envmgr: {obj.flow.name} has no step {unknown[0]!r} (its steps: {', '.join(known)})"
        )
    return _envmgr(obj.environment.plan, list(steps) or None)


def _envmgr(function: Any, *args: Any) -> Any:
    """*function*(*args*), an envmgr error turned into Metaflow's one-message error."""
    from metaflow.exception import MetaflowException

    from envmgr.errors import EnvmgrError

    try:
        return function(*args)
    except EnvmgrError as exc:
        raise MetaflowException(f"envmgr: {exc}") from None


def _emit(obj: Any, store_url: str, rows: list[dict[str, Any]], names: dict[str, str]) -> None:
    click.echo(
        json.dumps(
            {"flow": obj.flow.name, "store": store_url, "envs": rows, "named": names}, indent=2
        )
    )


def _named_lines(obj: Any, names: dict[str, str]) -> None:
    for step, name in sorted(names.items()):
        what = f"the env {name} ran in" if is_pathspec(name) else f"named env {name}"
        click.echo(f"{step:<16} {what}: used as it is, never resolved")


@environment.command(
    help="Lock each step's env for every platform it runs on (from the resolution cache "
    "where the spec is unchanged); builds nothing."
)
@_steps_option
@click.pass_obj
def resolve(obj: Any, steps: tuple[str, ...], as_json: bool) -> None:
    specs, names, store_url = _plan(obj, steps)
    rows = _envmgr(obj.environment.run_envmgr, "resolve", specs, store_url) if specs else []
    if as_json:
        _emit(obj, store_url, rows, names)
        return
    for row in rows:
        state = "cached" if row["cached"] else "solved"
        click.echo(
            f"{', '.join(row['steps']):<16} {row['platform']:<14} env {row['env_id'][:12]}  "
            f"{row['packages']:>3} packages  {state}"
        )
    _named_lines(obj, names)


@environment.command(
    help="Resolve, build and store each step's env for every platform it runs on; a run "
    "(or deploy) afterwards solves and builds nothing."
)
@_steps_option
@click.pass_obj
def build(obj: Any, steps: tuple[str, ...], as_json: bool) -> None:
    from metaflow_extensions.envmgr.plugins.envmgr_environment import built_line

    specs, names, store_url = _plan(obj, steps)
    rows = _envmgr(obj.environment.run_envmgr, "build", specs, store_url) if specs else []
    if as_json:
        _emit(obj, store_url, rows, names)
        return
    for row in rows:
        click.echo(built_line(row).removeprefix("envmgr: "))
    _named_lines(obj, names)


@environment.command(
    help="Show each step's env: platform, env id, packages, and whether it is in the store. "
    "Never solves: a step whose spec has no lock yet says so."
)
@_steps_option
@click.pass_obj
def show(obj: Any, steps: tuple[str, ...], as_json: bool) -> None:
    from metaflow.exception import MetaflowException

    from envmgr.cache import open_store
    from envmgr.cache.layout import manifest_key
    from envmgr.errors import EnvmgrError

    specs, names, store_url = _plan(obj, steps)
    try:
        rows = obj.environment.run_envmgr("resolve", specs, store_url, "--frozen") if specs else []
    except EnvmgrError as exc:
        text = str(exc.message)
        if " has no lock for " not in text:
            raise MetaflowException(f"envmgr: {exc}") from None
        missing = text.split(" has no lock for ", 1)[1].split(" (", 1)[0]
        raise MetaflowException(
            f"envmgr: no lock yet for {missing}; resolve first: python "
            f"{obj.flow.script_name} --environment={obj.environment.TYPE} environment resolve"
        ) from None
    store = _envmgr(open_store, store_url)
    for row in rows:
        row["stored"] = _envmgr(store.exists, manifest_key(row["platform"], row["env_id"]))
    if as_json:
        _emit(obj, store_url, rows, names)
        return
    for row in rows:
        where = "in the store" if row["stored"] else "not built"
        click.echo(
            f"{', '.join(row['steps']):<16} {row['platform']:<14} env {row['env_id']}  "
            f"{row['packages']:>3} packages  {where}"
        )
    _named_lines(obj, names)
