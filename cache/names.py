"""Named environments: ``names/<name>/<tag>`` in the store points at one env per platform.

``envmgr alias ENV team/pandas:stable`` lets people and steps refer to an env by a name that
outlives env ids. The tags :data:`MUTABLE_TAGS` move (``latest`` is the default tag); any other
tag is written once, with a conditional put, and pointing it elsewhere is an error, so
``pandas:2024-q3`` means the same packages forever. An entry is JSON::

    {"format": 1, "envs": {"linux-64": "<env_id>", ...}, "created": "...", "by": "user@host"}
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from envmgr.cache import Store
from envmgr.cache.layout import name_key
from envmgr.cache.store import NotARecordError, head
from envmgr.errors import EnvmgrError
from envmgr.ids import BadIdError, looks_like_id, parse_env_id, parse_platform

__all__ = [
    "DEFAULT_TAG",
    "MUTABLE_TAGS",
    "Alias",
    "AliasError",
    "BadName",
    "is_name",
    "list_aliases",
    "lookup",
    "parse_name",
    "set_alias",
    "step_envs",
]

DEFAULT_TAG = "latest"
MUTABLE_TAGS = frozenset({"latest", "candidate", "stable"})
_SEGMENT = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME = re.compile(rf"{_SEGMENT}(/{_SEGMENT})?")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: What an env id prefix looks like (ids are hex; prefixes of 8+ digits are accepted for ids).
_FORMAT = 1


class AliasError(EnvmgrError):
    """A bad env name, a missing one, or an attempt to move an immutable tag."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Alias:
    name: str
    tag: str
    envs: Mapping[str, str]  # platform -> env_id
    created: str = ""
    by: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def to_dict(self) -> dict[str, object]:
        return {"format": _FORMAT, "envs": dict(self.envs), "created": self.created, "by": self.by}


def is_name(text: str) -> bool:
    """True when *text* has the shape ``name[:tag]`` (it need not exist)."""
    name, _, tag = text.partition(":")
    return bool(_NAME.fullmatch(name)) and (not tag or bool(_TAG.fullmatch(tag)))


def parse_name(text: str) -> tuple[str, str]:
    """``name[:tag]`` → (name, tag); raises ``AliasError`` with the rules."""
    name, _, tag = text.partition(":")
    tag = tag or DEFAULT_TAG
    if not _NAME.fullmatch(name):
        raise AliasError(
            f"{text!r} is not an env name",
            hint="use lower-case letters, digits, '.', '_' or '-', optionally one '/' "
            "(team/name), then an optional :tag",
        )
    if not _TAG.fullmatch(tag):
        raise AliasError(f"{text!r}: bad tag {tag!r}", hint="letters, digits, '.', '_' or '-'")
    if looks_like_id(name):
        raise AliasError(
            f"{text!r} looks like an env id prefix, so it would mean two envs",
            hint="a name needs a letter beyond a-f or fewer than 8 hex digits, e.g. team/" + name,
        )
    return name, tag


