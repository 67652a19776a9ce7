"""The last use of a stored env: ``envs/<platform>/<env_id>/used.json``.

A worker that downloads an env, and a build that finds it already stored, record the time here
so that ``envmgr store gc --older-than`` keeps envs people still use, not only recent builds.
Recording is best effort: a worker with read-only credentials runs its task all the same. The
body is JSON ``{"at": "2026-...Z", "host": "..."}``; warm hydrates (the env already on the
host) write nothing, so the task start path stays one ``stat``.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket

from envmgr.cache.layout import used_key
from envmgr.cache.store import Store

__all__ = ["read_use", "record_use"]

_log = logging.getLogger("envmgr.store")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_use(store: Store, platform: str, env_id: str) -> None:
    """Write the use marker now; a store that refuses (read-only, down) is logged, not raised."""
    body = json.dumps({"at": _utc_now(), "host": socket.gethostname()}).encode()
    try:
        store.put(used_key(platform, env_id), body)
    except Exception as exc:
        _log.debug("could not record the use of %s in %s: %s", env_id, store.url, exc)


def read_use(raw: bytes | None) -> str:
    """The ``at`` time of a use marker body, or ``""`` when absent or unreadable."""
    if raw is None:
        return ""
    try:
        data = json.loads(raw)
        return str(data["at"])[:40] if isinstance(data, dict) else ""
    except (ValueError, KeyError):
        return ""
