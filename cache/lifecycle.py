"""A store's lifecycle: what it holds (``envmgr store ls`` / ``du``) and collecting old envs
(``envmgr store gc``), the same on a local directory and on S3.

:func:`scan` reads the store with three listings (``envs/``, ``leases/``, ``locks/``) plus one
GET per manifest, use marker, name entry and lease. :func:`plan_gc` decides from that picture
alone, and :func:`collect` carries a plan out. The rules of a collection:

- an env a name points at is never removed (remove or move the name first);
- an env built, used (downloaded by a worker, or found by a build) or named within
  *older_than* is kept;
- an env whose lease is live is being built and is kept, manifest or not;
- an incomplete env (objects but no manifest, no live lease: a builder died mid-upload) goes
  once its newest object is older than a day, or than *older_than* when that is shorter;
- a lease that expired, or whose holder died on this host, is stale: reported and removed;
- a package layer (``layers/<layer_id>/``) lives while an env that stays lists it; one that
  no remaining env lists goes once its newest object is older than *older_than*, and no layer
  goes while any build holds a live lease (it may be about to list one).

An env is removed manifest first, so a reader sees it whole or not at all; the resolution
cache (``locks/``) is kept, so resolving the same spec again gives the same env id and a build
re-creates the archive bit for bit.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from envmgr.cache.layout import lease_key
from envmgr.cache.lease import STALE_PERIODS, LeaseInfo, lease_bytes
from envmgr.cache.names import BadName, list_aliases
from envmgr.cache.store import Entry, Store, get_record
from envmgr.cache.usage import read_use
from envmgr.ids import BadIdError, is_env_id, parse_env_id, parse_layer_id, parse_platform

__all__ = [
    "INCOMPLETE_GRACE",
    "GcPlan",
    "Kept",
    "Lease",
    "StoreContents",
    "StoredEnv",
    "StoredLayer",
    "collect",
    "collect_layers",
    "plan_gc",
    "scan",
]

#: An env with objects but no manifest and no live lease is a failed upload after this long.
INCOMPLETE_GRACE = 86400.0

State = Literal["complete", "incomplete", "building"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredEnv:
    """One env of one platform in the store."""

    env_id: str
    platform: str
    state: State
    size: int  #: bytes of every object under envs/<platform>/<env_id>/
    created: str  #: the manifest's build time (UTC, ISO 8601); "" without a manifest
    last_used: str  #: the last recorded download or build request; "" if none
    last_named: str  #: when the newest name pointing at it was set; "" if none
    names: tuple[str, ...]  #: the names (``name:tag``) that point at it now
    modified: float  #: the newest object's last write (epoch seconds)
    keys: tuple[str, ...]  #: its objects, manifest first
    #: Format 3: the layers its manifest lists, and the bytes of those in the store.
    layers: tuple[str, ...] = ()
    layer_size: int = 0

    @property
    def last_active(self) -> float:
        """The latest of built, used, named and (without a manifest, or with one that says
        no build time: damaged) last written."""
        times = [_epoch(t) for t in (self.created, self.last_used, self.last_named)]
        if self.state != "complete" or not self.created:
            times.append(self.modified)
        return max(times)

    def to_dict(self) -> dict[str, object]:
        return {
            "env_id": self.env_id,
            "platform": self.platform,
            "state": self.state,
            "size": self.size,
            "created": self.created or None,
            "last_used": self.last_used or None,
            "last_named": self.last_named or None,
            "names": list(self.names),
            "layers": len(self.layers),
            "layer_size": self.layer_size,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredLayer:
    """One package layer in the store, shared by the envs that list it."""

    layer_id: str
    size: int  #: bytes of its objects
    modified: float  #: the newest object's last write (epoch seconds)
    keys: tuple[str, ...]  #: its objects, manifest first
    complete: bool  #: its manifest is there

    def to_dict(self) -> dict[str, object]:
        return {"layer_id": self.layer_id, "size": self.size, "complete": self.complete}


@dataclass(frozen=True, kw_only=True, slots=True)
class Lease:
    """A lease object: who builds which env, and whether that holder is still there."""

    env_id: str
    info: LeaseInfo
    raw: bytes
    stale: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "env_id": self.env_id,
            "holder": self.info.holder,
            "taken": self.info.taken or None,
            "expires": _iso(self.info.expires) if self.info.expires else None,
            "stale": self.stale,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreContents:
    """Everything :func:`scan` found, at one moment (``now``, epoch seconds)."""

    url: str
    now: float
    envs: tuple[StoredEnv, ...]
    leases: tuple[Lease, ...]
    locks: int  #: resolution cache entries
    lock_bytes: int
    names: int  #: name entries
    other: tuple[Entry, ...]  #: objects under envs/ that are not an env's (foreign files)
    bad_names: tuple[BadName, ...] = ()  #: objects under names/ that are not name entries
    layers: tuple[StoredLayer, ...] = ()  #: package layers (format 3)

    def live_leases(self) -> frozenset[str]:
        return frozenset(lease.env_id for lease in self.leases if not lease.stale)


@dataclass(frozen=True, kw_only=True, slots=True)
class Kept:
    env: StoredEnv
    reason: str  #: "named", "building", "recent"


@dataclass(frozen=True, kw_only=True, slots=True)
class GcPlan:
    remove: tuple[StoredEnv, ...]
    kept: tuple[Kept, ...]
    stale_leases: tuple[Lease, ...]
    #: Layers no remaining env lists, old enough to go.
    remove_layers: tuple[StoredLayer, ...] = ()

    @property
    def freed(self) -> int:
        return sum(env.size for env in self.remove) + sum(lay.size for lay in self.remove_layers)


def scan(store: Store, *, now: float | None = None) -> StoreContents:
    """What the store holds. Raises ``StoreError`` when it cannot be listed. An object under
    ``names/`` that is not a name entry is listed in ``bad_names``, and every env whose id
    its bytes mention counts as named by it (a name must never be guessed at, so gc keeps
    what it may have meant)."""
    now = time.time() if now is None else now
    named: dict[tuple[str, str], list[tuple[str, str]]] = {}
    name_count = 0
    bad: list[BadName] = []
    for alias in list_aliases(store, bad=bad):
        name_count += 1
        for platform, env_id in alias.envs.items():
            named.setdefault((platform, env_id), []).append((alias.ref, alias.created))
    grouped: dict[tuple[str, str], list[Entry]] = {}
    other: list[Entry] = []
    for entry in store.entries("envs/"):
        parts = entry.key.split("/")
        try:
            if len(parts) != 4:
                raise BadIdError("not envs/<platform>/<env_id>/<file>")
            where = f"store key {entry.key!r}"
            platform = parse_platform(parts[1], where=where)
            env_id = parse_env_id(parts[2], where=where)
        except BadIdError:
            other.append(entry)
            continue
        grouped.setdefault((platform, env_id), []).append(entry)
    for platform, env_id in grouped:
        for unreadable in bad:
            if env_id.encode() in unreadable.raw:
                ref = f"{unreadable.key} (unreadable)"
                named.setdefault((platform, env_id), []).append((ref, ""))
    leases = tuple(_leases(store, now))
    live = frozenset(lease.env_id for lease in leases if not lease.stale)
    layers, foreign = _layers(store)
    other += foreign
    sizes = {layer.layer_id: layer.size for layer in layers}
    envs = [
        _env(store, platform, env_id, entries, named.get((platform, env_id), []), live, sizes)
        for (platform, env_id), entries in sorted(grouped.items())
    ]
    locks = list(store.entries("locks/"))
    return StoreContents(
        url=store.url,
        now=now,
        envs=tuple(envs),
        leases=leases,
        locks=len(locks),
        lock_bytes=sum(entry.size for entry in locks),
        names=name_count,
        other=tuple(other),
        bad_names=tuple(bad),
        layers=layers,
    )


def _layers(store: Store) -> tuple[tuple[StoredLayer, ...], list[Entry]]:
    """The layers under ``layers/`` (one listing), and the objects there that are none."""
    grouped: dict[str, list[Entry]] = {}
    foreign = []
    for entry in store.entries("layers/"):
        parts = entry.key.split("/")
        try:
            if len(parts) != 3:
                raise BadIdError("not layers/<layer_id>/<file>")
            layer_id = parse_layer_id(parts[1], where=f"store key {entry.key!r}")
        except BadIdError:
            foreign.append(entry)
            continue
        grouped.setdefault(layer_id, []).append(entry)
    layers = []
    for found, entries in sorted(grouped.items()):
        keys = sorted((e.key for e in entries), key=lambda k: not k.endswith("/manifest.json"))
        layers.append(
            StoredLayer(
                layer_id=found,
                size=sum(e.size for e in entries),
                modified=max(e.modified for e in entries),
                keys=tuple(keys),
                complete=keys[0].endswith("/manifest.json"),
            )
        )
    return tuple(layers), foreign


def _env(
    store: Store,
    platform: str,
    env_id: str,
    entries: list[Entry],
    names: list[tuple[str, str]],
    live: frozenset[str],
    layer_sizes: dict[str, int],
) -> StoredEnv:
    by_name = {entry.key.rsplit("/", 1)[1]: entry for entry in entries}
    created = ""
    layers: tuple[str, ...] = ()
    state: State = "incomplete"
    if "manifest.json" in by_name:
        state = "complete"
        created, layers = _manifest_facts(get_record(store, by_name["manifest.json"].key))
    if env_id in live:
        state = "building" if state == "incomplete" else state
    used = by_name.get("used.json")
    keys = sorted((entry.key for entry in entries), key=lambda k: not k.endswith("/manifest.json"))
    return StoredEnv(
        env_id=env_id,
        platform=platform,
        state=state,
        size=sum(entry.size for entry in entries),
        created=created,
        last_used=read_use(get_record(store, used.key)) if used else "",
        last_named=max((when for _ref, when in names), default=""),
        names=tuple(sorted(ref for ref, _when in names)),
        modified=max(entry.modified for entry in entries),
        keys=tuple(keys),
        layers=layers,
        layer_size=sum(layer_sizes.get(layer, 0) for layer in layers),
    )


def _manifest_facts(raw: bytes | None) -> tuple[str, tuple[str, ...]]:
    """A manifest's build time and the layer ids it lists; a manifest gc cannot read lists
    none (its env is judged by its own objects' times)."""
    import json  # noqa: PLC0415

    try:
        data = json.loads(raw or b"")
    except ValueError:
        return "", ()
    if not isinstance(data, dict):
        return "", ()
    created = str(data.get("created", ""))[:40]
    layers = []
    entries = data.get("layers", [])
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, list) and entry and is_env_id(entry[0]):
            layers.append(str(entry[0]))
    return created, tuple(layers)


