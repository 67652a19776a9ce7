"""Stores of built environments: key layout, local directory and S3 (see ARCHITECTURE.md).

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

from envmgr.cache.store import Store, StoreError

__all__ = ["Store", "StoreError", "open_store"]


def open_store(url: str) -> Store:
    """The store named by *url*: ``file:///path``, a plain path, or ``s3://bucket/prefix``.

    Raises ``StoreError`` for other schemes.
    """
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        from pathlib import Path  # noqa: PLC0415

        from envmgr.cache.local import LocalStore  # noqa: PLC0415

        return LocalStore(Path(parts.path if parts.scheme == "file" else url))
    if parts.scheme == "s3":
        from envmgr.cache.s3 import S3Store  # noqa: PLC0415

        return S3Store(url)
    raise StoreError(
        url,
        "-",
        f"unsupported store URL scheme {parts.scheme!r}",
        hint="use file:///path or s3://bucket/prefix",
    )
