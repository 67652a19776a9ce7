"""The S3 fixture is a real server: multipart, ranges and conditional writes work."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

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


def _alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_killed_session_leaves_no_server_running(tmp_path):
    """A test session killed outright never stops its servers: each launcher stops, with its
    weed, once the process that started it is gone."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fixtures.s3_server import launch\n"
        "with launch(Path(sys.argv[1])) as s3:\n"
        "    print(s3.process.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    root = Path(__file__).resolve().parents[2]
    session = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "s3")],
        stdout=subprocess.PIPE, text=True, cwd=root,
    )  # fmt: skip
    assert session.stdout is not None
    launcher = int(session.stdout.readline())
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    assert len(children) == 1  # weed
    session.kill()
    session.wait()
    session.stdout.close()
    deadline = time.monotonic() + 15
    while (_alive(launcher) or _alive(int(children[0]))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(launcher) and not _alive(int(children[0]))
