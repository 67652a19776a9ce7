"""Find every step's environment in a flow file without running it.

:func:`discover` reads the file's syntax tree: no import, no step body, no Metaflow needed. It
finds ``@conda``/``@pypi``/``@conda_base``/``@pypi_base`` (imported from ``metaflow`` or
``envmgr``, by name, alias or ``module.attribute``) on classes and functions. In a class, every
method decorated with ``@step`` or with an environment decorator is a step, and the class's base
decorators apply to all of them; module-level decorated functions are steps without a base.

Decorator arguments must be literals (dicts, lists, strings, numbers, booleans, ``None``) or
names bound to literals at module level, since the file is read, not run; anything else is
reported with its file, line and key.

:func:`read_flow` also says, for a Metaflow flow (a class whose steps use Metaflow's
``@step``), which steps there are and which run on remote compute (``@kubernetes``, ``@batch``,
…): what :mod:`envmgr.specs.flows` needs to compute the specs a run uses.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envmgr.errors import Problem, SpecError
from envmgr.limits import InputError, read_bounded
from envmgr.specs.decorators import KINDS, DecoratorCall, Kind, step_names, step_specs
from envmgr.specs.flows import REMOTE_DECORATORS, FlowSettingError, Placement, wants_gpu
from envmgr.specs.model import EnvSpec

__all__ = ["FlowFile", "discover", "discover_source", "read_flow", "read_flow_source"]

_SOURCES = ("metaflow", "envmgr")
#: netflixext's decorators for an env that exists already (see :meth:`_Reader.named_env`).
_NAMED = ("named_env", "named_env_base")
#: Metaflow names that change decorators when a flow is loaded (configs, mutators, user
#: decorators): a file read without running it cannot see what they do.
_DYNAMIC = frozenset(
    {"Config", "config_expr", "FlowMutator", "StepMutator", "UserStepDecorator",
     "user_step_decorator"}
)  # fmt: skip


class _Names:
    """Which local names and module aliases refer to the four decorators and to ``step``."""

    def __init__(self, tree: ast.Module) -> None:
        self.decorators: dict[str, Kind] = {}
        self.steps: set[str] = set()
        self.remote: dict[str, str] = {}  # local name -> Metaflow's remote-compute decorator
        self.dynamic: set[str] = set()  # Metaflow's configs and mutators the file imports
        self.named: dict[str, str] = {}  # local name -> named_env / named_env_base
        self.modules: set[str] = set()
        self.constants: dict[str, ast.expr] = {}
        for node in tree.body:
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in _SOURCES
            ):
                for alias in node.names:
                    if alias.name == "*":
                        self.decorators.update({k: k for k in KINDS})
                        self.named.update({k: k for k in _NAMED})
                        self.steps.add("step")
                    elif alias.name in _NAMED:
                        self.named[alias.asname or alias.name] = alias.name
                    elif alias.name in KINDS:
                        self.decorators[alias.asname or alias.name] = alias.name
                    elif alias.name == "step":
                        self.steps.add(alias.asname or "step")
                    elif alias.name in REMOTE_DECORATORS:
                        self.remote[alias.asname or alias.name] = alias.name
                    elif alias.name in _DYNAMIC:
                        self.dynamic.add(alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in _SOURCES:
                        self.modules.add(alias.asname or alias.name.split(".")[0])
            elif (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                self.constants[node.targets[0].id] = node.value
            elif (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.value is not None
            ):
                self.constants[node.target.id] = node.value

    def _ref(self, node: ast.expr) -> str | None:
        """``name`` for ``name`` or ``module.name`` when module is metaflow/envmgr."""
        if isinstance(node, ast.Name):
            return node.id
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in self.modules
        ):
            return f".{node.attr}"
        return None

    def kind_of(self, decorator: ast.expr) -> Kind | None:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        ref = self._ref(target)
        if ref is None:
            return None
        if ref.startswith("."):
            return ref[1:] if ref[1:] in KINDS else None  # type: ignore[return-value]
        return self.decorators.get(ref)

    def named_of(self, decorator: ast.expr) -> str | None:
        """``named_env`` or ``named_env_base`` (netflixext's) if *decorator* is one."""
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        ref = self._ref(target)
        if ref is not None and ref.startswith("."):
            return ref[1:] if ref[1:] in _NAMED else None
        return self.named.get(ref or "")

    def is_step(self, decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        ref = self._ref(target)
        return ref == ".step" or (ref is not None and ref in self.steps)

    def remote_of(self, decorator: ast.expr) -> str | None:
        """The remote-compute decorator *decorator* is (``kubernetes``, …), if it is one."""
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        ref = self._ref(target)
        if ref is not None and ref.startswith("."):
            return ref[1:] if ref[1:] in REMOTE_DECORATORS else None
        return self.remote.get(ref or "")


class _Reader:
    def __init__(self, tree: ast.Module, filename: str) -> None:
        self.names = _Names(tree)
        self.filename = filename
        self.problems: list[Problem] = []
        #: The class being read: its ``@named_env_base`` as a step's ``@conda(name=...)``.
        self.named_base: DecoratorCall | None = None

    def placement(self, step: ast.FunctionDef | ast.AsyncFunctionDef) -> Placement:
        """Where *step* runs: its remote-compute decorator and whether it asks for GPUs."""
        for decorator in step.decorator_list:
            remote = self.names.remote_of(decorator)
            if remote is None:
                continue
            gpu = None
            if isinstance(decorator, ast.Call):
                for keyword in decorator.keywords:
                    if keyword.arg == "gpu":
                        gpu = self.value(keyword.value, f"step {step.name!r}", f"@{remote} gpu")
            try:
                return Placement(remote=remote, gpu=wants_gpu(remote, gpu))
            except FlowSettingError as exc:
                self.problems.append(
                    Problem(where=f"step {step.name!r}", key=f"@{remote} gpu", message=str(exc))
                )
                return Placement(remote=remote)
        return Placement()

    def value(self, node: ast.expr, where: str, key: str, depth: int = 0) -> Any:
        try:
            return ast.literal_eval(self._inline(node, depth))
        except (ValueError, TypeError, SyntaxError, RecursionError):
            self.problems.append(
                Problem(
                    where=where,
                    key=key,
                    message=f"line {node.lineno}: not a literal; envmgr reads flow files without "
                    "running them, so write the value out (or bind it to a literal at "
                    "module level), or let the flow compute it: python "
                    f"{self.filename} --environment=conda environment build",
                )
            )
            return None

    def _inline(self, node: ast.expr, depth: int) -> ast.expr:
        """Replace names bound to module-level literals by their values."""
        if depth > 10:
            raise ValueError("too deep")
        if isinstance(node, ast.Name) and node.id in self.names.constants:
            return self._inline(self.names.constants[node.id], depth + 1)
        if isinstance(node, ast.Dict):
            return ast.Dict(
                keys=[k if k is None else self._inline(k, depth) for k in node.keys],
                values=[self._inline(v, depth) for v in node.values],
            )
        if isinstance(node, ast.Set):
            return ast.Set(elts=[self._inline(e, depth) for e in node.elts])
        if isinstance(node, (ast.List, ast.Tuple)):
            return type(node)(elts=[self._inline(e, depth) for e in node.elts], ctx=ast.Load())
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "dict"
            and not node.args
            and all(k.arg is not None for k in node.keywords)
        ):
            return ast.Dict(
                keys=[ast.Constant(k.arg) for k in node.keywords],
                values=[self._inline(k.value, depth) for k in node.keywords],
            )
        return node

    def class_named_base(self) -> DecoratorCall | None:
        """The ``@named_env_base`` of the class whose decorators were read last."""
        return self.named_base

    def named_env(self, decorator: ast.expr, what: str, where: str) -> DecoratorCall | None:
        """netflixext's ``@named_env`` / ``@named_env_base`` as the ``@conda(name=...)`` (or
        ``@conda(disabled=True)``) it means; ``pathspec=`` is looked up in Metaflow's metadata,
        which only a run reads."""
        location = f"{self.filename}:{decorator.lineno}"
        keywords = decorator.keywords if isinstance(decorator, ast.Call) else []
        kwargs = {k.arg: self.value(k.value, where, f"@{what} {k.arg}") for k in keywords if k.arg}
        if kwargs.get("disabled") is True:
            return DecoratorCall(kind="conda", kwargs={"disabled": True}, where=location)
        if kwargs.get("pathspec") or kwargs.get("fetch_at_exec"):
            self.problems.append(
                Problem(
                    where=where,
                    key=f"@{what}",
                    message=f"{location}: the env of a pathspec (or one fetched at task start) "
                    "is looked up by a run; let the flow do it: python "
                    f"{self.filename} --environment=conda environment build",
                )
            )
            return None
        unknown = sorted(set(kwargs) - {"name", "disabled", "fetch_at_exec", "pathspec"})
        if unknown or not isinstance(kwargs.get("name"), str):
            self.problems.append(
                Problem(
                    where=where,
                    key=f"@{what}",
                    message=f'{location}: give name="team/env:tag" (or pathspec=)'
                    + (f"; unknown {', '.join(unknown)}" if unknown else ""),
                )
            )
            return None
        return DecoratorCall(kind="conda", kwargs={"name": kwargs["name"]}, where=location)

    def calls(self, decorators: list[ast.expr], where: str) -> tuple[list[DecoratorCall], bool]:
        found: list[DecoratorCall] = []
        named: list[DecoratorCall] = []
        is_step = False
        for decorator in decorators:
            if self.names.is_step(decorator):
                is_step = True
            what = self.names.named_of(decorator)
            if what == "named_env_base":
                self.named_base = self.named_env(decorator, what, where)
            elif what is not None:
                named += filter(None, [self.named_env(decorator, what, where)])
            kind = self.names.kind_of(decorator)
            if kind is None:
                continue
            location = f"{self.filename}:{decorator.lineno}"
            kwargs: dict[str, Any] = {}
            if isinstance(decorator, ast.Call):
                if decorator.args:
                    self.problems.append(
                        Problem(
                            where=where,
                            key=f"@{kind}",
                            message=f"{location}: takes keyword arguments only",
                        )
                    )
                for keyword in decorator.keywords:
                    if keyword.arg is None:
                        self.problems.append(
                            Problem(
                                where=where, key=f"@{kind} **", message=f"{location}: not a literal"
                            )
                        )
                        continue
                    kwargs[keyword.arg] = self.value(keyword.value, where, f"@{kind} {keyword.arg}")
            found.append(DecoratorCall(kind=kind, kwargs=kwargs, where=location))
        if named and found:
            self.problems.append(
                Problem(
                    where=where,
                    key="@named_env",
                    message="runs the step in an env as it is; drop "
                    f"{' and '.join(sorted({'@' + c.kind for c in found}))} from the step (or "
                    "@named_env to resolve its own packages)",
                )
            )
        return named or found, is_step


@dataclass(frozen=True, kw_only=True, slots=True)
class FlowFile:
    """What a flow file declares: each step's merged spec, and for Metaflow flows every step
    (also those without an environment decorator, which a run gives the base env) and where
    each runs."""

    specs: dict[str, EnvSpec]
    metaflow_steps: frozenset[str] = frozenset()
    placements: dict[str, Placement] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # step -> "name:tag" it runs in
    #: Metaflow configs/mutators the file uses: a run may change decorators this read misses.
    dynamic: tuple[str, ...] = ()

    @property
    def is_metaflow(self) -> bool:
        return bool(self.metaflow_steps)


def discover_source(source: str, filename: str = "<flow>") -> dict[str, EnvSpec]:
    """:func:`discover` on source text; ``filename`` is used in messages."""
    return read_flow_source(source, filename).specs


def read_flow_source(source: str, filename: str = "<flow>") -> FlowFile:
    """:func:`read_flow` on source text; ``filename`` is used in messages."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise SpecError(
            [
                Problem(
                    where=f"{filename}:{exc.lineno}",
                    key="-",
                    message=f"not valid Python: {exc.msg}",
                )
            ]
        ) from None
    reader = _Reader(tree, filename)
    result: dict[str, EnvSpec] = {}
    errors: list[Problem] = []
    module_steps: dict[str, list[DecoratorCall]] = {}
    metaflow_steps: set[str] = set()
    placements: dict[str, Placement] = {}
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            reader.named_base = None
            base, _ = reader.calls(node.decorator_list, f"flow {node.name!r}")
            named_base = reader.class_named_base()  # for the steps without their own
            steps: dict[str, list[DecoratorCall]] = {}
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    calls, is_step = reader.calls(item.decorator_list, f"step {item.name!r}")
                    if is_step and not calls and named_base is not None:
                        calls = [named_base]
                    if calls or is_step:
                        steps[item.name] = calls
                    if is_step:
                        placements[item.name] = reader.placement(item)
            if base or any(steps.values()):
                errors += _collect(result, base, steps, node.name)
                names.update(step_names(steps))
                stepped = {n for n in steps if n in placements}
                metaflow_steps |= stepped
                # A run gives every step an env: those without a decorator get the base's.
                for name in stepped - set(result):
                    result[name] = step_specs(base, {name: []}, flow=node.name).get(name, EnvSpec())
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls, _ = reader.calls(node.decorator_list, f"step {node.name!r}")
            if calls:
                module_steps[node.name] = calls
    if module_steps:
        errors += _collect(result, [], module_steps, Path(filename).stem)
        names.update(step_names(module_steps))
    problems = reader.problems + errors
    if problems:
        raise SpecError(problems)
    return FlowFile(
        specs={k: v for k, v in result.items() if k not in names},
        names=names,
        dynamic=tuple(sorted(reader.names.dynamic)),
        metaflow_steps=frozenset(metaflow_steps),
        placements={k: v for k, v in placements.items() if k in metaflow_steps},
    )


def _collect(
    result: dict[str, EnvSpec],
    base: list[DecoratorCall],
    steps: Mapping[str, list[DecoratorCall]],
    flow: str,
) -> list[Problem]:
    try:
        found = step_specs(base, steps, flow=flow)
    except SpecError as exc:
        return list(exc.problems)
    clashes = sorted(set(found) & set(result))
    result.update(found)
    return [
        Problem(where=f"step {name!r}", key="-", message="defined in two classes")
        for name in clashes
    ]


def discover(path: str | Path) -> dict[str, EnvSpec]:
    """``{step_name: merged EnvSpec}`` for the flow file at *path*, read without running it.

    Raises ``SpecError`` listing every problem in the file (each with the step, key and line).
    """
    return read_flow(path).specs


def read_flow(path: str | Path) -> FlowFile:
    """What the flow file at *path* declares (see :class:`FlowFile`), read without running it.

    Raises ``SpecError`` listing every problem in the file (each with the step, key and line).
    """
    path = Path(path)

    try:
        source = read_bounded(path, what="flow file")
    except InputError as exc:
        raise SpecError([Problem(where=str(path), key="-", message=exc.reason)]) from None
    return read_flow_source(source, filename=path.name)
