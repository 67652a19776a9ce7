"""Build once, pack deterministically, store locally or on S3, unpack safely elsewhere."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import zstandard
from _helpers import archive_manifest, envmgr_here, run_envmgr

from envmgr.archive.manifest import ArchiveError, Manifest, Relocation
from envmgr.archive.relocate import relocate
from envmgr.archive.unpack import unpack
from envmgr.build.once import BUILD_PREFIX_LENGTH, BuildOptions, build_and_store
from envmgr.cache.layout import archive_key, env_lock_key, lease_key, manifest_key, used_key
from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.errors import BuildError
from envmgr.locks.lock import LockedPackage, PlatformLock, read_conda_lock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(mixed_lock, tmp_path_factory):
    """The mixed env as one archive (format 2); tests/build/test_layers.py builds layers."""
    home = tmp_path_factory.mktemp("built")
    store = LocalStore(home / "store")
    options = BuildOptions(store=store, cache_dir=home / "cache", layers=False)
    return store, build_and_store(mixed_lock, options)


def _archive(store, manifest):
    return io.BytesIO(store.get(archive_key(manifest.platform, manifest.env_id)))


def test_build_stores_archive_lock_and_manifest(built, mixed_lock):
    store, outcome = built
    assert outcome.status == "built"
    keys = set(store.list("envs/"))
    assert keys == {
        archive_key("linux-64", mixed_lock.env_id),
        env_lock_key("linux-64", mixed_lock.env_id),
        manifest_key("linux-64", mixed_lock.env_id),
    }
    manifest = outcome.manifest
    assert len(manifest.build_prefix) == BUILD_PREFIX_LENGTH
    assert manifest.size == store.size(archive_key("linux-64", mixed_lock.env_id))
    assert {"bin/tabulate", "etc/prefix-demo.conf"} <= {r.path for r in manifest.relocations}
    assert any(r.mode == "binary" for r in manifest.relocations)
    # Format 2: frames a worker decodes on all its cores (hydrate tests then use them).
    assert manifest.format == 2 and len(manifest.chunks) > 3
    assert sum(c.size for c in manifest.chunks) == manifest.size
    assert not store.exists(lease_key(mixed_lock.env_id))
    lock_file = store.root / env_lock_key("linux-64", mixed_lock.env_id)
    assert read_conda_lock(lock_file).for_platform("linux-64").env_id == mixed_lock.env_id


def test_second_build_uploads_nothing(built, mixed_lock):
    """Only the small use marker (``used.json``, which keeps ``store gc`` off an env that is
    still built for) is written; archive, lock and manifest stay as they were."""
    store, first = built
    used = used_key(mixed_lock.platform, mixed_lock.env_id)
    before = {k: store.size(k) for k in store.list("envs/") if k != used}
    again = build_and_store(
        mixed_lock, BuildOptions(store=store, cache_dir=store.root.parent / "cache", layers=False)
    )
    assert again.status == "present" and again.manifest == first.manifest
    after = {k: store.size(k) for k in store.list("envs/")}
    assert after.pop(used) < 200
    assert after == before


def test_unpacked_at_a_shorter_prefix_works(built, mixed_lock, tmp_path):
    store, outcome = built
    manifest = outcome.manifest
    raw, moved = tmp_path / "raw", tmp_path / "e"
    unpack(_archive(store, manifest), raw, manifest)
    unpack(_archive(store, manifest), moved, manifest)
    relocate(moved, manifest)
    env = {"PATH": "/usr/bin:/bin"}
    code = (
        "import sys, numpy, tabulate, colorama, dateutil; "
        "print(sys.prefix, numpy.__version__, colorama.__version__)"
    )
    out = subprocess.run(
        [str(moved / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    assert out[0] == str(moved) and out[1] == "2.1.3"
    table = subprocess.run(
        [str(moved / "bin" / "tabulate")],
        input="a 1\n",
        text=True,
        capture_output=True,
        check=True,
        env=env,
    ).stdout
    assert "a" in table
    said = subprocess.run(
        [str(moved / "bin" / "prefix-demo")], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert str(moved) in said
    blob = (moved / "share" / "prefix-demo" / "prefix.bin").read_bytes()
    assert str(moved).encode() + b"\0" in blob and manifest.build_prefix.encode() not in blob
    listed = {r.path for r in manifest.relocations}
    for path in raw.rglob("*"):
        rel = path.relative_to(raw).as_posix()
        if path.is_file() and not path.is_symlink() and rel not in listed:
            assert path.read_bytes() == (moved / rel).read_bytes(), rel
        elif rel in listed:
            assert manifest.build_prefix.encode() not in (moved / rel).read_bytes()


def test_packing_is_deterministic(mixed_lock, built, tmp_path):
    _store, first = built
    other = LocalStore(tmp_path / "store")
    options = BuildOptions(store=other, cache_dir=tmp_path / "cache", layers=False)
    again = build_and_store(mixed_lock, options)
    assert again.status == "built"
    assert again.manifest.sha256 == first.manifest.sha256


def test_gzip_codec(mixed_lock, tmp_path):
    store = LocalStore(tmp_path / "store")
    outcome = build_and_store(
        mixed_lock, BuildOptions(store=store, cache_dir=tmp_path / "cache", codec="gz")
    )
    manifest = outcome.manifest
    assert manifest.codec == "gz"
    data = store.get(archive_key("linux-64", mixed_lock.env_id, "gz"))
    unpack(io.BytesIO(data), tmp_path / "e", manifest)
    assert (tmp_path / "e" / "bin" / "python3.11").is_file()


def test_expired_lease_is_taken_over_and_live_one_waited_for(mixed_lock, built, tmp_path):
    store = LocalStore(tmp_path / "store")
    stale = json.dumps({"holder": "dead-host:1", "expires": time.time() - 10, "seconds": 0.5})
    stale = stale.encode()
    store.put(lease_key(mixed_lock.env_id), stale)
    quick = BuildOptions(store=store, cache_dir=tmp_path / "cache", lease_seconds=0.5)
    outcome = build_and_store(mixed_lock, quick)  # unchanged for a period: taken over
    assert outcome.status == "built" and not store.exists(lease_key(mixed_lock.env_id))
    live = LocalStore(tmp_path / "other")
    live.put(
        lease_key(mixed_lock.env_id),
        json.dumps({"holder": "busy-host:2", "expires": time.time() + 600}).encode(),
    )
    with pytest.raises(BuildError, match="waited"):
        build_and_store(
            mixed_lock,
            BuildOptions(
                store=live, cache_dir=tmp_path / "cache", wait_timeout=1.0, poll_seconds=0.1
            ),
        )


def test_failed_build_releases_its_lease(mixed_lock, tmp_path):
    broken = PlatformLock(
        platform="linux-64",
        packages=(
            *mixed_lock.packages,
            LockedPackage(
                manager="pypi",
                name="ghost",
                version="1.0",
                sha256="0" * 64,
                url=f"file://{tmp_path}/ghost-1.0-py3-none-any.whl",
            ),
        ),
    )
    store = LocalStore(tmp_path / "store")
    with pytest.raises(Exception, match="ghost"):
        build_and_store(broken, BuildOptions(store=store, cache_dir=tmp_path / "cache"))
    assert not store.exists(lease_key(broken.env_id))
    assert not store.exists(manifest_key("linux-64", broken.env_id))


def _evil_archive(members) -> tuple[io.BytesIO, Manifest]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    packed = zstandard.ZstdCompressor().compress(raw.getvalue())
    return io.BytesIO(packed), archive_manifest(packed, unpacked_size=10)


def _member(name, *, kind=tarfile.REGTYPE, data=b"x", link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        ([_member("../escape")], "unsafe member"),
        ([_member("/etc/passwd")], "unsafe member"),
        ([_member("bin/link", kind=tarfile.SYMTYPE, link="../../outside")], "points outside"),
        ([_member("bin/abs", kind=tarfile.SYMTYPE, link="/etc/passwd")], "points outside"),
        ([_member("dev", kind=tarfile.CHRTYPE)], "device"),
        ([_member("big", data=b"y" * 11)], "more data than its manifest"),
        (
            [_member("bin/lib", kind=tarfile.SYMTYPE, link="/tmp"), _member("bin/lib/x")],
            "points outside",
        ),
    ],
)
def test_unpack_refuses_hostile_archives(tmp_path, members, needle):
    source, manifest = _evil_archive(members)
    with pytest.raises(ArchiveError, match=needle):
        unpack(source, tmp_path / "env", manifest)
    assert not (tmp_path / "escape").exists()


def test_relocation_refuses_a_longer_prefix(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x").write_bytes(b"/short\0")
    manifest = Manifest(
        env_id="e" * 32,
        platform="linux-64",
        build_prefix="/short",
        codec="zst",
        size=0,
        sha256="0" * 64,
        files=1,
        unpacked_size=7,
        relocations=(Relocation(path="bin/x", mode="binary"),),
    )
    with pytest.raises(ArchiveError, match="longer"):
        relocate(tmp_path, manifest, "/a/much/longer/prefix")


def test_cli_build_twice_and_other_platforms(conda_channel, tmp_path):
    env = {
        **os.environ,
        "ENVMGR_STORE": (tmp_path / "store").as_uri(),
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
    }
    args = [
        "build",
        "--conda",
        "python=3.11",
        "--conda",
        "tabulate",
        "--channel",
        conda_channel.url,
        "--platform",
        "linux-64",
        "--platform",
        "osx-arm64",
    ]
    first = run_envmgr(*args, env=env)
    assert first.returncode == 0, first.stderr
    # Both platforms are built here: any host builds any platform's env.
    # Each as package layers: python's and its dependencies' are each platform's own.
    assert first.stdout.count("built its ") == 2, first.stdout
    assert "osx-arm64" in first.stdout
    second = run_envmgr(*args, "--json", env=env)
    rows = json.loads(second.stdout)["envs"]
    assert [r["status"] for r in rows] == ["present", "present"]
    lock_file = tmp_path / "x.conda-lock.yml"
    resolved = envmgr_here("resolve", *args[1:], "-o", str(lock_file), env=env)
    assert resolved.returncode == 0, resolved.stderr
    from_lock = envmgr_here("build", "--from-lock", str(lock_file), "--json", env=env)
    assert from_lock.returncode == 0, from_lock.stderr
    assert [r["status"] for r in json.loads(from_lock.stdout)["envs"]] == ["present", "present"]


def test_two_processes_build_once_on_s3(s3_server, s3_bucket, conda_channel, tmp_path):
    url = f"s3://{s3_bucket}/team/envs"
    env = {
        **os.environ,
        "ENVMGR_STORE": url,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    args = [
        sys.executable,
        "-c",
        "from envmgr.cli.app import main; main()",
        "build",
        "--conda",
        "python=3.11",
        "--conda",
        "numpy",
        "--conda",
        "python-dateutil",
        "--channel",
        conda_channel.url,
        "--platform",
        "linux-64",
        "--json",
    ]
    procs = [
        subprocess.Popen(
            args,
            env={**env, "ENVMGR_CACHE_DIR": str(tmp_path / f"c{i}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outputs]
    rows = [json.loads(out)["envs"][0] for out, _ in outputs]
    assert rows[0]["env_id"] == rows[1]["env_id"]
    assert sorted(r["status"] for r in rows) in (["built", "waited"], ["built", "present"])
    store = S3Store(url, client=s3_server.client())
    keys = list(store.list("envs/"))
    env_id = rows[0]["env_id"]
    assert keys == sorted(
        [
            archive_key("linux-64", env_id),
            env_lock_key("linux-64", env_id),
            manifest_key("linux-64", env_id),
        ]
    )
    assert list(store.list("leases/")) == []
    manifest = Manifest.from_dict(json.loads(store.get(manifest_key("linux-64", env_id))))
    data = store.get(archive_key("linux-64", env_id))
    assert len(data) == manifest.size
    assert store.get(archive_key("linux-64", env_id), (0, 3)) == data[:4]


def _with_wheel(lock: PlatformLock, wheel: Path, name: str, version: str) -> PlatformLock:
    """*lock* with the local *wheel* added as a locked PyPI package."""
    import hashlib

    package = LockedPackage(
        manager="pypi",
        name=name,
        version=version,
        url=wheel.as_uri(),
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
    )
    return PlatformLock(
        platform=lock.platform, packages=(*lock.packages, package), channels=lock.channels
    )


def test_a_wheel_whose_script_and_entry_point_collide_installs_like_pip(mixed_lock, tmp_path):
    """dbt-core 1.1.6 ships bin/dbt twice (a .data script and a console_scripts entry point):
    pip installs it, the entry point winning; installer alone failed with 'File already
    exists'. __pycache__ members in wheels are left out without a warning."""
    import subprocess

    from envmgr.worker.hydrate import hydrate
    from fixtures.wheelmaker import make_wheel

    wheel = make_wheel(
        tmp_path / "wheels",
        "clash",
        "1.0",
        extra_files={
            "clash/cli.py": b"def main():\n    print('entry-point')\n",
            "clash-1.0.data/scripts/clash": b"#!/bin/sh\necho data-script\n",
            "clash-1.0.data/scripts/clash-helper": b"#!/bin/sh\necho helper\n",
            "clash/__pycache__/cli.cpython-311.pyc": b"stale bytecode from the wheel's build",
        },
        console_scripts={"clash": "clash.cli:main"},
    )
    lock = _with_wheel(mixed_lock, wheel, "clash", "1.0")
    store = LocalStore(tmp_path / "store")
    build_and_store(lock, BuildOptions(store=store, cache_dir=tmp_path / "cache"))
    prefix = hydrate(lock.env_id, store, tmp_path / "envs").prefix
    ran = subprocess.run([str(prefix / "bin" / "clash")], capture_output=True, text=True)
    assert ran.stdout.strip() == "entry-point", ran.stderr
    helper = subprocess.run([str(prefix / "bin" / "clash-helper")], capture_output=True, text=True)
    assert helper.stdout.strip() == "helper"  # other data scripts still install
    cache = prefix / "lib" / "python3.11" / "site-packages" / "clash" / "__pycache__"
    assert (cache / "cli.cpython-311.pyc").read_bytes() != b"stale bytecode from the wheel's build"


