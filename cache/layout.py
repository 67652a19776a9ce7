"""Store keys, the same under a local root or an S3 prefix (see ARCHITECTURE.md)."""

from __future__ import annotations

from envmgr.cache.store import check_key
from envmgr.ids import parse_env_id, parse_layer_id, parse_platform, parse_spec_id

__all__ = [
    "archive_key",
    "env_lock_key",
    "layer_archive_key",
    "layer_manifest_key",
    "lease_key",
    "lock_key",
    "manifest_key",
    "name_key",
    "used_key",
]


def _env_root(platform: str, env_id: str) -> str:
    """``envs/<platform>/<env_id>``: both parsed first (``BadIdError`` otherwise)."""
    platform = parse_platform(platform, where="platform")
    return f"envs/{platform}/{parse_env_id(env_id, where='env id')}"


def lock_key(spec_id: str, platform: str) -> str:
    """The resolution cache entry: ``locks/<spec_id>/<platform>.json``."""
    spec_id = parse_spec_id(spec_id, where="spec id")
    return check_key(f"locks/{spec_id}/{parse_platform(platform, where='platform')}.json")


def archive_key(platform: str, env_id: str, codec: str = "zst") -> str:
    """The packed env: ``envs/<platform>/<env_id>/env.tar.<codec>`` (zst, or gz)."""
    return check_key(f"{_env_root(platform, env_id)}/env.tar.{codec}")


def env_lock_key(platform: str, env_id: str) -> str:
    """The conda-lock file of an env, beside its archive."""
    return check_key(f"{_env_root(platform, env_id)}/conda-lock.yml")


def manifest_key(platform: str, env_id: str) -> str:
    return check_key(f"{_env_root(platform, env_id)}/manifest.json")


def used_key(platform: str, env_id: str) -> str:
    """When and where the env was last fetched or asked for (``envmgr store gc`` keeps
    recently used envs); advisory, written after the manifest."""
    return check_key(f"{_env_root(platform, env_id)}/used.json")


def layer_archive_key(layer_id: str, codec: str = "zst") -> str:
    """One package layer, shared by every env of that package and target:
    ``layers/<layer_id>/layer.tar.<codec>``."""
    return check_key(f"layers/{parse_layer_id(layer_id, where='layer id')}/layer.tar.{codec}")


def layer_manifest_key(layer_id: str) -> str:
    """The layer's manifest, written after its archive: the only thing readers trust."""
    return check_key(f"layers/{parse_layer_id(layer_id, where='layer id')}/manifest.json")


def lease_key(env_id: str) -> str:
    """The build-once lease of an env or of a layer (both are 32 hex digits)."""
    return check_key(f"leases/{parse_env_id(env_id, where='env id')}")


def name_key(name: str, tag: str) -> str:
    return check_key(f"names/{name}/{tag}")
