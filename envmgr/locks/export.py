"""Locks in other tools' formats: export to them, import from them.

Formats (:data:`FORMATS`):

- ``conda-lock``: the conda-lock v1 file, every platform (what envmgr stores).
- ``explicit``: conda's ``@EXPLICIT`` list for one platform (``conda create --file``), each
  conda package as ``URL#md5``; PyPI packages as ``# pip name @ URL#sha256=…`` lines, the form
  conda-lock writes.
- ``environment.yml``: exact ``name=version=build`` pins and a ``pip:`` section (no hashes).
- ``requirements.txt``: the PyPI packages as ``name==version --hash=sha256:…`` (pip's
  ``--require-hashes`` form); the conda packages appear as a comment.
- ``pylock``: a PEP 751 ``pylock.toml`` of the PyPI packages for one platform (``pip install
  -r`` and ``uv pip install`` read it); the conda packages go in its ``[tool.envmgr]`` table,
  which other tools ignore and envmgr reads back (:mod:`envmgr.locks.pylock`) to the same env id.

Importing: a conda-lock file is read as is (:func:`envmgr.locks.lock.read_conda_lock`); an explicit
file names only URLs and hashes, so :func:`read_explicit` looks every conda package up in its
channel's repodata (once, cached like any solve) for the rest of its record and checks that the
hashes agree. Both give the same ``env_id`` as the env they were exported from.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import unquote, urlsplit

from envmgr.channels import make_gateway
from envmgr.errors import EnvmgrError
from envmgr.limits import check_package_url, check_url_origin, read_bounded
from envmgr.locks.lock import (
    Lock,
    LockedPackage,
    LockError,
    PlatformLock,
    locked_package,
    render_conda_lock,
    strip_credentials,
)
from envmgr.locks.python_target import PythonTarget
from envmgr.platforms import Platform, is_platform

__all__ = [
    "FORMATS",
    "ExplicitFileError",
    "Format",
    "adopt",
    "is_explicit",
    "known_format",
    "read_explicit",
    "render",
]

Format = Literal["conda-lock", "explicit", "environment.yml", "requirements.txt", "pylock"]
FORMATS: tuple[Format, ...] = get_args(Format)

_PIP_LINE = re.compile(r"^#\s*pip\s+(?P<name>[A-Za-z0-9._-]+)\s*@\s*(?P<url>\S+)\s*$")
_HASH = re.compile(r"^(?:sha256[:=])?([0-9a-f]{64})$|^([0-9a-f]{32})$")


class ExplicitFileError(LockError):
    """An explicit file that cannot be adopted; names the file, the line and the package."""


def render(lock: Lock, fmt: Format, platform: Platform | None = None, name: str = "") -> str:
    """*lock* in format *fmt*; the single-platform formats need *platform* when the lock has
    several. Raises ``LockError`` when the lock has no such platform."""
    if fmt == "conda-lock":
        return render_conda_lock(lock)
    part = _one_platform(lock, platform)
    if fmt == "explicit":
        return _explicit(part)
    if fmt == "environment.yml":
        return _environment_yml(part, name or f"env-{part.env_id[:12]}")
    if fmt == "pylock":
        return _pylock(part, lock.envmgr_version)
    return _requirements(part)


def _one_platform(lock: Lock, platform: Platform | None) -> PlatformLock:
    if platform is not None:
        return lock.for_platform(platform)
    if len(lock.platforms) == 1:
        return lock.platforms[0]
    raise LockError(
        "this lock has several platforms ("
        + ", ".join(p.platform for p in lock.platforms)
        + "); choose one with --platform"
    )


def _explicit(lock: PlatformLock) -> str:
    lines = [
        f"# envmgr env {lock.env_id}",
        f"# platform: {lock.platform}",
        "@EXPLICIT",
    ]
    for pkg in lock.packages:
        if pkg.manager == "conda":
            lines.append(f"{pkg.url}#{pkg.md5 or 'sha256:' + pkg.sha256}")
    for pkg in lock.packages:
        if pkg.manager == "pypi":
            lines.append(f"# pip {pkg.name} @ {pkg.url.split('#')[0]}#sha256={pkg.sha256}")
    return "\n".join(lines) + "\n"


def _environment_yml(lock: PlatformLock, name: str) -> str:
    import yaml  # noqa: PLC0415

    conda = [f"{p.name}={p.version}={p.build}" for p in lock.packages if p.manager == "conda"]
    pypi = [f"{p.name}=={p.version}" for p in lock.packages if p.manager == "pypi"]
    deps: list[Any] = list(conda)
    if pypi:
        deps.append({"pip": pypi})
    data = {"name": name, "channels": list(lock.channels), "dependencies": deps}
    head = f"# envmgr env {lock.env_id} ({lock.platform}); exact pins, no hashes\n"
    return head + str(yaml.safe_dump(data, sort_keys=False))


def _requirements(lock: PlatformLock) -> str:
    conda = ", ".join(f"{p.name} {p.version}" for p in lock.packages if p.manager == "conda")
    lines = [f"# envmgr env {lock.env_id} ({lock.platform})", f"# conda provides: {conda}"]
    for pkg in lock.packages:
        if pkg.manager == "pypi":
            lines.append(f"{pkg.name}=={pkg.version} \\\n    --hash=sha256:{pkg.sha256}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A TOML value: JSON's string escapes are TOML's; lists and tables inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(_toml(v) for v in value) + "]"


def _table(header: str, fields: dict[str, Any]) -> list[str]:
    return ["", header, *(f"{k} = {_toml(v)}" for k, v in fields.items() if v not in ("", None))]


def _pylock(lock: PlatformLock, envmgr_version: str) -> str:

    python = lock.names().get("python")
    if python is None:
        raise LockError(f"env {lock.env_id} ({lock.platform}) has no python to write a pylock for")
    markers = PythonTarget(platform=lock.platform, python=python.version).markers()
    series = ".".join(python.version.split(".")[:2])
    lines = [
        f"# envmgr env {lock.env_id} ({lock.platform}): the PyPI packages; the conda ones",
        "# (python among them) are in [tool.envmgr], which envmgr reads back.",
        'lock-version = "1.0"',
        "environments = "
        + _toml(
            [
                f"sys_platform == {_toml(markers['sys_platform'])} and "
                f"platform_machine == {_toml(markers['platform_machine'])}"
            ]
        ),
        f"requires-python = {_toml('==' + series + '.*')}",
        f"created-by = {_toml('envmgr')}",
    ]
    for pkg in lock.packages:
        if pkg.manager != "pypi":
            continue
        deps = [{"name": d.split()[0]} for d in pkg.depends]
        lines += _table("[[packages]]", {"name": pkg.name, "version": pkg.version})
        if deps:
            lines.append(f"dependencies = {_toml(deps)}")
        filename = unquote(urlsplit(pkg.url).path.rsplit("/", 1)[-1])
        file = {
            "name": filename,
            "url": pkg.url,
            "size": pkg.size or None,
            "hashes": {"sha256": pkg.sha256},
        }
        lines += _table(
            "[[packages.wheels]]" if filename.endswith(".whl") else "[packages.sdist]", file
        )
    lines += _table("[tool.envmgr]", {"env_id": lock.env_id, "envmgr_version": envmgr_version})
    lines += _table(
        "[[tool.envmgr.platforms]]",
        {
            "platform": lock.platform,
            "channels": list(lock.channels),
            "virtual_packages": list(lock.virtual_packages),
        },
    )
    for pkg in lock.packages:
        if pkg.manager == "conda":
            fields = {k: v for k, v in pkg.to_dict().items() if k != "manager"}
            lines += _table("[[tool.envmgr.platforms.conda]]", fields)
    return "\n".join(lines) + "\n"


def is_explicit(path: Path) -> bool:
    """True when *path* is a conda ``@EXPLICIT`` file."""
    try:
        with path.open(encoding="utf-8") as handle:
            head = [line for line, _ in zip(handle, range(200), strict=False)]
    except (OSError, UnicodeDecodeError):
        return False
    return any(line.strip() == "@EXPLICIT" for line in head)


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    url: str
    md5: str
    sha256: str


def _parse_explicit(path: Path) -> tuple[str, list[_Line], list[LockedPackage]]:
    platform = ""
    conda: list[_Line] = []
    pypi: list[LockedPackage] = []
    seen_marker = False
    for number, raw in enumerate(read_bounded(path, what="explicit file").splitlines(), 1):
        line = raw.strip()
        where = f"{path}:{number}"
        if line.startswith("# platform:"):
            platform = line.split(":", 1)[1].strip()
        elif (match := _PIP_LINE.match(line)) is not None:
            pypi.append(_pypi_package(match["name"], match["url"], where))
        elif line == "@EXPLICIT":
            seen_marker = True
        elif line and not line.startswith("#"):
            if not seen_marker:
                raise ExplicitFileError(f"{where}: a package line before @EXPLICIT")
            url, _, fragment = line.partition("#")
            found = _HASH.match(fragment.strip().lower())
            if found is None:
                raise ExplicitFileError(
                    f"{where}: {url.rsplit('/', 1)[-1]} has no md5 or sha256 after '#'",
                    hint="export the file again with `conda list --explicit --md5`",
                )
            conda.append(_Line(number, url, found.group(2) or "", found.group(1) or ""))
    if not seen_marker:
        raise ExplicitFileError(f"{path}: not a conda explicit file (no @EXPLICIT line)")
    return platform, conda, pypi


def _pypi_package(name: str, url: str, where: str) -> LockedPackage:
    from packaging.utils import (  # noqa: PLC0415
        InvalidSdistFilename,
        InvalidWheelFilename,
        canonicalize_name,
        parse_sdist_filename,
        parse_wheel_filename,
    )

    base, _, fragment = url.partition("#")
    sha = fragment.removeprefix("sha256=")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ExplicitFileError(f"{where}: pip package {name} has no #sha256= hash")
    filename = unquote(urlsplit(base).path.rsplit("/", 1)[-1])
    try:
        if filename.endswith(".whl"):
            version = str(parse_wheel_filename(filename)[1])
        else:
            version = str(parse_sdist_filename(filename)[1])
    except (InvalidWheelFilename, InvalidSdistFilename) as exc:
        raise ExplicitFileError(f"{where}: {exc}") from None
    return LockedPackage(
        manager="pypi", name=str(canonicalize_name(name)), version=version, url=base, sha256=sha
    )


def read_explicit(path: Path, cache_dir: Path) -> PlatformLock:
    """Adopt a conda explicit file as a lock; every conda package is looked up in its
    channel's repodata and its hashes checked. Raises ``ExplicitFileError`` naming the line."""
    try:
        platform, lines, pypi = _parse_explicit(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ExplicitFileError(f"{path}: cannot read ({exc})") from None
    subdirs = {line.url.rsplit("/", 2)[-2] for line in lines if line.url.count("/") >= 2}
    if not platform:
        native = sorted(subdirs - {"noarch"})
        platform = native[0] if len(native) == 1 else ""
    if not is_platform(platform):
        raise ExplicitFileError(
            f"{path}: cannot tell the platform (no '# platform:' line)"
            if not platform
            else f"{path}: unknown platform {platform!r}"
        )
    records = asyncio.run(_lookup(lines, cache_dir))
    packages: list[LockedPackage] = []
    for line in lines:
        record = records.get(line.url)
        if record is None:
            raise ExplicitFileError(
                f"{path}:{line.number}: {line.url} is not in its channel's repodata",
                hint="check that the channel still serves it (and is reachable)",
            )
        if (line.md5 and line.md5 != record.md5) or (line.sha256 and line.sha256 != record.sha256):
            raise ExplicitFileError(
                f"{path}:{line.number}: {record.name} {record.version}: the file's hash does "
                "not match the channel's; refusing it"
            )
        packages.append(record)
    channels = tuple(dict.fromkeys(line.url.rsplit("/", 2)[0] for line in lines))
    return PlatformLock(platform=platform, packages=(*packages, *pypi), channels=channels)


async def _lookup(lines: Iterable[_Line], cache_dir: Path) -> dict[str, LockedPackage]:
    """URL → locked package from the channels' repodata, one query per channel."""

    wanted: dict[str, dict[str, set[str]]] = {}  # channel -> subdir -> names
    for line in lines:
        channel, subdir, filename = line.url.rsplit("/", 2)
        name = re.sub(r"(\.tar\.bz2|\.conda)$", "", filename).rsplit("-", 2)[0]
        wanted.setdefault(channel, {}).setdefault(subdir, set()).add(name)
    gateway = make_gateway(cache_dir / "repodata")
    found: dict[str, LockedPackage] = {}
    try:
        for channel, by_subdir in wanted.items():
            names = sorted(set().union(*by_subdir.values()))
            groups = await gateway.query([channel], sorted(by_subdir), names, recursive=False)
            for records in groups:
                for record in records:
                    if record.sha256 is not None:
                        found[str(record.url)] = locked_package(record)
    except Exception as exc:  # py-rattler's gateway errors: unreachable or broken channel
        text = " ".join(str(exc).split())[:300]
        raise ExplicitFileError(f"cannot read the channels of the explicit file: {text}") from None
    finally:
        del gateway
    return found


def adopt(lock: Lock, *, where: str, trusted: Sequence[str] = ()) -> Lock:
    """Check an adopted lock before it is used: at least one platform, no duplicate names,
    every URL a package file of its package (so a lock cannot send a build to
    ``file:///etc/passwd``) from where the lock's channels or *trusted* (configured channel
    and index URLs) say packages come from (:func:`~envmgr.limits.check_url_origin`)."""
    if not lock.platforms:
        raise LockError(f"{where}: the lock has no packages")
    for part in lock.platforms:
        seen: dict[tuple[str, str], LockedPackage] = {}
        roots = (*channel_urls(part.channels), *trusted)
        for pkg in part.packages:
            problem = check_package_url(
                pkg.url, manager=pkg.manager, name=pkg.name
            ) or check_url_origin(pkg.url, manager=pkg.manager, roots=roots)
            if problem is not None:
                raise LockError(
                    f"{where}: {part.platform}: {pkg.name[:80]} {pkg.version[:40]}: its URL "
                    f"{strip_credentials(pkg.url)[:200]} is refused: {problem}"
                )
            key = (pkg.manager, pkg.name)
            if key in seen:
                raise LockError(
                    f"{where}: {part.platform}: {pkg.name} is locked twice "
                    f"({seen[key].version} and {pkg.version})"
                )
            seen[key] = pkg
    return lock


def channel_urls(channels: Iterable[str]) -> list[str]:
    """The base URLs of *channels* (names like ``conda-forge`` or URLs), as conda reads them."""
    import rattler  # noqa: PLC0415

    out = []
    for channel in channels:
        try:
            out.append(str(rattler.Channel(channel).base_url))
        except Exception:  # noqa: S112 - py-rattler's parse errors: not a channel
            continue
    return out


def known_format(value: str) -> Format:
    """*value* as a :data:`Format`; raises ``EnvmgrError`` listing the formats."""
    for fmt in FORMATS:
        if value == fmt:
            return fmt
    if value == "pylock.toml":
        return "pylock"
    raise EnvmgrError(f"unknown export format {value!r}; use one of {', '.join(FORMATS)}")
