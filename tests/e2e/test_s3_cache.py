"""The object cache end to end: the daemon (memory cache on by default) answers repeated
GETs without reading the backends again, and an overwrite is visible at once.

The backends' monthly usage counters (flushed to the store when the daemon stops) tell
how many bytes were read from them: every chunk is read from a backend exactly once.
"""

from __future__ import annotations

import random

import pytest

from tests.e2e.conftest import CHUNK_SIZE, DaemonFactory, DaemonSpec

pytestmark = pytest.mark.e2e


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_repeated_gets_read_each_chunk_from_a_backend_once(
    daemon_factory: DaemonFactory, db: str
) -> None:
    daemon = daemon_factory(DaemonSpec(db=db))
    s3 = daemon.client()
    small = data_of(64 * 1024, 1)
    large = data_of(3 * CHUNK_SIZE + 1234, 2)  # four chunks
    s3.put_object(Bucket=daemon.bucket, Key="small", Body=small)
    s3.put_object(Bucket=daemon.bucket, Key="large", Body=large)
    for _ in range(5):
        assert s3.get_object(Bucket=daemon.bucket, Key="small")["Body"].read() == small
        assert s3.get_object(Bucket=daemon.bucket, Key="large")["Body"].read() == large
    got = s3.get_object(Bucket=daemon.bucket, Key="large", Range="bytes=1000-2500000")
    assert got["Body"].read() == large[1000:2500001]
    # an overwrite is read back at once (new chunk ids), and read from a backend once
    newer = data_of(64 * 1024, 3)
    s3.put_object(Bucket=daemon.bucket, Key="small", Body=newer)
    for _ in range(3):
        assert s3.get_object(Bucket=daemon.bucket, Key="small")["Body"].read() == newer
    daemon.stop_and_check()
    rows = daemon.query("SELECT backend, egress_bytes FROM usage")
    egress = sum(int(r["egress_bytes"]) for r in rows)
    # chunks of at most 256 KiB (the small objects, the large one's 1,234-byte tail) are
    # kept in memory as they are written: no backend read at all
    assert egress == 3 * CHUNK_SIZE, rows
