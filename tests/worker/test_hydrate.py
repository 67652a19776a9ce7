"""Hydrate at task start: remote workers, concurrency, kill -9, corruption, hostile archives,
the first worker of a platform building, envmgr run / ls / gc."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import zstandard
from _helpers import envmgr_here, run_envmgr

from envmgr.archive.manifest import ArchiveError, Manifest
from envmgr.build.once import BuildOptions, build_and_store, build_missing
from envmgr.cache.layout import archive_key, env_lock_key, manifest_key
from envmgr.cache.local import LocalStore
from envmgr.locks.lock import Lock, write_conda_lock
from envmgr.worker.env_cache import COMPLETE, env_dir, gc, hold_for_use, list_envs
from envmgr.worker.hydrate import HashMismatchError, HydrateError, hydrate

ROOT = Path(__file__).resolve().parents[2]
CHECK = (
    "import json, sys, numpy, tabulate, dateutil, colorama; print(json.dumps({'prefix': "
    "sys.prefix, 'numpy': numpy.__version__, 'tabulate': tabulate.__version__, "
    "'dateutil': dateutil.__version__, 'colorama': colorama.__version__}))"
)


@pytest.fixture(scope="module")
def lock(mixed_lock):
    return mixed_lock


@pytest.fixture(scope="module")
def local_store(lock, tmp_path_factory):
    home = tmp_path_factory.mktemp("hstore")
    store = LocalStore(home / "store")
    build_and_store(lock, BuildOptions(store=store, cache_dir=home / "cache"))
    return store


def _bootstrap(store_url: str, env_id: str, cache: Path, env: dict | None = None, **kwargs):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "envmgr.bootstrap",
            "--store",
            store_url,
            "--env-id",
            env_id,
            "--cache-dir",
            str(cache),
            "--json",
        ],
        env=env or dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _versions(python: Path, env: dict | None = None) -> dict:
    out = subprocess.run(
        [str(python), "-c", CHECK],
        capture_output=True,
        text=True,
        check=True,
        env=env or {"PATH": "/usr/bin:/bin"},
    )
    return json.loads(out.stdout)


def _expected(lock) -> dict:
    names = lock.names()
    return {
        k: names[n].version
        for k, n in (
            ("numpy", "numpy"),
            ("tabulate", "tabulate"),
            ("dateutil", "python-dateutil"),
            ("colorama", "colorama"),
        )
    }


def test_remote_worker_with_only_s3(lock, s3_server, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/prod"
    from envmgr.cache.s3 import S3Store

    build_and_store(
        lock,
        BuildOptions(store=S3Store(url, client=s3_server.client()), cache_dir=tmp_path / "builder"),
    )
    home = tmp_path / "home"
    home.mkdir()
    worker_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        # Everything but S3 is unreachable: channels and indexes point at closed ports.
        "ENVMGR_CHANNELS": "http://127.0.0.1:9/conda",
        "PIP_INDEX_URL": "http://127.0.0.1:9/",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1",
    }
    proc = _bootstrap(url, lock.env_id, tmp_path / "cache", env=worker_env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["downloaded"] is True
    seen = _versions(Path(result["python"]))
    assert seen.pop("prefix") == result["prefix"] == str(env_dir(tmp_path / "cache", lock.env_id))
    assert seen == _expected(lock)


def test_bootstrap_imports_no_resolver_cold_or_warm(local_store, lock, tmp_path):
    code = (
        "import sys; from envmgr.bootstrap import main; main(sys.argv[1:]); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'rattler', 'conda_lock', "
        "'typer', 'resolvelib', 'requests', 'packaging', 'installer', 'yaml', 'pydantic'}); "
        "print('HEAVY', heavy)"
    )
    args = ["--store", local_store.url, "--env-id", lock.env_id, "--cache-dir", str(tmp_path / "c")]
    for _ in ("cold", "warm"):
        out = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
        ).stdout
        assert "HEAVY []" in out, out


def test_sixteen_concurrent_hydrates_download_once(lock, s3_server, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/many"
    from envmgr.cache.s3 import S3Store

    build_and_store(
        lock,
        BuildOptions(store=S3Store(url, client=s3_server.client()), cache_dir=tmp_path / "builder"),
    )
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    procs = [_bootstrap(url, lock.env_id, tmp_path / "cache", env=env) for _ in range(16)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sum(r["downloaded"] for r in results) == 1
    assert len({r["prefix"] for r in results}) == 1
    assert _versions(Path(results[0]["python"]))["numpy"] == lock.names()["numpy"].version


def test_kill_minus_nine_never_leaves_an_incomplete_env(local_store, lock, tmp_path):
    cache = tmp_path / "cache"
    final = env_dir(cache, lock.env_id)
    # Kill points spread over the whole hydrate (start-up, download, unpack, assembly,
    # publish), each on a host without the layers (kills in downloads) and with them.
    for trial in range(12):
        shutil.rmtree(final, ignore_errors=True)
        if trial % 2 == 0:  # a host without the layers: kills land in downloads, else assembly
            shutil.rmtree(cache / "layers", ignore_errors=True)
        proc = _bootstrap(local_store.url, lock.env_id, cache)
        time.sleep(0.6 * ((trial * 5) % 12) / 11)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        # Whatever was killed, a published env is complete, and the next hydrate works.
        if final.exists():
            assert (final / COMPLETE).is_file()
        for layer in (cache / "layers").glob("[0-9a-f]*"):
            assert (layer / COMPLETE).is_file(), layer  # a layer, too, is whole or absent
        result = hydrate(lock.env_id, local_store, cache)
        assert (result.prefix / COMPLETE).is_file()
    assert _versions(final / "bin" / "python")["numpy"] == lock.names()["numpy"].version
    assert not list(final.parent.glob(".tmp-*"))
    assert not list((cache / "layers").glob(".tmp-*"))


def test_flipped_byte_is_a_hash_mismatch_and_publishes_nothing(local_store, lock, tmp_path):
    """In the env layer and in the largest package layer (python's), at two places each;
    each on a host that has none of the layers yet (a host that has a layer never fetches it
    again)."""
    store = LocalStore(tmp_path / "store")
    for key in local_store.list(""):
        store.put(key, local_store.get(key))
    layers = [k for k in store.list("layers/") if k.endswith(".tar.zst")]
    for key in (archive_key("linux-64", lock.env_id), max(layers, key=store.size)):
        good = store.get(key)
        for position in (len(good) // 2, 100):
            cache = tmp_path / f"cache-{key.split('/')[-2]}-{position}"
            bad = bytearray(good)
            bad[position] ^= 0xFF
            store.put(key, bytes(bad))
            with pytest.raises(HashMismatchError, match=lock.env_id):
                hydrate(lock.env_id, store, cache)
            assert not env_dir(cache, lock.env_id).exists()
            assert not list((cache / "envs").glob(".tmp-*"))
            assert not list((cache / "layers").glob(".tmp-*"))
        store.put(key, good)
    assert hydrate(lock.env_id, store, tmp_path / "cache").downloaded


def _store_with_archive(tmp_path, members) -> tuple[LocalStore, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            data = b"x" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    packed = zstandard.ZstdCompressor().compress(raw.getvalue())
    import hashlib

    env_id = "f" * 32
    store = LocalStore(tmp_path / "evil")
    manifest = Manifest(
        env_id=env_id,
        platform="linux-64",
        build_prefix="/b" * 100,
        codec="zst",
        size=len(packed),
        sha256=hashlib.sha256(packed).hexdigest(),
        files=len(members),
        unpacked_size=100,
        relocations=(),
    )
    store.put(archive_key("linux-64", env_id), packed)
    store.put(manifest_key("linux-64", env_id), json.dumps(manifest.to_dict()).encode())
    return store, env_id


@pytest.mark.parametrize(
    ("members", "named"),
    [
        ([("../../outside", tarfile.REGTYPE, "")], "../../outside"),
        ([("/etc/cron.d/evil", tarfile.REGTYPE, "")], "/etc/cron.d/evil"),
        ([("bin/escape", tarfile.SYMTYPE, "../../../etc")], "bin/escape"),
        ([("lib/abs", tarfile.SYMTYPE, "/usr/lib")], "lib/abs"),
    ],
)
def test_hostile_archives_are_rejected_naming_the_member(tmp_path, members, named):
    store, env_id = _store_with_archive(tmp_path, members)
    with pytest.raises(ArchiveError, match=named.replace(".", r"\.")):
        hydrate(env_id, store, tmp_path / "cache")
    assert not env_dir(tmp_path / "cache", env_id).exists()
    assert not (tmp_path / "outside").exists()


def test_a_worker_builds_a_stored_lock_only_when_it_opts_in(lock, tmp_path):
    store = LocalStore(tmp_path / "store")
    lock_file = tmp_path / "l.yml"
    write_conda_lock(Lock(platforms=(lock,), spec_id=lock.spec_id), lock_file)
    store.put_file(env_lock_key("linux-64", lock.env_id), lock_file)
    with pytest.raises(HydrateError, match=f"envmgr build --env {lock.env_id} --platform"):
        hydrate(lock.env_id, store, tmp_path / "cache")  # workers only hydrate by default
    builder = build_missing(BuildOptions(store=store, cache_dir=tmp_path / "cache"))
    result = hydrate(lock.env_id, store, tmp_path / "cache", build_missing=builder)
    assert result.downloaded and store.exists(manifest_key("linux-64", lock.env_id))
    assert _versions(result.python)["tabulate"] == lock.names()["tabulate"].version
    with pytest.raises(HydrateError, match="no archive and no lock"):
        hydrate("0" * 32, store, tmp_path / "cache")


def test_run_ls_and_gc(local_store, lock, tmp_path):
    env = {
        **os.environ,
        "ENVMGR_STORE": local_store.url,
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": "/leaky/host/path",
    }
    probe = (
        "import os, sys, numpy; print(sys.prefix); print(os.environ.get('PYTHONPATH')); "
        "print(os.environ['CONDA_PREFIX']); print(sys.flags.no_user_site)"
    )
    ran = run_envmgr("run", lock.env_id, "--", "python", "-c", probe, env=env)
    assert ran.returncode == 0, ran.stderr
    prefix, pythonpath, conda_prefix, no_user_site = ran.stdout.split()
    assert prefix == conda_prefix == str(env_dir(tmp_path / "cache", lock.env_id))
    assert pythonpath == "None" and no_user_site == "1"
    failing = run_envmgr("run", lock.env_id, "--", "python", "-c", "raise SystemExit(7)", env=env)
    assert failing.returncode == 7
    listed = json.loads(envmgr_here("ls", "--json", env=env).stdout)["envs"]
    # Its own bytes (relocated copies, the env layer): its packages' files are the layers'.
    assert [e["env_id"] for e in listed] == [lock.env_id] and 10_000 < listed[0]["size"] < 10**6
    with hold_for_use(tmp_path / "cache", lock.env_id):
        removed, busy, _layers = gc(tmp_path / "cache", max_size=0)
        assert removed == [] and [e.env_id for e in busy] == [lock.env_id]
    collected = json.loads(envmgr_here("gc", "--max-size", "1M", "--json", env=env).stdout)
    assert collected["removed"] == [lock.env_id] and collected["freed"] > 10_000_000
    assert len(collected["removed_layers"]) == 8  # no env links to them any more
    assert list_envs(tmp_path / "cache") == []


def test_a_store_record_that_never_ends_is_one_line_and_publishes_nothing(
    local_store, lock, tmp_path
):
    """A hostile or broken store can hand a "manifest" without end: a sparse file of 1 GiB
    is read to RECORD_BYTES, a link to /dev/zero (read only) or a FIFO is refused at once.
    Each is one line naming the object, and nothing is published."""
    layer_manifests = sorted(k for k in local_store.list("layers/") if k.endswith(".json"))
    for name, key in (
        ("env", manifest_key("linux-64", lock.env_id)),
        ("layer", layer_manifests[0]),
    ):
        store = LocalStore(tmp_path / f"store-{name}")
        for each in local_store.list(""):
            store.put(each, local_store.get(each) or b"")
        for shape, said in (
            ("sparse", "more than 67,108,864 bytes"),
            ("zero", "not a regular file"),
            ("fifo", "not a regular file"),
        ):
            (store.root / key).unlink()
            if shape == "sparse":
                with (store.root / key).open("wb") as handle:
                    handle.truncate(1 << 30)
            elif shape == "zero":
                (store.root / key).symlink_to("/dev/zero")
            else:
                os.mkfifo(store.root / key)
            cache = tmp_path / f"cache-{name}-{shape}"
            proc = _bootstrap(store.url, lock.env_id, cache)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode != 0 and not out
            lines = err.strip().splitlines()
            assert len(lines) == 1 and key in lines[0] and said in lines[0], err
            assert not env_dir(cache, lock.env_id).exists()


def test_a_cold_hydrate_leaves_its_use_marker_and_a_read_only_store_still_hydrates(
    local_store, lock, tmp_path
):
    """`store gc` keeps an env a worker started from: each cold hydrate writes its use marker
    (while the env comes down); a store the worker may only read (a read-only role) costs
    the marker, never the hydrate. A warm hydrate writes nothing."""
    from envmgr.cache.layout import used_key
    from envmgr.cache.usage import read_use

    used = used_key(lock.platform, lock.env_id)
    local_store.delete(used)
    hydrate(lock.env_id, local_store, tmp_path / "cold", platform=lock.platform)
    at = read_use(local_store.get(used))
    assert at.endswith("Z") and len(at) == 20
    local_store.delete(used)
    hydrate(lock.env_id, local_store, tmp_path / "cold", platform=lock.platform)  # warm
    assert not local_store.exists(used)

    class ReadOnly(LocalStore):
        def put(self, key: str, data: bytes) -> None:
            raise PermissionError(13, "Access Denied", key)

    read_only = ReadOnly(local_store.root)
    result = hydrate(lock.env_id, read_only, tmp_path / "other", platform=lock.platform)
    assert result.downloaded and (result.prefix / COMPLETE).is_file()
    assert not local_store.exists(used)
