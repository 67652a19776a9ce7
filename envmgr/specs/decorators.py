"""``@conda``, ``@pypi``, ``@conda_base``, ``@pypi_base``, and their arguments as specs.

The decorators accept Metaflow's argument names (``packages``, ``libraries``, ``python``,
``disabled``) plus envmgr's (``channels``, ``system_packages``, ``platforms``, and for PyPI
``index_url`` and ``extra_index_urls``). Applied to a function, method or class they record the
call on the object and change nothing else; validation happens when specs are built
(:func:`step_specs`), so every problem of a flow is reported at once, each naming its step.

Values follow Metaflow's meaning so flows keep their behaviour: a conda library version ``"2.2"``
means ``==2.2``; a value starting with an operator (``">=1.26,<2"``, ``"2.2.*"``) is used as is;
a PyPI version ``"2.3.1"`` means ``==2.3.1``, a value starting with ``<>=!~`` or ``@`` is appended
to the name, and ``"; marker"`` may follow. ``python="3.11"`` means any 3.11.x (see
:func:`envmgr.specs.deps.parse_python`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from envmgr.cache.names import AliasError, parse_name
from envmgr.errors import Problem, SpecError
from envmgr.platforms import PLATFORMS, is_platform
from envmgr.specs.deps import (
    CONDA_NAME,
    CondaDep,
    PypiDep,
    parse_channel,
    parse_index_url,
    parse_python,
    parse_system_package,
)
from envmgr.specs.model import EnvSpec, combine, merge

__all__ = [
    "ATTRIBUTE",
    "DecoratorCall",
    "Kind",
    "conda",
    "conda_base",
    "layer_from_call",
    "pypi",
    "pypi_base",
    "step_names",
    "step_specs",
]

Kind = Literal["conda", "pypi", "conda_base", "pypi_base"]
KINDS: tuple[Kind, ...] = get_args(Kind)

#: Attribute on decorated objects holding their ``DecoratorCall`` tuple.
ATTRIBUTE = "__envmgr_decorators__"

_COMMON = frozenset({"python", "disabled", "system_packages", "platforms"})
ALLOWED: Mapping[str, frozenset[str]] = {
    "conda": _COMMON | {"libraries", "packages", "channels", "name"},
    "pypi": _COMMON | {"packages", "index_url", "extra_index_urls", "name"},
}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, kw_only=True, slots=True)
class DecoratorCall:
    """One decorator application: which kind, its keyword arguments, and where it was written."""

    kind: Kind
    kwargs: Mapping[str, Any]
    where: str = ""

    @property
    def manager(self) -> Literal["conda", "pypi"]:
        return "conda" if self.kind.startswith("conda") else "pypi"


def _decorator(kind: Kind) -> Callable[..., Any]:
    def factory(obj: Any = None, /, **kwargs: Any) -> Any:
        call = DecoratorCall(kind=kind, kwargs=dict(kwargs))

        def attach(target: F) -> F:
            calls = tuple(target.__dict__.get(ATTRIBUTE, ()))
            setattr(target, ATTRIBUTE, (*calls, call))
            return target

        # Both @conda and @conda(...) work, as in Metaflow.
        if obj is not None:
            if kwargs or not callable(obj):
                raise TypeError(f"@{kind} takes keyword arguments only")
            return attach(obj)
        return attach

    factory.__name__ = factory.__qualname__ = kind
    factory.__doc__ = f"Record a ``@{kind}`` environment on a step function or flow class."
    return factory


conda = _decorator("conda")
pypi = _decorator("pypi")
conda_base = _decorator("conda_base")
pypi_base = _decorator("pypi_base")


def _conda_text(name: str, version: str) -> str:
    version = version.strip()
    if not version:
        return name
    if version[0] in "<>=!~*":
        return f"{name} {version}"
    return f"{name} =={version}"


def _pypi_text(name: str, version: str) -> str:
    version = version.strip()
    if not version or version[0] in "<>=!~@;[":
        return f"{name}{' ' if version.startswith('@') else ''}{version}"
    return f"{name}=={version}"


class _Layer:
    """Builds one ``EnvSpec`` layer from one call, collecting problems."""

    def __init__(self, call: DecoratorCall, where: str, problems: list[Problem]) -> None:
        self.call = call
        self.where = where
        self.problems = problems

    def bad(self, key: str, message: str) -> None:
        self.problems.append(
            Problem(where=self.where, key=f"@{self.call.kind} {key}", message=message)
        )

    def strings(self, key: str) -> list[str]:
        value = self.call.kwargs.get(key)
        if value is None:
            return []
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            self.bad(key, f"must be a list of strings, not {type(value).__name__}")
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(item)
            else:
                self.bad(f"{key}[{i}]", f"must be a string, not {type(item).__name__}")
        return out

    def mapping(self, key: str) -> dict[str, str]:
        value = self.call.kwargs.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.bad(key, f"must be a dict of name to version, not {type(value).__name__}")
            return {}
        out: dict[str, str] = {}
        for name, version in value.items():
            if not isinstance(name, str) or not name.strip():
                self.bad(f"{key}[{name!r}]", "package name must be a non-empty string")
            elif version is None:
                out[name.strip()] = ""
            elif not isinstance(version, str):
                self.bad(
                    f"{key}[{name!r}]",
                    f'version must be a string (e.g. "{version}"), not {type(version).__name__}',
                )
            else:
                out[name.strip()] = version
        return out

    def conda_packages(self) -> list[tuple[str, str, str]]:
        """``(argument, name, version)`` from ``libraries=`` and ``packages=``, which wins on
        a clash (as in Metaflow, where ``libraries`` is the old name)."""
        libraries, packages = self.mapping("libraries"), self.mapping("packages")
        return [("libraries", n, v) for n, v in libraries.items() if n not in packages] + [
            ("packages", n, v) for n, v in packages.items()
        ]

    def named(self) -> str | None:
        """``name=``'s ``name:tag`` (steps only; nothing else may come with it)."""

        value = self.call.kwargs.get("name")
        if value is None:
            return None
        if self.call.kind.endswith("_base"):
            self.bad("name", f"a named env is for one step: use @{self.call.manager}(name=...)")
            return None
        if not isinstance(value, str):
            self.bad("name", f'must be a string like "team/env:stable", not {value!r}')
            return None
        try:
            name, tag = parse_name(value)
        except AliasError as exc:
            self.bad("name", str(exc))
            return None
        others = sorted(k for k in self.call.kwargs if k not in ("name", "disabled"))
        if others:
            self.bad(
                "name",
                f"a named env is used as it is; drop {', '.join(others)} (or drop name= to "
                "resolve the step's own packages)",
            )
        return f"{name}:{tag}"

    def build(self) -> EnvSpec:
        kwargs = self.call.kwargs
        allowed = ALLOWED[self.call.manager]
        for key in sorted(set(kwargs) - allowed):
            self.bad(key, f"unknown argument; @{self.call.kind} takes {', '.join(sorted(allowed))}")
        self.named()
        python = kwargs.get("python")
        if python is not None:
            if isinstance(python, float):
                self.bad(
                    "python",
                    f'is the number {python!r}; quote it (python="3.10"): as a number 3.10 '
                    "reads 3.1",
                )
                python = None
            elif not isinstance(python, str):
                self.bad("python", f'must be a string like "3.11", not {python!r}')
                python = None
            else:
                try:
                    python = parse_python(python)
                except ValueError as exc:
                    self.bad("python", str(exc))
                    python = None
        disabled = kwargs.get("disabled")
        if disabled is not None and not isinstance(disabled, bool):
            self.bad("disabled", f"must be True or False, not {disabled!r}")
            disabled = None
        conda_deps: list[CondaDep] = []
        pypi_deps: list[PypiDep] = []
        if self.call.manager == "conda":
            seen: dict[str, str] = {}
            for argument, name, version in self.conda_packages():
                key = f"{argument}[{name!r}]"
                bare = name.rpartition("::")[2].strip()
                if bare and not CONDA_NAME.match(bare):
                    self.bad(
                        key,
                        f"{bare!r} is not a conda package name (letters, digits, "
                        "'_', '-', '.', '+'); put versions in the value",
                    )
                    continue
                try:
                    dep = CondaDep.parse(_conda_text(name, version))
                except ValueError as exc:
                    self.bad(key, str(exc))
                    continue
                if dep.name in seen:
                    self.bad(key, f"same package as {seen[dep.name]!r}; list it once")
                    continue
                if dep.name == "python":
                    self.bad(key, "give the python version with python=, not as a package")
                    continue
                seen[dep.name] = name
                conda_deps.append(dep)
        else:
            seen_pypi: dict[str, str] = {}
            for name, version in self.mapping("packages").items():
                key = f"packages[{name!r}]"
                if any(c in name for c in "<>=!~;@ ") and version.strip():
                    self.bad(
                        key, "the key is already a requirement; put the version in the value only"
                    )
                    continue
                try:
                    pdep = PypiDep.parse(_pypi_text(name, version))
                except ValueError as exc:
                    self.bad(key, str(exc))
                    continue
                if pdep.name in seen_pypi:
                    self.bad(key, f"same package as {seen_pypi[pdep.name]!r}; list it once")
                    continue
                seen_pypi[pdep.name] = name
                pypi_deps.append(pdep)
        channels = []
        for i, text in enumerate(self.strings("channels")):
            try:
                channels.append(parse_channel(text))
            except ValueError as exc:
                self.bad(f"channels[{i}]", str(exc))
        index_url = kwargs.get("index_url")
        if index_url is not None and not isinstance(index_url, str):
            self.bad("index_url", f"must be a URL string, not {type(index_url).__name__}")
            index_url = None
        elif index_url is not None:
            try:
                index_url = parse_index_url(index_url)
            except ValueError as exc:
                self.bad("index_url", str(exc))
                index_url = None
        extra = []
        for i, text in enumerate(self.strings("extra_index_urls")):
            try:
                extra.append(parse_index_url(text))
            except ValueError as exc:
                self.bad(f"extra_index_urls[{i}]", str(exc))
        system = []
        for name, version in self.mapping("system_packages").items():
            try:
                system.append(parse_system_package(name, version))
            except ValueError as exc:
                self.bad(f"system_packages[{name!r}]", str(exc))
        platforms = []
        for i, text in enumerate(self.strings("platforms")):
            if is_platform(text):
                platforms.append(text)
            else:
                self.bad(
                    f"platforms[{i}]", f"unknown platform {text!r}; known: {', '.join(PLATFORMS)}"
                )
        return EnvSpec(
            python=python,
            conda=tuple(conda_deps),
            pypi=tuple(pypi_deps),
            channels=tuple(channels),
            index_url=index_url,
            extra_index_urls=tuple(extra),
            system=tuple(system),
            platforms=tuple(platforms),
            disabled=disabled,
        )


