"""What envmgr reads from Metaflow's step objects: the arguments a decorator was given, where a
step runs, and its ``@conda``/``@pypi`` calls as envmgr's spec layer takes them.

Both the decorators and the environment use these; neither imports the other. envmgr's spec
layer is imported inside the functions: Metaflow loads this extension on every worker too,
where only the worker's files of envmgr are shipped (see :mod:`envmgr.worker.shipped`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["decorator_calls", "own_kwargs", "placement", "remote_decorator"]


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
    from envmgr.specs.flows import Placement

    deco = remote_decorator(step.decorators)
    if deco is None:
        return Placement()
    return Placement(remote=deco.name, target_platform=getattr(deco, "target_platform", None))


def decorator_calls(decorators: Any, kinds: tuple[str, ...]) -> list[Any]:
    """The *kinds* of decorators among *decorators*, as envmgr's spec layer takes them."""
    from envmgr.specs.decorators import DecoratorCall

    return [
        DecoratorCall(kind=deco.name, kwargs=own_kwargs(deco))
        for deco in decorators
        if deco.name in kinds
    ]
