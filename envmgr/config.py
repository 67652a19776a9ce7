"""envmgr's settings and where each one came from.

Precedence, highest first: a command-line flag, an ``ENVMGR_*`` environment variable, the
configuration file, the default. The file is TOML at ``ENVMGR_CONFIG``, else
``$XDG_CONFIG_HOME/envmgr/config.toml``, else ``~/.config/envmgr/config.toml``; it holds the
same keys as :data:`SETTINGS`, e.g.::

    store = "s3://team-bucket/envmgr"
    channels = ["conda-forge", "bioconda"]
    platforms = ["linux-64", "osx-arm64"]

The PyPI index defaults to pip's own configuration (``PIP_INDEX_URL``, pip.conf), and virtual
packages honour ``CONDA_OVERRIDE_*`` (see :mod:`envmgr.platforms`), so envmgr agrees with the
tools a user already configured. Nothing is read at import; every call reads the environment
it is given (default ``os.environ``) and the file, which is parsed once per modification.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from envmgr.errors import EnvmgrError

__all__ = [
    "DEFAULT_BUILD_ROOT",
    "DEFAULT_CHANNELS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "cache_dir",
    "config_path",
    "default_channels",
    "default_store_url",
    "load",
]

#: Channels used when a spec names none (conda's community channel, as pixi and Metaflow do).
DEFAULT_CHANNELS: tuple[str, ...] = ("conda-forge",)

#: Where envs are built; the same path on every machine keeps archives reproducible.
DEFAULT_BUILD_ROOT = "/tmp/envmgr-builds"  # noqa: S108 - shared on purpose, see build_prefix

Kind = Literal["path", "str", "list", "int"]


class ConfigError(EnvmgrError):
    """The configuration file or an ``ENVMGR_*`` variable is malformed; names which."""

    exit_code = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class Setting:
    key: str
    kind: Kind
    help: str

    @property
    def env(self) -> str:
        return f"ENVMGR_{self.key.upper()}"


#: Every setting, in the order ``envmgr config show`` prints them.
SETTINGS: tuple[Setting, ...] = (
    Setting(key="cache_dir", kind="path", help="hydrated envs, downloads, repodata"),
    Setting(key="store", kind="str", help="where locks and archives live (file:// or s3://)"),
    Setting(key="channels", kind="list", help="conda channels for specs that name none"),
    Setting(key="platforms", kind="list", help="targets for specs that name none"),
    Setting(key="index_url", kind="str", help="PyPI index for specs that name none"),
    Setting(key="extra_index_urls", kind="list", help="more PyPI indexes"),
    Setting(key="build_root", kind="path", help="where envs are built (same on every machine)"),
    Setting(key="codec", kind="str", help="archive compression: zst or gz"),
    Setting(key="level", kind="int", help="archive compression level"),
    Setting(
        key="format",
        kind="int",
        help="how builds store envs: 3, package layers shared across envs; 2, one archive each",
    ),
    Setting(key="index_ttl", kind="int", help="seconds an index page without caching headers"),
    Setting(
        key="lease_seconds",
        kind="int",
        help="build-once lease period, renewed while building (a killed builder's cost)",
    ),
    Setting(
        key="remote_platform",
        kind="str",
        help="platform of Metaflow's remote steps (@kubernetes, @batch, ...)",
    ),
    Setting(
        key="torch_index",
        kind="str",
        help="PyPI index of the torch family, with {backend} (cpu, cu126): each env's CUDA picks",
    ),
    Setting(
        key="cuda",
        kind="str",
        help="CUDA version of the cluster's GPU nodes: GPU steps are locked for it (__cuda)",
    ),
)
_BY_KEY = {s.key: s for s in SETTINGS}


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """Effective settings: ``values[key]`` and ``sources[key]`` (flag, variable, file, …)."""

    path: Path
    values: Mapping[str, Any]
    sources: Mapping[str, str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """The configuration file's path (it need not exist)."""
    env = os.environ if env is None else env
    if env.get("ENVMGR_CONFIG"):
        return Path(env["ENVMGR_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "envmgr" / "config.toml"


_FILE_CACHE: dict[Path, tuple[float, dict[str, Any]]] = {}


def _read_file(path: Path) -> dict[str, Any]:
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    cached = _FILE_CACHE.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415
    else:  # pragma: no cover - 3.10
        import tomli as tomllib  # noqa: PLC0415
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid TOML ({exc})", hint="fix the file or point ENVMGR_CONFIG elsewhere"
        ) from None
    unknown = sorted(set(data) - set(_BY_KEY))
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting(s) {', '.join(unknown)}",
            hint=f"known settings: {', '.join(_BY_KEY)}",
        )
    values = {key: _coerce(_BY_KEY[key], value, f"{path}: {key}") for key, value in data.items()}
    _FILE_CACHE[path] = (mtime, values)
    return values


