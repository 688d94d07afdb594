"""Reads of keys the daemon never read while its metadata store is down (the SQLite file
unreadable; PostgreSQL cut off behind a relay): the current version comes from the
key's self-describing blobs — plain, encrypted, multipart, copies, ranges, the newest of
an overwritten key — deleted keys stay deleted (S3 DeleteObject and DeleteObjects),
never-written keys are 404, writes and listings get 503; once the store is back the
store and the backends agree (fsck) and the tombstones of the deletes are retired."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.conftest import pg_dsn
from tests.e2e.conftest import (
    BUCKET,
    SECRET_BUCKET,
    SECRET_KEY,
    Daemon,
    DaemonSpec,
    _new_root,
    running_daemon,
)
from tests.e2e.test_db_outage import code, corrupt, restore
from tests.relay import Switch, relayed_dsn

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MiB = 1024 * 1024


def write_everything(daemon: Daemon) -> dict[tuple[str, str], bytes]:
    plain = daemon.client()
    secret = daemon.client(access_key="E2ESECRETKEY0001", secret_key=SECRET_KEY)
    seen: dict[tuple[str, str], bytes] = {}
    for client, bucket in ((plain, BUCKET), (secret, SECRET_BUCKET)):
        data = os.urandom(3 * MiB + 11)  # 4 chunks
        client.put_object(Bucket=bucket, Key="big", Body=data, ContentType="x/big")
        seen[(bucket, "big")] = data
        upload = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
        parts = [os.urandom(5 * MiB), os.urandom(MiB // 2)]
        etags = [
            client.upload_part(Bucket=bucket, Key="mp", UploadId=upload, PartNumber=n, Body=p)[
                "ETag"
            ]
            for n, p in enumerate(parts, start=1)
        ]
        client.complete_multipart_upload(
            Bucket=bucket,
            Key="mp",
            UploadId=upload,
            MultipartUpload={
                "Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]
            },
        )
        seen[(bucket, "mp")] = b"".join(parts)
        client.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "big"})
        seen[(bucket, "copy")] = data
        client.put_object(Bucket=bucket, Key="over", Body=b"first")
        client.put_object(Bucket=bucket, Key="over", Body=b"second")
        seen[(bucket, "over")] = b"second"
        for key in ("gone", "gone-a", "gone-b", "gone-src"):
            client.put_object(Bucket=bucket, Key=key, Body=os.urandom(MiB + 5))
        client.copy_object(
            Bucket=bucket, Key="kept", CopySource={"Bucket": bucket, "Key": "gone-src"}
        )
        seen[(bucket, "kept")] = client.get_object(Bucket=bucket, Key="gone-src")["Body"].read()
        client.delete_object(Bucket=bucket, Key="gone")
        client.delete_object(Bucket=bucket, Key="gone-src")  # its chunks live on in "kept"
        client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": "gone-a"}, {"Key": "gone-b"}]}
        )
    return seen


def check_down(daemon: Daemon, seen: dict[tuple[str, str], bytes]) -> None:
    plain = daemon.client()
    secret = daemon.client(access_key="E2ESECRETKEY0001", secret_key=SECRET_KEY)
    clients = {BUCKET: plain, SECRET_BUCKET: secret}
    for (bucket, key), data in seen.items():
        got = clients[bucket].get_object(Bucket=bucket, Key=key)
        assert got["Body"].read() == data, (bucket, key)
        assert got["ContentLength"] == len(data)
    for bucket, client in clients.items():
        data = seen[(bucket, "big")]
        ranged = client.get_object(Bucket=bucket, Key="big", Range=f"bytes={MiB - 3}-{2 * MiB + 4}")
        assert ranged["Body"].read() == data[MiB - 3 : 2 * MiB + 5]
        head = client.head_object(Bucket=bucket, Key="big")
        assert (head["ContentLength"], head["ContentType"]) == (len(data), "x/big")
        for key in ("gone", "gone-a", "gone-b", "gone-src", "never-written"):
            with pytest.raises(ClientError) as caught:
                client.get_object(Bucket=bucket, Key=key)
            assert code(caught.value) == (404, "NoSuchKey"), key
        with pytest.raises(ClientError) as caught:
            client.put_object(Bucket=bucket, Key="new", Body=b"x")
        assert code(caught.value) == (503, "ServiceUnavailable")
        with pytest.raises(ClientError) as caught:
            client.list_objects_v2(Bucket=bucket)
        assert code(caught.value) == (503, "ServiceUnavailable")
        with pytest.raises(ClientError) as caught:
            client.delete_object(Bucket=bucket, Key="big")
        assert code(caught.value) == (503, "ServiceUnavailable")


def tombstone_files(daemon: Daemon) -> int:
    return sum(1 for path in daemon.backends.values() for _ in Path(path).rglob("tombstone"))


def check_up(daemon: Daemon, seen: dict[tuple[str, str], bytes]) -> None:
    plain = daemon.client()
    deadline = time.monotonic() + 30
    while True:
        try:
            plain.put_object(Bucket=BUCKET, Key="after", Body=b"back")
            break
        except ClientError as exc:
            if time.monotonic() > deadline or code(exc)[0] != 503:
                raise
            time.sleep(0.5)
    secret = daemon.client(access_key="E2ESECRETKEY0001", secret_key=SECRET_KEY)
    for bucket, client in ((BUCKET, plain), (SECRET_BUCKET, secret)):
        for key in ("big", "over", "kept"):
            assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == seen[(bucket, key)]
        client.delete_object(Bucket=bucket, Key="kept")  # frees gone-src's chunks too
    assert tombstone_files(daemon) > 0
    deadline = time.monotonic() + 60  # the GC, then the tombstone sweep (every 5 s)
    while tombstone_files(daemon) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert tombstone_files(daemon) == 0
    status, report = daemon.admin("GET", "/fsck")
    assert status == 200 and report["problems"] == 0, report


def scenario(daemon: Daemon, down: object, up: object) -> None:
    seen = write_everything(daemon)
    # let the GC finish: a GC pass cut by the stop leaves its items leased for 5 minutes
    # (the deleted versions' chunks are gone then, but "gone-src"'s live on in "kept")
    daemon.wait_blobs_settled()
    daemon.stop()
    daemon.start()  # a fresh process: none of those keys' metadata is cached
    for access, bucket in ((None, BUCKET), ("E2ESECRETKEY0001", SECRET_BUCKET)):
        client = (
            daemon.client(access_key=access, secret_key=SECRET_KEY) if access else daemon.client()
        )
        client.head_bucket(Bucket=bucket)  # credentials and bucket, cached for the outage
    state = down()  # type: ignore[operator]
    time.sleep(5.5)  # past the credential cache's TTL: keys come from the outage cache
    check_down(daemon, seen)
    assert "from blobs" in daemon.output()  # served by the fallback, not a cache
    up(state)  # type: ignore[operator]
    check_up(daemon, seen)


def test_sqlite_unreadable_uncached_reads_come_from_blobs(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    spec = DaemonSpec(encryption="inline", memory_cache=False)
    root = _new_root(tmp_path_factory, "fallback-sqlite")
    with running_daemon(spec, root, expect_errors=True) as daemon:
        scenario(daemon, lambda: corrupt(daemon.root), restore)


@pytest.fixture
def pg_relay() -> Iterator[tuple[Switch, str]]:
    with relayed_dsn(pg_dsn()) as relay:
        yield relay


def test_postgres_cut_off_uncached_reads_come_from_blobs(
    tmp_path_factory: pytest.TempPathFactory, pg_relay: tuple[Switch, str]
) -> None:
    switch, dsn = pg_relay
    spec = DaemonSpec(db="postgres", encryption="inline", memory_cache=False, db_dsn=dsn)
    root = _new_root(tmp_path_factory, "fallback-pg")
    with running_daemon(spec, root, expect_errors=True) as daemon:
        scenario(daemon, switch.off, lambda _: switch.on())
