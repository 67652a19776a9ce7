"""A store's lifecycle on a local directory and on SeaweedFS: ``store ls``/``du`` see what it
holds, ``store gc`` removes old envs but never a named one, a recent one (built, used or named)
or one a live lease is building, and it cleans stale leases."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from _helpers import envmgr_here, run_envmgr, s3_env
from _shapes import shaped

from envmgr.cache.layout import (
    archive_key,
    env_lock_key,
    layer_archive_key,
    layer_manifest_key,
    lease_key,
    lock_key,
    manifest_key,
    used_key,
)
from envmgr.cache.lease import LEASE_BYTES, _boot_id, read_lease, try_take
from envmgr.cache.lifecycle import collect, collect_layers, plan_gc, scan
from envmgr.cache.local import LocalStore
from envmgr.cache.names import set_alias
from envmgr.cache.store import RECORD_BYTES

DAY = 86400.0


def _stamp(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def _env(store, env_id: str, *, built_days_ago: float, platform: str = "linux-64") -> None:
    """The objects of a stored env: archive and lock, then the manifest (last, as builds do)."""
    store.put(archive_key(platform, env_id), b"z" * 1000)
    store.put(env_lock_key(platform, env_id), b"version: 1\n")
    manifest = {"format": 1, "env_id": env_id, "created": _stamp(built_days_ago * DAY)}
    store.put(manifest_key(platform, env_id), json.dumps(manifest).encode())


def _lease(store, env_id: str, *, holder: str, dead: bool = False) -> None:
    """A lease of a builder on another host, or (*dead*) of a process of this host that is
    gone. Its ``expires`` lies an hour ahead: no one trusts another host's clock."""
    body = {"holder": holder, "host": "elsewhere", "boot": "", "pid": 1, "seconds": 60,
            "expires": time.time() + 3600, "taken": _stamp(-3600)}  # fmt: skip
    if dead:
        gone = subprocess.Popen(["true"])
        gone.wait()
        body.update(host=socket.gethostname(), boot=_boot_id(), pid=gone.pid)
    store.put(lease_key(env_id), json.dumps(body).encode())


@pytest.fixture
def store(any_store):
    return any_store


IDS = {name: name * 32 for name in "abcdef12"}


def _populate(store) -> None:
    _env(store, IDS["a"], built_days_ago=200)  # named: kept
    set_alias(store, "team/a:stable", {"linux-64": IDS["a"]})
    _env(store, IDS["b"], built_days_ago=200)  # old, unnamed, unused: removed
    store.put(lock_key("f" * 32, "linux-64"), json.dumps({"env_id": IDS["b"]}).encode())
    _env(store, IDS["c"], built_days_ago=10)  # recent build: kept
    _env(store, IDS["d"], built_days_ago=200)  # old build, downloaded 5 days ago: kept
    store.put(used_key("linux-64", IDS["d"]), json.dumps({"at": _stamp(5 * DAY)}).encode())
    _env(store, IDS["e"], built_days_ago=200)  # old, but a live lease is (re)building it
    _lease(store, IDS["e"], holder="builder-e")
    store.put(archive_key("osx-arm64", IDS["f"]), b"half")  # an upload in progress
    _lease(store, IDS["f"], holder="builder-f")
    _lease(store, IDS["1"], holder="dead-builder", dead=True)  # stale: cleaned
    _env(store, IDS["2"], built_days_ago=120, platform="osx-arm64")  # old: removed


