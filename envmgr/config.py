"""Where envmgr keeps things and which defaults apply, from the environment.

Only ``ENVMGR_*`` variables and the platform's cache directory are read here, and only when a
function is called (never at import). The full configuration file arrives with the CLI issue;
until then flags override these values.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["DEFAULT_CHANNELS", "cache_dir", "default_channels", "default_store_url"]

#: Channels used when a spec names none (conda's community channel, as pixi and Metaflow do).
DEFAULT_CHANNELS: tuple[str, ...] = ("conda-forge",)


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``ENVMGR_CACHE_DIR``, else ``$XDG_CACHE_HOME/envmgr``, else ``~/.cache/envmgr``."""
    env = os.environ if env is None else env
    if env.get("ENVMGR_CACHE_DIR"):
        return Path(env["ENVMGR_CACHE_DIR"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "envmgr"


def default_store_url(env: Mapping[str, str] | None = None) -> str:
    """``ENVMGR_STORE``, else the local store under the cache dir (``file://…/store``)."""
    env = os.environ if env is None else env
    if env.get("ENVMGR_STORE"):
        return env["ENVMGR_STORE"]
    return (cache_dir(env) / "store").resolve().as_uri()


def default_channels(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``ENVMGR_CHANNELS`` (comma or space separated), else :data:`DEFAULT_CHANNELS`."""
    env = os.environ if env is None else env
    raw = env.get("ENVMGR_CHANNELS", "")
    channels = tuple(c for c in re.split(r"[,\s]+", raw) if c)
    return channels or DEFAULT_CHANNELS
