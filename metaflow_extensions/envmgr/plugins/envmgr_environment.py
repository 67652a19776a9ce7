"""``--environment=conda`` / ``pypi`` backed by envmgr: lock, build once, hydrate per host.

At flow start (when Metaflow packages the code) every step's spec is read from its decorators
(base + step, ``@conda`` and ``@pypi`` together allowed) and completed for the run by
:mod:`envmgr.specs.flows` (python, Metaflow's task packages for the datastore, the platform the step
runs on: the same specs ``envmgr build flow.py`` computes), resolved through envmgr's
resolution cache, and each env is built and stored once, whatever this host's platform. A step
with ``name="team/env:tag"`` runs in that named env. Local tasks run with the hydrated env's
python (one hydration per host however many tasks); remote tasks hydrate their own platform's
env with ``python -m envmgr.bootstrap`` from the store named in the code package.

envmgr is imported inside the methods: Metaflow loads this environment in every task, and a
remote task has only the worker's files of envmgr (see :mod:`envmgr.worker.shipped`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from metaflow.metaflow_environment import MetaflowEnvironment
from metaflow.packaging_sys import ContentType

from metaflow_extensions.envmgr.plugins.envmgr_steps import (
    decorator_calls,
    is_pathspec,
    named_env,
    placement,
)

_PACKAGE_FILE = "envmgr_envs.json"


def _bootstrap_sources() -> list[tuple[str, str, Any]]:
    """What ``python -m envmgr.bootstrap`` imports on a worker, for the code package: a
    worker needs only Python, boto3 (for S3) and zstandard or the zstd program. They go
    beside ``metaflow`` in the package (code content), which the pod puts on PYTHONPATH."""
    from envmgr.worker.shipped import worker_sources

    return [(str(path), arcname, ContentType.CODE_CONTENT) for path, arcname in worker_sources()]


def _child_error(result: Any) -> str:
    """What ``envmgr build --json`` said went wrong: its error object whole (the message, the
    lines of a build log that explain it, the log's path), else its stderr's last lines."""
    try:
        error = json.loads(result.stdout)["error"]
    except (ValueError, KeyError, TypeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        text = str(error["message"])
        if error.get("hint"):
            text += f" ({error['hint']})"
        for line in error.get("lines") or ():
            text += f"\n    {line}"
        if error.get("log"):
            text += f"\n    whole log: {error['log']}"
        return text
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    if not lines:
        return f"envmgr build exited with code {result.returncode}"
    return "\n".join(line.removeprefix("envmgr: error: ") for line in lines[-15:])


def built_line(row: dict[str, Any]) -> str:
    """How a run (and ``environment build``) reports one env of ``envmgr build --json``."""
    state = {
        "built": "built",
        "present": "stored already",
        "waited": "built by another process",
    }[row["status"]]
    if row["status"] == "built" and row.get("layers"):
        from envmgr.cli._common import layers_built_text

        state = layers_built_text(row["layers_built"], row["layers"], int(row["uploaded"]))
    lock_state = "cached lock" if row["lock_cached"] else "solved"
    return (
        f"envmgr: {', '.join(row['steps'])}: {row['platform']} env "
        f"{row['env_id'][:12]} ({lock_state}, {state})"
    )


def _check_task_packages(
    store: Any, platform: str, env_id: str, datastore: str, step: str, what: str
) -> None:
    """An env used as it is (a named env, an earlier step's) must hold what Metaflow's own
    task code imports (``requests``; ``boto3`` for S3): else the task would stop in a
    traceback inside Metaflow. Raises ``EnvmgrError`` naming what is missing."""
    from envmgr.build.once import read_manifest
    from envmgr.errors import EnvmgrError
    from envmgr.specs.flows import run_settings, task_packages

    manifest = read_manifest(store, platform, env_id)
    if manifest is None or not manifest.package_sizes:
        return  # an env stored before manifests named their packages: not checked
    have = {name.lower().replace("_", "-") for name, _size in manifest.package_sizes}
    needed = task_packages(run_settings(datastore or None).datastore)
    missing = sorted(name for name in needed if name.lower() not in have)
    if missing:
        raise EnvmgrError(
            f"step {step!r}: its env {env_id[:12]} ({what}, {platform}) has no "
            f"{' or '.join(missing)}, which Metaflow's task code imports",
            hint="build that env again with "
            + " ".join(f"--conda {name}" for name in missing)
            + " and point the name at it (`envmgr alias`)",
        )


#: One part of a Metaflow pathspec (flow, run id, step, task id): never "." or "..".
_PATHSPEC_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def _pathspec_envs(store: Any, pathspec: str, platforms: Any, *, step: str) -> dict[str, str]:
    """``@named_env(pathspec="Flow/run/step[/task]")``: the env that step's (first) task ran
    in, as its metadata recorded it, for the one platform *platforms* holds; raises
    ``EnvmgrError`` naming *step* when there is no such task, env or platform."""
    from metaflow import Step, Task
    from metaflow.exception import MetaflowNotFound

    from envmgr.cache.layout import manifest_key
    from envmgr.errors import EnvmgrError

    where = f"step {step!r}: @named_env(pathspec={pathspec!r})"
    parts = pathspec.strip("/").split("/")
    if len(parts) not in (3, 4) or not all(_PATHSPEC_PART.fullmatch(part) for part in parts):
        raise EnvmgrError(f"{where}: not a step or task pathspec", hint='write "Flow/run/step"')
    try:
        found = (
            Task(pathspec, _namespace_check=False)
            if len(parts) == 4
            else next(iter(Step(pathspec, _namespace_check=False)), None)
        )
    except MetaflowNotFound:
        found = None
    if found is None:
        raise EnvmgrError(
            f"{where}: no such task in this metadata service",
            hint="check the flow name, the run id and the step name",
        )
    meta = found.metadata_dict
    env_id = meta.get("envmgr_env_id")
    if not env_id:
        raise EnvmgrError(
            f"{where}: task {found.pathspec} ran without an envmgr env",
            hint="point at a step that ran with --environment=conda or pypi",
        )
    wanted = list(platforms)
    have = [p for p in wanted if store.exists(manifest_key(p, env_id))]
    if len(wanted) != 1 or not have:
        raise EnvmgrError(
            f"{where}: its env {env_id[:12]} is not in {store.url} for "
            f"{', '.join(wanted)}, where this step runs",
            hint="run the step where that task ran, or use a named env that has this platform "
            "(`envmgr alias`)",
        )
    return {have[0]: env_id}


class CondaEnvironment(MetaflowEnvironment):  # type: ignore[misc]
    TYPE = "conda"

    def __init__(self, flow: Any) -> None:
        super().__init__(flow)
        self.flow = flow
        #: step -> {"store", "spec_id", "envs": {platform: env_id}}
        self.envmgr_envs: dict[str, dict[str, Any]] = {}
        self._pythons: dict[str, str] = {}
        #: Holds the envs file for the code package once written (see _write_package_file).
        self._package_dir: tempfile.TemporaryDirectory[str] | None = None
        self._datastore = ""

    def validate_environment(self, echo: Any, datastore_type: str) -> None:
        # Tasks of an S3 datastore need boto3 inside their env.
        self._datastore = datastore_type
        super().validate_environment(echo, datastore_type)

    def decospecs(self) -> tuple[str, ...]:
        # Every step gets @conda, so its hooks run (a step without one uses the base env).
        return ("conda", *super().decospecs())

    def _specs(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The run's spec of every step (:mod:`envmgr.specs.flows`, as ``envmgr build flow.py``
        computes them) and the existing env of steps with ``name=`` or netflixext's
        ``@named_env``: ``"team/env:tag"``, or ``"Flow/run/step"`` for ``pathspec=``."""
        from envmgr.errors import SpecError
        from envmgr.specs.decorators import DecoratorCall, step_names, step_specs
        from envmgr.specs.flows import run_settings, run_specs

        flow_decos = [
            d
            for name in ("conda_base", "pypi_base")
            for d in self.flow._flow_decorators.get(name, [])
        ]
        named_base = (self.flow._flow_decorators.get("named_env_base") or [None])[0]
        problems: list[Any] = []
        steps: dict[str, list[Any]] = {}
        pathspecs: dict[str, str] = {}
        for step in self.flow:
            ref = named_env(step, named_base, problems)
            if ref is None:
                steps[step.name] = decorator_calls(step.decorators, ("conda", "pypi"))
            elif ref[0] == "pathspec":
                pathspecs[step.name] = ref[1]
                steps[step.name] = []
            else:  # as @conda(name=...) or @conda(disabled=True) says it
                call = DecoratorCall(kind="conda", kwargs=dict([ref]), where="@named_env")
                steps[step.name] = [call]
        if problems:
            raise SpecError(problems)
        specs = step_specs(
            decorator_calls(flow_decos, ("conda_base", "pypi_base")), steps, flow=self.flow.name
        )
        names = {k: v for k, v in step_names(steps).items() if not specs[k].disabled}
        names.update(pathspecs)
        placements = {step.name: placement(step) for step in self.flow}
        settings = run_settings(self._datastore or None, where="--datastore")
        unnamed = {k: v for k, v in specs.items() if k not in names}
        return run_specs(unnamed, placements, settings), names

    def init_environment(self, echo: Any, only_steps: Any = None) -> None:
        from metaflow.exception import MetaflowException

        from envmgr.errors import EnvmgrError

        try:
            self._init_environment(echo, only_steps)
        except EnvmgrError as exc:
            # A bad spec or an unreachable store stops the run before any task starts,
            # as one message (Metaflow prints MetaflowException without a traceback).
            raise MetaflowException(f"envmgr: {exc}") from None

    def plan(self, only_steps: Any = None) -> tuple[dict[str, Any], dict[str, str], str]:
        """The specs of the run's steps (of *only_steps* if given), the existing env of steps
        that name one (see :meth:`_specs`), and the store the run keeps its envs in."""
        from envmgr.specs.flows import run_settings, run_store

        specs, names = self._specs()
        if only_steps:
            specs = {k: v for k, v in specs.items() if k in only_steps}
            names = {k: v for k, v in names.items() if k in only_steps}
        store_url, endpoint = run_store(run_settings(self._datastore or None).datastore)
        if endpoint and not os.environ.get("AWS_ENDPOINT_URL"):
            os.environ["AWS_ENDPOINT_URL"] = endpoint  # for the child and the hydrates here
        return specs, names, store_url

    def run_envmgr(
        self, command: str, specs: dict[str, Any], store_url: str, *extra: str
    ) -> list[dict[str, Any]]:
        """``envmgr COMMAND`` (resolve or build) of *specs* into *store_url*: its ``--json``
        rows, one per env and platform. Solving and building run in a child process:
        py-rattler's runtime threads must not live in Metaflow's process (they can abort an
        interpreter while it finalizes). Raises ``EnvmgrError`` with the child's error."""
        import subprocess
        import sys

        from envmgr.errors import EnvmgrError

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump({"steps": {k: v.to_dict() for k, v in specs.items()}}, handle)
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "envmgr",
                    command,
                    "--specs-json",
                    handle.name,  # each spec names the platforms its step runs on
                    "--store",
                    store_url,
                    "--json",
                    *extra,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            Path(handle.name).unlink()
        if result.returncode != 0:
            raise EnvmgrError(_child_error(result))
        rows: list[dict[str, Any]] = json.loads(result.stdout)["envs"]
        return rows

    def _init_environment(self, echo: Any, only_steps: Any) -> None:
        specs, names, store_url = self.plan(only_steps)
        if not specs and not names:
            return
        if names:
            self._named_envs(names, store_url, echo)
        if not specs:
            self._write_package_file()
            return
        echo(f"envmgr: resolving {len(specs)} step environments (store {store_url})")
        for row in self.run_envmgr("build", specs, store_url):
            echo(built_line(row))
            for step in row["steps"]:
                entry = self.envmgr_envs.setdefault(
                    step, {"spec_id": row["spec_id"], "store": store_url, "envs": {}}
                )
                entry["envs"][row["platform"]] = row["env_id"]
        self._write_package_file()

    def _write_package_file(self) -> None:
        # The code package reads this file whenever Metaflow makes it; the directory goes when
        # this environment does, or when the process exits, so no run leaves a file behind.
        if self._package_dir is None:
            self._package_dir = tempfile.TemporaryDirectory(prefix="envmgr-package-")
        path = Path(self._package_dir.name) / _PACKAGE_FILE
        path.write_text(json.dumps(self.envmgr_envs), encoding="utf-8")

    def _named_envs(self, names: dict[str, str], store_url: str, echo: Any) -> None:
        """Steps with ``name=`` run in that named env's env for their platform, as it is;
        steps with ``@named_env(pathspec=)`` in the env that step's task ran in."""
        from envmgr.cache import open_store
        from envmgr.cache.names import step_envs
        from envmgr.specs.flows import step_platforms
        from envmgr.specs.model import EnvSpec

        store = open_store(store_url)
        for step_name, name in sorted(names.items()):
            step = next(s for s in self.flow if s.name == step_name)
            # name= comes alone (the spec layer refuses platforms= beside it).
            platforms = step_platforms(EnvSpec(), placement(step))
            if is_pathspec(name):
                envs = _pathspec_envs(store, name, platforms, step=step_name)
                what = f"as {name} ran"
            else:
                envs = step_envs(store, name, platforms, step=step_name)
                what = f"named {name}"
            for platform_, env_id in envs.items():
                _check_task_packages(store, platform_, env_id, self._datastore, step_name, what)
            self.envmgr_envs[step_name] = {
                "spec_id": "",
                "store": store_url,
                "envs": envs,
                "name": name,
            }
            for platform_, env_id in envs.items():
                echo(f"envmgr: {step_name}: {platform_} env {env_id[:12]} ({what})")

    def add_to_package(self) -> list[tuple[str, str, Any]]:
        files = list(super().add_to_package())
        if self._package_dir is not None:
            written = str(Path(self._package_dir.name) / _PACKAGE_FILE)
            files.append((written, _PACKAGE_FILE, ContentType.OTHER_CONTENT))
            files += _bootstrap_sources()
        return files

    def host_env_id(self, step_name: str) -> str | None:
        """The env a local task of *step_name* runs in (this host's platform), if any."""
        from envmgr.platforms import host_platform

        env = self.envmgr_envs.get(step_name)
        return None if env is None else env["envs"].get(host_platform())

    def envmgr_python(self, step_name: str) -> str:
        """Hydrate the step's env for this host (once) and return its python."""
        if step_name not in self._pythons:
            from metaflow.exception import MetaflowException

            from envmgr.cache import open_store
            from envmgr.config import cache_dir
            from envmgr.platforms import host_platform
            from envmgr.worker.hydrate import hydrate

            env = self.envmgr_envs[step_name]
            env_id = self.host_env_id(step_name)
            if env_id is None:
                raise MetaflowException(
                    f"envmgr: step {step_name} runs on {', '.join(env['envs'])}, not on this "
                    f"{host_platform()} host (add this platform with @conda(platforms=[...]), "
                    "or run the step on its remote compute)"
                )
            result = hydrate(env_id, open_store(env["store"]), cache_dir(), check_gpu=True)
            self._pythons[step_name] = str(result.prefix / "bin" / "python")
        return self._pythons[step_name]

    def bootstrap_commands(self, step_name: str, datastore_type: str) -> list[str]:
        env = self.envmgr_envs.get(step_name)
        if env is None:
            return list(super().bootstrap_commands(step_name, datastore_type))
        # The worker picks its own platform's env; a failed hydrate fails the assignment,
        # so the && chain Metaflow builds stops there.
        pairs = " ".join(f"--env-for {p}={e}" for p, e in sorted(env["envs"].items()))
        return [
            "echo 'envmgr: hydrating the environment'",
            f"ENVMGR_EXPORTS=$(python -m envmgr.bootstrap --store {env['store']} {pairs} "
            '--cache-dir "$(pwd)/.envmgr" --shell)',
            'eval "$ENVMGR_EXPORTS"',
            f"export ENVMGR_SPEC_ID={env['spec_id']}",
            *([f"export ENVMGR_ENV_NAME={env['name']}"] if env.get("name") else []),
        ]

    def is_disabled(self, step: Any) -> bool:
        """Stock's question: does *step* run on the launching interpreter (``disabled``)?"""
        return step.name not in self.envmgr_envs and any(
            d.name in ("conda", "pypi") and str(d.attributes.get("disabled")).lower() == "true"
            for d in step.decorators
        )

    def interpreter(self, step_name: str) -> str:
        """Stock's name for the python a local task of *step_name* runs with."""
        return self.envmgr_python(step_name)

    def executable(self, step_name: str, default: str | None = None) -> str:
        env = self.envmgr_envs.get(step_name)
        if env is None:
            return str(super().executable(step_name, default))
        return "$ENVMGR_PYTHON -s"


class PypiEnvironment(CondaEnvironment):
    TYPE = "pypi"


__all__ = ["CondaEnvironment", "PypiEnvironment", "built_line"]
