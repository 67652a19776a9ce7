"""The S3 fixture is a real server: multipart, ranges and conditional writes work."""

from __future__ import annotations

import hashlib
import os

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from fixtures.s3_server import RunningS3

MiB = 1024 * 1024


def test_multipart_round_trip(s3_server: RunningS3, s3_bucket: str, tmp_path):
    client = s3_server.client()
    data = os.urandom(11 * MiB)
    source = tmp_path / "blob"
    source.write_bytes(data)
    config = TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4
    )
    client.upload_file(str(source), s3_bucket, "env.tar.zst", Config=config)
    head = client.head_object(Bucket=s3_bucket, Key="env.tar.zst")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # three parts: it really was multipart

    target = tmp_path / "back"
    client.download_file(s3_bucket, "env.tar.zst", str(target), Config=config)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()

    ranged = client.get_object(Bucket=s3_bucket, Key="env.tar.zst", Range="bytes=100-199")
    assert ranged["Body"].read() == data[100:200]


def test_conditional_put_rejects_the_second_writer(s3_server: RunningS3, s3_bucket: str):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="leases/env1", Body=b"host-a", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=s3_bucket, Key="leases/env1", Body=b"host-b", IfNoneMatch="*")
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    body = client.get_object(Bucket=s3_bucket, Key="leases/env1")["Body"].read()
    assert body == b"host-a"


def test_buckets_are_fresh_per_test(s3_server: RunningS3, s3_bucket: str):
    listing = s3_server.client().list_objects_v2(Bucket=s3_bucket)
    assert listing.get("KeyCount", 0) == 0
