"""``--environment=conda`` / ``pypi`` backed by envmgr: lock, build once, hydrate per host.

At flow start (when Metaflow packages the code) every step's spec is read from its decorators
(base + step, ``@conda`` and ``@pypi`` together allowed), resolved through envmgr's resolution
cache for the platform the step runs on, and each env is built and stored once, whatever this
host's platform: a step with a remote compute decorator (Metaflow's own list, from the flow or
``--with``) targets envmgr's ``remote_platform`` setting (``ENVMGR_REMOTE_PLATFORM``; default
the decorator's ``target_platform``, else linux-64), a step's ``@conda(platforms=[...])``
wins over both, and other steps target this host. Local tasks run with the hydrated env's
python (one hydration per host however many tasks); remote tasks hydrate their own platform's
env with ``python -m envmgr.bootstrap`` from the store named in the code package.
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
#: Decorators that run a step elsewhere: Metaflow's own list (its conda environment's), plus
#: any decorator that says ``supports_conda_environment``.
REMOTE_DECORATORS = ("batch", "kubernetes", "nvidia", "snowpark", "slurm", "nvct", "skypilot_step")


def remote_decorator(decorators: Any) -> Any:
    """Of a step's *decorators*, the one that runs it on remote compute (``None``: local)."""
    for deco in decorators:
        if getattr(deco, "supports_conda_environment", False) or deco.name in REMOTE_DECORATORS:
            return deco
    return None


def step_platforms(step: Any, spec: Any) -> tuple[str, ...]:
    """Where *step* runs: its spec's platforms, else the remote platform, else this host."""
    from envmgr.config import load
    from envmgr.ids import parse_platform
    from envmgr.platforms import host_platform

    if spec.platforms:
        return tuple(spec.platforms)
    deco = remote_decorator(step.decorators)
    if deco is None:
        return (host_platform(),)
    config = load()
    value = config["remote_platform"]
    where = f"envmgr setting remote_platform ({config.sources['remote_platform']})"
    if config.sources["remote_platform"].startswith("default"):
        # Metaflow's own knob (e.g. METAFLOW_KUBERNETES_CONDA_ARCH) when envmgr has none.
        value = getattr(deco, "target_platform", None) or value
        where = f"@{deco.name} target_platform"
    return (parse_platform(value, where=where),)


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
    worker needs only Python, boto3 (for S3) and zstandard or the zstd program. They go
    beside ``metaflow`` in the package (code content), which the pod puts on PYTHONPATH."""
    from envmgr.bootstrap import worker_sources

    return [(str(path), arcname, ContentType.CODE_CONTENT) for path, arcname in worker_sources()]


class CondaEnvironment(MetaflowEnvironment):  # type: ignore[misc]
    TYPE = "conda"

    def __init__(self, flow: Any) -> None:
        super().__init__(flow)
        self.flow = flow
        #: step -> {"store", "spec_id", "envs": {platform: env_id}}
        self.envmgr_envs: dict[str, dict[str, Any]] = {}
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
        import dataclasses

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
            step = next(s for s in self.flow if s.name == name)
            out[name] = dataclasses.replace(spec, platforms=step_platforms(step, spec))
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
                    handle.name,  # each spec names the platforms its step runs on
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
                f"envmgr: {', '.join(row['steps'])}: {row['platform']} env "
                f"{row['env_id'][:12]} ({lock_state}, {state})"
            )
            for step in row["steps"]:
                entry = self.envmgr_envs.setdefault(
                    step, {"spec_id": row["spec_id"], "store": store_url, "envs": {}}
                )
                entry["envs"][row["platform"]] = row["env_id"]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(self.envmgr_envs, handle)
        self._package_file = handle.name

    def add_to_package(self) -> list[tuple[str, str, Any]]:
        files = list(super().add_to_package())
        if self._package_file:
            files.append((self._package_file, _PACKAGE_FILE, ContentType.OTHER_CONTENT))
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
            from envmgr.hydrate import hydrate
            from envmgr.platforms import host_platform

            env = self.envmgr_envs[step_name]
            env_id = self.host_env_id(step_name)
            if env_id is None:
                raise MetaflowException(
                    f"envmgr: step {step_name} runs on {', '.join(env['envs'])}, not on this "
                    f"{host_platform()} host (add this platform with @conda(platforms=[...]), "
                    "or run the step on its remote compute)"
                )
            result = hydrate(env_id, open_store(env["store"]), cache_dir())
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
        ]

    def executable(self, step_name: str, default: str | None = None) -> str:
        env = self.envmgr_envs.get(step_name)
        if env is None:
            return str(super().executable(step_name, default))
        return "$ENVMGR_PYTHON -s"


class PypiEnvironment(CondaEnvironment):
    TYPE = "pypi"


__all__ = ["CondaEnvironment", "PypiEnvironment"]
