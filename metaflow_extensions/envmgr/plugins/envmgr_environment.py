"""``--environment=conda`` / ``pypi`` backed by envmgr: lock, build once, hydrate per host.

At flow start (when Metaflow packages the code) every step's spec is read from its decorators
(base + step, ``@conda`` and ``@pypi`` together allowed), resolved through envmgr's resolution
cache, and each env of this host's platform is built and stored once. Local tasks run with the
hydrated env's python (one hydration per host however many tasks); remote tasks hydrate with
``python -m envmgr.bootstrap`` from the store named in the code package.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from metaflow.metaflow_environment import MetaflowEnvironment
from metaflow.packaging_sys import ContentType

_PACKAGE_FILE = "envmgr_envs.json"
#: Metaflow itself needs these in every env its tasks run in.
_METAFLOW_NEEDS = ("requests",)


def _store_url() -> str:
    from envmgr.config import default_store_url

    if os.environ.get("ENVMGR_STORE"):
        return os.environ["ENVMGR_STORE"]
    from metaflow.metaflow_config import DATASTORE_SYSROOT_S3, DEFAULT_DATASTORE

    if DEFAULT_DATASTORE == "s3" and DATASTORE_SYSROOT_S3:
        from metaflow.metaflow_config import S3_ENDPOINT_URL

        if S3_ENDPOINT_URL and not os.environ.get("AWS_ENDPOINT_URL"):
            os.environ["AWS_ENDPOINT_URL"] = S3_ENDPOINT_URL
        return f"{DATASTORE_SYSROOT_S3.rstrip('/')}/envmgr"
    return default_store_url()


def _calls(decorators: Any, kinds: tuple[str, ...]) -> list[Any]:
    from envmgr.decorators import DecoratorCall

    calls = []
    for deco in decorators:
        if deco.name not in kinds:
            continue
        kwargs = {
            k: v
            for k, v in deco.attributes.items()
            if v is not None and v != {} and v != [] and v != ()
        }
        calls.append(DecoratorCall(kind=deco.name, kwargs=kwargs))
    return calls


def _bootstrap_sources() -> list[tuple[str, str, Any]]:
    """What ``python -m envmgr.bootstrap`` imports on a worker, for the code package: a
    worker needs only Python, boto3 (for S3) and zstandard or the zstd program."""
    from envmgr.bootstrap import worker_sources

    return [(str(path), arcname, ContentType.OTHER_CONTENT) for path, arcname in worker_sources()]


class CondaEnvironment(MetaflowEnvironment):  # type: ignore[misc]
    TYPE = "conda"

    def __init__(self, flow: Any) -> None:
        super().__init__(flow)
        self.flow = flow
        self.envmgr_envs: dict[str, dict[str, str]] = {}
        self._pythons: dict[str, str] = {}
        self._package_file: str | None = None
        self._datastore = ""

    def validate_environment(self, echo: Any, datastore_type: str) -> None:
        # Tasks of an S3 datastore need boto3 inside their env.
        self._datastore = datastore_type
        super().validate_environment(echo, datastore_type)

    def decospecs(self) -> tuple[str, ...]:
        # Every step gets @conda, so its hooks run (a step without one uses the base env).
        return ("conda", *super().decospecs())

    def _specs(self) -> dict[str, Any]:
        from envmgr.decorators import step_specs
        from envmgr.spec import CondaDep, PypiDep, merge

        flow_decos = [
            d
            for name in ("conda_base", "pypi_base")
            for d in self.flow._flow_decorators.get(name, [])
        ]
        steps = {step.name: _calls(step.decorators, ("conda", "pypi")) for step in self.flow}
        specs = step_specs(
            _calls(flow_decos, ("conda_base", "pypi_base")), steps, flow=self.flow.name
        )
        out = {}
        for name, spec in specs.items():
            if spec.disabled:
                continue
            present = {d.name for d in spec.conda} | {d.name for d in spec.pypi}
            needs = (*_METAFLOW_NEEDS, *(("boto3",) if self._datastore == "s3" else ()))
            missing = [n for n in needs if n not in present]
            if missing and spec.pypi and not spec.conda:
                spec = merge(spec, type(spec)(pypi=tuple(PypiDep.parse(n) for n in missing)))
            elif missing:
                spec = merge(spec, type(spec)(conda=tuple(CondaDep.parse(n) for n in missing)))
            out[name] = spec
        return out

    def init_environment(self, echo: Any, only_steps: Any = None) -> None:
        from metaflow.exception import MetaflowException

        from envmgr.errors import EnvmgrError

        try:
            self._init_environment(echo, only_steps)
        except EnvmgrError as exc:
            # A bad spec or an unreachable store stops the run before any task starts,
            # as one message (Metaflow prints MetaflowException without a traceback).
            raise MetaflowException(f"envmgr: {exc}") from None

    def _init_environment(self, echo: Any, only_steps: Any) -> None:
        import subprocess
        import sys

        from envmgr.errors import EnvmgrError
        from envmgr.platforms import host_platform

        specs = self._specs()
        if only_steps:
            specs = {k: v for k, v in specs.items() if k in only_steps}
        if not specs:
            return
        store_url = _store_url()
        echo(f"envmgr: resolving {len(specs)} step environments (store {store_url})")
        # Solving and building run in a child process: py-rattler's runtime threads must not
        # live in Metaflow's process (they can abort an interpreter while it finalizes).
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump({"steps": {k: v.to_dict() for k, v in specs.items()}}, handle)
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "envmgr",
                    "build",
                    "--specs-json",
                    handle.name,
                    "--platform",
                    host_platform(),
                    "--store",
                    store_url,
                    "--json",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            Path(handle.name).unlink()
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            message = lines[-1] if lines else f"exit code {result.returncode}"
            raise EnvmgrError(message.removeprefix("envmgr: error: "))
        for row in json.loads(result.stdout)["envs"]:
            state = {
                "built": "built",
                "present": "stored already",
                "waited": "built by another process",
            }[row["status"]]
            lock_state = "cached lock" if row["lock_cached"] else "solved"
            echo(
                f"envmgr: {', '.join(row['steps'])}: env {row['env_id'][:12]} "
                f"({lock_state}, {state})"
            )
            for step in row["steps"]:
                self.envmgr_envs[step] = {
                    "env_id": row["env_id"],
                    "spec_id": row["spec_id"],
                    "store": store_url,
                }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(self.envmgr_envs, handle)
        self._package_file = handle.name

    def add_to_package(self) -> list[tuple[str, str, Any]]:
        files = list(super().add_to_package())
        if self._package_file:
            files.append((self._package_file, _PACKAGE_FILE, ContentType.OTHER_CONTENT))
            files += _bootstrap_sources()
        return files

    def envmgr_python(self, step_name: str) -> str:
        """Hydrate the step's env on this host (once) and return its python."""
        if step_name not in self._pythons:
            from envmgr.cache import open_store
            from envmgr.config import cache_dir
            from envmgr.hydrate import hydrate

            env = self.envmgr_envs[step_name]
            result = hydrate(env["env_id"], open_store(env["store"]), cache_dir())
            self._pythons[step_name] = str(result.prefix / "bin" / "python")
        return self._pythons[step_name]

    def bootstrap_commands(self, step_name: str, datastore_type: str) -> list[str]:
        env = self.envmgr_envs.get(step_name)
        if env is None:
            return list(super().bootstrap_commands(step_name, datastore_type))
        return [
            "echo 'envmgr: hydrating the environment'",
            f"python -m envmgr.bootstrap --store {env['store']} --env-id {env['env_id']} "
            '--cache-dir "$(pwd)/.envmgr" > /dev/null',
            f"export ENVMGR_ENV_ID={env['env_id']} ENVMGR_SPEC_ID={env['spec_id']}",
        ]

    def executable(self, step_name: str, default: str | None = None) -> str:
        env = self.envmgr_envs.get(step_name)
        if env is None:
            return str(super().executable(step_name, default))
        return f"$(pwd)/.envmgr/envs/{env['env_id']}/bin/python -s"


class PypiEnvironment(CondaEnvironment):
    TYPE = "pypi"


__all__ = ["CondaEnvironment", "PypiEnvironment"]
