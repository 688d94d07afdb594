"""Envelope encryption over real stores and local-directory backends.

What providers see (nothing), range reads (only the covering segments, one GET per
chunk), tamper detection with and without replicas, per-bucket policy, and the wiring
of inline and file master keys.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.build import Pool, open_pool
from appliance.config import parse_config
from appliance.crypto.aead import SEGMENT, TAG
from appliance.data.blobformat import (
    decode_chunk_header,
    decode_manifest_body,
    decode_sealed_manifest,
    decode_sealed_part,
)
from appliance.errors import DataCorrupted, KeyUnavailable
from backends.base import Backend, BlobStream, ByteRange
from backends.errors import PermanentBackendError
from backends.faults import FaultyBackend
from tests.fixtures_moto import MotoS3

pytestmark = pytest.mark.service
KiB = 1024
CHUNK = 256 * KiB  # four 64 KiB segments per chunk
KEY_A = base64.b64encode(b"A" * 32).decode()
KEY_B = base64.b64encode(b"B" * 32).decode()


def config(
    database: Any,
    tmp_path: Path,
    *,
    enabled: bool = True,
    key: dict[str, Any] | None = None,
    previous: list[dict[str, Any]] | None = None,
    replicas: int = 1,
    buckets: list[dict[str, Any]] | None = None,
) -> Any:
    raw: dict[str, Any] = {
        "database": database,
        "pool": {
            "chunk_size": CHUNK,
            "gc_delay_seconds": 0,
            "replication": {"factor": replicas, "write_quorum": replicas},
        },
        "backends": [{"name": f"d{i}", "type": "local", "path": f"d{i}"} for i in range(3)],
        "buckets": buckets or [{"name": "secret-bucket-name"}],
        "encryption": {"enabled": enabled},
        "cache": {"max_size": 0},  # these tests watch what reaches the backends
    }
    if key is not None or enabled:
        raw["encryption"]["key"] = key or {"inline": KEY_A}
    if previous:
        raw["encryption"]["previous_keys"] = previous
    return parse_config(raw, env={}, base_dir=tmp_path)


class Recorder:
    """A backend wrapper that records every ranged GET (key, start, end)."""

    def __init__(self, inner: Backend, log: list[tuple[str, str, int, int | None]]) -> None:
        self.inner = inner
        self.log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        rng = byte_range or ByteRange()
        self.log.append((self.inner.name, key, rng.start, rng.end))
        return await self.inner.get(key, byte_range)


@pytest.fixture
async def pool(database: Any, tmp_path: Path) -> AsyncIterator[Pool]:
    made = await open_pool(config(database, tmp_path))
    yield made
    await made.close()


async def body(data: bytes, piece: int = 50_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


async def read(pool: Pool, bucket: str, key: str, start: int = 0, end: int | None = None) -> bytes:
    handle = await pool.objects.open_object(bucket, key)
    return b"".join([bytes(p) async for p in pool.objects.read(handle, start, end)])


def blobs(tmp_path: Path) -> dict[str, bytes]:
    """Every blob on every backend: relative path -> bytes."""
    found = {}
    for i in range(3):
        root = tmp_path / f"d{i}"
        for path in root.rglob("*"):
            if path.is_file():
                found[f"d{i}/{path.relative_to(root)}"] = path.read_bytes()
    return found


def windows(data: bytes, width: int = 24, count: int = 40) -> list[bytes]:
    step = max(1, (len(data) - width) // count)
    return [data[i : i + width] for i in range(0, len(data) - width + 1, step)]


async def test_nothing_leaks_to_the_providers(pool: Pool, tmp_path: Path) -> None:
    bucket = "secret-bucket-name"
    text = b"The quick brown fox keeps the launch codes: 0451-7782-9920. " * 90000
    small = b"tiny but very distinctive payload PLAINTEXT-MARKER-77"
    meta = {"owner": "alice-the-distinctive-owner"}
    await pool.objects.put_object(
        bucket, "private/plans.txt", body(text), size=len(text), user_metadata=meta
    )
    await pool.objects.put_object(bucket, "private/small.txt", body(small), size=len(small))
    source = await pool.objects.open_object(bucket, "private/plans.txt")
    await pool.objects.copy_object(source, bucket, "copies/plans-copy.txt")
    upload = await pool.multipart.create(bucket, "multipart/big-secret.bin")
    parts = []
    for number in (1, 2):
        part = await pool.multipart.upload_part(
            upload, number, body(text[: 5 * 1024 * 1024]), size=5 * 1024 * 1024
        )
        parts.append((number, part.etag))
    await pool.multipart.complete(upload, parts)

    stored = blobs(tmp_path)
    assert len(stored) >= 10
    names = [
        bucket.encode(),
        b"private",
        b"plans",
        b"small.txt",
        b"copies",
        b"multipart",
        b"big-secret",
        b"alice-the-distinctive-owner",
        b"owner",
    ]
    secrets = names + windows(text) + windows(small, width=16)
    for path, data in stored.items():
        for needle in secrets:
            assert needle not in path.encode(), (path, needle)
            assert needle not in data, (path, needle)
    # and every object still reads back
    assert await read(pool, bucket, "private/plans.txt") == text
    assert await read(pool, bucket, "copies/plans-copy.txt") == text
    assert await read(pool, bucket, "private/small.txt") == small
    assert await read(pool, bucket, "multipart/big-secret.bin") == text[: 5 * 1024 * 1024] * 2


async def test_identity_is_sealed_in_chunk_zero(pool: Pool, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 5)
    await pool.objects.put_object(
        "secret-bucket-name", "k/one", body(data), size=len(data), user_metadata={"a": "b"}
    )
    handle = await pool.objects.open_object("secret-bucket-name", "k/one")
    first = handle.layout[0]
    blob = (tmp_path / first.locations[0].backend / first.locations[0].blob_key).read_bytes()
    header, _ = decode_chunk_header(blob)
    assert header.encrypted and header.identity is None and header.sealed
    assert header.wrapped_dek == first.chunk.wrapped_dek
    assert header.key_id == first.chunk.key_id
    plain = await pool.encrypting.open_sealed(
        header.chunk_id, header.wrapped_dek or b"", header.key_id or "", header.sealed or b""
    )
    sha256, identity = decode_sealed_part(plain)
    assert sha256 == first.chunk.sha256
    assert identity is not None and (identity.bucket, identity.key) == (
        "secret-bucket-name",
        "k/one",
    )
    assert identity.user_metadata == {"a": "b"} and identity.chunk_count == 4

    # a copy's manifest is sealed too, and opens with its own data key
    await pool.objects.copy_object(handle, "secret-bucket-name", "k/copy")
    copy = await pool.objects.open_object("secret-bucket-name", "k/copy")
    last = copy.layout[-1]
    raw = (tmp_path / last.locations[0].backend / last.locations[0].blob_key).read_bytes()
    sealed = decode_sealed_manifest(raw)
    assert sealed.chunk_id == last.chunk.chunk_id and b"k/copy" not in raw
    manifest = decode_manifest_body(
        await pool.chunks.open_sealed(
            sealed.chunk_id, sealed.wrapped_dek, sealed.key_id, sealed.sealed
        )
    )
    assert (manifest.identity.bucket, manifest.identity.key) == ("secret-bucket-name", "k/copy")
    assert [e.chunk_id for e in manifest.entries] == [p.chunk.chunk_id for p in handle.layout]


async def test_range_reads_fetch_only_the_covering_segments(database: Any, tmp_path: Path) -> None:
    gets: list[tuple[str, str, int, int | None]] = []
    pool = await open_pool(
        config(database, tmp_path),
        wrap_backend=lambda b: Recorder(b, gets),  # type: ignore[arg-type,return-value]
    )
    try:
        data = os.urandom(4 * CHUNK)
        await pool.objects.put_object("secret-bucket-name", "r", body(data), size=len(data))
        cases = [
            (10, 20),  # inside one segment
            (SEGMENT - 5, SEGMENT + 5),  # across a segment boundary
            (CHUNK - 10, CHUNK + 10),  # across a chunk boundary: two chunks, two GETs
            (CHUNK + 3 * SEGMENT, 2 * CHUNK),  # the last segment of a chunk
            (0, len(data)),
        ]
        for a, b in cases:
            gets.clear()
            assert await read(pool, "secret-bucket-name", "r", a, b) == data[a:b]
            chunks_touched = (b - 1) // CHUNK - a // CHUNK + 1
            assert len(gets) == chunks_touched
            fetched = sum((end or 0) - start for _, _, start, end in gets)
            segments = sum(
                (min(b, (c + 1) * CHUNK) - 1 - c * CHUNK) // SEGMENT
                - (max(a, c * CHUNK) - c * CHUNK) // SEGMENT
                + 1
                for c in range(a // CHUNK, (b - 1) // CHUNK + 1)
            )
            assert fetched == segments * (SEGMENT + TAG)
    finally:
        await pool.close()


def _chunk_file(tmp_path: Path, pool_handle: Any, index: int = 0) -> list[Path]:
    placement = pool_handle.layout[index]
    return [tmp_path / loc.backend / loc.blob_key for loc in placement.locations]


def _flip(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def _swap_segments(path: Path) -> None:
    data = path.read_bytes()
    _header, length = decode_chunk_header(data)
    stride = SEGMENT + TAG
    payload = data[length:]
    seg = [payload[i : i + stride] for i in range(0, len(payload), stride)]
    path.write_bytes(data[:length] + seg[1] + seg[0] + b"".join(seg[2:]))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - SEGMENT - TAG])


TAMPERS = {"flipped bit": _flip, "swapped segments": _swap_segments, "truncated": _truncate}
DAMAGED_RANGE = {
    "flipped bit": (CHUNK - 10, CHUNK),
    "swapped segments": (5, 70_000),
    "truncated": (CHUNK - 10, CHUNK),
    "moved blob": (5, 70_000),
}


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("how", [*TAMPERS, "moved blob"])
async def test_tampering_fails_over_to_a_replica_then_fails_clearly(
    database: Any, tmp_path: Path, how: str
) -> None:
    pool = await open_pool(config(database, tmp_path, replicas=2))
    try:
        data = os.urandom(2 * CHUNK)
        await pool.objects.put_object("secret-bucket-name", "t", body(data), size=len(data))
        handle = await pool.objects.open_object("secret-bucket-name", "t")
        first, second = _chunk_file(tmp_path, handle, 0)
        other = _chunk_file(tmp_path, handle, 1)

        def damage(path: Path, sibling: Path) -> None:
            if how == "moved blob":  # another chunk's blob put in this one's place
                shutil.copyfile(sibling, path)
            else:
                TAMPERS[how](path)

        damage(first, other[0])
        # one replica damaged: the read fails over and returns the right bytes
        assert await read(pool, "secret-bucket-name", "t") == data
        assert await read(pool, "secret-bucket-name", "t", 5, 70_000) == data[5:70_000]
        damage(second, other[1])
        with pytest.raises(DataCorrupted):
            await read(pool, "secret-bucket-name", "t")
        a, b = DAMAGED_RANGE[how]  # a range over the damaged segments fails too
        with pytest.raises(DataCorrupted):
            await read(pool, "secret-bucket-name", "t", a, b)
        # the undamaged chunk still reads
        assert await read(pool, "secret-bucket-name", "t", CHUNK, 2 * CHUNK) == data[CHUNK:]
    finally:
        await pool.close()


async def test_per_bucket_policy(database: Any, tmp_path: Path) -> None:
    cfg = config(
        database,
        tmp_path,
        enabled=False,
        key={"inline": KEY_A},
        buckets=[{"name": "plain-bucket"}, {"name": "vault-bucket", "encryption": True}],
    )
    pool = await open_pool(cfg)
    try:
        marker = b"PLAINTEXT-MARKER-" * 100
        await pool.objects.put_object("plain-bucket", "p", body(marker), size=len(marker))
        await pool.objects.put_object("vault-bucket", "v", body(marker), size=len(marker))
        stored = blobs(tmp_path)
        assert sum(marker[:40] in d for d in stored.values()) == 1
        plain = await pool.objects.open_object("plain-bucket", "p")
        hidden = await pool.objects.open_object("vault-bucket", "v")
        assert plain.layout[0].chunk.wrapped_dek is None
        assert hidden.layout[0].chunk.wrapped_dek is not None
        assert await read(pool, "plain-bucket", "p") == marker
        assert await read(pool, "vault-bucket", "v") == marker
    finally:
        await pool.close()


async def test_file_key_and_missing_key(database: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_bytes(os.urandom(32))
    pool = await open_pool(config(database, tmp_path, key={"file": str(key_file)}))
    try:
        await pool.objects.put_object("secret-bucket-name", "f", body(b"abc"), size=3)
        assert await read(pool, "secret-bucket-name", "f") == b"abc"
    finally:
        await pool.close()
    # the same data with another key configured and the old one not in previous_keys
    other = await open_pool(config(database, tmp_path, key={"inline": KEY_B}))
    try:
        with pytest.raises(KeyUnavailable, match="previous_keys"):
            await read(other, "secret-bucket-name", "f")
    finally:
        await other.close()
    key_file.write_text("not a key")
    with pytest.raises(KeyUnavailable, match="master key file"):
        await open_pool(config(database, tmp_path, key={"file": str(key_file)}))


async def test_unencrypted_data_stays_readable_when_encryption_is_turned_on(
    database: Any, tmp_path: Path
) -> None:
    plain = await open_pool(config(database, tmp_path, enabled=False))
    try:
        await plain.objects.put_object("secret-bucket-name", "old", body(b"old data"), size=8)
    finally:
        await plain.close()
    pool = await open_pool(config(database, tmp_path))
    try:
        await pool.objects.put_object("secret-bucket-name", "new", body(b"new data"), size=8)
        assert await read(pool, "secret-bucket-name", "old") == b"old data"
        assert await read(pool, "secret-bucket-name", "new") == b"new data"
    finally:
        await pool.close()


async def test_fault_wrapper_still_composes(database: Any, tmp_path: Path) -> None:
    """A backend failing every GET on one replica: reads fail over, not corrupt."""
    wrapped: list[FaultyBackend] = []

    def wrap(backend: Backend) -> Backend:
        faulty = FaultyBackend(backend)
        wrapped.append(faulty)
        return faulty

    pool = await open_pool(config(database, tmp_path, replicas=2), wrap_backend=wrap)
    try:
        data = os.urandom(CHUNK + 7)
        await pool.objects.put_object("secret-bucket-name", "x", body(data), size=len(data))
        handle = await pool.objects.open_object("secret-bucket-name", "x")
        broken = handle.layout[0].locations[0].backend
        next(w for w in wrapped if w.name == broken).fail_always(
            "get", PermanentBackendError("disk gone")
        )
        assert await read(pool, "secret-bucket-name", "x") == data
    finally:
        await pool.close()


async def test_nothing_leaks_to_an_s3_provider(
    database: Any, tmp_path: Path, moto_s3: MotoS3
) -> None:
    """The same check against an S3 backend (moto), listing the provider's bucket."""
    bucket = moto_s3.new_bucket()
    raw = {
        "database": database,
        "pool": {"chunk_size": CHUNK, "gc_delay_seconds": 0},
        "encryption": {"enabled": True, "key": {"inline": KEY_A}},
        "backends": [
            {
                "name": "moto",
                "type": "s3",
                "endpoint": moto_s3.endpoint_url,
                "region": moto_s3.region,
                "bucket": bucket,
                "prefix": "pool",
                "access_key": moto_s3.access_key,
                "secret_key": moto_s3.secret_key,
                "path_style": True,
            }
        ],
        "buckets": [{"name": "secret-bucket-name"}],
    }
    pool = await open_pool(parse_config(raw, env={}, base_dir=tmp_path))
    try:
        text = b"Moto-visible plaintext that must stay hidden, line after line. " * 20_000
        await pool.objects.put_object(
            "secret-bucket-name",
            "hidden/dir/report-2026.txt",
            body(text),
            size=len(text),
            headers={"Content-Type": "text/x-hidden-report"},
            user_metadata={"project": "codename-bluebird"},
        )
        assert await read(pool, "secret-bucket-name", "hidden/dir/report-2026.txt") == text
        assert (
            await read(pool, "secret-bucket-name", "hidden/dir/report-2026.txt", 70_000, 300_000)
            == text[70_000:300_000]
        )
    finally:
        await pool.close()
    keys = moto_s3.keys(bucket)
    assert len(keys) == -(-len(text) // CHUNK)
    needles = [
        b"secret-bucket-name",
        b"hidden",
        b"report-2026",
        b"x-hidden-report",
        b"codename-bluebird",
        b"project",
        *windows(text),
    ]
    for key in keys:
        response = moto_s3.client.get_object(Bucket=bucket, Key=key)
        data = response["Body"].read()
        assert not response.get("Metadata")
        for needle in needles:
            assert needle not in key.encode(), (key, needle)
            assert needle not in data, (key, needle)
