"""The stores behave alike; an unreachable S3 names its URL, endpoint and credential source."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest
from _helpers import envmgr_here
from botocore.config import Config

from envmgr.cache import open_store
from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.cache.store import StoreError


@pytest.fixture
def store(any_store):
    return any_store


def test_store_contract(store, tmp_path):
    assert store.get("locks/a/linux-64.json") is None
    store.put("locks/a/linux-64.json", b"{}")
    assert store.get("locks/a/linux-64.json") == b"{}"
    assert store.put_if_absent("leases/x", b"me") is True
    assert store.put_if_absent("leases/x", b"you") is False
    assert store.get("leases/x") == b"me"
    data = bytes(range(256)) * 100
    source = tmp_path / "blob"
    source.write_bytes(data)
    store.put_file("envs/linux-64/e/env.tar.zst", source)
    assert store.size("envs/linux-64/e/env.tar.zst") == len(data)
    assert store.get("envs/linux-64/e/env.tar.zst", (10, 19)) == data[10:20]
    with store.open("envs/linux-64/e/env.tar.zst") as reader:
        assert reader.read() == data
    assert store.open("envs/linux-64/e/absent.tar.zst") is None
    assert store.get_file("envs/linux-64/e/env.tar.zst", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    assert list(store.list("envs/")) == ["envs/linux-64/e/env.tar.zst"]
    store.delete("leases/x")
    store.delete("leases/x")
    assert not store.exists("leases/x")
    with pytest.raises(ValueError):
        store.get("../escape")


def test_open_store_by_url(tmp_path):
    assert open_store(tmp_path.as_uri()).url == tmp_path.resolve().as_uri()
    assert open_store("s3://bucket/a/b").url == "s3://bucket/a/b"
    with pytest.raises(StoreError, match="unsupported store URL scheme"):
        open_store("ftp://example.org/x")


def test_file_store_urls_that_are_not_absolute_are_refused_or_made_absolute(tmp_path, monkeypatch):
    """file://team-store used to list and write the current directory, file://relative/x
    dropped 'relative', file://./team-store meant /team-store."""
    monkeypatch.chdir(tmp_path)
    for url in ("file://team-store", "file://relative/x", "file://./team-store", "file:rel"):
        with pytest.raises(StoreError, match="a file URL names an absolute path") as info:
            open_store(url)
        assert "file:///absolute/path" in str(info.value) and "\n" not in str(info.value)
    assert open_store("file://localhost" + str(tmp_path)).root == tmp_path
    assert open_store((tmp_path / "a b").as_uri()).root == tmp_path / "a b"
    assert open_store("team-store").root == tmp_path / "team-store"
    assert open_store("./x/../team-store").root == tmp_path / "team-store"
    assert not Path("/team-store").exists()


