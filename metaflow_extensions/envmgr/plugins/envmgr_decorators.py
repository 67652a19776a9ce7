"""@conda / @pypi (steps) and @conda_base / @pypi_base (flows) with envmgr's arguments.

They accept Metaflow's names (``packages``, ``libraries``, ``python``, ``disabled``) and envmgr's
additions (``channels``, ``system_packages``, ``platforms``; ``index_url`` and
``extra_index_urls`` for PyPI); ``@conda`` and ``@pypi`` may sit on one step. The environment
(``--environment=conda``) does the work; the step decorators run each task with its env's
python and record which env it used.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, ClassVar

from metaflow.decorators import FlowDecorator, StepDecorator
from metaflow.metadata_provider import MetaDatum
from metaflow.packaging_sys import ContentType

from metaflow_extensions.envmgr.plugins.envmgr_environment import remote_decorator

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


class _EnvmgrFlow(FlowDecorator):  # type: ignore[misc]
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


class _EnvmgrStep(StepDecorator):  # type: ignore[misc]
    defaults: ClassVar[dict[str, Any]] = {}
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
        self.flow_name = flow.name
        self.step_name = step
        self.environment = environment
        self.python = None
        self.remote = remote_decorator(decos) is not None

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
        if env is not None and not self.remote:
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
        spec_id = os.environ.get("ENVMGR_SPEC_ID")
        if not env_id:
            return
        tags = [f"attempt_id:{retry_count}"]
        metadata.register_metadata(
            run_id,
            step_name,
            task_id,
            [
                MetaDatum(field="envmgr_env_id", value=env_id, type="envmgr_env_id", tags=tags),
                MetaDatum(
                    field="envmgr_spec_id", value=spec_id or "", type="envmgr_spec_id", tags=tags
                ),
            ],
        )

    def runtime_finished(self, exception: Any) -> None:
        if _EnvmgrStep._code_dir is not None:
            _EnvmgrStep._code_dir.cleanup()
            _EnvmgrStep._code_dir = None


class CondaStepDecorator(_EnvmgrStep):
    """Conda packages for one step (Metaflow's arguments plus ``channels`` etc.)."""

    name = "conda"
    defaults: ClassVar[dict[str, Any]] = {
        "packages": {},
        "libraries": {},
        "channels": [],
        **_COMMON,
    }


class PypiStepDecorator(_EnvmgrStep):
    """PyPI packages for one step."""

    name = "pypi"
    defaults: ClassVar[dict[str, Any]] = {
        "packages": {},
        "index_url": None,
        "extra_index_urls": [],
        **_COMMON,
    }


class CondaFlowDecorator(_EnvmgrFlow):
    """Conda packages for every step of the flow."""

    name = "conda_base"
    defaults: ClassVar[dict[str, Any]] = {
        "packages": {},
        "libraries": {},
        "channels": [],
        **_COMMON,
    }


class PypiFlowDecorator(_EnvmgrFlow):
    """PyPI packages for every step of the flow."""

    name = "pypi_base"
    defaults: ClassVar[dict[str, Any]] = {
        "packages": {},
        "index_url": None,
        "extra_index_urls": [],
        **_COMMON,
    }
