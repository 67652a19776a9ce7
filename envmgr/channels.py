"""Conda channels through py-rattler: credentials as request headers (never inside a URL),
and the gateway that reads repodata.

py-rattler writes the URLs it is given into its repodata cache, so a channel given as
``https://user:TOKEN@host/channel`` would leave the token on disk. :func:`split_credentials`
takes the ``user:password@`` part off every channel URL and keeps it per host;
:func:`rattler_client` gives py-rattler a client that adds ``Authorization: Basic ...`` to the
requests for those hosts (repodata and package downloads alike). Conda ``/t/<token>/`` path
tokens are part of the channel's address and are passed on as they are.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["Credentials", "make_gateway", "rattler_client", "split_credentials"]

#: host (lower case, with ``:port`` when the URL had one) -> ``Authorization`` header value
Credentials = Mapping[str, str]


def _clean(url: str) -> tuple[str, tuple[str, str] | None]:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    value = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, (hostport.lower(), f"Basic {value}")


def split_credentials(urls: Iterable[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """(*urls* without ``user:password@``, the credentials they carried, per host)."""
    clean: list[str] = []
    credentials: dict[str, str] = {}
    for url in urls:
        bare, found = _clean(url)
        clean.append(bare)
        if found is not None:
            credentials[found[0]] = found[1]
    return tuple(clean), credentials


def rattler_client(credentials: Credentials) -> Any:
    """A py-rattler ``Client`` that authenticates to the hosts in *credentials*, or ``None``
    (rattler's default client) when there are none."""
    if not credentials:
        return None
    from rattler.networking import AddHeadersMiddleware, Client  # noqa: PLC0415

    by_host = {host.split(":")[0]: value for host, value in credentials.items()}

    def headers(host: str, _path: str) -> dict[str, str] | None:
        value = by_host.get(host.lower())
        return {"Authorization": value} if value else None

    return Client([AddHeadersMiddleware(headers)])


def make_gateway(cache_dir: Path, credentials: Credentials | None = None) -> Any:
    """A py-rattler gateway caching repodata under *cache_dir*, authenticating to the hosts
    in *credentials* (see :mod:`envmgr.channels`)."""
    import rattler  # noqa: PLC0415

    cache_dir.mkdir(parents=True, exist_ok=True)
    client = rattler_client(credentials or {})
    if client is None:
        return rattler.Gateway(cache_dir=cache_dir)
    return rattler.Gateway(cache_dir=cache_dir, client=client)
