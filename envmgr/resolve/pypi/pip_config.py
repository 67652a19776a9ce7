"""Where PyPI packages come from by default: pip's own configuration, read with pip's loader.

envmgr never names an index itself: the default index, extra indexes and find-links are what
pip would use here (``PIP_INDEX_URL`` and friends, ``pip.conf``, pip's default), and flags or
settings override them. ``${VAR}`` in an index URL is expanded from the environment, as pip
does, so tokens stay out of specs and locks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["expand", "pip_index_urls", "pip_sources"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(url: str) -> str:
    """``${VAR}`` references in *url* replaced from the environment (empty when unset)."""
    return _VAR.sub(lambda m: os.environ.get(m.group(1), ""), url)


def pip_index_urls() -> tuple[str, tuple[str, ...]]:
    """The index URL and extra index URLs pip would use here (env vars, pip.conf, defaults).

    pip's own configuration loader and default are used, so envmgr agrees with pip.
    """
    index, extra, _find_links = pip_sources()
    return index, extra


def pip_sources() -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """pip's index URL, extra index URLs and find-links locations (as URLs) here."""
    from pip._internal.configuration import Configuration  # noqa: PLC0415
    from pip._internal.models.index import PyPI  # noqa: PLC0415

    config = Configuration(isolated=False)
    config.load()

    def value(key: str) -> str:
        for section in (":env:", "install", "global"):
            try:
                found = config.get_value(f"{section}.{key}")
            except Exception:  # pip raises ConfigurationError for a missing key  # noqa: S112
                continue
            if found:
                return str(found)
        return ""

    index = value("index-url") or PyPI.simple_url
    extra = tuple(value("extra-index-url").split())
    find_links = []
    for item in value("find-links").split():
        if "://" in item:
            find_links.append(item)
        else:
            find_links.append(Path(os.path.expanduser(item)).resolve().as_uri())  # noqa: PTH111
    return index, extra, tuple(find_links)