def _decode(store: Store, key: str, raw: bytes, name: str, tag: str) -> Alias:
    try:
        data = json.loads(raw)
        if data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        envs = {
            parse_platform(k, where="platform"): parse_env_id(v, where=f"envs[{k!r}]")
            for k, v in data["envs"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError, BadIdError) as exc:
        raise AliasError(f"{store.url}/{key}: not an envmgr name entry ({exc})") from None
    return Alias(
        name=name,
        tag=tag,
        envs=envs,
        created=str(data.get("created", "")),
        by=str(data.get("by", "")),
    )


def lookup(store: Store, text: str) -> Alias:
    """The alias *text* (``name[:tag]``); raises ``AliasError`` if it does not exist."""
    name, tag = parse_name(text)
    key = name_key(name, tag)
    raw = store.get(key)
    if raw is None:
        tags = sorted(k.rsplit("/", 1)[-1] for k in store.list(f"names/{name}/"))
        hint = f"tags of {name}: {', '.join(tags)}" if tags else "create it with `envmgr alias`"
        raise AliasError(f"no env named {name}:{tag} in {store.url}", hint=hint)
    return _decode(store, key, raw, name, tag)


def step_envs(store: Store, text: str, platforms: Iterable[str], *, step: str) -> dict[str, str]:
    """``{platform: env_id}`` of the named env *text* for the *platforms* a step runs on (a
    step with ``@conda(name=...)``); raises ``AliasError`` naming the step when the name does
    not exist or has no env for one of them."""
    alias = lookup(store, text)
    platforms = list(platforms)
    missing = [p for p in platforms if p not in alias.envs]
    if missing:
        raise AliasError(
            f"step {step!r}: named env {alias.ref} has no {', '.join(missing)} env in "
            f"{store.url} (it has: {', '.join(sorted(alias.envs)) or 'none'})",
            hint=f"point it at one: envmgr alias ENV_ID {alias.ref} --platform {missing[0]}",
        )
    return {p: alias.envs[p] for p in platforms}


def set_alias(store: Store, text: str, envs: Mapping[str, str]) -> tuple[Alias, bool]:
    """Point ``name[:tag]`` at *envs* (platform → env_id); returns the alias and whether it
    changed. Raises ``AliasError`` when an immutable tag already points elsewhere."""
    name, tag = parse_name(text)
    if not envs:
        raise AliasError(f"{name}:{tag}: nothing to point at")
    key = name_key(name, tag)
    alias = Alias(
        name=name,
        tag=tag,
        envs=dict(sorted(envs.items())),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        by=f"{getpass.getuser()}@{socket.gethostname()}",
    )
    payload = json.dumps(alias.to_dict(), sort_keys=True).encode()
    if tag in MUTABLE_TAGS:
        old = store.get(key)
        if old is not None and dict(_decode(store, key, old, name, tag).envs) == alias.envs:
            return _decode(store, key, old, name, tag), False
        store.put(key, payload)
        return alias, True
    if store.put_if_absent(key, payload):
        return alias, True
    current = lookup(store, f"{name}:{tag}")
    if dict(current.envs) == alias.envs:
        return current, False
    raise AliasError(
        f"{name}:{tag} already points at {_describe(current.envs)}; tag {tag!r} is immutable",
        hint=f"use a new tag, or one of the moving tags {', '.join(sorted(MUTABLE_TAGS))}",
    )


def _describe(envs: Mapping[str, str]) -> str:
    return ", ".join(f"{platform} {env_id[:12]}" for platform, env_id in envs.items())


class BadName(NamedTuple):
    """An object under ``names/`` that is not a name entry: its key, bytes and what is wrong."""

    key: str
    raw: bytes
    error: AliasError


def list_aliases(
    store: Store, name: str | None = None, *, bad: list[BadName] | None = None
) -> Iterator[Alias]:
    """Every alias in the store (of *name* only, when given), sorted by name and tag. An
    object that is not a name entry is appended to *bad* and skipped; without *bad* it
    raises ``AliasError``, since a name must never be guessed at."""
    for key in store.list(f"names/{name}/" if name else "names/"):
        parts = key.split("/")[1:]
        if len(parts) < 2:
            continue
        alias_name, tag = "/".join(parts[:-1]), parts[-1]
        try:
            raw = store.get(key)
        except NotARecordError as exc:
            if bad is None:
                raise
            # Like any other object that is not a name entry: skipped, what can be read of
            # its first MiB kept for gc, which keeps every env it mentions.
            error = AliasError(f"{store.url}/{key}: not an envmgr name entry ({exc.cause})")
            bad.append(BadName(key=key, raw=head(store, key, 1 << 20), error=error))
            continue
        if raw is None:
            continue
        try:
            yield _decode(store, key, raw, alias_name, tag)
        except AliasError as exc:
            if bad is None:
                raise
            bad.append(BadName(key=key, raw=raw[: 1 << 20], error=exc))
