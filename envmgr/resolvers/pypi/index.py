"""A client for simple package indexes: PEP 691 JSON first, PEP 503 HTML as the fallback.

One ``requests`` session (pooled connections, retries with backoff) serves every index; a URL's
user info, ``${VAR}`` references and ``~/.netrc`` supply credentials, which never appear in
errors or logs. Project pages are cached on disk and revalidated with ``ETag`` /
``Last-Modified`` (or reused while ``Cache-Control: max-age`` says they are fresh); ``file://``
indexes (a directory per project with an ``index.html``) are read directly.

Metadata comes from the fastest source that works (:meth:`IndexClient.metadata`): a PEP 658/714
``.metadata`` file (when advertised, or when the URL answers); else the wheel's ``METADATA``
read with HTTP range requests (the zip's central directory, then one member); else the whole
wheel, checked against its sha256. Metadata is cached forever by the file's sha256.
"""

from __future__ import annotations

import email.message
import email.parser
import functools
import hashlib
import html.parser
import io
import json
import os
import re
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import InvalidVersion, Version

from envmgr.errors import EnvmgrError
from envmgr.lock import strip_credentials

__all__ = [
    "DistFile",
    "IndexClient",
    "PackageIndexError",
    "pip_index_urls",
    "pip_sources",
    "wheel_metadata",
]

JSON_TYPE = "application/vnd.pypi.simple.v1+json"
_ACCEPT = f"{JSON_TYPE}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TAIL = 64 * 1024
_PAGE_FORMAT = 1
_METADATA_PROBES = 3  # unadvertised .metadata 404s on an index before we stop asking it


class PackageIndexError(EnvmgrError):
    """An index could not be read or served something unusable; names the (clean) URL."""


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


@dataclass(frozen=True, kw_only=True, slots=True)
class DistFile:
    """One file of a project on an index."""

    project: str
    version: str
    filename: str
    url: str  # absolute, credentials included if the index URL had them
    sha256: str
    requires_python: str | None
    yanked: str | None  # the reason ("" when none was given), or None when not yanked
    metadata_sha256: str | None  # PEP 658/714: None when not advertised, "" when no hash
    size: int = 0

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.append(dict(attrs))


def _parse_filename(name: str, project: str | None = None) -> tuple[str, str] | None:
    """(project, version) of a wheel or sdist file name; a cheap split, since pages of big
    projects list thousands of files (wheel tags are parsed later, only for candidates).

    With *project* (canonical), a file that is not that project's is None, and an sdist's
    version is what follows the project's name, as pip and uv read it: for project ``thop``,
    ``thop-0.0.22-421392844089.tar.gz`` is version ``0.0.22.post421392844089``, not project
    ``thop-0-0-22``. Without it (a file whose project nobody named) the last dash splits."""
    if name.endswith(".whl"):
        parts = name[:-4].split("-")
        if len(parts) not in (5, 6):
            return None
        found = _canonical(parts[0])
        if project is not None and found != project:
            return None
        return found, parts[1]
    if project is not None:
        version = sdist_version(name, project)
        return None if version is None else (project, version)
    if name.endswith(_SDIST_SUFFIXES):
        try:
            found, parsed = parse_sdist_filename(name)
        except (InvalidSdistFilename, ValueError):
            return None
        return canonicalize_name(found), str(parsed)
    return None


_SDIST_SUFFIXES = (".tar.gz", ".zip")


def sdist_version(filename: str, project: str) -> str | None:
    """The normalized version of sdist *filename* of *project*, or None when the file is not
    an sdist of *project* or its version is not PEP 440: the stem's first dash after which
    the part before, normalized, is the project's name (pip's and uv's rule)."""
    suffix = next((s for s in _SDIST_SUFFIXES if filename.endswith(s)), None)
    if suffix is None:
        return None
    stem = filename[: -len(suffix)]
    wanted = canonicalize_name(project)
    dash = stem.find("-")
    while dash != -1:
        if _canonical(stem[:dash]) == wanted:
            try:
                return str(Version(stem[dash + 1 :]))
            except InvalidVersion:
                return None
        dash = stem.find("-", dash + 1)
    return None


