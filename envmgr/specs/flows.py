"""What a Metaflow run puts in each step's env: the one place the CLI and the extension agree.

A step's declared spec (its ``@conda``/``@pypi`` over the flow's ``*_base``) becomes the spec a
run hydrates with three additions, made here and nowhere else, so ``envmgr build flow.py``
pre-builds exactly the envs ``python flow.py --environment=conda run`` uses (same spec ids,
same env ids):

* **python**: the launching interpreter's series (``3.11`` → any 3.11.x) when the step and
  the flow name none. Stock Metaflow pins the launching interpreter's exact version; envmgr
  keeps the patch level free so laptops on 3.11.7 and 3.11.9 share envs.
* **Metaflow's task packages**: what a task itself imports (``requests``; ``boto3`` for an S3
  datastore; Azure's and Google's clients for theirs), Metaflow's own
  ``get_pinned_conda_libs`` when Metaflow is installed. They join the step's PyPI packages
  when it has only PyPI ones, else its conda packages, unless the step names them itself.
* **platforms**: the step's own ``platforms=``; else, for a step with remote compute
  (``@kubernetes``, ``@batch``, … or any decorator with ``supports_conda_environment``), the
  ``remote_platform`` setting, else the decorator's ``target_platform``, else linux-64; else
  this host.
* **CUDA**: a step whose compute asks for GPUs (``gpu=`` above 0 on ``@kubernetes``/``@batch``,
  or ``@nvidia``) is locked with ``__cuda`` at the ``cuda`` setting (the cluster's CUDA), unless
  its spec names ``__cuda`` itself; every other step without. The host's GPU never decides.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from envmgr.config import load
from envmgr.errors import EnvmgrError
from envmgr.ids import parse_platform
from envmgr.platforms import Platform, host_platform
from envmgr.specs.deps import CondaDep, PypiDep, parse_python
from envmgr.specs.model import EnvSpec, merge

__all__ = [
    "DATASTORES",
    "DEPLOY_DECORATORS",
    "GPU_DECORATORS",
    "REMOTE_DECORATORS",
    "Datastore",
    "Placement",
    "RunSettings",
    "metaflow_target_platform",
    "run_settings",
    "run_spec",
    "run_specs",
    "run_store",
    "step_cuda",
    "step_platforms",
    "task_packages",
    "wants_gpu",
]

Datastore = Literal["local", "s3", "azure", "gs"]
DATASTORES: tuple[Datastore, ...] = get_args(Datastore)

#: Decorators that run a step elsewhere: Metaflow's own list (its conda environment's).
REMOTE_DECORATORS = ("batch", "kubernetes", "nvidia", "snowpark", "slurm", "nvct", "skypilot_step")
#: Compute decorators whose steps always run on a GPU.
GPU_DECORATORS = ("nvidia", "nvct")
#: The compute decorator each deploy command puts on every step (as its own CLI does).
DEPLOY_DECORATORS: Mapping[str, str] = {
    "airflow": "kubernetes",
    "argo-workflows": "kubernetes",
    "step-functions": "batch",
}

#: Metaflow 2.19's pins, for a host without Metaflow (``metaflow_config.get_pinned_conda_libs``).
_TASK_PACKAGES: Mapping[str, Mapping[str, str]] = {
    "local": {"requests": ">=2.21.0"},
    "s3": {"requests": ">=2.21.0", "boto3": ">=1.14.0"},
    "azure": {
        "requests": ">=2.21.0",
        "azure-identity": ">=1.10.0",
        "azure-storage-blob": ">=12.12.0",
        "azure-keyvault-secrets": ">=4.7.0",
        "simple-azure-blob-downloader": ">=0.1.0",
    },
    "gs": {
        "requests": ">=2.21.0",
        "google-cloud-storage": ">=2.5.0",
        "google-auth": ">=2.11.0",
        "google-cloud-secret-manager": ">=2.10.0",
        "simple-gcp-object-downloader": ">=0.1.0",
        "packaging": ">=24.0",
    },
}


class FlowSettingError(EnvmgrError):
    """A datastore or platform setting for a flow's run is not one envmgr knows."""

    exit_code = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    """Where a step runs: the name of its remote-compute decorator (``None``: this host),
    the platform that decorator asks for, when it says (Metaflow's ``target_platform``), and
    whether it asks for GPUs (see :func:`wants_gpu`)."""

    remote: str | None = None
    target_platform: str | None = None
    gpu: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSettings:
    """What a run is started with: its datastore and the launching interpreter's series."""

    datastore: Datastore = "local"
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"


def _metaflow_config() -> Any:
    """Metaflow's configuration module, when Metaflow is installed (its import reads the
    profile, ``METAFLOW_*`` variables and extensions' overrides)."""
    try:
        from metaflow import metaflow_config  # noqa: PLC0415
    except ImportError:
        return None
    return metaflow_config


def run_settings(
    datastore: str | None = None, python: str | None = None, *, where: str = "--datastore"
) -> RunSettings:
    """The settings of a run: *datastore* when given, else Metaflow's ``DEFAULT_DATASTORE``
    (its config or ``METAFLOW_DEFAULT_DATASTORE``), else local; *python* (``"3.11"``) when
    given, else this interpreter's. Raises ``FlowSettingError`` for an unknown datastore."""
    if datastore is None:
        config = _metaflow_config()
        if config is not None:
            datastore = str(config.DEFAULT_DATASTORE)
        else:
            datastore = os.environ.get("METAFLOW_DEFAULT_DATASTORE") or "local"
    if datastore not in DATASTORES:
        raise FlowSettingError(
            f"{where}: unknown datastore {datastore!r}", hint=f"use one of {', '.join(DATASTORES)}"
        )
    if python is None:
        return RunSettings(datastore=datastore)
    try:
        parse_python(python)
    except ValueError as exc:
        raise FlowSettingError(f"--python: {exc}", hint='give a series such as "3.11"') from None
    return RunSettings(datastore=datastore, python=python)


