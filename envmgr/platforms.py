"""Target platforms and the virtual packages a solve for each one assumes.

A lock is made for a *target*, not for the host: :func:`virtual_packages` gives the default
virtual packages of each platform (``__unix``/``__linux`` with ``__glibc`` 2.28, ``__osx``,
``__win``, ``__archspec``), then applies ``CONDA_OVERRIDE_*`` variables, the spec's system
packages and ``--cuda``. Nothing is taken from the host: ``__glibc``, ``__linux`` and ``__osx``
keep portable defaults unless overridden, so a lock made on a new laptop still installs on older
workers, and ``__cuda`` is set only by the spec (a GPU step gets the ``cuda`` setting, see
:mod:`envmgr.specs.flows`) or by ``--cuda`` (``--cuda host`` asks for this machine's driver;
``CONDA_OVERRIDE_CUDA`` says what the host has, so it counts there and nowhere else).
"""

from __future__ import annotations

import os
import platform as _platform
import sys
from collections.abc import Mapping
from typing import Literal, NamedTuple, TypeGuard, get_args

__all__ = [
    "DEFAULT_GLIBC",
    "PLATFORMS",
    "Platform",
    "VirtualPackage",
    "host_platform",
    "is_platform",
    "virtual_packages",
]

Platform = Literal["linux-64", "linux-aarch64", "osx-64", "osx-arm64", "win-64"]

#: Every supported target, in a stable order.
PLATFORMS: tuple[Platform, ...] = get_args(Platform)

#: The glibc a linux lock assumes unless told otherwise (manylinux_2_28, RHEL 8 and newer).
DEFAULT_GLIBC = "2.28"

_ARCH: Mapping[Platform, str] = {
    "linux-64": "x86_64",
    "linux-aarch64": "aarch64",
    "osx-64": "x86_64",
    "osx-arm64": "arm64",
    "win-64": "x86_64",
}
#: The macOS a lock assumes unless told otherwise: uv's default deployment target (wheels for
#: older releases still fit; scipy's arm64 wheels, for one, need 12.0).
_DEFAULT_OSX: Mapping[Platform, str] = {"osx-64": "12.0", "osx-arm64": "12.0"}
_LINUX_KERNEL = "5.10"


def is_platform(value: object) -> TypeGuard[Platform]:
    """True when *value* names a supported target platform."""
    return isinstance(value, str) and value in PLATFORMS


def host_platform() -> Platform:
    """The conda subdir of this machine; raises ``ValueError`` on an unsupported one."""
    machine = _platform.machine().lower()
    arches = {
        "linux": {"x86_64": "64", "amd64": "64", "aarch64": "aarch64", "arm64": "aarch64"},
        "osx": {"x86_64": "64", "arm64": "arm64", "aarch64": "arm64"},
        "win": {"amd64": "64", "x86_64": "64"},
    }
    name = {"linux": "linux", "darwin": "osx", "win32": "win"}.get(sys.platform, "")
    candidate = f"{name}-{arches.get(name, {}).get(machine, machine)}"
    if not is_platform(candidate):
        raise ValueError(f"this host ({sys.platform}, {machine}) is not a supported platform")
    return candidate


class VirtualPackage(NamedTuple):
    """A virtual package the solver assumes present: ``__glibc 2.28 0``. (A named tuple:
    this module is on the worker's warm start path, where ``dataclasses`` costs ~6 ms.)"""

    name: str
    version: str
    build: str = "0"

    def __str__(self) -> str:
        return f"{self.name}={self.version}={self.build}"


def virtual_packages(
    target: Platform,
    *,
    system: Mapping[str, str] | None = None,
    cuda: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[VirtualPackage, ...]:
    """The virtual packages to solve *target* with, sorted by name.

    Precedence, lowest first: the platform defaults (macOS 12.0, or
    ``MACOSX_DEPLOYMENT_TARGET``); ``CONDA_OVERRIDE_<NAME>`` in *env* for ``__glibc``,
    ``__osx`` and ``__linux``; the spec's *system* packages; *cuda* (the ``--cuda`` flag's
    version, or ``""`` for none). An empty value removes the package, as conda does.
    """
    env = os.environ if env is None else env
    os_name = target.split("-")[0]
    found: dict[str, str] = {}
    if os_name in ("linux", "osx"):
        found["__unix"] = "0"
    if os_name == "linux":
        found["__linux"] = _LINUX_KERNEL
        found["__glibc"] = DEFAULT_GLIBC
    elif os_name == "osx":
        found["__osx"] = _DEFAULT_OSX[target]
        deployment = env.get("MACOSX_DEPLOYMENT_TARGET", "").strip()
        if deployment:  # what compilers and uv read; "14" means 14.0
            found["__osx"] = deployment if "." in deployment else f"{deployment}.0"
    else:
        found["__win"] = "0"
    for name in ("__glibc", "__osx", "__linux"):
        override = env.get(f"CONDA_OVERRIDE_{name[2:].upper()}")
        if override is not None:
            found[name] = override
    found.update(system or {})
    if cuda is not None:
        found["__cuda"] = cuda
    packages = [VirtualPackage(name=n, version=v) for n, v in found.items() if v.strip()]
    packages.append(VirtualPackage(name="__archspec", version="1", build=_ARCH[target]))
    return tuple(sorted(packages))