@functools.lru_cache(maxsize=4096)
def _canonical(name: str) -> str:
    return str(canonicalize_name(name))


def _files_from_json(data: dict[str, Any], base: str, project: str) -> list[DistFile]:
    out = []
    for entry in data.get("files", []):
        parsed = _parse_filename(entry.get("filename", ""), project)
        sha256 = (entry.get("hashes") or {}).get("sha256")
        if parsed is None or not sha256:
            continue  # envmgr locks only files it can verify
        meta = entry.get("core-metadata", entry.get("data-dist-info-metadata", False))
        yanked = entry.get("yanked", False)
        out.append(
            DistFile(
                project=parsed[0],
                version=parsed[1],
                filename=entry["filename"],
                url=urljoin(base, entry["url"]),
                sha256=sha256.lower(),
                requires_python=entry.get("requires-python") or None,
                yanked=(yanked if isinstance(yanked, str) else "") if yanked else None,
                metadata_sha256=(meta.get("sha256", "") if isinstance(meta, dict) else "")
                if meta
                else None,
                size=int(entry.get("size") or 0),
            )
        )
    return out


def _files_from_html(text: str, base: str, project: str) -> list[DistFile]:
    parser = _Links()
    parser.feed(text)
    out = []
    for attrs in parser.links:
        href = attrs.get("href") or ""
        url, _, fragment = urljoin(base, href).partition("#")
        filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        parsed = _parse_filename(filename, project)
        algo, _, digest = fragment.partition("=")
        if parsed is None or algo != "sha256" or not digest:
            continue
        meta = attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata"))
        yanked = attrs.get("data-yanked")
        out.append(
            DistFile(
                project=parsed[0],
                version=parsed[1],
                filename=filename,
                url=url,
                sha256=digest.lower(),
                requires_python=attrs.get("data-requires-python") or None,
                yanked=yanked if yanked is not None else None,
                metadata_sha256=(meta.partition("=")[2] if meta and meta != "true" else "")
                if meta is not None
                else None,
            )
        )
    return out


def _file_to_row(dist: DistFile) -> list[Any]:
    return [
        dist.filename,
        dist.url,
        dist.sha256,
        dist.requires_python,
        dist.yanked,
        dist.metadata_sha256,
        dist.size,
    ]


def _rows_to_files(rows: list[list[Any]], project: str) -> list[DistFile]:
    out = []
    for filename, url, sha256, requires_python, yanked, metadata_sha256, size in rows:
        parsed = _parse_filename(filename, project)
        if parsed is not None:
            out.append(
                DistFile(
                    project=parsed[0],
                    version=parsed[1],
                    filename=filename,
                    url=url,
                    sha256=sha256,
                    requires_python=requires_python,
                    yanked=yanked,
                    metadata_sha256=metadata_sha256,
                    size=size,
                )
            )
    return out


