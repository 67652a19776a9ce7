"""Faults with real parts: a TCP proxy that cuts, delays and refuses connections in front of
SeaweedFS, the S3 server stopped and restarted mid-download, and a disk that refuses writes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from _helpers import run_bootstrap

from envmgr.build.once import BuildOptions, build_and_store
from envmgr.cache.s3 import S3Store
from envmgr.errors import EnvmgrError
from envmgr.worker.env_cache import COMPLETE, env_dir
from envmgr.worker.hydrate import HydrateError, hydrate
from fixtures.s3_server import RunningS3, free_port, launch
from fixtures.tcp_proxy import FaultProxy, Faults

WORKER_SECRET = "worker-secret"  # noqa: S105 - a read-only identity of a local test server


def _client(server: RunningS3, endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=2,
            read_timeout=10,
        ),
    )


def _upstream(server: RunningS3) -> tuple[str, int]:
    parts = urlsplit(server.endpoint_url)
    return str(parts.hostname), int(parts.port or 80)


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(_upstream(s3_server)) as running:
        yield running


@pytest.fixture(scope="module")
def built(mixed_lock, s3_server, tmp_path_factory):
    """The mixed env built once into its own bucket."""
    bucket = "faults-env"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/envs"
    outcome = build_and_store(
        mixed_lock,
        BuildOptions(store=S3Store(url, client=client), cache_dir=tmp_path_factory.mktemp("b")),
    )
    return url, mixed_lock, outcome.manifest


def test_cut_downloads_resume_with_ranged_gets(s3_server, s3_bucket, proxy):
    data = os.urandom(6 << 20)
    s3_server.client().put_object(Bucket=s3_bucket, Key="big", Body=data)
    store = S3Store(f"s3://{s3_bucket}", client=_client(s3_server, proxy.url))
    proxy.faults = Faults(cut_after=2 << 20, cuts=2)
    assert store.get("big") == data
    assert proxy.counters.cut == 2
    # Resumed, not restarted: the first GET asked for the whole object, each retry for the
    # rest only, from the first byte it had not received. (A reset can throw away all the
    # client had buffered; a retry with nothing to resume from asks for the whole object.)
    gets = [r for r in proxy.counters.requests if r.startswith("GET ")]
    assert len(gets) == 3, gets
    retries = proxy.counters.ranges
    assert retries and all(int(r.split("-")[0]) > 0 for r in retries), retries


@pytest.mark.parametrize("parts", ["0", "3"], ids=["one-stream", "ranged-parts"])
def test_hydrate_through_cut_and_slow_connections(
    built, s3_server, proxy, tmp_path, monkeypatch, parts
):
    """Both readers: one GET stream (the default) and ENVMGR_S3_PARTS ranged GETs."""
    monkeypatch.setenv("ENVMGR_S3_PARTS", parts)
    url, lock, manifest = built
    store = S3Store(url, client=_client(s3_server, proxy.url), threads=2)
    proxy.faults = Faults(cut_after=3 << 20, cuts=4, latency=0.002)
    result = hydrate(lock.env_id, store, tmp_path / "cache")
    assert result.downloaded and (result.prefix / COMPLETE).read_text().strip() == manifest.sha256
    assert proxy.counters.cut == 4


def test_a_store_that_stays_down_is_one_clear_error(built, s3_server, proxy, tmp_path, monkeypatch):
    url, lock, _manifest = built
    monkeypatch.setenv("ENVMGR_S3_RETRIES", "2")
    store = S3Store(url, client=_client(s3_server, proxy.url))
    manifest_store = S3Store(url, client=s3_server.client())
    from envmgr.build.once import read_manifest

    read_manifest(manifest_store, lock.platform, lock.env_id)  # the manifest is readable...
    proxy.faults = Faults(cut_after=0, cuts=10**6)  # ...but every download dies at once
    started = time.monotonic()
    with pytest.raises(HydrateError) as caught:
        hydrate(lock.env_id, store, tmp_path / "cache")
    message = str(caught.value)
    assert f"env {lock.env_id}" in message and url in message and "after 3 attempts" in message
    assert time.monotonic() - started < 60
    cache = tmp_path / "cache" / "envs"
    assert not env_dir(tmp_path / "cache", lock.env_id).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    proxy.faults = Faults()
    assert hydrate(lock.env_id, store, tmp_path / "cache").downloaded


def test_s3_server_stopped_and_restarted_during_a_download(mixed_lock, tmp_path, monkeypatch):
    """A private SeaweedFS: stopped mid-download and started again on the same data and port;
    the download resumes where it broke."""
    monkeypatch.setenv("ENVMGR_S3_RETRIES", "8")
    port, data = free_port(), tmp_path / "weed"
    first = launch(data, port=port)
    server = first.__enter__()
    try:
        client = server.client()
        client.create_bucket(Bucket="restart")
        url = "s3://restart/envs"
        build_and_store(
            mixed_lock, BuildOptions(store=S3Store(url, client=client), cache_dir=tmp_path / "b")
        )
        proxy = FaultProxy(_upstream(server)).start()
        # Slow enough (about 13 s for the archive) that the stop, which gives weed
        # WEED_GRACE s to finish, always lands mid-download.
        proxy.faults = Faults(latency=0.03)
        store = S3Store(url, client=_client(server, proxy.url), threads=1)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = hydrate(mixed_lock.env_id, store, tmp_path / "cache")
            except Exception as exc:  # reported below
                outcome["error"] = exc

        worker = threading.Thread(target=work)
        worker.start()
        while proxy.bytes_down < (2 << 20):
            time.sleep(0.05)
        first.__exit__(None, None, None)
        stopped_at = proxy.bytes_down
        proxy.faults = Faults()  # the stop landed mid-download: the rest may go at full speed
        second = launch(data, port=port)
        second.__enter__()
        try:
            worker.join(timeout=120)
        finally:
            second.__exit__(None, None, None)
            proxy.stop()
    except BaseException:
        first.__exit__(None, None, None)
        raise
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].downloaded and stopped_at < proxy.bytes_down


def test_a_full_disk_during_hydrate_publishes_nothing(built, s3_server, tmp_path):
    """A worker whose files may not grow past 2 MB (RLIMIT_FSIZE): the bootstrap says it
    cannot write, removes its temp dir, publishes nothing; without the limit it works."""
    url, lock, _manifest = built
    cache = tmp_path / "cache"
    limited = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20)); "
        "from envmgr.bootstrap import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["--store", url, "--env-id", lock.env_id, "--cache-dir", str(cache)]
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
    }
    failed = subprocess.run(
        [sys.executable, "-c", limited, *args], capture_output=True, text=True, env=env, check=False
    )
    assert failed.returncode == 1
    assert f"env {lock.env_id}: cannot write it under" in failed.stderr
    assert "File too large" in failed.stderr and "nothing was published" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    envs = cache / "envs"
    assert not env_dir(cache, lock.env_id).exists()
    assert not [p for p in envs.iterdir() if p.name.startswith(".tmp-")]
    layers = cache / "layers"  # format 3: layers that fit are kept, whole; none half-written
    assert not list(layers.glob(".tmp-*"))
    assert all((p / ".envmgr-complete").is_file() for p in layers.glob("[0-9a-f]*"))
    fine = subprocess.run(
        [sys.executable, "-m", "envmgr.bootstrap", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert fine.returncode == 0, fine.stderr
    assert Path(fine.stdout.strip()).is_file()


def test_read_only_credentials_hydrate_but_cannot_build(mixed_lock, conda_channel, tmp_path):
    """A private SeaweedFS with identities: the admin builds; a worker with read-and-list
    credentials hydrates that env, and says clearly that it cannot build one that is missing."""
    from envmgr.build.once import offer_lock
    from envmgr.locks.lock import PlatformLock
    from fixtures.s3_server import write_identities

    identities = write_identities(tmp_path / "identities.json", {"worker": WORKER_SECRET})
    with launch(tmp_path / "weed", identities=identities) as server:
        admin = server.client()
        admin.create_bucket(Bucket="readonly")
        url = "s3://readonly/envs"
        admin_store = S3Store(url, client=admin)
        build_and_store(mixed_lock, BuildOptions(store=admin_store, cache_dir=tmp_path / "b"))
        # A second env whose lock is stored but whose archive is not: its first worker builds.
        smaller = PlatformLock(
            platform=mixed_lock.platform,
            packages=tuple(p for p in mixed_lock.packages if p.manager == "conda"),
            channels=mixed_lock.channels,
        )
        offer_lock(admin_store, smaller)
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_ACCESS_KEY_ID": "worker",
            "AWS_SECRET_ACCESS_KEY": WORKER_SECRET,
            "AWS_DEFAULT_REGION": server.region,
        }
        import boto3

        read_only = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=server.region,
        )
        with pytest.raises(Exception, match="AccessDenied"):
            read_only.put_object(Bucket="readonly", Key="envs/x", Body=b"x")  # really read-only

        def bootstrap(env_id: str) -> subprocess.CompletedProcess[str]:
            args = ["--store", url, "--env-id", env_id, "--cache-dir", str(tmp_path / "w")]
            args.append("--build-if-missing")  # the opt-in of a worker with a full envmgr
            return run_bootstrap(*args, env=env)

        fine = bootstrap(mixed_lock.env_id)
        assert fine.returncode == 0, fine.stderr
        assert Path(fine.stdout.strip()).is_file()
        refused = bootstrap(smaller.env_id)
        assert refused.returncode == 1
        assert "must build it, but it cannot write to the store" in refused.stderr
        assert "AccessDenied" in refused.stderr and "credentials from env" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not list(admin_store.list("leases/"))  # nothing half-written


def test_s3_responses_cut_during_a_build_name_the_real_cause(
    mixed_lock, s3_server, s3_bucket, proxy, tmp_path, monkeypatch
):
    """Every S3 response cut short during a build read "S3 error KeyError"."""
    monkeypatch.setenv("ENVMGR_S3_RETRIES", "1")
    store = S3Store(f"s3://{s3_bucket}/envs", client=_client(s3_server, proxy.url))
    proxy.faults = Faults(cut_after=150, cuts=10**6)
    with pytest.raises(EnvmgrError) as caught:
        build_and_store(mixed_lock, BuildOptions(store=store, cache_dir=tmp_path / "c"))
    message = str(caught.value)
    assert "\n" not in message and s3_bucket in message
    assert "S3 error a cut or malformed response (" in message, message
    assert "check the network" in message


@pytest.mark.parametrize("first", ["head", "get"])
def test_the_first_request_during_a_server_restart_is_retried(
    s3_server, s3_bucket, proxy, monkeypatch, first
):
    """The size of an object (the HEAD before a ranged download) and the first GET of a
    stream (which gives the size itself) are sent again with backoff while the server is
    away, as reads are: a layer's download that began during a restart failed at once."""
    monkeypatch.setenv("ENVMGR_S3_RETRIES", "4")
    S3Store(f"s3://{s3_bucket}/p", client=s3_server.client()).put("layers/x", b"12345")
    store = S3Store(f"s3://{s3_bucket}/p", client=_client(s3_server, proxy.url))
    proxy.faults = Faults(refuse=True)
    back = threading.Timer(1.0, lambda: setattr(proxy, "faults", Faults()))
    back.start()
    try:
        if first == "head":
            assert store.size("layers/x") == 5
        else:
            reader = store.open("layers/x")
            assert reader is not None
            with reader:
                assert reader.read() == b"12345"
    finally:
        back.cancel()
    assert proxy.counters.refused >= 3  # botocore's own tries alone would have given up