def test_gc_keeps_named_recent_used_and_building_envs(store):
    _populate(store)
    contents = scan(store)
    by_id = {(e.platform, e.env_id[0]): e for e in contents.envs}
    assert by_id["linux-64", "a"].names == ("team/a:stable",)
    assert by_id["linux-64", "a"].last_named  # when the name was set
    assert by_id["linux-64", "d"].last_used.startswith(_stamp(5 * DAY)[:10])
    assert by_id["osx-arm64", "f"].state == "building"
    b_keys = [archive_key, env_lock_key, manifest_key]
    sizes = [store.size(key("linux-64", IDS["b"])) for key in b_keys]
    assert by_id["linux-64", "b"].size == sum(sizes) and sizes[:2] == [1000, 11]
    assert {lease.env_id[0]: lease.stale for lease in contents.leases} == {
        "e": False,
        "f": False,
        "1": True,
    }

    plan = plan_gc(contents, older_than=90 * DAY)
    assert {(e.platform, e.env_id[0]) for e in plan.remove} == {
        ("linux-64", "b"),
        ("osx-arm64", "2"),
    }
    reasons = {k.env.env_id[0]: k.reason for k in plan.kept}
    assert reasons == {"a": "named", "c": "recent", "d": "recent", "e": "building", "f": "building"}
    assert [lease.env_id[0] for lease in plan.stale_leases] == ["1"]

    # A name set between the scan and the collection protects its env all the same.
    set_alias(store, "team/h:2026-q4", {"osx-arm64": IDS["2"]})
    removed = collect(store, plan)
    assert [e.env_id[0] for e in removed] == ["b"]
    assert list(store.list(f"envs/linux-64/{IDS['b']}/")) == []
    assert store.exists(manifest_key("osx-arm64", IDS["2"]))
    assert store.get(lease_key(IDS["1"])) is None and store.get(lease_key(IDS["e"])) is not None
    assert store.exists(lock_key("f" * 32, "linux-64"))  # the resolution cache stays
    assert {e.env_id[0] for e in scan(store).envs} == set("acdef2")


def test_a_stale_lease_retaken_since_the_scan_is_left_to_its_new_holder(store):
    _lease(store, IDS["1"], holder="dead-builder", dead=True)
    plan = plan_gc(scan(store), older_than=DAY)
    _lease(store, IDS["1"], holder="new-builder")
    collect(store, plan)
    assert b"new-builder" in store.get(lease_key(IDS["1"]))


def test_gc_judges_a_lease_by_the_stores_clock_not_the_holders(tmp_path):
    """A lease written by a host whose clock runs an hour ahead (or behind) is live while the
    store says it was written lately, and stale once the store says five periods passed."""
    store = LocalStore(tmp_path / "store")
    _env(store, IDS["b"], built_days_ago=200)
    _lease(store, IDS["b"], holder="ahead")
    behind = json.loads(store.get(lease_key(IDS["b"])) or b"")
    behind.update(expires=time.time() - 3600, taken=_stamp(3600))
    for body in (None, behind):
        if body is not None:
            store.put(lease_key(IDS["b"]), json.dumps(body).encode())
        contents = scan(store)
        assert [lease.stale for lease in contents.leases] == [False]
        plan = plan_gc(contents, older_than=DAY)
        assert plan.remove == () and [k.reason for k in plan.kept] == ["building"]
    old = time.time() - 5 * 60 - 5
    os.utime(store.root / lease_key(IDS["b"]), (old, old))
    plan = plan_gc(scan(store), older_than=DAY)
    assert [lease.env_id for lease in plan.stale_leases] == [IDS["b"]]
    assert [e.env_id for e in collect(store, plan)] == [IDS["b"]]


def test_one_bad_name_object_does_not_break_names_ls_or_gc(world, tmp_path):
    """One garbage object under names/ made `envmgr names`, `store ls` and `store gc` fail for
    the whole store; now it is named in a warning and gc keeps the envs it mentions."""
    store = LocalStore(tmp_path / "store")
    _env(store, IDS["a"], built_days_ago=200)
    _env(store, IDS["b"], built_days_ago=200)
    _env(store, IDS["c"], built_days_ago=200)
    set_alias(store, "team/a:stable", {"linux-64": IDS["a"]})
    store.put(
        "names/team/b/broken", b'{"format": 99, "envs": {"linux-64": "' + IDS["b"].encode() + b'"}}'
    )
    store.put("names/team/junk/x", b"\x00\xff not json")
    warning = f"envmgr: warning: skipped {store.url}/names/team/b/broken: not an envmgr name entry"
    names = envmgr_here("names", env=world)
    assert names.returncode == 0, names.stderr
    assert "team/a:stable" in names.stdout and warning in names.stderr
    assert len(names.stderr.splitlines()) == 2
    listed = envmgr_here("store", "ls", env=world)
    assert listed.returncode == 0 and warning in listed.stderr
    gc = envmgr_here("store", "gc", "--older-than", "30d", "--json", env=world)
    assert gc.returncode == 0, gc.stderr
    assert [e["env_id"] for e in json.loads(gc.stdout)["removed"]] == [IDS["c"]]
    assert store.exists(manifest_key("linux-64", IDS["b"]))  # the bad entry may have meant it
    assert store.exists("names/team/b/broken")


