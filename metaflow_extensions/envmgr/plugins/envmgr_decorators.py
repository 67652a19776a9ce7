"""@conda / @pypi (steps) and @conda_base / @pypi_base (flows) with envmgr's arguments.

They accept Metaflow's names (``packages``, ``libraries``, ``python``, ``disabled``) and envmgr's
additions (``channels``, ``system_packages``, ``platforms``; ``index_url`` and
``extra_index_urls`` for PyPI); ``@conda`` and ``@pypi`` may sit on one step. The environment
(``--environment=conda``) does the work; the step decorators run each task with its env's
python and record which env it used.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from metaflow.decorators import FlowDecorator, StepDecorator
from metaflow.metadata_provider import MetaDatum
from metaflow.packaging_sys import ContentType

from metaflow_extensions.envmgr.plugins.envmgr_steps import remote_decorator

_COMMON = {"python": None, "disabled": None, "system_packages": {}, "platforms": []}

#: The environments that give @conda/@pypi their meaning (both are envmgr's here).
_ENVIRONMENTS = ("conda", "pypi")


def _require_envmgr_environment(environment: Any, what: str) -> None:
    """Refuse like stock Metaflow, before any task: without the environment the step would
    run on the host's python, failing in user code or passing with other versions."""
    if getattr(environment, "TYPE", None) not in _ENVIRONMENTS:
        from metaflow.metaflow_environment import InvalidEnvironmentException

        flags = " or ".join(f"--environment={name}" for name in _ENVIRONMENTS)
        raise InvalidEnvironmentException(f"{what} requires {flags}")


class _UserValues:
    """Stock's bookkeeping of which attributes the user gave (``is_attribute_user_defined``),
    and its ``init``: ``libraries`` merged into ``packages`` (``packages`` wins on a clash)
    and emptied."""

    attributes: dict[str, Any]
    _user_defined_attributes: set[str]

    def __init__(
        self, attributes: Any = None, statically_defined: bool = False, inserted_by: Any = None
    ) -> None:
        self._attributes_with_user_values = set(attributes) if attributes is not None else set()
        super().__init__(attributes, statically_defined, inserted_by)  # type: ignore[call-arg]

    def _stock_init(self) -> None:
        # Values that came from Metaflow configs count as the user's too.
        self._attributes_with_user_values |= set(getattr(self, "_user_defined_attributes", ()))
        if "libraries" in self.attributes:
            self.attributes["packages"] = {
                **(self.attributes["libraries"] or {}),
                **(self.attributes["packages"] or {}),
            }
            self.attributes["libraries"] = {}  # kept: make_decorator_spec expects the key
        if self.attributes.get("packages"):
            self._attributes_with_user_values.add("packages")
        python = self.attributes.get("python")
        if isinstance(python, int) and not isinstance(python, bool):
            self.attributes["python"] = str(python)  # a float (3.10) is refused by the spec

    def is_attribute_user_defined(self, name: str) -> bool:
        return name in self._attributes_with_user_values


class _EnvmgrFlow(_UserValues, FlowDecorator):  # type: ignore[misc]
    def flow_init(
        self,
        flow: Any,
        graph: Any,
        environment: Any,
        flow_datastore: Any,
        metadata: Any,
        logger: Any,
        echo: Any,
        options: Any,
    ) -> None:
        _require_envmgr_environment(environment, f"@{self.name} decorator on flow {flow.name}")


