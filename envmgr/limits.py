"""Bounds on what envmgr parses from files other people hand in (locks, spec files).

A lock or environment file comes from another team, a repository or a store: it is read only
within limits checked before any real parsing, each failure one line naming the file. The
YAML check walks the event stream (libyaml where PyYAML has it) and counts the nodes the
document would expand to, so an alias bomb ("billion laughs") is refused in milliseconds,
while ordinary anchors, which conda-lock itself may write, still load. The locked packages of
an adopted lock are checked too: each URL must name a package file of that package and come
from where the lock or the configuration says packages come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from envmgr.errors import EnvmgrError

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "MAX_REQUIREMENTS",
    "MAX_SCALAR",
    "InputError",
    "InputTooLargeError",
    "check_package_url",
    "check_url_origin",
    "check_yaml",
    "read_bounded",
]

#: The largest lock or spec file read (a 300-package, three-platform lock is about 1 MB).
MAX_FILE_BYTES = 32 << 20
#: Nodes a YAML document may expand to, aliases counted as what they repeat.
MAX_NODES = 2_000_000
#: Nesting depth of a YAML document (a lock is about 5 deep).
MAX_DEPTH = 64
#: One YAML scalar (a name, a URL, a hash is far shorter).
MAX_SCALAR = 64 << 10
#: Requirements in one requirements file and what it includes (real ones hold hundreds).
MAX_REQUIREMENTS = 20_000


class InputError(EnvmgrError):
    """A file handed in cannot be read; ``reason`` says why without the file's name."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


class InputTooLargeError(InputError):
    """A file handed in is over one of the limits; names the file and the limit."""

    exit_code = 2


def read_bounded(path: Path, *, what: str) -> str:
    """The UTF-8 text of *path* (a leading byte-order mark dropped, as pip does), refusing
    more than :data:`MAX_FILE_BYTES`. The bytes read are counted, not the size ``stat`` gives:
    a device or a pipe (``/dev/zero``, ``<(cat ...)``) has none. It reads in chunks, so
    Ctrl-C stops it at once."""
    limit = MAX_FILE_BYTES
    try:
        size = path.stat().st_size
        if size > limit:
            raise InputTooLargeError(
                str(path), f"{size / 1e6:.0f} MB is more than a {what} can be ({limit >> 20} MiB)"
            )
        data = bytearray()
        with path.open("rb") as handle:
            while len(data) <= limit:
                chunk = handle.read(1 << 20)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise InputError(str(path), f"cannot read: no such {what}") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read: {exc.strerror}") from None
    if len(data) > limit:
        raise InputTooLargeError(
            str(path), f"more than a {what} can be ({limit >> 20} MiB read and more to come)"
        )
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InputError(str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def check_yaml(text: str, *, where: str) -> None:
    """Refuse YAML that expands past :data:`MAX_NODES`, nests past :data:`MAX_DEPTH` or holds
    a scalar over :data:`MAX_SCALAR`. Syntax errors are left to the real parser."""
    import yaml  # noqa: PLC0415

    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    sizes: dict[str, int] = {}  # anchor -> nodes it stands for
    open_anchors: list[tuple[str | None, int]] = []
    nodes = depth = 0
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent):
                nodes += sizes.get(event.anchor, 1)
            elif isinstance(event, yaml.ScalarEvent):
                nodes += 1
                if len(event.value) > MAX_SCALAR:
                    raise InputTooLargeError(
                        where, f"a value of {len(event.value)} characters (at most {MAX_SCALAR})"
                    )
                if event.anchor:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                nodes += 1
                depth += 1
                if depth > MAX_DEPTH:
                    raise InputTooLargeError(where, f"nested deeper than {MAX_DEPTH} levels")
                open_anchors.append((event.anchor, nodes))
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                anchor, start = open_anchors.pop()
                if anchor:
                    sizes[anchor] = nodes - start + 1
            if nodes > MAX_NODES:
                raise InputTooLargeError(
                    where, f"expands to more than {MAX_NODES:,} YAML nodes (an alias bomb?)"
                )
    except yaml.YAMLError as exc:
        # libyaml's scanner looks ahead and stops at 1,000 open flow collections ([[[...)
        # before any event: that is this limit too, not a syntax error for the composer,
        # which would recurse that deep.
        if "maximum nesting depth" in str(exc):
            raise InputTooLargeError(where, f"nested deeper than {MAX_DEPTH} levels") from None
        return  # the real parser reports it with its line


def check_url_origin(url: str, *, manager: str, roots: Sequence[str]) -> str | None:
    """Why *url*, a package URL of an adopted lock, does not come from where the lock and the
    configuration say packages come from (``None``: it does). *roots* are the channel and
    index URLs the lock declares and the configured ones.

    No URL may hold ``.`` or ``..`` path segments or point at a link-local address (cloud
    metadata services live there). A conda package must lie under one of *roots*. A PyPI
    file may live on another host than its index (an index serves files from a file host),
    so for PyPI only a loopback or private address is held to *roots*' hosts and ports."""
    import ipaddress  # noqa: PLC0415

    parts = urlsplit(url)
    segments = [unquote(s) for s in parts.path.split("/")]
    if any(s in (".", "..") for s in segments):
        return "its path holds '.' or '..' segments"
    host = (parts.hostname or "").strip("[]")
    try:
        address = ipaddress.ip_address(host) if host else None
    except ValueError:
        address = None
    if address is not None and address.is_link_local:
        return f"{host} is a link-local address"
    under = [_root_of(root) for root in roots]
    if manager == "conda":
        if any(_is_under(parts, root) for root in under):
            return None
        return "it is under no channel the lock declares or envmgr is configured with"
    local = host == "localhost" or (
        address is not None and (address.is_loopback or address.is_private)
    )
    if local and not any(_same_origin(parts, root) for root in under):
        return f"{parts.netloc} is a local address that no declared or configured index uses"
    return None


def _root_of(url: str) -> SplitResult:
    parts = urlsplit(url)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return parts._replace(path=unquote(path))


def _same_origin(a: SplitResult, b: SplitResult) -> bool:
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def _is_under(parts: SplitResult, root: SplitResult) -> bool:
    return _same_origin(parts, root) and unquote(parts.path).startswith(root.path)


def check_package_url(url: str, *, manager: str, name: str) -> str | None:
    """Why *url* cannot be the locked file of package *name* (``None``: it can).

    The scheme must be http(s) or file, and the last path segment a package file of *name*:
    ``<name>-…​.conda`` / ``.tar.bz2`` for conda, a wheel or sdist of the project for PyPI.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http", "file"):
        return f"scheme {parts.scheme or 'none'!r} (want https, http or file)"
    if parts.scheme != "file" and not parts.hostname:
        return "no host"
    filename = unquote(parts.path.rsplit("/", 1)[-1])
    if manager == "conda":
        if not filename.endswith((".conda", ".tar.bz2")):
            return f"{filename!r} is not a conda package file"
        if not filename.lower().startswith(f"{name.lower()}-"):
            return f"{filename!r} is not a file of {name}"
        return None
    stem = filename.lower().replace("-", "_").replace(".", "_")
    project = name.lower().replace("-", "_").replace(".", "_")
    if not filename.endswith((".whl", ".tar.gz", ".zip")):
        return f"{filename!r} is not a wheel or a source distribution"
    if not stem.startswith(f"{project}_"):
        return f"{filename!r} is not a file of {name}"
    return None