def _leases(store: Store, now: float) -> Iterable[Lease]:
    for entry in store.entries("leases/"):
        env_id = entry.key.split("/", 1)[1]
        raw = lease_bytes(store, entry.key)
        if raw is None:
            continue  # released while we listed
        info = LeaseInfo.from_bytes(raw)
        yield Lease(env_id=env_id, info=info, raw=raw, stale=_stale(info, entry.modified, now))


def _stale(info: LeaseInfo, modified: float, now: float) -> bool:
    """A lease seen once (gc cannot watch it): stale when known at once, or not written for
    :data:`STALE_PERIODS` periods by the store's clock (never by the holder's ``expires``)."""
    return info.stale_at_once() or now - modified > STALE_PERIODS * info.seconds


def _live_lease(store: Store, env_id: str, now: float) -> bool:
    for entry in store.entries(lease_key(env_id)):
        raw = lease_bytes(store, entry.key)
        if entry.key == lease_key(env_id) and raw is not None:
            return not _stale(LeaseInfo.from_bytes(raw), entry.modified, now)
    return False


def plan_gc(contents: StoreContents, *, older_than: float) -> GcPlan:
    """Which envs :func:`collect` removes: those not named, not being built and not active
    within *older_than* seconds (incomplete ones after :data:`INCOMPLETE_GRACE` at most)."""
    remove: list[StoredEnv] = []
    kept: list[Kept] = []
    live = contents.live_leases()
    for env in contents.envs:
        age = contents.now - env.last_active
        limit = older_than if env.state == "complete" else min(older_than, INCOMPLETE_GRACE)
        if env.names:
            kept.append(Kept(env=env, reason="named"))
        elif env.env_id in live:
            kept.append(Kept(env=env, reason="building"))
        elif age < limit:
            kept.append(Kept(env=env, reason="recent"))
        else:
            remove.append(env)
    stale = tuple(lease for lease in contents.leases if lease.stale)
    going = {(env.platform, env.env_id) for env in remove}
    listed = {
        layer
        for env in contents.envs
        if (env.platform, env.env_id) not in going
        for layer in env.layers
    }
    layers = tuple(
        layer
        for layer in contents.layers
        if layer.layer_id not in listed and contents.now - layer.modified >= older_than
    )
    return GcPlan(remove=tuple(remove), kept=tuple(kept), stale_leases=stale, remove_layers=layers)