def _parse_metadata(data: bytes) -> email.message.Message:
    return email.parser.BytesParser().parsebytes(data)


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
        timeout: float = 30.0,
        pool_size: int = 16,
    ) -> None:
        import requests  # noqa: PLC0415
        from requests.adapters import HTTPAdapter  # noqa: PLC0415
        from urllib3.util.retry import Retry  # noqa: PLC0415

        self.index_urls = tuple(dict.fromkeys(u.rstrip("/") + "/" for u in index_urls))
        self.find_links = tuple(dict.fromkeys(find_links))
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
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._lock = threading.Lock()
        self._pages: dict[str, list[DistFile]] = {}
        # Per index host: unadvertised .metadata probes made, and whether one ever answered.
        self._probes: dict[str, list[int]] = {}
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
        for index in self.index_urls:
            ip = urlsplit(expand(index))
            if ip.username and ip.hostname == parts.hostname and ip.port == parts.port:
                return bare, (unquote(ip.username), unquote(ip.password or ""))
        return bare, None  # requests falls back to ~/.netrc

    def _get(self, url: str, headers: dict[str, str] | None = None) -> Any:
        import requests  # noqa: PLC0415

        real, auth = self._auth_for(url)
        with self._lock:
            self.requests_made += 1
        try:
            return self.session.get(
                real, headers=headers or {}, timeout=self.timeout, auth=auth, stream=False
            )
        except requests.RequestException as exc:
            cause = type(exc).__name__
            raise PackageIndexError(
                f"cannot reach {strip_credentials(url)}: {cause}",
                hint="check the index URL and the network",
            ) from None

    # -- project pages -----------------------------------------------------------------------

    def project_files(self, project: str) -> list[DistFile]:
        """Every verifiable file of *project* on every index (empty if none has it)."""
        name = canonicalize_name(project)
        with self._lock:
            if name in self._pages:
                return self._pages[name]
        files: list[DistFile] = []
        for index in self.index_urls:
            files += self._page(index, name)
        for location in self.find_links:
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
                    names.update(_canonical(p.name) for p in root.iterdir() if p.is_dir())
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
                return {_canonical(p["name"]) for p in json.loads(body)["projects"]}
            except (ValueError, KeyError, TypeError):
                return set()
        links = _Links()
        links.feed(body.decode("utf-8", "replace"))
        return {
            _canonical(href.rstrip("/").rsplit("/", 1)[-1])
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
                parsed = _parse_filename(path.name)
                if parsed is not None and path.is_file():
                    entries.append((parsed[0], path.name, path.resolve().as_uri()))
        else:
            answer = self._get(location)
            if answer.status_code != 200:
                raise PackageIndexError(
                    f"find-links {strip_credentials(location)} answered HTTP {answer.status_code}"
                )
            links = _Links()
            links.feed(answer.text)
            for attrs in links.links:
                url = urljoin(strip_credentials(answer.url), attrs.get("href") or "")
                filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
                parsed = _parse_filename(filename)
                if parsed is not None:
                    entries.append((parsed[0], filename, url))
        with self._lock:
            self._flat[location] = entries
        return entries

    def _flat_files(self, location: str, name: str) -> list[DistFile]:
        return [
            self.direct_file(url, name)
            for _project, filename, url in self._flat_entries(location)
            if _parse_filename(filename, name) is not None
        ]

    def direct_file(self, url: str, project: str | None = None) -> DistFile:
        """The wheel or sdist at *url* (a direct URL or a find-links file) as a :class:`DistFile`
        of *project* (canonical) when given; its sha256 comes from a ``#sha256=`` fragment, else
        from its bytes (a local file's hash is cached by path, size and mtime)."""
        bare, _, fragment = url.partition("#")
        filename = unquote(urlsplit(bare).path.rsplit("/", 1)[-1])
        parsed = _parse_filename(filename, project)
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
        _write_atomic(cache, digest.hexdigest().encode())
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
            return _files_from_html(path.read_text(encoding="utf-8", errors="replace"), url, name)
        # The cache holds parsed rows with credential-free absolute URLs, not the page body:
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
            return _rows_to_files(cached["rows"], name)
        headers = {"Accept": _ACCEPT}
        if cached and cached.get("etag"):
            headers["If-None-Match"] = cached["etag"]
        if cached and cached.get("last_modified"):
            headers["If-Modified-Since"] = cached["last_modified"]
        answer = self._get(url, headers)
        if answer.status_code == 304 and cached:
            cached["fresh_until"] = time.time() + _max_age(answer.headers)
            _write_atomic(cache, json.dumps(cached).encode())
            return _rows_to_files(cached["rows"], name)
        if answer.status_code == 404:
            return []
        if answer.status_code != 200:
            raise PackageIndexError(f"{strip_credentials(url)} answered HTTP {answer.status_code}")
        base = strip_credentials(answer.url)
        if answer.headers.get("Content-Type", "").split(";")[0].strip() == JSON_TYPE:
            try:
                files = _files_from_json(answer.json(), base, name)
            except ValueError:
                raise PackageIndexError(f"{strip_credentials(url)}: malformed JSON page") from None
        else:
            files = _files_from_html(answer.text, base, name)
        entry = {
            "format": _PAGE_FORMAT,
            "etag": answer.headers.get("ETag"),
            "last_modified": answer.headers.get("Last-Modified"),
            "fresh_until": time.time() + _max_age(answer.headers),
            "rows": [_file_to_row(f) for f in files],
        }
        _write_atomic(cache, json.dumps(entry, separators=(",", ":")).encode())
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
            data = _local_metadata(dist)  # a file:// index: read the wheel where it lies
        else:
            data = self.metadata_file(dist)
        if data is None:
            data = self._metadata_by_range(dist)
        if data is None:
            data = self._metadata_by_download(dist)
        _write_atomic(cache, data)
        return _parse_metadata(data)

    def _index_of(self, dist: DistFile) -> str:
        return urlsplit(dist.url).netloc

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
        """The PEP 658 ``.metadata`` file of *dist* (checked when its hash is advertised), or
        None; unadvertised files are probed on a few files per index, then no more."""
        probe = self._probes.setdefault(self._index_of(dist), [0, 0])
        if dist.metadata_sha256 is None:
            with self._lock:  # reserve a probe before asking: the prefetcher runs in parallel
                if not probe[1] and probe[0] >= _METADATA_PROBES:
                    return None
                probe[0] += 1
        answer = self._get(f"{dist.url}.metadata")
        if answer.status_code != 200:
            return None
        probe[1] = 1
        data: bytes = answer.content
        if dist.metadata_sha256 and hashlib.sha256(data).hexdigest() != dist.metadata_sha256:
            raise PackageIndexError(
                f"{dist.filename}.metadata does not match its advertised sha256"
            )
        return data

    def _metadata_by_range(self, dist: DistFile) -> bytes | None:
        tail = self._get(dist.url, {"Range": f"bytes=-{_TAIL}"})
        if tail.status_code == 200:
            return _metadata_from_wheel(tail.content, dist)  # no range support: whole file
        if tail.status_code != 206:
            return None
        total = int(tail.headers.get("Content-Range", "*/0").rsplit("/", 1)[-1] or 0)
        data = tail.content
        start = total - len(data)
        try:
            cd_offset, cd_size = _central_directory(data)
        except ValueError:
            return None
        if cd_offset < start:
            extra = self._get(dist.url, {"Range": f"bytes={cd_offset}-{start - 1}"})
            if extra.status_code != 206:
                return None
            data = extra.content + data
            start = cd_offset
        member = _find_member(data[cd_offset - start : cd_offset - start + cd_size])
        if member is None:
            return None
        local_offset, compressed, method = member
        end = local_offset + 30 + 1024 + compressed  # header, name and extra fit in 1 KiB
        chunk = self._get(dist.url, {"Range": f"bytes={local_offset}-{min(end, total) - 1}"})
        if chunk.status_code != 206:
            return None
        return _read_local_member(chunk.content, compressed, method)

    def _metadata_by_download(self, dist: DistFile) -> bytes:
        answer = self._get(dist.url)
        if answer.status_code != 200:
            raise PackageIndexError(
                f"{strip_credentials(dist.url)} answered HTTP {answer.status_code}"
            )
        return _metadata_from_wheel(answer.content, dist)


def wheel_metadata(archive: zipfile.ZipFile) -> bytes | None:
    """The bytes of a wheel's ``<name>.dist-info/METADATA``, or ``None`` when it has none."""
    for name in archive.namelist():
        if name.count("/") == 1 and name.endswith(".dist-info/METADATA"):
            return archive.read(name)
    return None


def _local_metadata(dist: DistFile) -> bytes:
    """The METADATA of a wheel on this machine (its hash is checked when it is installed)."""
    path = Path(unquote(urlsplit(dist.url).path))
    try:
        with zipfile.ZipFile(path) as archive:
            data = wheel_metadata(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PackageIndexError(f"{path}: cannot read the wheel ({exc})") from None
    if data is None:
        raise PackageIndexError(f"{dist.filename}: no .dist-info/METADATA in the wheel")
    return data


def _metadata_from_wheel(data: bytes, dist: DistFile) -> bytes:
    if hashlib.sha256(data).hexdigest() != dist.sha256:
        raise PackageIndexError(
            f"{dist.filename}: download does not match its sha256 ({strip_credentials(dist.url)})"
        )
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        metadata = wheel_metadata(archive)
    if metadata is None:
        raise PackageIndexError(f"{dist.filename}: no .dist-info/METADATA in the wheel")
    return metadata


def _central_directory(tail: bytes) -> tuple[int, int]:
    """(offset, size) of the zip central directory from the file's last bytes."""
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        raise ValueError("no end of central directory")
    size, offset = struct.unpack("<II", tail[pos + 12 : pos + 20])
    if offset == 0xFFFFFFFF:  # zip64
        loc = tail.rfind(b"PK\x06\x07", 0, pos)
        if loc < 0:
            raise ValueError("zip64 without locator")
        rel = tail.rfind(b"PK\x06\x06", 0, loc)
        if rel < 0:
            raise ValueError("zip64 record not in the tail")
        size, offset = struct.unpack("<QQ", tail[rel + 40 : rel + 56])
    return offset, size


def _find_member(directory: bytes) -> tuple[int, int, int] | None:
    """(local header offset, compressed size, method) of ``*.dist-info/METADATA``."""
    pos = 0
    while directory.startswith(b"PK\x01\x02", pos):
        (method,) = struct.unpack("<H", directory[pos + 10 : pos + 12])
        (compressed,) = struct.unpack("<I", directory[pos + 20 : pos + 24])
        name_len, extra_len, comment_len = struct.unpack("<HHH", directory[pos + 28 : pos + 34])
        (offset,) = struct.unpack("<I", directory[pos + 42 : pos + 46])
        name = directory[pos + 46 : pos + 46 + name_len].decode("utf-8", "replace")
        if name.count("/") == 1 and name.endswith(".dist-info/METADATA"):
            return offset, compressed, method
        pos += 46 + name_len + extra_len + comment_len
    return None


def _read_local_member(chunk: bytes, compressed: int, method: int) -> bytes | None:
    if not chunk.startswith(b"PK\x03\x04"):
        return None
    name_len, extra_len = struct.unpack("<HH", chunk[26:30])
    start = 30 + name_len + extra_len
    raw = chunk[start : start + compressed]
    if len(raw) < compressed:
        return None
    if method == 0:
        return raw
    if method == 8:
        return zlib.decompress(raw, -15)
    return None


def _max_age(headers: Any) -> float:
    """How long a project page stays fresh: ``Cache-Control: max-age``; a server that sends
    no caching headers at all gets PyPI's own policy (``ENVMGR_INDEX_TTL``, default 600 s), as
    there would be nothing to revalidate with; ``no-cache``/``no-store`` mean zero."""
    control = headers.get("Cache-Control", "")
    match = re.search(r"max-age=(\d+)", control)
    if match:
        return float(match.group(1))
    if control or headers.get("ETag") or headers.get("Last-Modified"):
        return 0.0
    from envmgr.config import load  # noqa: PLC0415

    return float(load()["index_ttl"])


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
