"""The database circuit breaker through the daemon: the SQLite file goes bad while
clients read and write. Reads of existing objects (encrypted ones too, with credentials
checked from the cache) keep succeeding, writes and listings get 503, and once the file
is repaired everything resumes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import (
    BUCKET,
    SECRET_BUCKET,
    SECRET_KEY,
    Daemon,
    DaemonSpec,
    _new_root,
    running_daemon,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    spec = DaemonSpec(encryption="inline", memory_cache=False)
    root = _new_root(tmp_path_factory, "db-outage")
    with running_daemon(spec, root, expect_errors=True) as running:
        yield running


def corrupt(root: Path) -> dict[Path, bytes]:
    files = [p for p in root.glob("cairn.db*") if not p.name.endswith(".lock")]
    saved = {p: p.read_bytes() for p in files}
    for p in files:
        with p.open("r+b") as f:
            f.write(os.urandom(len(saved[p])))
    return saved


def restore(saved: dict[Path, bytes]) -> None:
    for p, data in saved.items():
        with p.open("r+b") as f:
            f.write(data)


def code(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


def test_sqlite_goes_bad_reads_continue_writes_get_503_then_all_resumes(daemon: Daemon) -> None:
    plain = daemon.client()
    secret = daemon.client(access_key="E2ESECRETKEY0001", secret_key=SECRET_KEY)
    stored = {}
    for client, bucket in ((plain, BUCKET), (secret, SECRET_BUCKET)):
        for i in range(3):
            data = os.urandom(3 * 1024 * 1024 + i)  # 4 chunks of 1 MiB
            client.put_object(Bucket=bucket, Key=f"k{i}", Body=data)
            assert client.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == data
            stored[(bucket, f"k{i}")] = (client, data)
    saved = corrupt(daemon.root)
    time.sleep(5.5)  # past the credential cache's TTL: keys come from the outage cache
    for _ in range(2):
        for (bucket, key), (client, data) in stored.items():
            assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    with pytest.raises(ClientError) as caught:
        plain.put_object(Bucket=BUCKET, Key="new", Body=b"x" * 10)
    assert code(caught.value) == (503, "ServiceUnavailable")
    with pytest.raises(ClientError) as caught:
        plain.list_objects_v2(Bucket=BUCKET)
    assert code(caught.value) == (503, "ServiceUnavailable")
    restore(saved)
    deadline = time.monotonic() + 30
    while True:
        try:
            plain.put_object(Bucket=BUCKET, Key="after", Body=b"back")
            break
        except ClientError as exc:
            if time.monotonic() > deadline or code(exc)[0] != 503:
                raise
            time.sleep(0.5)
    keys = [o["Key"] for o in plain.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys == ["after", "k0", "k1", "k2"]
    for (bucket, key), (client, data) in stored.items():
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    status, report = daemon.admin("GET", "/fsck")
    assert status == 200 and report["problems"] == 0, report
