"""What envmgr reads from Metaflow's step objects: the arguments a decorator was given, where a
step runs, and its ``@conda``/``@pypi`` calls as envmgr's spec layer takes them.

Both the decorators and the environment use these; neither imports the other. envmgr's spec
layer is imported inside the functions: Metaflow loads this extension on every worker too,
where only the worker's files of envmgr are shipped (see :mod:`envmgr.worker.shipped`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "decorator_calls",
    "is_pathspec",
    "named_env",
    "own_kwargs",
    "placement",
    "remote_decorator",
]


def own_kwargs(deco: Any) -> dict[str, Any]:
    """The arguments *deco* itself was given (before a step merged its flow's into it), as
    envmgr's spec layer takes them: empty values dropped."""
    attributes = getattr(deco, "_envmgr_own", None)
    if attributes is None:
        attributes = deco.attributes
    return {
        k: v for k, v in attributes.items() if v is not None and v != {} and v != [] and v != ()
    }


def remote_decorator(decorators: Any) -> Any:
    """Of a step's *decorators*, the one that runs it on remote compute (``None``: local):
    Metaflow's own list, plus any decorator that says ``supports_conda_environment``."""
    from envmgr.specs.flows import REMOTE_DECORATORS

    for deco in decorators:
        if getattr(deco, "supports_conda_environment", False) or deco.name in REMOTE_DECORATORS:
            return deco
    return None


def placement(step: Any) -> Any:
    """Where *step* runs, as :mod:`envmgr.specs.flows` takes it."""
    from envmgr.specs.flows import Placement, wants_gpu

    deco = remote_decorator(step.decorators)
    if deco is None:
        return Placement()
    gpu = any(wants_gpu(d.name, None) for d in step.decorators)  # @nvidia beside @kubernetes
    gpu = gpu or wants_gpu(deco.name, deco.attributes.get("gpu"))
    return Placement(
        remote=deco.name, target_platform=getattr(deco, "target_platform", None), gpu=gpu
    )


def is_pathspec(ref: str) -> bool:
    """Whether a step's existing env *ref* is an earlier step's pathspec ("Flow/run/step"),
    not an env name ("team/env:tag" has one slash at most)."""
    return ref.count("/") >= 2


def named_env(step: Any, base: Any, problems: list[Any]) -> tuple[str, Any] | None:
    """What ``@named_env`` (netflixext's) says of *step*, or the flow's ``@named_env_base``
    (*base*) for a step without an env decorator of its own: ``("name", "team/env:tag")``,
    ``("pathspec", "Flow/run/step")``, ``("disabled", True)``, or ``None``. Problems go to
    *problems* (envmgr ``Problem``s naming the step)."""
    from envmgr.errors import Problem

    where = f"step {step.name!r}"
    own = [
        deco
        for deco in step.decorators
        if deco.name in ("conda", "pypi") and (deco.statically_defined or own_kwargs(deco))
    ]
    mine = [deco for deco in step.decorators if deco.name == "named_env"]
    if mine:
        if own:
            problems.append(
                Problem(
                    where=where,
                    key="@named_env",
                    message="runs the step in an env as it is; drop "
                    f"{' and '.join('@' + d.name for d in own)} from the step (or @named_env "
                    "to resolve its own packages)",
                )
            )
            return None
        kwargs, key = own_kwargs(mine[0]), "@named_env"
    elif base is not None and not own:
        kwargs, key = own_kwargs(base), "@named_env_base"
    else:
        return None
    if str(kwargs.get("disabled")).lower() == "true":
        return ("disabled", True)
    if kwargs.get("fetch_at_exec"):
        problems.append(
            Problem(
                where=where,
                key=f"{key} fetch_at_exec",
                message="envmgr fixes a step's env when the run starts (or the flow is "
                "deployed), never at task start; drop fetch_at_exec and deploy again to "
                "take up a tag that moved",
            )
        )
    given = [k for k in ("name", "pathspec") if kwargs.get(k)]
    if len(given) != 1:
        problems.append(
            Problem(
                where=where,
                key=key,
                message='give name="team/env:tag" or pathspec="Flow/run/step"'
                + (", not both" if given else ""),
            )
        )
        return None
    value = kwargs[given[0]]
    if not isinstance(value, str):
        problems.append(
            Problem(
                where=where, key=f"{key} {given[0]}", message=f"must be a string, not {value!r}"
            )
        )
        return None
    return (given[0], value)


def decorator_calls(decorators: Any, kinds: tuple[str, ...]) -> list[Any]:
    """The *kinds* of decorators among *decorators*, as envmgr's spec layer takes them."""
    from envmgr.specs.decorators import DecoratorCall

    return [
        DecoratorCall(kind=deco.name, kwargs=own_kwargs(deco))
        for deco in decorators
        if deco.name in kinds
    ]