def layer_from_call(call: DecoratorCall, *, where: str) -> EnvSpec:
    """One decorator call as an ``EnvSpec`` layer; raises ``SpecError`` with every problem."""
    problems: list[Problem] = []
    layer = _Layer(call, where, problems).build()
    if problems:
        raise SpecError(problems)
    return layer


def _level(calls: Iterable[DecoratorCall], where: str, problems: list[Problem]) -> EnvSpec:
    """The calls of one level (a step, or a flow's base) as one spec."""
    by_manager: dict[str, EnvSpec] = {}
    for call in calls:
        if call.manager in by_manager:
            problems.append(
                Problem(
                    where=where, key=f"@{call.kind}", message=f"given twice; use one @{call.kind}"
                )
            )
            continue
        by_manager[call.manager] = _Layer(call, where, problems).build()
    layers = list(by_manager.values())
    if len(layers) == 2:
        try:
            return combine(layers[0], layers[1], where=where)
        except SpecError as exc:
            problems.extend(exc.problems)
            return layers[0]
    return layers[0] if layers else EnvSpec()


def step_names(steps: Mapping[str, Iterable[DecoratorCall]]) -> dict[str, str]:
    """``{step: "name:tag"}`` for the steps that use a named env (``@conda(name=...)``);
    :func:`step_specs` reports bad names. Their specs are not resolved."""
    out: dict[str, str] = {}
    for step, calls in steps.items():
        for call in calls:
            if call.kind.endswith("_base"):
                continue
            named = _Layer(call, f"step {step!r}", []).named()
            if named is not None:
                out[step] = named
    return out