def test_a_relative_store_is_said_and_a_host_in_a_file_url_is_one_line(world, tmp_path):
    result = envmgr_here("store", "ls", "--store", "file://team-store", env=world, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "envmgr: error: store file://team-store: a file URL names an absolute path after three "
        "slashes (write file:///absolute/path, or a plain path such as ./team-store)"
    ]
    (tmp_path / "team-store").mkdir()
    result = envmgr_here("store", "ls", "--store", "team-store", env=world, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = f"envmgr: the store team-store (from command line) is {tmp_path / 'team-store'}"
    assert said in result.stderr.splitlines()


def test_unreachable_s3_names_url_endpoint_and_credentials(monkeypatch):
    monkeypatch.setenv("ENVMGR_S3_RETRIES", "1")  # the message is the subject, not the backoff
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="a",
        aws_secret_access_key="b",  # noqa: S106
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    with pytest.raises(StoreError) as info:
        S3Store("s3://bucket/prefix", client=client).get("locks/a")
    text = str(info.value)
    assert "s3://bucket/prefix" in text and "http://127.0.0.1:9" in text
    assert "credentials from explicit" in text


def test_missing_credentials_are_reported_at_once_not_retried(s3_server, s3_bucket, tmp_path):
    """No credentials anywhere: one attempt, one line saying so (it was retried 6 times)."""
    import os
    import subprocess
    import sys

    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "ENVMGR_S3_RETRIES": "5",
    }
    code = (
        "from envmgr.cache.s3 import S3Store\n"
        f"try: S3Store('s3://{s3_bucket}/x').get('locks/a')\n"
        "except Exception as e: print(type(e).__name__, e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    assert out[0].startswith("StoreError") and "NoCredentialsError" in out[0], out
    assert "no credentials found" in out[0] and "after" not in out[0]  # no "after N attempts"


@pytest.mark.parametrize(
    ("setting", "value", "said", "fix"),
    [
        ("AWS_ENDPOINT_URL", "localhost:9000", "Invalid endpoint: localhost:9000", "a URL such as"),
        ("AWS_ENDPOINT_URL_S3", "ftp://store", "`ftp://store` was not a valid URI", "a URL such"),
        ("AWS_PROFILE", "nope", "profile (nope) could not be found", "AWS_PROFILE names"),
        ("AWS_DEFAULT_REGION", "us east 1", "'us east 1' doesn't match", "set AWS_REGION"),
    ],
)
def test_bad_aws_settings_are_one_line_at_once(monkeypatch, tmp_path, setting, value, said, fix):
    """An AWS setting botocore cannot use is named in one StoreError with what to fix, and
    never retried: an endpoint without its scheme took 12 s of retries, and then a
    traceback, because the error's own report made the client again."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("ENVMGR_S3_RETRIES", "5")
    monkeypatch.setenv(setting, value)
    if setting == "AWS_ENDPOINT_URL_S3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    store = S3Store("s3://bucket/prefix")
    for call in (lambda: store.get("locks/a"), lambda: store.put("locks/a", b"x")):
        with pytest.raises(StoreError) as info:
            call()
        text = str(info.value)
        assert "\n" not in text and "s3://bucket/prefix" in text, text
        assert said in text and fix in text, text
        assert "attempts" not in text, text  # not retried


def test_the_s3_loader_keeps_aws_data_path_and_knows_s3_alone(monkeypatch, tmp_path):
    """The client's data loader skips botocore's listing of every service, and still
    searches AWS_DATA_PATH first, as botocore's own does."""
    import botocore.session

    from envmgr.cache.s3 import _s3_loader

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_DATA_PATH", f"~/models{os.pathsep}{tmp_path / 'more'}")
    loader = _s3_loader(botocore.session.Session())
    assert loader.search_paths[:2] == [str(tmp_path / "models"), str(tmp_path / "more")]
    assert loader.list_available_services("service-2") == ["s3"]
    assert loader.list_available_services("no-such-type-1") == []
    assert loader.load_service_model("s3", "service-2")["metadata"]["endpointPrefix"] == "s3"


def test_temp_files_of_writers_killed_mid_write_are_swept(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    store = LocalStore(tmp_path / "store")
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)  # fmt: skip
    leases = tmp_path / "store" / "leases"
    leases.mkdir(parents=True)
    host = socket.gethostname()
    dead = leases / f".{'a' * 32}.tmp-{host}-{gone}-abc123"
    live = leases / f".{'a' * 32}.tmp-{host}-{os.getpid()}-def456"
    dead.write_text("half")
    live.write_text("busy")
    assert store.put_if_absent(f"leases/{'a' * 32}", b"me")
    assert not dead.exists() and live.exists()
    assert list(store.list("leases/")) == [f"leases/{'a' * 32}"]


def test_a_whole_object_over_the_limit_is_refused_and_a_range_is_not(store):
    """A store is another host's word: a "manifest" of gigabytes must not be held in memory."""
    store.put("leases/big", b"x" * 1001)
    assert store.get("leases/big", limit=1001) == b"x" * 1001
    with pytest.raises(StoreError, match="more than 1,000 bytes") as info:
        store.get("leases/big", limit=1000)
    assert "leases/big" in str(info.value) and "\n" not in str(info.value)
    assert store.get("leases/big", (0, 1000), limit=10) == b"x" * 1001
    assert len(store.get("leases/big", limit=None) or b"") == 1001


def test_a_local_key_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    """A link to /dev/zero (read only) has no end, and a FIFO would block its reader
    forever: every way of reading a key refuses both, and a directory, in one line; a
    sparse file over the limit is read only to the limit."""
    store = LocalStore(tmp_path / "store")
    leases = tmp_path / "store" / "leases"
    leases.mkdir(parents=True)
    (leases / "zero").symlink_to("/dev/zero")
    os.mkfifo(leases / "fifo")
    (leases / "dir").mkdir()
    for key in ("leases/zero", "leases/fifo", "leases/dir"):
        for read in (
            lambda k: store.get(k),
            lambda k: store.get(k, (0, 9)),
            lambda k: store.open(k),
            lambda k: store.get_file(k, tmp_path / "copy"),
        ):
            with pytest.raises(StoreError, match="not a regular file") as info:
                read(key)
            assert key in str(info.value) and "\n" not in str(info.value)
    with (leases / "sparse").open("wb") as handle:
        handle.truncate(1 << 30)
    with pytest.raises(StoreError, match="more than 4,096 bytes"):
        store.get("leases/sparse", limit=4096)


def test_an_s3_body_longer_than_its_declared_length_stops_at_the_limit():
    """The declared length is checked first; the bytes are counted too, for a server that
    declares little and sends without end."""
    sent = []

    class Endless:
        def iter_chunks(self, size):
            while True:
                sent.append(size)
                yield b"\0" * size

        def close(self):
            sent.append("closed")

    class Client:
        def get_object(self, **_):
            return {"ETag": '"e"', "ContentLength": 10, "Body": Endless()}

    store = S3Store("s3://bucket/p", client=Client())
    with pytest.raises(StoreError, match="more than 200,000 bytes"):
        store.get("envs/linux-64/e/manifest.json", limit=200_000)
    assert sent[-1] == "closed" and len(sent) <= 5

    class Declares(Client):
        def get_object(self, **_):
            return {"ETag": '"e"', "ContentLength": 10**12, "Body": Endless()}

    sent.clear()
    with pytest.raises(StoreError, match="more than 200,000 bytes"):
        S3Store("s3://bucket/p", client=Declares()).get("leases/e", limit=200_000)
    assert sent == ["closed"]

    sent.clear()
    with pytest.raises(StoreError, match="more than the 100 bytes asked for"):
        store.get("layers/l/layer.tar.zst", (0, 99))
    assert sent == [100, 100, "closed"]  # the part in one read, then the first byte too many


@pytest.mark.parametrize("streams", [0, 3])
def test_both_s3_readers_hand_on_every_byte_in_order_whatever_the_read_sizes(
    s3_server, s3_bucket, tmp_path, streams
):
    """One GET stream and ranged parts (8 MiB each, the last one short): reads that split a
    part, that ask for more than a part holds, and read() to the end."""
    store = S3Store(f"s3://{s3_bucket}/r", client=s3_server.client())
    data = os.urandom((17 << 20) + 3)
    (tmp_path / "blob").write_bytes(data)
    store.put_file("layers/l/layer.tar.zst", tmp_path / "blob")
    with store.open("layers/l/layer.tar.zst", streams=streams) as reader:
        got = [reader.read(7), reader.read(9 << 20), reader.read(1), bytearray(5 << 20)]
        got[3] = got[3][: reader.readinto(got[3])]
        got.append(reader.read())
        assert reader.read(10) == b""
    assert b"".join(got) == data
