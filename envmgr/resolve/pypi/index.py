"""A client for simple package indexes: PEP 691 JSON first, PEP 503 HTML as the fallback.

One ``requests`` session (pooled connections, retries with backoff) serves every index; a URL's
user info, ``${VAR}`` references and ``~/.netrc`` supply credentials, which never appear in
errors or logs. Project pages are cached on disk and revalidated with ``ETag`` /
``Last-Modified`` (or reused while ``Cache-Control: max-age`` says they are fresh); ``file://``
indexes (a directory per project with an ``index.html``) are read directly.

Metadata comes from the fastest source that works (:meth:`IndexClient.metadata`): a PEP 658/714
``.metadata`` file where the page advertises one (as pip and uv do: a mirror that strips the
advertisement may still answer some ``.metadata`` URLs, but each miss cost 120-200 ms on the
index here, against 2-35 ms for a range); else the wheel's ``METADATA`` read with HTTP range
requests (the zip's central directory, then one member); else the whole wheel, checked against
its sha256. Metadata is cached forever by the file's sha256.
"""

from __future__ import annotations

import email.message
import email.parser
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from packaging.utils import canonicalize_name

from envmgr import profile
from envmgr.config import load
from envmgr.fs import write_atomic
from envmgr.locks.lock import strip_credentials
from envmgr.resolve.pypi.pages import (
    JSON_TYPE,
    DistFile,
    LinkParser,
    PackageIndexError,
    canonical_name,
    file_to_row,
    files_from_html,
    files_from_json,
    parse_filename,
    rows_to_files,
)
from envmgr.resolve.pypi.pip_config import expand
from envmgr.resolve.pypi.wheel_metadata import (
    central_directory,
    find_member,
    local_metadata,
    metadata_from_wheel,
    read_local_member,
    wheel_metadata,
)

__all__ = [
    "DistFile",
    "IndexClient",
    "PackageIndexError",
    "wheel_metadata",
]

_ACCEPT = f"{JSON_TYPE}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
_TAIL = 64 * 1024
_PAGE_FORMAT = 1


def _parse_metadata(data: bytes) -> email.message.Message:
    with profile.phase("parse"):
        return email.parser.BytesParser().parsebytes(data)


