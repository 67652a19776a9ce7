"""CUDA: which CUDA a locked env needs from a node's NVIDIA driver, and what a node has.

An env needs CUDA when a locked package does: a conda package that depends on ``__cuda``
(conda-forge's CUDA builds of pytorch, jax, cupy), the ``cuda-version`` metapackage, or a
PyPI wheel built for a CUDA series (``torch 2.5.1+cu124``, ``nvidia-*-cu12``). The driver must
support at least the CUDA *major* version of what was locked (NVIDIA's minor version
compatibility: a 12.6 runtime runs on any 12.x driver), or the lower bound a package states
itself (``__cuda >=12.4``), whichever is higher. Every other env is a CPU env, whatever
``__cuda`` its lock was solved with.

What a node has comes from ``CONDA_OVERRIDE_CUDA`` when it is set (empty: no GPU), as conda
does, else from the driver itself (``cuDriverGetVersion`` in ``libcuda``). Standard library
only: the worker's bootstrap checks a node with this before it downloads anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_CUDA",
    "TORCH_FAMILY",
    "CudaNeed",
    "check_node",
    "cuda_need",
    "describe",
    "manifest_cuda",
    "node_cuda",
    "parse_cuda",
    "torch_backend",
]

#: The CUDA version GPU steps are locked for unless the ``cuda`` setting says otherwise:
#: what the GPU node images of the large clouds' Kubernetes and Batch services ship drivers
#: for in 2026 (12.x drivers run every 12.x runtime).
DEFAULT_CUDA = "12.6"

#: The PyPI projects PyTorch's own indexes serve per backend (``cpu``, ``cu126``): with the
#: ``torch_index`` setting they come from there only, whoever asks for them (as uv's
#: ``--torch-backend`` routes them).
TORCH_FAMILY = (
    "torch",
    "torchaudio",
    "torchdata",
    "torchtext",
    "torchvision",
    "torchrec",
    "pytorch-triton",
    "pytorch-triton-rocm",
)

_VERSION = re.compile(r"\d+(\.\d+){0,2}")
_LOWER = re.compile(r"(>=|==|>|=)?\s*(\d+(?:\.\d+)*)(\.\*)?")
_WHEEL_SERIES = re.compile(r"\+cu(\d+)(\d)\b")
_NVIDIA_WHEEL = re.compile(r"nvidia-.*-cu(\d+)")


class CudaNeed(NamedTuple):
    """What an env needs: a driver for CUDA *minimum* or newer, because of *package*."""

    minimum: str
    package: str

    def __str__(self) -> str:
        return f"CUDA >= {self.minimum} ({self.package})"


def parse_cuda(value: str, *, where: str = "cuda") -> str:
    """*value* as a CUDA version ("12", "12.4"); raises ``ValueError`` naming *where*."""
    text = value.strip()
    if not _VERSION.fullmatch(text):
        raise ValueError(f"{where}: {value!r} is not a CUDA version; give digits and dots: 12.4")
    return text


def torch_backend(cuda: str | None) -> str:
    """PyTorch's name for the wheels of an env locked with ``__cuda`` *cuda*: ``cpu`` without,
    ``cu126`` for 12.6."""
    if not cuda:
        return "cpu"
    major, _, rest = cuda.partition(".")
    return f"cu{major}{rest.split('.')[0] or '0'}"


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _cuda_lower_bound(spec: str) -> str | None:
    """The lowest CUDA a ``__cuda`` match spec (``>=12.4``, ``12.*``, ``>=11.2,<13``) admits,
    or ``None`` when it states none (a bare ``__cuda``)."""
    best: str | None = None
    for part in re.split(r"[,|]", spec):
        part = part.strip()
        if not part or part.startswith(("<", "!")):
            continue
        found = _LOWER.fullmatch(part)
        if found and (best is None or _key(found.group(2)) > _key(best)):
            best = found.group(2)
    return best


def cuda_need(packages: Iterable[Any]) -> CudaNeed | None:
    """The CUDA an env of *packages* (locked packages: ``manager``, ``name``, ``version``,
    ``build``, ``depends``) needs from the driver, or ``None`` for a CPU env. The package
    named is the first that uses CUDA itself (a framework's CUDA build) over the runtime
    packages that state only the series (``cuda-version``, ``nvidia-*-cu12``)."""
    minimum: str | None = None
    users: list[str] = []
    runtimes: list[str] = []

    def consider(bound: str | None, package: Any, *, user: bool) -> None:
        nonlocal minimum
        label = f"{package.name} {package.version}"
        if getattr(package, "build", ""):
            label += f" {package.build}"
        (users if user else runtimes).append(label)
        if bound is not None and (minimum is None or _key(bound) > _key(minimum)):
            minimum = bound

    for package in packages:
        if package.manager == "conda":
            specs = [
                d.strip().partition(" ")[2] for d in package.depends if d.split(" ")[0] == "__cuda"
            ]
            if specs:
                bounds = [b for b in map(_cuda_lower_bound, specs) if b is not None]
                consider(max(bounds, key=_key) if bounds else None, package, user=True)
            if package.name == "cuda-version":
                consider(package.version.split(".")[0], package, user=False)
        else:
            series = _WHEEL_SERIES.search(package.version)
            nvidia = _NVIDIA_WHEEL.fullmatch(package.name)
            if series:
                consider(series.group(1), package, user=True)
            elif nvidia:
                consider(nvidia.group(1), package, user=False)
    if not users and not runtimes:
        return None
    return CudaNeed(minimum=minimum or "any", package=(users or runtimes)[0])


def manifest_cuda(lock: Any) -> tuple[str, ...]:
    """What a manifest of *lock* (a ``PlatformLock``) records: ``(minimum, package)`` of
    :func:`cuda_need`, or ``()`` for a CPU env."""
    need = cuda_need(lock.packages)
    return () if need is None else (need.minimum, need.package)


def describe(platform: str, need: CudaNeed | None) -> str:
    """What the env is, as every message and ``show`` says it: ``linux-64, CUDA >= 12
    (pytorch 2.5.1 cuda126_...)`` or ``linux-64, CPU``."""
    return f"{platform}, {need}" if need is not None else f"{platform}, CPU"


def _driver_cuda() -> str | None:
    """The CUDA version this node's NVIDIA driver supports, from ``libcuda``; ``None``
    when there is no driver."""
    import ctypes  # noqa: PLC0415

    for name in ("libcuda.so.1", "libcuda.so", "libcuda.dylib", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            status = lib.cuDriverGetVersion(ctypes.byref(version))
        except AttributeError:
            continue
        if status == 0 and version.value > 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    return None


def node_cuda(env: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """``(CUDA version or None, where it came from)`` for this node."""
    env = os.environ if env is None else env
    override = env.get("CONDA_OVERRIDE_CUDA")
    if override is not None:
        if not override.strip():
            return None, "no GPU (CONDA_OVERRIDE_CUDA is empty)"
        return parse_cuda(override, where="CONDA_OVERRIDE_CUDA"), "CONDA_OVERRIDE_CUDA"
    found = _driver_cuda()
    return found, "the NVIDIA driver" if found else "no NVIDIA driver (libcuda not found)"


def check_node(need: CudaNeed | None, have: str | None, source: str) -> tuple[str, str] | None:
    """``(why, what to do)`` when a node with CUDA *have* (from *source*) cannot run an env
    that needs *need*; ``None`` when it can."""
    if need is None:
        return None
    cpu = "or pass --allow-cpu (ENVMGR_ALLOW_CPU=1) to run it on the CPU on purpose"
    if have is None:
        return (
            f"needs {need}; this node has {source}",
            f"run the step on a GPU node (@kubernetes(gpu=1), @batch(gpu=1)), {cpu}",
        )
    if need.minimum != "any" and _key(have) < _key(need.minimum):
        return (
            f"needs {need}; this node's driver supports CUDA {have} ({source})",
            f"use nodes with a newer NVIDIA driver, or set the cuda setting (ENVMGR_CUDA) to "
            f"{have} and resolve again to lock builds for it, {cpu}",
        )
    return None
