"""How to build: the one options object that travels from the CLI through the builder, and
what a build stored.

Apart from :mod:`envmgr.build.once` so that the stages it calls (:mod:`envmgr.build.layers`)
take and return them without importing the module that calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from envmgr.archive.manifest import Codec, Manifest
from envmgr.build.bytecode import BytecodeSource
from envmgr.cache import Store
from envmgr.cache.lease import LEASE_SECONDS
from envmgr.platforms import Platform
from envmgr.progress import NULL, Progress

__all__ = ["BuildOptions", "Stored"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Stored:
    """What a build stored: the env's manifest, the bytes of the package layers it lists
    (what a host holding none of them downloads besides the env's own archive), and what
    this builder made of it: package layers built, archive bytes uploaded."""

    manifest: Manifest
    layer_bytes: int = 0
    built: int = 0
    uploaded: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildOptions:
    """How to build: where, with which codec, and how long to wait for other builders."""

    store: Store
    cache_dir: Path
    codec: Codec = "zst"
    level: int = 3
    #: The build-once lease's period (renewed by a heartbeat): the longest a killed
    #: builder can hold others up.
    lease_seconds: float = LEASE_SECONDS
    wait_timeout: float = 3600.0
    poll_seconds: float = 0.5
    holder: str = ""
    #: Called with what a person must see even off a terminal (whom a build waits for).
    notify: Callable[[str], None] | None = None
    #: Channel credentials per host, for package downloads (see :mod:`envmgr.channels`).
    credentials: Mapping[str, str] = field(default_factory=dict)
    progress: Progress = NULL
    #: The build host's platform (a value, so tests can build "as if" on another host);
    #: ``None``: this machine's.
    host: Platform | None = None
    #: Which interpreter writes the target's bytecode (see :mod:`envmgr.build.bytecode`).
    bytecode: BytecodeSource = "auto"
    #: Store the env as package layers (format 3, see :mod:`envmgr.build.layers`); false, or
    #: a gzip codec: one archive per env (format 2, or 1).
    layers: bool = True