def step_specs(
    base_calls: Iterable[DecoratorCall],
    steps: Mapping[str, Iterable[DecoratorCall]],
    *,
    flow: str = "flow",
) -> dict[str, EnvSpec]:
    """Merged specs per step: the base level (``*_base``) overridden by each step's level.

    Only steps with a spec (their own or the base's) are returned. Raises ``SpecError`` with
    every problem of every step.
    """
    problems: list[Problem] = []
    base_calls = list(base_calls)
    for call in base_calls:
        if not call.kind.endswith("_base"):
            problems.append(
                Problem(
                    where=f"flow {flow!r}",
                    key=f"@{call.kind}",
                    message=f"use @{call.kind}_base on a flow class",
                )
            )
    base = _level((c for c in base_calls if c.kind.endswith("_base")), f"flow {flow!r}", problems)
    result: dict[str, EnvSpec] = {}
    for step, calls in steps.items():
        calls = list(calls)
        where = f"step {step!r}"
        for call in calls:
            if call.kind.endswith("_base"):
                problems.append(
                    Problem(
                        where=where,
                        key=f"@{call.kind}",
                        message=f"use @{call.manager} on a step, @{call.kind} on the flow class",
                    )
                )
        own = _level((c for c in calls if not c.kind.endswith("_base")), where, problems)
        if base_calls or calls:
            result[step] = merge(base, own)
    if problems:
        raise SpecError(problems)
    return result