def _coerce(setting: Setting, value: Any, where: str) -> Any:
    """A file value (already typed) or a variable's text as the setting's kind."""
    if setting.kind == "list":
        if isinstance(value, str):
            return tuple(v for v in re.split(r"[,\s]+", value) if v)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}: want a list of strings, got {value!r}")
    if setting.kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            return int(value)
        raise ConfigError(f"{where}: want a whole number, got {value!r}")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: want a non-empty string, got {value!r}")
    if setting.kind == "path":
        return Path(value).expanduser()
    return value


def _default(key: str, values: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Any, str]:
    if key == "cache_dir":
        base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base).expanduser() / "envmgr", "default"
    if key == "store":
        return (Path(values["cache_dir"]) / "store").resolve().as_uri(), "default (cache_dir/store)"
    if key == "channels":
        return DEFAULT_CHANNELS, "default"
    if key == "platforms":
        return (), "default (this host's platform)"
    if key in ("index_url", "extra_index_urls"):
        return (None if key == "index_url" else ()), "pip's configuration"
    if key == "build_root":
        return Path(DEFAULT_BUILD_ROOT), "default"
    if key == "codec":
        return "zst", "default"
    if key in ("level", "format"):
        return 3, "default"
    if key == "lease_seconds":
        return 60, "default"
    if key == "remote_platform":
        return "linux-64", "default (Metaflow's remote compute)"
    if key == "torch_index":
        return None, "default (none: torch comes from the spec's indexes)"
    if key == "cuda":
        from envmgr.cuda import DEFAULT_CUDA  # noqa: PLC0415

        return DEFAULT_CUDA, "default (GPU steps only)"
    return 600, "default"  # index_ttl: PyPI's own cache policy


def load(env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None) -> Config:
    """The effective settings; *flags* maps keys to command-line values (``None``/empty:
    not given). Raises ``ConfigError`` naming the file or variable."""
    from envmgr import profile  # noqa: PLC0415

    with profile.phase("config"):
        return _load(env, flags)


def _load(env: Mapping[str, str] | None, flags: Mapping[str, Any] | None) -> Config:
    env = os.environ if env is None else env
    path = config_path(env)
    from_file = _read_file(path)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        flag = (flags or {}).get(setting.key)
        if flag not in (None, (), [], ""):
            value, source = (tuple(flag) if setting.kind == "list" else flag), "command line"
        elif env.get(setting.env):
            value, source = _coerce(setting, env[setting.env], setting.env), setting.env
        elif setting.key in from_file:
            value, source = from_file[setting.key], str(path)
        else:
            value, source = _default(setting.key, values, env)
        values[setting.key] = value
        sources[setting.key] = source
    if values["format"] not in (2, 3):
        raise ConfigError(f"{sources['format']}: format {values['format']!r}: use 3 or 2")
    if values["codec"] not in ("zst", "gz"):
        raise ConfigError(f"{sources['codec']}: codec {values['codec']!r}: use zst or gz")
    return Config(path=path, values=values, sources=sources)


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``ENVMGR_CACHE_DIR``, the file's ``cache_dir``, else ``$XDG_CACHE_HOME/envmgr``."""
    return Path(load(env)["cache_dir"])


def default_store_url(env: Mapping[str, str] | None = None) -> str:
    """``ENVMGR_STORE``, the file's ``store``, else the local store under the cache dir."""
    return str(load(env)["store"])


def default_channels(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``ENVMGR_CHANNELS`` (comma or space separated), the file's ``channels``, else
    :data:`DEFAULT_CHANNELS`."""
    return tuple(load(env)["channels"]) or DEFAULT_CHANNELS