class _EnvmgrStep(_UserValues, StepDecorator):  # type: ignore[misc]
    defaults: ClassVar[dict[str, Any]] = {}
    base_name: ClassVar[str] = ""
    _code_dir: ClassVar[Any] = None
    _code_env: ClassVar[dict[str, str]] = {}

    def step_init(
        self,
        flow: Any,
        graph: Any,
        step: str,
        decos: Any,
        environment: Any,
        flow_datastore: Any,
        logger: Any,
    ) -> None:
        _require_envmgr_environment(environment, f"@{self.name} decorator on step {step!r}")
        self.flow = flow
        self.step = self.step_name = step
        self.flow_name = flow.name
        self.environment = environment
        self.datastore = flow_datastore
        self.python = None
        self.decos = decos
        # envmgr's spec is built from what this decorator was given; the attributes then
        # read as stock's do after step_init (the flow's merged in, defaults filled).
        if getattr(self, "_envmgr_own", None) is None:
            self._envmgr_own = dict(self.attributes)
        self._merge_base(flow)
        if not self.attributes["disabled"]:
            self.attributes["disabled"] = False
        self.disabled = bool(self.attributes["disabled"])

    def _merge_base(self, flow: Any) -> None:
        bases = flow._flow_decorators.get(self.base_name) or []
        if not bases:
            return
        base = bases[0]
        self.attributes["packages"] = {**base.attributes["packages"], **self.attributes["packages"]}
        self._attributes_with_user_values |= getattr(base, "_attributes_with_user_values", set())
        self.attributes["python"] = self.attributes["python"] or base.attributes["python"]
        if self.attributes["disabled"] is None:
            self.attributes["disabled"] = base.attributes["disabled"]

    def _env(self) -> dict[str, Any] | None:
        envs = getattr(self.environment, "envmgr_envs", None) or {}
        return envs.get(self.step_name)

    def runtime_init(self, flow: Any, graph: Any, package: Any, run_id: str) -> None:
        if self._env() is None:
            return
        # The env's python has no Metaflow: the code package (which holds Metaflow) is
        # extracted once per run and put on PYTHONPATH, as Metaflow's own @conda does.
        if _EnvmgrStep._code_dir is None:
            _EnvmgrStep._code_dir = tempfile.TemporaryDirectory(prefix="envmgr-mf-")
            package.extract_into(_EnvmgrStep._code_dir.name, ContentType.ALL_CONTENT)
            _EnvmgrStep._code_env = (
                package.get_post_extract_env_vars(
                    package.package_metadata, _EnvmgrStep._code_dir.name
                )
                or {}
            )

    def runtime_task_created(
        self,
        task_datastore: Any,
        task_id: str,
        split_index: Any,
        input_paths: Any,
        is_cloned: bool,
        ubf_context: Any,
    ) -> None:
        env = self._env()
        # A remote step's task runs here only to launch it (its pod hydrates its own env).
        # (Looked up here, in the launcher: a task's python has only the worker's modules.)
        if env is not None and remote_decorator(self.decos) is None:
            self.python = self.environment.envmgr_python(self.step_name)

    def runtime_step_cli(
        self, cli_args: Any, retry_count: int, max_user_code_retries: int, ubf_context: Any
    ) -> None:
        if self.python is None or _EnvmgrStep._code_dir is None:
            return
        code = _EnvmgrStep._code_dir.name
        extra: dict[str, str] = {}
        for key, value in _EnvmgrStep._code_env.items():
            if key.endswith(":"):
                extra[key[:-1]] = value
            elif key == "PYTHONPATH":
                extra[key] = os.pathsep.join([value, code])
            else:
                extra[key] = value
        extra.setdefault("PYTHONPATH", code)
        cli_args.env.update(extra)
        cli_args.env["PYTHONNOUSERSITE"] = "1"
        env = self._env() or {}
        cli_args.env["ENVMGR_ENV_ID"] = self.environment.host_env_id(self.step_name) or ""
        cli_args.env["ENVMGR_SPEC_ID"] = env.get("spec_id", "")
        cli_args.env["ENVMGR_ENV_NAME"] = env.get("name", "")
        cli_args.entrypoint[0] = self.python

    def task_pre_step(
        self,
        step_name: str,
        task_datastore: Any,
        metadata: Any,
        run_id: str,
        task_id: str,
        flow: Any,
        graph: Any,
        retry_count: int,
        max_user_code_retries: int,
        ubf_context: Any,
        inputs: Any,
    ) -> None:
        env_id = os.environ.get("ENVMGR_ENV_ID")
        if not env_id:
            return
        from envmgr.cuda import CudaNeed, describe
        from envmgr.platforms import host_platform
        from envmgr.worker.env_cache import marker_cuda

        cuda = marker_cuda(Path(sys.prefix))  # the task runs on its env's python
        tags = [f"attempt_id:{retry_count}"]
        fields = {
            "envmgr_env_id": env_id,
            "envmgr_spec_id": os.environ.get("ENVMGR_SPEC_ID", ""),
            "envmgr_env_name": os.environ.get("ENVMGR_ENV_NAME", ""),
            "envmgr_variant": describe(host_platform(), CudaNeed(*cuda) if cuda else None),
        }
        metadata.register_metadata(
            run_id,
            step_name,
            task_id,
            [
                MetaDatum(field=key, value=value, type=key, tags=tags)
                for key, value in fields.items()
                if value or key != "envmgr_env_name"
            ],
        )

    def runtime_finished(self, exception: Any) -> None:
        if _EnvmgrStep._code_dir is not None:
            _EnvmgrStep._code_dir.cleanup()
            _EnvmgrStep._code_dir = None