def test_an_incomplete_upload_without_a_lease_goes_after_a_day(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put(archive_key("linux-64", IDS["b"]), b"half an archive")
    assert [e.state for e in scan(store).envs] == ["incomplete"]
    assert plan_gc(scan(store), older_than=90 * DAY).remove == ()  # could be uploading
    old = time.time() - 2 * DAY
    os.utime(store.root / archive_key("linux-64", IDS["b"]), (old, old))
    assert [e.env_id for e in plan_gc(scan(store), older_than=90 * DAY).remove] == [IDS["b"]]


def test_store_commands_on_s3_as_a_user_runs_them(world, s3_server, s3_bucket, tmp_path):
    env = {**world, **s3_env(s3_server), "ENVMGR_STORE": f"s3://{s3_bucket}/envmgr"}
    built = envmgr_here("build", "--conda", "numpy", "--python", "3.11", "--json", env=env)
    assert built.returncode == 0, built.stderr
    env_id = json.loads(built.stdout)["envs"][0]["env_id"]
    worker = {**env, "ENVMGR_CACHE_DIR": str(tmp_path / "worker")}
    assert envmgr_here("hydrate", env_id[:10], env=worker).returncode == 0  # records the use

    listed = shaped("store ls", envmgr_here("store", "ls", "--json", env=env).stdout)
    [entry] = listed["envs"]
    assert entry["env_id"] == env_id and entry["state"] == "complete"
    assert entry["layers"] == 2 and entry["layer_size"] > 10_000  # python and numpy
    assert entry["created"] and entry["last_used"] and entry["names"] == []
    text = envmgr_here("store", "ls", env=env)
    assert text.returncode == 0 and env_id[:12] in text.stdout and "MB" in text.stdout
    usage = shaped("store du", envmgr_here("store", "du", "--json", env=env).stdout)
    assert usage["envs"] == {"count": 1, "size": entry["size"]} and usage["locks"]["count"] >= 1
    stored = entry["layer_size"]
    assert usage["layers"] == {"count": 2, "size": stored, "listed": stored}
    assert "linux-64" in envmgr_here("store", "du", env=env).stdout

    gc = ("store", "gc", "--keep-named", "--older-than", "0s")
    dry = shaped("store gc", envmgr_here(*gc, "--dry-run", "--json", env=env).stdout)
    assert dry["dry_run"] is True and [e["env_id"] for e in dry["removed"]] == [env_id]
    kept = shaped("store gc", envmgr_here(*gc, "--older-than", "90d", "--json", env=env).stdout)
    assert kept["removed"] == [] and kept["kept"][0]["reason"] == "recent"

    assert envmgr_here("alias", env_id, "team/numpy:stable", env=env).returncode == 0
    named = shaped("store gc", envmgr_here(*gc, "--json", env=env).stdout)
    assert named["removed"] == [] and named["kept"][0]["reason"] == "named"
    assert shaped("store ls", envmgr_here("store", "ls", "--json", env=env).stdout)["envs"][0][
        "names"
    ] == ["team/numpy:stable"]

    # Once the name moves elsewhere, the env is old enough to go.
    client = s3_server.client()
    client.delete_object(Bucket=s3_bucket, Key="envmgr/names/team/numpy/stable")
    gone = envmgr_here(*gc, env=env)
    assert gone.returncode == 0 and f"removed {env_id[:12]} linux-64" in gone.stdout
    assert "removed 2 package layers no env lists" in gone.stdout
    assert shaped("store ls", envmgr_here("store", "ls", "--json", env=env).stdout)["envs"] == []
    assert (
        shaped("store du", envmgr_here("store", "du", "--json", env=env).stdout)["layers"]["count"]
        == 0
    )
    rebuilt = envmgr_here("build", "--conda", "numpy", "--python", "3.11", "--json", env=env)
    assert json.loads(rebuilt.stdout)["envs"][0]["env_id"] == env_id  # same id, from the lock


def test_store_gc_needs_an_age_and_a_store_that_exists(world, tmp_path):
    no_age = envmgr_here("store", "gc", env=world)
    assert no_age.returncode == 2 and "--older-than" in no_age.stderr
    bad_age = envmgr_here("store", "gc", "--older-than", "ninety", env=world)
    assert bad_age.returncode == 2 and "bad age 'ninety'" in bad_age.stderr
    missing = tmp_path / "no-such-store"
    for args in (("store", "ls"), ("store", "gc", "--older-than", "1d"), ("show", "a" * 12)):
        result = run_envmgr(*args, "--store", str(missing), env=world)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"envmgr: error: store {missing.as_uri()}: no such store (from command line) "
            "(check the path; `envmgr build` or `envmgr resolve` creates a local store)"
        ], result.stderr
        assert not missing.exists()
    created = envmgr_here("resolve", "--conda", "numpy", "--python", "3.11", "--store",
                         str(missing), env=world)  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert f"creating the store {missing.as_uri()}" in created.stderr and missing.is_dir()


