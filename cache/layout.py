"""Store keys, the same under a local root or an S3 prefix (see ARCHITECTURE.md)."""

from __future__ import annotations

from envmgr.cache.store import check_key

__all__ = ["archive_key", "env_lock_key", "lease_key", "lock_key", "manifest_key", "name_key"]


def lock_key(spec_id: str, platform: str) -> str:
    """The resolution cache entry: ``locks/<spec_id>/<platform>.json``."""
    return check_key(f"locks/{spec_id}/{platform}.json")


def archive_key(platform: str, env_id: str, codec: str = "zst") -> str:
    """The packed env: ``envs/<platform>/<env_id>/env.tar.<codec>`` (zst, or gz)."""
    return check_key(f"envs/{platform}/{env_id}/env.tar.{codec}")


def env_lock_key(platform: str, env_id: str) -> str:
    """The conda-lock file of an env, beside its archive."""
    return check_key(f"envs/{platform}/{env_id}/conda-lock.yml")


def manifest_key(platform: str, env_id: str) -> str:
    return check_key(f"envs/{platform}/{env_id}/manifest.json")


def lease_key(env_id: str) -> str:
    return check_key(f"leases/{env_id}")


def name_key(name: str, tag: str) -> str:
    return check_key(f"names/{name}/{tag}")