def test_wheels_installed_by_worker_processes_give_the_same_archive(
    mixed_lock, built, tmp_path, monkeypatch
):
    """Wheels shared among one installer process per core (here even the fixture's few
    small ones) make the same bytes as one installer; a wheel that cannot be installed is
    one line naming it."""

    import envmgr.build.wheels
    from fixtures.wheelmaker import make_wheel

    _store, serial = built
    monkeypatch.setattr(envmgr.build.wheels, "_SHARE_BYTES", 0)
    shares: list[int] = []
    real = envmgr.build.wheels._install_in_workers

    def spy(jobs):
        shares.append(len(jobs))
        real(jobs)

    monkeypatch.setattr(envmgr.build.wheels, "_install_in_workers", spy)
    store = LocalStore(tmp_path / "store")
    options = BuildOptions(store=store, cache_dir=tmp_path / "cache", layers=False)
    shared = build_and_store(mixed_lock, options)
    assert shares == [2]
    assert shared.manifest.sha256 == serial.manifest.sha256
    wheel = make_wheel(tmp_path / "wheels", "broken", "1.0")
    wheel.write_bytes(wheel.read_bytes()[:200])  # not a zip any more
    lock = _with_wheel(mixed_lock, wheel, "broken", "1.0")
    with pytest.raises(BuildError, match=r"^env \w+: installing broken 1.0 failed: ") as caught:
        build_and_store(lock, BuildOptions(store=store, cache_dir=tmp_path / "cache2"))
    assert "\n" not in str(caught.value)
