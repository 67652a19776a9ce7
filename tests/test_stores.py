"""The stores behave alike; an unreachable S3 names its URL, endpoint and credential source."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config

from envmgr.cache import open_store
from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.cache.store import StoreError


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(f"s3://{bucket}/some/prefix", client=server.client())


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


def test_unreachable_s3_names_url_endpoint_and_credentials():
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
