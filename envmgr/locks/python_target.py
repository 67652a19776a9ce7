"""What a PyPI resolution targets: wheel tags and marker values of the *target*, not the host.

Built from a conda platform, the locked Python version and the platform's virtual packages
(``__glibc`` sets the manylinux level, ``__osx`` the macOS version), so a Mac can lock for
linux-64 and keep Linux-only dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from packaging import tags
from packaging.tags import Tag

from envmgr.platforms import DEFAULT_GLIBC, Platform

__all__ = ["PythonTarget"]

_MACHINE: Mapping[Platform, str] = {
    "linux-64": "x86_64",
    "linux-aarch64": "aarch64",
    "osx-64": "x86_64",
    "osx-arm64": "arm64",
    "win-64": "AMD64",
}
_DEFAULT_MACOS: Mapping[Platform, tuple[int, int]] = {"osx-64": (12, 0), "osx-arm64": (12, 0)}


def _version_tuple(text: str, width: int) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(".")[:width] if p.isdigit()]
    return tuple(parts + [0] * (width - len(parts)))


@dataclass(frozen=True, kw_only=True, slots=True)
class PythonTarget:
    """A CPython interpreter on a platform: ``python`` is the full version, e.g. ``3.11.7``."""

    platform: Platform
    python: str
    glibc: str = DEFAULT_GLIBC
    macos: str = ""
    _tags: tuple[Tag, ...] = field(default=(), init=False, repr=False, compare=False)

    @classmethod
    def from_virtual_packages(
        cls, platform: Platform, python: str, virtual: Mapping[str, str]
    ) -> PythonTarget:
        return cls(
            platform=platform,
            python=python,
            glibc=virtual.get("__glibc", DEFAULT_GLIBC),
            macos=virtual.get("__osx", ""),
        )

    @property
    def python_xy(self) -> tuple[int, int]:
        major, minor = _version_tuple(self.python, 2)
        return major, minor

    def _platform_tags(self) -> list[str]:
        machine = _MACHINE[self.platform]
        if self.platform.startswith("linux"):
            major, minor = _version_tuple(self.glibc, 2)
            legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
            out: list[str] = []
            for level in range(minor, 4, -1) if major == 2 else ():
                out.append(f"manylinux_2_{level}_{machine}")
                alias = legacy.get(level)
                if alias and (machine in ("x86_64", "i686") or alias == "manylinux2014"):
                    out.append(f"{alias}_{machine}")
            return [*out, f"linux_{machine}"]
        if self.platform.startswith("osx"):
            version = _version_tuple(self.macos, 2) if self.macos else _DEFAULT_MACOS[self.platform]
            return list(tags.mac_platforms((version[0], version[1]), machine))
        return ["win_amd64"]

    def tags(self) -> tuple[Tag, ...]:
        """Every wheel tag the target accepts, most preferred first."""
        if not self._tags:
            platforms = self._platform_tags()
            found = [
                *tags.cpython_tags(self.python_xy, platforms=platforms),
                *tags.compatible_tags(
                    self.python_xy, f"cp{''.join(map(str, self.python_xy))}", platforms
                ),
            ]
            object.__setattr__(self, "_tags", tuple(dict.fromkeys(found)))
        return self._tags

    def tag_rank(self) -> dict[Tag, int]:
        return {tag: i for i, tag in enumerate(self.tags())}

    def markers(self) -> dict[str, str]:
        """The PEP 508 marker environment of the target."""
        os_name, sys_platform, system = {
            "linux": ("posix", "linux", "Linux"),
            "osx": ("posix", "darwin", "Darwin"),
            "win": ("nt", "win32", "Windows"),
        }[self.platform.split("-")[0]]
        major, minor = self.python_xy
        return {
            "implementation_name": "cpython",
            "implementation_version": self.python,
            "os_name": os_name,
            "platform_machine": _MACHINE[self.platform],
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": system,
            "platform_version": "",
            "python_full_version": self.python,
            "python_version": f"{major}.{minor}",
            "sys_platform": sys_platform,
        }