def _one_tls_context(base: type[Any]) -> type[Any]:
    """requests' ``HTTPAdapter`` whose HTTPS connections share one TLS context per CA bundle.

    requests hands urllib3 the bundle's path for every connection pool, and urllib3 loads it
    into the context again for every new connection (~15 ms of CPU each on a small machine,
    up to 16 at once when a resolve starts). Here the bundle that requests would use (``verify``
    as requests resolved it: ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or certifi's) is
    loaded once into a context the connections share; verification itself is unchanged
    (``CERT_REQUIRED``, urllib3's hostname check)."""
    from requests.utils import DEFAULT_CA_BUNDLE_PATH  # noqa: PLC0415
    from urllib3.util.ssl_ import create_urllib3_context  # noqa: PLC0415

    class OneTlsContext(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._contexts: dict[str, Any] = {}
            self._contexts_lock = threading.Lock()
            super().__init__(*args, **kwargs)

        def _context(self, bundle: str) -> Any:
            with self._contexts_lock:
                context = self._contexts.get(bundle)
                if context is None:
                    context = create_urllib3_context()
                    if Path(bundle).is_dir():
                        context.load_verify_locations(capath=bundle)
                    else:
                        context.load_verify_locations(cafile=bundle)
                    self._contexts[bundle] = context
                return context

        def build_connection_pool_key_attributes(
            self, request: Any, verify: Any, cert: Any = None
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
            if host["scheme"] == "https" and verify is not False:
                bundle = verify if isinstance(verify, str) else DEFAULT_CA_BUNDLE_PATH
                pool.pop("ca_certs", None)
                pool.pop("ca_cert_dir", None)
                pool["ssl_context"] = self._context(bundle)
            return host, pool

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            super().cert_verify(conn, url, verify, cert)
            if url.lower().startswith("https") and verify:
                conn.ca_certs = None  # in the shared context already
                conn.ca_cert_dir = None

    return OneTlsContext


class IndexClient:
    """Reads project pages and metadata from one or more indexes (all equal, as in pip).

    Thread-safe: the resolver's prefetcher calls it from a pool.
    """

    def __init__(
        self,
        index_urls: Iterable[str],
        cache_dir: Path,
        *,
        find_links: Iterable[str] = (),
        pins: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        pool_size: int = 8,
    ) -> None:
        import requests  # noqa: PLC0415
        from requests.adapters import HTTPAdapter  # noqa: PLC0415
        from urllib3.util.retry import Retry  # noqa: PLC0415

        self.index_urls = tuple(dict.fromkeys(u.rstrip("/") + "/" for u in index_urls))
        self.find_links = tuple(dict.fromkeys(find_links))
        #: How long a page from a server without caching headers stays fresh (read once).
        self.index_ttl = float(load()["index_ttl"])
        #: Projects read from one index only (and never from the others or find-links).
        self.pins = {canonicalize_name(k): v.rstrip("/") + "/" for k, v in (pins or {}).items()}
        self._flat: dict[str, list[tuple[str, str, str]]] = {}  # location -> (project, name, url)
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.session = requests.Session()
        retry = Retry(
            total=4,
            backoff_factor=0.25,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=("GET", "HEAD"),
            raise_on_status=False,
        )
        # At most *pool_size* connections per host, shared by the prefetcher's threads (they
        # wait for a free one rather than open more): each new connection costs a TLS
        # handshake, and here about one in twenty took 5 s to connect, so a resolve that opened
        # 16 stalled for 5 s about one time in eight; 8 resolve as fast as 16 did.
        adapter = _one_tls_context(HTTPAdapter)(
            pool_connections=pool_size, pool_maxsize=pool_size, max_retries=retry, pool_block=True
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._lock = threading.Lock()
        self._pages: dict[str, list[DistFile]] = {}
        self.requests_made = 0

    # -- HTTP --------------------------------------------------------------------------------

    def _auth_for(self, url: str) -> tuple[str, tuple[str, str] | None]:
        """*url* without user info, and the credentials to send with it: its own, or those of
        an index on the same host (file URLs in pages are stored without credentials)."""
        parts = urlsplit(expand(url))
        bare = urlunsplit(
            (parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, parts.query, parts.fragment)
        )
        if parts.username:
            return bare, (unquote(parts.username), unquote(parts.password or ""))
        for index in (*self.index_urls, *self.pins.values()):
            ip = urlsplit(expand(index))
            if ip.username and ip.hostname == parts.hostname and ip.port == parts.port:
                return bare, (unquote(ip.username), unquote(ip.password or ""))
        return bare, None  # requests falls back to ~/.netrc

    def _get(self, url: str, headers: dict[str, str] | None = None) -> Any:
        import requests  # noqa: PLC0415

        real, auth = self._auth_for(url)
        with self._lock:
            self.requests_made += 1
        start = time.perf_counter()
        try:
            answer = self.session.get(
                real, headers=headers or {}, timeout=self.timeout, auth=auth, stream=False
            )
        except requests.exceptions.SSLError:
            raise PackageIndexError(
                f"cannot reach {strip_credentials(url)}: its TLS certificate is not trusted here",
                hint="point REQUESTS_CA_BUNDLE at the CA bundle that signed it",
            ) from None
        except requests.RequestException as exc:
            cause = type(exc).__name__
            raise PackageIndexError(
                f"cannot reach {strip_credentials(url)}: {cause}",
                hint="check the index URL and the network",
            ) from None
        profile.add("http", time.perf_counter() - start, size=len(answer.content))
        return answer

    # -- project pages -----------------------------------------------------------------------

    def project_files(self, project: str) -> list[DistFile]:
        """Every verifiable file of *project* on every index (empty if none has it)."""
        name = canonicalize_name(project)
        with self._lock:
            if name in self._pages:
                return self._pages[name]
        files: list[DistFile] = []
        pinned = self.pins.get(name)
        for index in (pinned,) if pinned else self.index_urls:
            files += self._page(index, name)
        for location in () if pinned else self.find_links:
            files += self._flat_files(location, name)
        with self._lock:
            self._pages[name] = files
        return files

    def project_names(self, limit: int = 8 << 20) -> list[str]:
        """The projects the indexes list on their root pages (PEP 691 JSON or PEP 503 HTML) and
        the find-links locations hold; a root page larger than *limit* bytes (PyPI's own) is
        skipped. Used only to suggest a name for a typo."""
        names: set[str] = set()
        for index in self.index_urls:
            parts = urlsplit(index)
            if parts.scheme == "file":
                root = Path(unquote(parts.path))
                if root.is_dir():
                    names.update(canonical_name(p.name) for p in root.iterdir() if p.is_dir())
                continue
            names.update(self._root_names(index, limit))
        for location in self.find_links:
            try:
                names.update(project for project, _f, _u in self._flat_entries(location))
            except PackageIndexError:
                continue
        return sorted(names)

    def _root_names(self, index: str, limit: int) -> set[str]:
        import requests  # noqa: PLC0415

        real, auth = self._auth_for(index)
        try:
            with self.session.get(
                real, headers={"Accept": _ACCEPT}, timeout=self.timeout, auth=auth, stream=True
            ) as answer:
                if (
                    answer.status_code != 200
                    or int(answer.headers.get("Content-Length") or 0) > limit
                ):
                    return set()
                body = b""
                for chunk in answer.iter_content(1 << 16):
                    body += chunk
                    if len(body) > limit:
                        return set()
                kind = answer.headers.get("Content-Type", "").split(";")[0].strip()
        except requests.RequestException:
            return set()
        if kind == JSON_TYPE:
            try:
                return {canonical_name(p["name"]) for p in json.loads(body)["projects"]}
            except (ValueError, KeyError, TypeError):
                return set()
        links = LinkParser()
        links.feed(body.decode("utf-8", "replace"))
        return {
            canonical_name(href.rstrip("/").rsplit("/", 1)[-1])
            for href in (a.get("href") or "" for a in links.links)
            if href
        }

    # -- find-links and direct URLs ---------------------------------------------------------

    def _flat_entries(self, location: str) -> list[tuple[str, str, str]]:
        """(project, file name, URL) of every wheel and sdist a find-links location lists: the
        files of a directory, or the links of an HTML page."""
        with self._lock:
            known = self._flat.get(location)
        if known is not None:
            return known
        entries: list[tuple[str, str, str]] = []
        parts = urlsplit(location)
        if parts.scheme == "file":
            directory = Path(unquote(parts.path))
            if not directory.is_dir():
                raise PackageIndexError(
                    f"find-links {directory}: not a directory",
                    hint="give a directory of wheels and sdists, or an http(s):// page",
                )
            for path in sorted(directory.iterdir()):
                parsed = parse_filename(path.name)
                if parsed is not None and path.is_file():
                    entries.append((parsed[0], path.name, path.resolve().as_uri()))
        else:
            answer = self._get(location)
            if answer.status_code != 200:
                raise PackageIndexError(
                    f"find-links {strip_credentials(location)} answered HTTP {answer.status_code}"
                )
            links = LinkParser()
            links.feed(answer.text)
            for attrs in links.links:
                url = urljoin(strip_credentials(answer.url), attrs.get("href") or "")
                filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
                parsed = parse_filename(filename)
                if parsed is not None:
                    entries.append((parsed[0], filename, url))
        with self._lock:
            self._flat[location] = entries
        return entries

    def _flat_files(self, location: str, name: str) -> list[DistFile]:
        return [
            self.direct_file(url, name)
            for _project, filename, url in self._flat_entries(location)
            if parse_filename(filename, name) is not None
        ]

    def direct_file(self, url: str, project: str | None = None) -> DistFile:
        """The wheel or sdist at *url* (a direct URL or a find-links file) as a :class:`DistFile`
        of *project* (canonical) when given; its sha256 comes from a ``#sha256=`` fragment, else
        from its bytes (a local file's hash is cached by path, size and mtime)."""
        bare, _, fragment = url.partition("#")
        filename = unquote(urlsplit(bare).path.rsplit("/", 1)[-1])
        parsed = parse_filename(filename, project)
        if parsed is None:
            whose = f" of {project}" if project else ""
            raise PackageIndexError(
                f"{strip_credentials(bare)}: not a wheel or sdist file name{whose}",
                hint="name a .whl, .tar.gz or .zip file",
            )
        algo, _, digest = fragment.partition("=")
        size = 0
        if algo == "sha256" and digest:
            sha256 = digest.lower()
        elif urlsplit(bare).scheme == "file":
            sha256, size = self.local_sha256(Path(unquote(urlsplit(bare).path)))
        else:
            data = self.fetch(bare)
            sha256, size = hashlib.sha256(data).hexdigest(), len(data)
        return DistFile(
            project=parsed[0],
            version=parsed[1],
            filename=filename,
            url=bare,
            sha256=sha256,
            requires_python=None,
            yanked=None,
            metadata_sha256=None,
            size=size,
        )

    def local_sha256(self, path: Path) -> tuple[str, int]:
        """(sha256, size) of a local file, cached by its path, size and mtime."""
        try:
            stat = path.stat()
        except OSError as exc:
            raise PackageIndexError(f"{path}: {exc.strerror}") from None
        cache = self._cache_path("local-hashes", f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
        if cache.is_file():
            return cache.read_text().strip(), stat.st_size
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        write_atomic(cache, digest.hexdigest().encode())
        return digest.hexdigest(), stat.st_size

    def _cache_path(self, kind: str, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.cache_dir / kind / digest[:2] / digest

    def _page(self, index: str, name: str) -> list[DistFile]:
        url = f"{index}{name}/"
        if urlsplit(index).scheme == "file":
            path = Path(unquote(urlsplit(expand(url)).path)) / "index.html"
            if not path.is_file():
                return []
            with profile.phase("parse"):
                return files_from_html(
                    path.read_text(encoding="utf-8", errors="replace"), url, name
                )
        # The page cache holds parsed rows with credential-free absolute URLs, not the page body:
        # decoding thousands of rows is what a warm resolution costs.
        cache = self._cache_path("pages", strip_credentials(url))
        cached: dict[str, Any] | None = None
        if cache.is_file():
            try:
                cached = json.loads(cache.read_bytes())
            except ValueError:
                cached = None
        if cached and cached.get("format") != _PAGE_FORMAT:
            cached = None
        if cached and cached.get("fresh_until", 0) > time.time():
            return rows_to_files(cached["rows"], name)
        headers = {"Accept": _ACCEPT}
        if cached and cached.get("etag"):
            headers["If-None-Match"] = cached["etag"]
        if cached and cached.get("last_modified"):
            headers["If-Modified-Since"] = cached["last_modified"]
        answer = self._get(url, headers)
        if answer.status_code == 304 and cached:
            cached["fresh_until"] = time.time() + _max_age(answer.headers, self.index_ttl)
            write_atomic(cache, json.dumps(cached).encode())
            return rows_to_files(cached["rows"], name)
        if answer.status_code == 404:
            return []
        if answer.status_code != 200:
            raise PackageIndexError(f"{strip_credentials(url)} answered HTTP {answer.status_code}")
        base = strip_credentials(answer.url)
        parsing = time.perf_counter()
        if answer.headers.get("Content-Type", "").split(";")[0].strip() == JSON_TYPE:
            try:
                files = files_from_json(answer.json(), base, name)
            except ValueError:
                raise PackageIndexError(f"{strip_credentials(url)}: malformed JSON page") from None
        else:
            files = files_from_html(answer.text, base, name)
        profile.add("parse", time.perf_counter() - parsing)
        entry = {
            "format": _PAGE_FORMAT,
            "etag": answer.headers.get("ETag"),
            "last_modified": answer.headers.get("Last-Modified"),
            "fresh_until": time.time() + _max_age(answer.headers, self.index_ttl),
            "rows": [file_to_row(f) for f in files],
        }
        write_atomic(cache, json.dumps(entry, separators=(",", ":")).encode())
        return files

    # -- metadata ----------------------------------------------------------------------------

    def metadata(self, dist: DistFile) -> email.message.Message:
        """The core metadata of a wheel, from the fastest source that works (see module doc)."""
        cache = self.cache_dir / "metadata" / dist.sha256[:2] / f"{dist.sha256}.metadata"
        if cache.is_file():
            return _parse_metadata(cache.read_bytes())
        if not dist.is_wheel:
            raise PackageIndexError(
                f"{dist.filename}: metadata of source distributions needs a build"
            )
        data: bytes | None
        if urlsplit(dist.url).scheme == "file":
            data = local_metadata(dist)  # a file:// index: read the wheel where it lies
        elif dist.metadata_sha256 is not None:
            data = self.metadata_file(dist)
        else:
            data = None
        if data is None:
            data = self._metadata_by_range(dist)
        if data is None:
            data = self._metadata_by_download(dist)
        write_atomic(cache, data)
        return _parse_metadata(data)

    def fetch(self, url: str) -> bytes:
        """The bytes of one file of a project at *url*, with the index's credentials; the
        caller checks them against the file's sha256."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            path = Path(unquote(parts.path))
            try:
                return path.read_bytes()
            except OSError as exc:
                raise PackageIndexError(f"{path}: {exc.strerror}") from None
        answer = self._get(url)
        if answer.status_code != 200:
            raise PackageIndexError(f"{strip_credentials(url)} answered HTTP {answer.status_code}")
        data: bytes = answer.content
        return data

    def metadata_file(self, dist: DistFile) -> bytes | None:
        """The PEP 658 ``.metadata`` file the page advertises for *dist* (checked against its
        hash when the page gives one), or None when the index does not answer with it."""
        answer = self._get(f"{dist.url}.metadata")
        if answer.status_code != 200:
            return None
        data: bytes = answer.content
        if dist.metadata_sha256 and hashlib.sha256(data).hexdigest() != dist.metadata_sha256:
            raise PackageIndexError(
                f"{dist.filename}.metadata does not match its advertised sha256"
            )
        return data

    def _metadata_by_range(self, dist: DistFile) -> bytes | None:
        tail = self._get(dist.url, {"Range": f"bytes=-{_TAIL}"})
        if tail.status_code == 200:
            return metadata_from_wheel(tail.content, dist)  # no range support: whole file
        if tail.status_code != 206:
            return None
        total = int(tail.headers.get("Content-Range", "*/0").rsplit("/", 1)[-1] or 0)
        data = tail.content
        start = total - len(data)
        try:
            cd_offset, cd_size = central_directory(data)
        except ValueError:
            return None
        if cd_offset < start:
            extra = self._get(dist.url, {"Range": f"bytes={cd_offset}-{start - 1}"})
            if extra.status_code != 206:
                return None
            data = extra.content + data
            start = cd_offset
        member = find_member(data[cd_offset - start : cd_offset - start + cd_size])
        if member is None:
            return None
        local_offset, compressed, method = member
        end = local_offset + 30 + 1024 + compressed  # header, name and extra fit in 1 KiB
        chunk = self._get(dist.url, {"Range": f"bytes={local_offset}-{min(end, total) - 1}"})
        if chunk.status_code != 206:
            return None
        return read_local_member(chunk.content, compressed, method)

    def _metadata_by_download(self, dist: DistFile) -> bytes:
        answer = self._get(dist.url)
        if answer.status_code != 200:
            raise PackageIndexError(
                f"{strip_credentials(dist.url)} answered HTTP {answer.status_code}"
            )
        return metadata_from_wheel(answer.content, dist)


def _max_age(headers: Any, default: float) -> float:
    """How long a project page stays fresh: ``Cache-Control: max-age``; a server that sends
    no caching headers at all gets PyPI's own policy (*default*: ``ENVMGR_INDEX_TTL``, 600 s),
    as there would be nothing to revalidate with; ``no-cache``/``no-store`` mean zero."""
    control = headers.get("Cache-Control", "")
    match = re.search(r"max-age=(\d+)", control)
    if match:
        return float(match.group(1))
    if control or headers.get("ETag") or headers.get("Last-Modified"):
        return 0.0
    return default