def metaflow_target_platform(remote: str) -> str | None:
    """The ``target_platform`` Metaflow's *remote* decorator class declares (e.g. from
    ``METAFLOW_KUBERNETES_CONDA_ARCH``), when Metaflow is installed."""
    if _metaflow_config() is None:
        return None
    from metaflow.plugins import STEP_DECORATORS  # noqa: PLC0415

    for deco in STEP_DECORATORS:
        if deco.name == remote:
            return getattr(deco, "target_platform", None)
    return None


def task_packages(datastore: Datastore) -> dict[str, str]:
    """``{name: version spec}`` a Metaflow task needs in its env for *datastore*."""
    config = _metaflow_config()
    if config is not None and hasattr(config, "get_pinned_conda_libs"):
        return dict(config.get_pinned_conda_libs(None, datastore))
    return dict(_TASK_PACKAGES[datastore])


def step_platforms(spec: EnvSpec, placement: Placement) -> tuple[Platform, ...]:
    """Where a step with *spec* and *placement* runs (see the module's docstring)."""

    if spec.platforms:
        return tuple(spec.platforms)
    if placement.remote is None:
        return (host_platform(),)
    config = load()
    value, where = config["remote_platform"], config.sources["remote_platform"]
    if where.startswith("default") and placement.target_platform:
        # Metaflow's own knob (e.g. METAFLOW_KUBERNETES_CONDA_ARCH) when envmgr has none.
        value, where = placement.target_platform, f"@{placement.remote} target_platform"
    else:
        where = f"envmgr setting remote_platform ({where})"
    return (parse_platform(value, where=where),)  # type: ignore[return-value]  # checked


def wants_gpu(remote: str | None, gpu: object) -> bool:
    """Whether a step on the compute decorator *remote* with its ``gpu=`` argument *gpu*
    (a number or its text; ``None`` when not given) runs on a GPU."""
    if remote in GPU_DECORATORS:
        return True
    if remote is None or gpu is None or isinstance(gpu, bool):
        return False
    try:
        return float(str(gpu).strip()) > 0
    except ValueError:
        raise FlowSettingError(
            f"@{remote}(gpu={gpu!r}): not a number of GPUs", hint="give a whole number, e.g. gpu=1"
        ) from None


def step_cuda(spec: EnvSpec, placement: Placement) -> tuple[tuple[str, str], ...]:
    """*spec*'s system packages with ``__cuda`` at the ``cuda`` setting for a GPU step that
    names no ``__cuda`` itself."""
    if not placement.gpu or "__cuda" in dict(spec.system):
        return spec.system
    from envmgr.cuda import parse_cuda  # noqa: PLC0415

    config = load()
    try:
        cuda = parse_cuda(
            str(config["cuda"]), where=f"envmgr setting cuda ({config.sources['cuda']})"
        )
    except ValueError as exc:
        raise FlowSettingError(str(exc), hint="set it to your GPU nodes' CUDA, e.g. 12.4") from None
    return (*spec.system, ("__cuda", cuda))


def run_spec(spec: EnvSpec, placement: Placement, settings: RunSettings) -> EnvSpec:
    """*spec* (a step's declared spec) as the run uses it: python, task packages, platforms,
    CUDA."""
    python = spec.python or parse_python(settings.python)
    present = {d.name for d in spec.conda} | {d.name for d in spec.pypi}
    missing = {n: v for n, v in task_packages(settings.datastore).items() if n not in present}
    extra = EnvSpec()
    if missing and spec.pypi and not spec.conda:
        extra = EnvSpec(pypi=tuple(PypiDep.parse(f"{n}{v}") for n, v in missing.items()))
    elif missing:
        extra = EnvSpec(conda=tuple(CondaDep.parse(f"{n} {v}") for n, v in missing.items()))
    completed = merge(spec, extra)
    return dataclasses.replace(
        completed,
        python=python,
        platforms=step_platforms(completed, placement),
        system=step_cuda(completed, placement),
    )


def run_specs(
    specs: Mapping[str, EnvSpec], placements: Mapping[str, Placement], settings: RunSettings
) -> dict[str, EnvSpec]:
    """The run's spec of every step in *specs* that is not ``disabled`` (a disabled step runs
    on the launching interpreter, as in stock Metaflow)."""
    return {
        name: run_spec(spec, placements.get(name, Placement()), settings)
        for name, spec in specs.items()
        if not spec.disabled
    }


def run_store(datastore: Datastore, store: str | None = None) -> tuple[str, str | None]:
    """``(store URL, S3 endpoint)`` a run keeps its envs in: *store* or envmgr's ``store``
    setting when either is given, else ``<DATASTORE_SYSROOT_S3>/envmgr`` for an S3 datastore
    (with Metaflow's ``S3_ENDPOINT_URL``), else envmgr's local store."""

    config = load(flags={"store": store})
    explicit = not config.sources["store"].startswith("default")
    if not explicit and os.environ.get("METAFLOW_ENVMGR_STORE"):
        return os.environ["METAFLOW_ENVMGR_STORE"], None
    if explicit or datastore != "s3":
        return str(config["store"]), None
    mf = _metaflow_config()
    root = getattr(mf, "DATASTORE_SYSROOT_S3", None) if mf is not None else None
    if not root:
        return str(config["store"]), None
    return f"{str(root).rstrip('/')}/envmgr", getattr(mf, "S3_ENDPOINT_URL", None) or None
