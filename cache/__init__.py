"""Stores of built environments: key layout, local directory and S3 (see ARCHITECTURE.md).

This folder installs as ``envmgr.cache`` only. Importing it under its folder name (``import
cache`` from a checkout) is refused, so nothing ever depends on a generic top-level ``cache``.
"""

if __name__ != "envmgr.cache":
    raise ImportError(
        f"the package {__name__!r} is envmgr's store layer: import it as 'envmgr.cache'",
        name=__name__,
    )