# Metaflow runs ``init`` only when the class itself defines it (``"init" in __dict__``).


class CondaStepDecorator(_EnvmgrStep):
    """Conda packages for one step: Metaflow's arguments (``packages``, ``libraries``,
    ``python``, ``disabled``), envmgr's (``channels``, ``system_packages``, ``platforms``), and
    ``name="team/env:tag"`` to run in a named env instead of resolving one."""

    name = "conda"
    base_name = "conda_base"
    defaults: ClassVar[dict[str, Any]] = {
        "packages": {},
        "libraries": {},
        "channels": [],
        "name": None,
        **_COMMON,
    }

    def init(self) -> None:
        self._stock_init()

    def step_init(self, flow: Any, graph: Any, step: str, *args: Any) -> None:
        super().step_init(flow, graph, step, *args)
        if not self.attributes["python"]:
            # Stock: the launching interpreter (envmgr: its series, see envmgr.specs.flows).
            self.attributes["python"] = f"{sys.version_info[0]}.{sys.version_info[1]}"


class PyPIStepDecorator(_EnvmgrStep):
    """PyPI packages for one step (Metaflow's arguments plus ``index_url``,
    ``extra_index_urls``, ``system_packages``, ``platforms`` and ``name``)."""

    name = "pypi"
    base_name = "pypi_base"
    defaults: ClassVar[dict[str, Any]] = {
        "packages": {},
        "index_url": None,
        "extra_index_urls": [],
        "name": None,
        **_COMMON,
    }

    def init(self) -> None:
        self._stock_init()


class CondaFlowDecorator(_EnvmgrFlow):
    """Conda packages for every step of the flow."""

    name = "conda_base"
    defaults: ClassVar[dict[str, Any]] = {
        "packages": {},
        "libraries": {},
        "channels": [],
        **_COMMON,
    }

    def init(self) -> None:
        self._stock_init()


class PyPIFlowDecorator(_EnvmgrFlow):
    """PyPI packages for every step of the flow."""

    name = "pypi_base"
    defaults: ClassVar[dict[str, Any]] = {
        "packages": {},
        "index_url": None,
        "extra_index_urls": [],
        **_COMMON,
    }

    def init(self) -> None:
        self._stock_init()


class NamedEnvStepDecorator(StepDecorator):  # type: ignore[misc]
    """netflixext's ``@named_env``: run the step in an env that exists already, by name
    (``name="team/env:tag"``, see ``envmgr alias``) or as the step of an earlier run used it
    (``pathspec="Flow/run/step"``). It only says which env: the step's ``@conda`` (which
    ``--environment=conda`` gives every step) hydrates it and records it."""

    name = "named_env"
    defaults: ClassVar[dict[str, Any]] = {
        "name": None,
        "pathspec": None,
        "fetch_at_exec": False,
        "disabled": None,
    }

    def step_init(
        self,
        flow: Any,
        graph: Any,
        step: str,
        decos: Any,
        environment: Any,
        flow_datastore: Any,
        logger: Any,
    ) -> None:
        _require_envmgr_environment(environment, f"@{self.name} decorator on step {step!r}")


class NamedEnvFlowDecorator(_EnvmgrFlow):
    """``@named_env_base``: the named env (or earlier step's env) of every step that has no
    ``@conda``, ``@pypi`` or ``@named_env`` of its own."""

    name = "named_env_base"
    defaults: ClassVar[dict[str, Any]] = {
        "name": None,
        "pathspec": None,
        "fetch_at_exec": False,
        "disabled": None,
    }


#: The names of earlier envmgr releases.
PypiStepDecorator = PyPIStepDecorator
PypiFlowDecorator = PyPIFlowDecorator