def test_local_gc_json_marks_a_dry_run(world):
    result = envmgr_here("gc", "--older-than", "1d", "--dry-run", "--json", env=world)
    assert json.loads(result.stdout)["dry_run"] is True


def test_a_store_that_refuses_the_use_marker_does_not_fail_the_task(tmp_path):
    """Recording a use is best effort: a worker with read-only credentials runs anyway."""
    from envmgr.cache.store import StoreError
    from envmgr.cache.usage import record_use

    class ReadOnly(LocalStore):
        def put(self, key: str, data: bytes) -> None:
            raise StoreError(self.url, key, "S3 error AccessDenied")

    store = ReadOnly(tmp_path / "store")
    record_use(store, "linux-64", IDS["a"])  # no exception
    assert not store.exists(used_key("linux-64", IDS["a"]))


def _layered_env(store, env_id: str, layers: list[str], *, built_days_ago: float) -> None:
    """A format-3 env's objects (its manifest lists *layers*) and each layer's objects."""
    store.put(archive_key("linux-64", env_id), b"e" * 100)
    refs = [[layer, f"conda pkg-{layer[0]} 1.0", "0" * 64] for layer in layers]
    manifest = {"format": 3, "env_id": env_id, "created": _stamp(built_days_ago * DAY),
                "layers": refs}  # fmt: skip
    store.put(manifest_key("linux-64", env_id), json.dumps(manifest).encode())


def _layer(store, layer_id: str, *, days_ago: float) -> None:
    for key, size in ((layer_archive_key(layer_id), 5000), (layer_manifest_key(layer_id), 10)):
        store.put(key, b"l" * size)
        if isinstance(store, LocalStore):
            old = time.time() - days_ago * DAY
            os.utime(store.root / key, (old, old))


def test_gc_keeps_a_layer_while_a_kept_env_lists_it(tmp_path):
    """Layer s is shared by a kept env and a removed one; o is only the removed env's; n is
    listed by no env but new (a build may be about to list it); g is listed by no env and
    old. gc removes o and g, and no layer at all while a build holds a live lease."""
    store = LocalStore(tmp_path / "store")
    lid = {name: digit * 32 for name, digit in zip("sogn", "5096", strict=True)}
    name = {layer: name for name, layer in lid.items()}
    for old in "sog":
        _layer(store, lid[old], days_ago=200)
    _layer(store, lid["n"], days_ago=0)
    _layered_env(store, IDS["a"], [lid["s"]], built_days_ago=1)
    _layered_env(store, IDS["b"], [lid["s"], lid["o"]], built_days_ago=200)
    contents = scan(store)
    by_id = {e.env_id[0]: e for e in contents.envs}
    assert by_id["b"].layers == (lid["s"], lid["o"]) and by_id["b"].layer_size == 2 * 5010
    plan = plan_gc(contents, older_than=90 * DAY)
    assert [e.env_id[0] for e in plan.remove] == ["b"]
    assert sorted(name[layer.layer_id] for layer in plan.remove_layers) == ["g", "o"]
    assert plan.freed == by_id["b"].size + 2 * 5010

    _lease(store, IDS["c"], holder="builder-c")  # some build is running: layers wait
    assert collect(store, plan) and collect_layers(store, plan, contents) == ()
    store.delete(lease_key(IDS["c"]))
    removed = collect_layers(store, plan, contents)
    assert sorted(name[layer.layer_id] for layer in removed) == ["g", "o"]
    assert {name[layer.layer_id] for layer in scan(store).layers} == {"s", "n"}


