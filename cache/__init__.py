"""The store, and nothing else: where built envs, their locks and the resolution cache live.

In: objects under keys (:mod:`.layout`). Out: the same bytes, whole or not at all, from a local
directory (:mod:`.local`) or S3 (:mod:`.s3`) behind one :class:`~envmgr.cache.store.Store`
interface. Also here: build-once leases (:mod:`.lease`), named envs (:mod:`.names`), the last
use of an env (:mod:`.usage`) and what a store holds and collecting it (:mod:`.lifecycle`).
Standard library and boto3 only: this folder ships to workers.

This folder installs as ``envmgr.cache`` only. Importing it under its folder name (``import
cache`` from a checkout) is refused, so nothing ever depends on a generic top-level ``cache``.
"""

from __future__ import annotations

if __name__ != "envmgr.cache":
    raise ImportError(
        f"the package {__name__!r} is envmgr's store layer: import it as 'envmgr.cache'",
        name=__name__,
    )

from urllib.parse import urlsplit

from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.cache.store import Store, StoreError

__all__ = ["Store", "StoreError", "open_store"]


def open_store(url: str) -> Store:
    """The store named by *url*: ``file:///path`` (or ``file://localhost/path``), a plain
    path (a relative one is taken from the current directory), or ``s3://bucket/prefix``.

    Raises ``StoreError`` for other schemes and for file URLs that do not name an absolute
    path (``file://team-store`` would name a host, ``file:relative`` nothing certain).
    """
    parts = urlsplit(url)
    if parts.scheme in ("", "file") and not url.startswith("file:"):
        import os  # noqa: PLC0415
        from pathlib import Path  # noqa: PLC0415

        return LocalStore(Path(os.path.abspath(os.path.expanduser(url))))  # noqa: PTH100,PTH111
    if parts.scheme == "file":
        from pathlib import Path  # noqa: PLC0415
        from urllib.parse import unquote  # noqa: PLC0415

        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StoreError(
                url,
                "-",
                "a file URL names an absolute path after three slashes",
                hint="write file:///absolute/path, or a plain path such as ./team-store",
            )
        return LocalStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        return S3Store(url)
    raise StoreError(
        url,
        "-",
        f"unsupported store URL scheme {parts.scheme!r}",
        hint="use file:///path or s3://bucket/prefix",
    )
