"""What a simple index page lists: the files of a project, from PEP 691 JSON or PEP 503 HTML.

A :class:`DistFile` is one file a page offers (URL, sha256, ``requires-python``, yanked, and
whether PEP 658 metadata is advertised). File names are read the way pip and uv read them: a
wheel by its tags, an sdist by what follows its project's normalized name
(:func:`sdist_version`), so ``thop-0.0.22-421392844089.tar.gz`` is thop's. Pages are kept in
the page cache as rows (:func:`file_to_row`, :func:`rows_to_files`).
"""

from __future__ import annotations

import functools
import html.parser
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import InvalidVersion, Version

from envmgr.errors import EnvmgrError

__all__ = [
    "JSON_TYPE",
    "DistFile",
    "LinkParser",
    "PackageIndexError",
    "canonical_name",
    "file_to_row",
    "files_from_html",
    "files_from_json",
    "parse_filename",
    "rows_to_files",
    "sdist_version",
]

JSON_TYPE = "application/vnd.pypi.simple.v1+json"


class PackageIndexError(EnvmgrError):
    """An index could not be read or served something unusable; names the (clean) URL."""


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


class LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.append(dict(attrs))


def parse_filename(name: str, project: str | None = None) -> tuple[str, str] | None:
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
        found = canonical_name(parts[0])
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
        if canonical_name(stem[:dash]) == wanted:
            try:
                return str(Version(stem[dash + 1 :]))
            except InvalidVersion:
                return None
        dash = stem.find("-", dash + 1)
    return None


@functools.lru_cache(maxsize=4096)
def canonical_name(name: str) -> str:
    return str(canonicalize_name(name))


def files_from_json(data: dict[str, Any], base: str, project: str) -> list[DistFile]:
    out = []
    for entry in data.get("files", []):
        parsed = parse_filename(entry.get("filename", ""), project)
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


def files_from_html(text: str, base: str, project: str) -> list[DistFile]:
    parser = LinkParser()
    parser.feed(text)
    out = []
    for attrs in parser.links:
        href = attrs.get("href") or ""
        url, _, fragment = urljoin(base, href).partition("#")
        filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        parsed = parse_filename(filename, project)
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


def file_to_row(dist: DistFile) -> list[Any]:
    return [
        dist.filename,
        dist.url,
        dist.sha256,
        dist.requires_python,
        dist.yanked,
        dist.metadata_sha256,
        dist.size,
    ]


def rows_to_files(rows: list[list[Any]], project: str) -> list[DistFile]:
    out = []
    for filename, url, sha256, requires_python, yanked, metadata_sha256, size in rows:
        parsed = parse_filename(filename, project)
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