def test_gc_spares_a_layer_an_env_built_since_the_scan_lists(tmp_path):
    store = LocalStore(tmp_path / "store")
    old = "7" * 32
    _layer(store, old, days_ago=200)
    contents = scan(store)
    plan = plan_gc(contents, older_than=90 * DAY)
    assert [layer.layer_id for layer in plan.remove_layers] == [old]
    _layered_env(store, IDS["d"], [old], built_days_ago=0)  # a build found it and listed it
    assert collect_layers(store, plan, contents) == ()
    assert store.exists(layer_manifest_key(old))


def test_a_name_or_lease_too_large_to_be_one_is_skipped_or_stale(world, tmp_path):
    """Store objects are read up to a limit: a name entry of more than RECORD_BYTES is a bad
    name like any other (warned about, its envs kept), a lease of more than LEASE_BYTES is
    unreadable, so stale at once, and an env manifest that large is a damaged one to gc: none
    of them fails `names`, `store gc` or a build."""
    store = LocalStore(tmp_path / "store")
    for name in "abc":
        _env(store, IDS[name], built_days_ago=200)
    set_alias(store, "team/a:stable", {"linux-64": IDS["a"]})
    huge = store.root / "names" / "team" / "huge" / "x"
    huge.parent.mkdir(parents=True)
    with huge.open("wb") as handle:  # sparse: 64 MiB and one byte that take no disk
        handle.write(b'{"format": 1, "envs": {"linux-64": "' + IDS["b"].encode() + b'"')
        handle.truncate(RECORD_BYTES + 1)
    store.put(lease_key(IDS["c"]), b"{" * (LEASE_BYTES + 1))
    # Not regular files: a FIFO would block its reader. Made under tmp_path, and a FIFO,
    # never a link to a device, where gc deletes (the lease).
    os.mkfifo(store.root / "names" / "team" / "huge" / "fifo")
    os.mkfifo(store.root / lease_key(IDS["f"]))
    _env(store, IDS["d"], built_days_ago=1)  # recent: kept, though gc cannot read its manifest
    with (store.root / manifest_key("linux-64", IDS["d"])).open("r+b") as handle:
        handle.truncate(RECORD_BYTES + 1)
    _env(store, IDS["e"], built_days_ago=1)  # the same for a small damaged manifest
    store.put(manifest_key("linux-64", IDS["e"]), b"\x00 not json")
    names = envmgr_here("names", env=world)
    assert names.returncode == 0, names.stderr
    assert names.stderr.splitlines() == [
        f"envmgr: warning: skipped {store.url}/names/team/huge/fifo: not an envmgr name entry "
        "(not a regular file (a device, a pipe or a directory)) (gc keeps every env it "
        "mentions)",
        f"envmgr: warning: skipped {store.url}/names/team/huge/x: not an envmgr name entry "
        f"(more than {RECORD_BYTES:,} bytes, far more than an envmgr record can be) (gc keeps "
        "every env it mentions)",
    ]
    gc = envmgr_here("store", "gc", "--older-than", "30d", "--json", env=world)
    assert gc.returncode == 0, gc.stderr
    assert [e["env_id"] for e in json.loads(gc.stdout)["removed"]] == [IDS["c"]]
    assert not store.exists(lease_key(IDS["c"])) and huge.exists()
    assert not (store.root / lease_key(IDS["f"])).exists()  # the FIFO lease was stale too
    store.put(lease_key(IDS["a"]), b"{" * (LEASE_BYTES + 1))
    info = read_lease(store, IDS["a"])
    assert info is not None and not info.readable
    assert try_take(store, IDS["a"], holder="me", seconds=60)
    assert (read_lease(store, IDS["a"]) or info).holder == "me"
