"""Ids are values: a bad env id, platform, name entry or manifest touches nothing outside the
cache, whether it comes from a flag, the store's ``names/`` or a manifest."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from _helpers import ROOT, run_bootstrap

from envmgr.archive.manifest import ArchiveError, Manifest
from envmgr.archive.pack import pack
from envmgr.cache.layout import archive_key, manifest_key, name_key
from envmgr.cache.local import LocalStore
from envmgr.cache.names import AliasError, lookup
from envmgr.ids import BadIdError, check_under, parse_env_id, parse_platform, parse_spec_id
from envmgr.worker.env_cache import COMPLETE, env_dir
from envmgr.worker.hydrate import HydrateError, hydrate

A = "a" * 32
B = "b" * 32


def _bootstrap(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_bootstrap(*args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory beside the cache that a traversal id would reach."""
    folder = tmp_path / "victim"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "data.txt").write_text("precious\n")
    return folder


def _untouched(victim: Path) -> bool:
    return (victim / "sub" / "data.txt").read_text() == "precious\n"


@pytest.mark.parametrize(
    "bad",
    [
        "../../victim",
        "../victim",
        "{victim}",  # an absolute path
        "A" * 32,  # upper case: not what envmgr prints
        "a" * 31,
        "a" * 32 + "/..",
        "",
        "x" * 100_000,
    ],
)
def test_bootstrap_refuses_a_bad_env_id_and_touches_nothing(bad, victim, tmp_path):
    bad = bad.format(victim=victim)
    cache = tmp_path / "cache" / "deep"
    cache.mkdir(parents=True)
    done = _bootstrap(
        "--store", (tmp_path / "store").as_uri(), "--cache-dir", str(cache), "--env-id", bad,
        cwd=cache,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--env-id" in done.stderr
    assert "is not an env id" in done.stderr
    assert len(done.stderr) < 400  # a huge id is not echoed whole
    assert done.stdout == ""
    assert _untouched(victim)
    assert list(cache.iterdir()) == []  # no lock file, no envs dir
    assert not (tmp_path / "store").exists()


def test_bootstrap_refuses_a_bad_platform(tmp_path):
    done = _bootstrap(
        "--store", (tmp_path / "store").as_uri(), "--cache-dir", str(tmp_path / "c"),
        "--env-id", A, "--platform", "../../linux-64", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--platform" in done.stderr
    assert "is not a platform" in done.stderr
    assert not (tmp_path / "c").exists()


# Never a real system path here: on code without the check, these ids are rmtree'd.
@pytest.mark.parametrize("bad", ["../../victim", "{victim}", "a" * 33, 12, None])
def test_hydrate_refuses_a_bad_id_before_any_path(bad, victim, tmp_path):
    if isinstance(bad, str):
        bad = bad.format(victim=victim)
    cache = tmp_path / "cache"
    with pytest.raises(BadIdError) as info:
        hydrate(bad, LocalStore(tmp_path / "store"), cache)  # type: ignore[arg-type]
    assert info.value.exit_code == 2
    assert _untouched(victim)
    assert not cache.exists()


def test_ids_and_paths_are_parsed_in_one_place(tmp_path):
    assert parse_env_id(A, where="x") == A
    assert parse_spec_id(B, where="x") == B
    assert parse_platform("linux-aarch64", where="x") == "linux-aarch64"
    for bad in ("../x", A.upper(), A + "\n", f" {A}"):
        with pytest.raises(BadIdError, match=r"x: .* is not an env id"):
            parse_env_id(bad, where="x")
    with pytest.raises(BadIdError):
        env_dir(tmp_path, "../x")
    with pytest.raises(BadIdError):
        archive_key("linux-64", "../../x")
    with pytest.raises(BadIdError):
        manifest_key("../linux-64", A)


def test_check_under_follows_links(tmp_path):
    root = tmp_path / "envs"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "inner").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert check_under(root / "inner", root) == root / "inner"
    for bad in (root / "link", root, root / ".." / "outside", tmp_path):
        with pytest.raises(BadIdError, match="refusing to remove"):
            check_under(bad, root)


def _alias_store(tmp_path: Path, envs: object) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    store.put(name_key("team/x", "latest"), json.dumps({"format": 1, "envs": envs}).encode())
    return store


@pytest.mark.parametrize(
    "envs",
    [
        {"linux-64": "../../victim"},
        {"linux-64": "/nonexistent/victim"},
        {"../../x": A},
        {"linux-64": ["a"]},
        ["linux-64"],
    ],
)
def test_a_name_entry_with_a_bad_id_is_refused_where_it_is_read(envs, tmp_path):
    store = _alias_store(tmp_path, envs)
    with pytest.raises(AliasError, match="not an envmgr name entry"):
        lookup(store, "team/x")


def test_bootstrap_by_a_hostile_name_touches_nothing(victim, tmp_path):
    store = _alias_store(tmp_path, {"linux-64": "../../victim"})
    cache = tmp_path / "cache" / "deep"
    cache.mkdir(parents=True)
    done = _bootstrap(
        "--store", store.url, "--cache-dir", str(cache), "--name", "team/x",
        "--platform", "linux-64", cwd=cache,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "not an envmgr name entry" in done.stderr
    assert _untouched(victim)
    assert list(cache.iterdir()) == []


def _stored_env(store: LocalStore, tmp_path: Path, env_id: str, payload: str) -> Manifest:
    """A tiny real env (one file) packed and stored as *env_id* for linux-64."""
    prefix = tmp_path / f"prefix-{env_id[:4]}"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "which").write_text(payload)
    out = io.BytesIO()
    result = pack(prefix, out)
    manifest = Manifest(
        env_id=env_id,
        platform="linux-64",
        build_prefix="/b" * 60,
        codec="zst",
        size=result.size,
        sha256=result.sha256,
        files=result.files,
        unpacked_size=result.unpacked_size,
        relocations=(),
    )
    store.put(archive_key("linux-64", env_id), out.getvalue())
    store.put(manifest_key("linux-64", env_id), json.dumps(manifest.to_dict()).encode())
    return manifest


def test_a_manifest_of_another_env_is_not_published_under_this_id(tmp_path):
    store = LocalStore(tmp_path / "store")
    _stored_env(store, tmp_path, A, "env a\n")
    _stored_env(store, tmp_path, B, "env b\n")
    # A writer of the store points B's manifest at A's archive.
    store.put(manifest_key("linux-64", B), store.get(manifest_key("linux-64", A)) or b"")
    cache = tmp_path / "cache"
    with pytest.raises(HydrateError, match=f"describes env {A}"):
        hydrate(B, store, cache, platform="linux-64")
    assert not env_dir(cache, B).exists()
    # ... and a manifest stored under another platform's key is refused the same way.
    store.put(manifest_key("linux-aarch64", A), store.get(manifest_key("linux-64", A)) or b"")
    with pytest.raises(HydrateError, match="for linux-64, not the one under its key"):
        hydrate(A, store, cache, platform="linux-aarch64")
    assert not env_dir(cache, A).exists()
    # The honest one still hydrates.
    done = hydrate(A, store, cache, platform="linux-64")
    assert (done.prefix / "bin" / "which").read_text() == "env a\n"
    assert (done.prefix / COMPLETE).is_file()


@pytest.mark.parametrize(
    "field, value", [("env_id", "../../victim"), ("platform", "../x"), ("env_id", None)]
)
def test_a_traversal_in_a_manifest_is_an_archive_error(field, value, tmp_path):
    store = LocalStore(tmp_path / "store")
    manifest = _stored_env(store, tmp_path, A, "a\n")
    data = {**manifest.to_dict(), field: value}
    with pytest.raises(ArchiveError, match="not an envmgr manifest"):
        Manifest.from_dict(data, where="m")
    store.put(manifest_key("linux-64", A), json.dumps(data).encode())
    with pytest.raises(ArchiveError, match="not an envmgr manifest"):
        hydrate(A, store, tmp_path / "cache", platform="linux-64")


def test_an_env_dir_that_is_a_link_is_removed_not_followed(victim, tmp_path):
    store = LocalStore(tmp_path / "store")
    _stored_env(store, tmp_path, A, "a\n")
    cache = tmp_path / "cache"
    (cache / "envs").mkdir(parents=True)
    (cache / "envs" / A).symlink_to(victim)
    done = hydrate(A, store, cache, platform="linux-64")
    assert not done.prefix.is_symlink()
    assert _untouched(victim)


def test_a_wrong_size_in_a_manifest_is_named_as_a_size(tmp_path):
    """Not as two equal hashes, as before."""
    store = LocalStore(tmp_path / "store")
    manifest = _stored_env(store, tmp_path, A, "a\n")
    data = {**manifest.to_dict(), "size": manifest.size + 7}
    store.put(manifest_key("linux-64", A), json.dumps(data).encode())
    with pytest.raises(HydrateError, match=rf"\({manifest.size} bytes, want {manifest.size + 7}\)"):
        hydrate(A, store, tmp_path / "cache", platform="linux-64")
    assert not env_dir(tmp_path / "cache", A).exists()


def test_an_unwritable_cache_is_one_line_naming_it_and_the_setting(tmp_path):
    """As root, permissions do not stop writes; a cache path under a regular file does."""
    store = LocalStore(tmp_path / "store")
    _stored_env(store, tmp_path, A, "a\n")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    done = _bootstrap(
        "--store", store.url, "--env-id", A, "--platform", "linux-64",
        "--cache-dir", str(blocker / "cache"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"cannot write the env cache {blocker / 'cache'}" in done.stderr
    assert "ENVMGR_CACHE_DIR" in done.stderr
    with_exec = _bootstrap(
        "--store", store.url, "--env-id", A, "--platform", "linux-64",
        "--cache-dir", str(blocker / "cache"), "--exec", "true", cwd=tmp_path,
    )  # fmt: skip
    assert with_exec.returncode == 1 and with_exec.stderr.count("\n") == 1, with_exec.stderr
    assert f"cannot write the env cache {blocker / 'cache'}" in with_exec.stderr
    env = {**os.environ, "ENVMGR_CACHE_DIR": str(blocker / "c"), "ENVMGR_STORE": store.url}
    from _helpers import run_envmgr

    cli = run_envmgr("resolve", "--conda", "tabulate", "--python", "3.11", env=env)
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1, cli.stderr
    assert f"cannot write {blocker / 'c'}" in cli.stderr and "config show" in cli.stderr


def test_a_corrupt_stored_lock_is_named_by_its_store_key(tmp_path):
    from envmgr.build.once import read_stored_lock
    from envmgr.cache.layout import env_lock_key
    from envmgr.locks.lock import LockError

    store = LocalStore(tmp_path / "store")
    store.put(env_lock_key("linux-64", A), b"version: [unclosed\n")
    with pytest.raises(LockError) as info:
        read_stored_lock(store, "linux-64", A)
    assert f"{store.url}/{env_lock_key('linux-64', A)}" in str(info.value)
    assert "/tmp" not in str(info.value).replace(str(tmp_path), "")