def collect(store: Store, plan: GcPlan) -> tuple[StoredEnv, ...]:
    """Remove what *plan* says, each env manifest first; a stale lease only if it is still the
    one that was read (a builder that took it over since keeps it). An env that gained a live
    lease or a name since the scan is left alone. Returns the envs removed."""
    now = time.time()
    for lease in plan.stale_leases:
        if lease_bytes(store, lease_key(lease.env_id)) == lease.raw:
            store.delete(lease_key(lease.env_id))
    bad: list[BadName] = []
    named = {(p, e) for alias in list_aliases(store, bad=bad) for p, e in alias.envs.items()}
    removed = []
    for env in plan.remove:
        if _live_lease(store, env.env_id, now):
            continue
        if (env.platform, env.env_id) in named or any(env.env_id.encode() in b.raw for b in bad):
            continue
        for key in env.keys:
            store.delete(key)
        removed.append(env)
    return tuple(removed)


def collect_layers(store: Store, plan: GcPlan, contents: StoreContents) -> tuple[StoredLayer, ...]:
    """Remove the layers *plan* says, each manifest first, unless a build holds a live lease
    now (it may list any of them: they wait for the next collection) or an env written since
    the scan lists them. Returns the layers removed."""
    if not plan.remove_layers:
        return ()
    now = time.time()
    for entry in store.entries("leases/"):
        raw = lease_bytes(store, entry.key)
        if raw is not None and not _stale(LeaseInfo.from_bytes(raw), entry.modified, now):
            return ()
    seen = {key for env in contents.envs for key in env.keys}
    listed: set[str] = set()
    for entry in store.entries("envs/"):  # envs built since the scan (no clock compared)
        if entry.key.endswith("/manifest.json") and entry.key not in seen:
            listed.update(_manifest_facts(get_record(store, entry.key))[1])
    for env in contents.envs:  # and envs the scan saw, unless removed since
        if env.layers and store.exists(env.keys[0]):
            listed.update(env.layers)
    removed = []
    for layer in plan.remove_layers:
        if layer.layer_id in listed:
            continue
        for key in layer.keys:
            store.delete(key)
        removed.append(layer)
    return tuple(removed)


def _epoch(stamp: str) -> float:
    if not stamp:
        return 0.0
    try:
        parsed = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
