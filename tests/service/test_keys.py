"""Key rotation, resumed rotation, encrypt/decrypt-existing and Vault Transit, over real
stores, local-directory backends and a local Vault Transit server."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from appliance.build import Pool, open_pool
from appliance.config import parse_config
from appliance.crypto.keys import KeySource, VaultTransitKey
from appliance.errors import KeyUnavailable
from appliance.services.keys import Job, JobRunning, JobState
from frontends.cli import cli
from tests.vault_transit import VaultTransitServer, vault

pytestmark = pytest.mark.service
__all__ = ["vault"]
CHUNK = 64 * 1024
KEYS = [{"inline": base64.b64encode(bytes([n]) * 32).decode()} for n in range(1, 4)]
BUCKET = "rot-bucket"


def cfg(
    database: Any,
    tmp_path: Path,
    *,
    key: dict[str, Any] | None,
    previous: list[dict[str, Any]] = (),  # type: ignore[assignment]
    enabled: bool = True,
    quotas: list[str | None] | None = None,
) -> Any:
    encryption: dict[str, Any] = {"enabled": enabled, "previous_keys": list(previous)}
    if key is not None:
        encryption["key"] = key
    return parse_config(
        {
            "database": database,
            "pool": {"chunk_size": CHUNK, "gc_delay_seconds": 0},
            "cache": {"max_size": 0},  # reads must reach the backends and the key ring
            "encryption": encryption,
            "backends": [
                {"name": f"d{i}", "type": "local", "path": f"d{i}", "quota_bytes": q}
                for i, q in enumerate(quotas or [None, None])
            ],
            "buckets": [{"name": BUCKET}],
        },
        env={},
        base_dir=tmp_path,
    )


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read(pool: Pool, key: str) -> bytes:
    handle = await pool.objects.open_object(BUCKET, key)
    return b"".join([bytes(p) async for p in pool.objects.read(handle)])


async def write_objects(
    pool: Pool, count: int, size: int = 3 * CHUNK + 11, prefix: str = "obj/"
) -> dict[str, bytes]:
    written = {}
    for i in range(count):
        data = os.urandom(size + i)
        await pool.objects.put_object(BUCKET, f"{prefix}{i:03d}", body(data), size=len(data))
        written[f"{prefix}{i:03d}"] = data
    return written


async def check_all(pool: Pool, written: dict[str, bytes]) -> None:
    for key, data in written.items():
        assert await read(pool, key) == data, key


def all_blob_bytes(tmp_path: Path) -> dict[Path, bytes]:
    return {
        p: p.read_bytes() for i in range(2) for p in (tmp_path / f"d{i}").rglob("*") if p.is_file()
    }


async def test_rotate_twice_then_drop_the_oldest_key(database: Any, tmp_path: Path) -> None:
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[0]))
    try:
        written = await write_objects(pool, 6)
        first_id = pool.encrypting.keys.current_id  # type: ignore[union-attr]
        before = all_blob_bytes(tmp_path)
    finally:
        await pool.close()

    # rotation 1: key 2 current, key 1 retired
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[1], previous=[KEYS[0]]))
    try:
        status = await pool.keys.status()
        assert status.chunks_by_key == {first_id: 4 * 6}
        more = await write_objects(pool, 2, size=10, prefix="new/")  # new writes: key 2
        seen: list[int] = []
        result = await pool.keys.rotate(on_progress=lambda p: seen.append(p.done))
        assert result.state is JobState.DONE and result.total == result.done == 24
        assert seen and seen[-1] == 24
        status = await pool.keys.status()
        assert status.chunks_by_key == {pool.encrypting.keys.current_id: 26}  # type: ignore[union-attr]
        written.update(more)
        await check_all(pool, written)
    finally:
        await pool.close()
    # rotation re-wraps rows only: no blob was rewritten
    after = all_blob_bytes(tmp_path)
    assert all(after[p] == data for p, data in before.items())

    # rotation 2: key 3 current, keys 2 and 1 retired; then drop key 1 (rotated away
    # twice) and key 2 once rotation 2 finished: everything still reads
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[2], previous=[KEYS[1], KEYS[0]]))
    try:
        assert (await pool.keys.rotate()).done == 26
    finally:
        await pool.close()
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[2]))
    try:
        await check_all(pool, written)
        assert (await pool.keys.rotate()).done == 0  # nothing left to do
    finally:
        await pool.close()


class FailingAfter:
    """A key source that starts failing after ``limit`` operations (a crash mid-run)."""

    def __init__(self, inner: KeySource, limit: int) -> None:
        self.inner = inner
        self.left = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def wrap(self, plaintext: bytes) -> tuple[bytes, str]:
        self.left -= 1
        if self.left < 0:
            raise KeyUnavailable("simulated outage")
        return await self.inner.wrap(plaintext)

    async def rewrap(self, wrapped: bytes, key_id: str) -> tuple[bytes, str]:
        return await self.wrap(await self.inner.unwrap(wrapped, key_id))


async def test_an_interrupted_rotation_resumes(database: Any, tmp_path: Path) -> None:
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[0]))
    try:
        written = await write_objects(pool, 10, size=20)  # 10 chunks
    finally:
        await pool.close()
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[1], previous=[KEYS[0]]))
    try:
        ring = pool.encrypting.keys
        assert ring is not None
        real = ring.current
        ring.current = FailingAfter(real, 6)  # type: ignore[assignment]
        pool.keys._batch = 3  # type: ignore[attr-defined]
        with pytest.raises(KeyUnavailable, match="simulated"):
            await pool.keys.rotate()
        stopped = await pool.keys.progress(Job.ROTATE)
        assert stopped is not None and stopped.state is JobState.FAILED
        assert stopped.done == 6 and stopped.total == 10 and "simulated" in (stopped.error or "")
        status = await pool.keys.status()
        assert sorted(status.chunks_by_key.values()) == [4, 6]
        ring.current = real
        finished = await pool.keys.rotate()
        assert finished.state is JobState.DONE and finished.done == 10 == finished.total
        assert finished.started_at == stopped.started_at  # the same job, resumed
        await check_all(pool, written)
    finally:
        await pool.close()
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[1]))
    try:
        await check_all(pool, written)
    finally:
        await pool.close()


async def test_encrypt_existing_then_decrypt_existing(database: Any, tmp_path: Path) -> None:
    marker = b"UNENCRYPTED-MARKER-" * 5000
    pool = await open_pool(cfg(database, tmp_path, key=None, enabled=False))
    try:
        await pool.objects.put_object(
            BUCKET, "m", body(marker), size=len(marker), user_metadata={"k": "v"}
        )
        written = await write_objects(pool, 3)
        before = await pool.objects.head_object(BUCKET, "m")
        source = await pool.objects.open_object(BUCKET, "m")
        await pool.objects.copy_object(source, BUCKET, "m-copy")  # chunks + a manifest
    finally:
        await pool.close()
    written["m"] = written["m-copy"] = marker
    assert any(marker[:40] in d for d in all_blob_bytes(tmp_path).values())

    pool = await open_pool(cfg(database, tmp_path, key=KEYS[0]))
    try:
        result = await pool.keys.encrypt_existing()
        assert result.state is JobState.DONE
        assert (result.total, result.done, result.changed) == (5, 5, 5)
        await check_all(pool, written)
        after = await pool.objects.head_object(BUCKET, "m")
        assert after.etag == before.etag and after.user_metadata == {"k": "v"}
        assert after.version_id > before.version_id
        while await pool.gc.run_once():
            pass
        assert not any(marker[:40] in d for d in all_blob_bytes(tmp_path).values())
        status = await pool.keys.status()
        assert "none" not in status.chunks_by_key
        assert (await pool.keys.encrypt_existing()).changed == 0  # idempotent
    finally:
        await pool.close()

    pool = await open_pool(cfg(database, tmp_path, key=KEYS[0], enabled=False))
    try:
        copy = await pool.objects.open_object(BUCKET, "m-copy")
        assert all(p.chunk.wrapped_dek is not None for p in copy.layout)
        result = await pool.keys.decrypt_existing()
        assert result.changed == 5
        await check_all(pool, written)
        assert set((await pool.keys.status()).chunks_by_key) == {"none"}
    finally:
        await pool.close()


async def test_conversion_pauses_when_there_is_no_room_and_resumes(
    database: Any, tmp_path: Path
) -> None:
    pool = await open_pool(cfg(database, tmp_path, key=None, enabled=False, quotas=["1MiB"]))
    try:
        written = await write_objects(pool, 3, size=200 * 1024)  # ~600 KiB of 1 MiB
    finally:
        await pool.close()
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[0], quotas=["1MiB"]))
    try:
        result = await pool.keys.encrypt_existing()
        assert result.state is JobState.PAUSED and "free space" in (result.error or "")
        assert 0 < result.changed < 3
        while await pool.gc.run_once():  # the old copies go
            pass
        resumed = await pool.keys.encrypt_existing()
        while resumed.state is JobState.PAUSED:
            while await pool.gc.run_once():
                pass
            resumed = await pool.keys.encrypt_existing()
        assert resumed.state is JobState.DONE and resumed.done == 3
        assert resumed.changed == 3  # counters carry over a resumed job
        await check_all(pool, written)
    finally:
        await pool.close()


async def test_vault_transit_keys(database: Any, tmp_path: Path, vault: VaultTransitServer) -> None:
    token_file = tmp_path / "vault-token"
    token_file.write_text("root-token\n")
    key = {"vault": {"address": vault.address, "key_name": "cairn", "token_file": str(token_file)}}
    pool = await open_pool(cfg(database, tmp_path, key=key))
    try:
        written = await write_objects(pool, 3)
        assert pool.encrypting.keys is not None
        assert pool.encrypting.keys.current_id == "vault:transit/cairn:v1"
        # a renewed token on disk is picked up when the old one is refused
        vault.tokens = {"renewed-token"}
        token_file.write_text("renewed-token\n")
        pool.encrypting._data_keys.clear()  # type: ignore[attr-defined]
        await check_all(pool, written)
        assert vault.calls["decrypt"] >= 12
        # rotation: Vault makes version 2, Cairn re-wraps inside Vault (rewrap endpoint)
        result = await pool.keys.rotate(new_vault_version=True)
        assert result.done == 12 and vault.calls["rotate"] == 1
        # one batched Transit call re-wrapped all 12 data keys inside Vault
        assert vault.calls["rewrap"] == 1 and vault.calls["rewrap_items"] == 12
        status = await pool.keys.status()
        assert status.chunks_by_key == {"vault:transit/cairn:v2": 12}
        vault.min_decryption_version["cairn"] = 2  # v1 retired in Vault
        pool.encrypting._data_keys.clear()  # type: ignore[attr-defined]
        await check_all(pool, written)
        vault.down = True
        pool.encrypting._data_keys.clear()  # type: ignore[attr-defined]
        with pytest.raises(KeyUnavailable, match="503"):
            await read(pool, "obj/000")
    finally:
        await pool.close()
    with pytest.raises(KeyUnavailable):
        await open_pool(cfg(database, tmp_path, key=key))  # Vault down at start: clear error


async def test_cli_status_rotate_and_generate(database: Any, tmp_path: Path) -> None:
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[0]))
    try:
        written = await write_objects(pool, 2, size=10)
    finally:
        await pool.close()
    raw = {
        "database": database,
        "pool": {"chunk_size": CHUNK},
        "encryption": {"enabled": True, "key": KEYS[1], "previous_keys": [KEYS[0]]},
        "backends": [{"name": f"d{i}", "type": "local", "path": f"d{i}"} for i in range(2)],
        "buckets": [{"name": BUCKET}],
    }
    config_file = tmp_path / "cairn.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    runner = CliRunner()

    def run(*args: str) -> Result:
        # the CLI runs its own event loop: call it from a worker thread
        return runner.invoke(cli, [*args, "--config", str(config_file)], catch_exceptions=False)

    result = await asyncio.to_thread(run, "admin", "keys", "status")
    assert result.exit_code == 0, result.output
    assert "chunks local:" in result.output and ": 2" in result.output
    result = await asyncio.to_thread(run, "admin", "keys", "rotate")
    assert result.exit_code == 0, result.output
    assert "rotate: done, 2/2 (100%), 2 changed" in result.output
    result = await asyncio.to_thread(run, "admin", "keys", "encrypt-existing")
    assert result.exit_code == 0 and "encrypt: done, 2/2 (100%), 0 changed" in result.output
    generated = runner.invoke(cli, ["admin", "keys", "generate"])
    assert len(base64.b64decode(generated.output.strip())) == 32
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[1]))
    try:
        await check_all(pool, written)
    finally:
        await pool.close()
    config_file.write_text("encryption: {enabled: true}\nbackends: []\n")
    result = await asyncio.to_thread(run, "admin", "keys", "rotate")
    assert result.exit_code == 1 and "encryption.key: required" in result.output


class Slow:
    """A key source whose re-wraps take a while, so a background job can be watched."""

    def __init__(self, inner: KeySource) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def wrap(self, plaintext: bytes) -> tuple[bytes, str]:
        await asyncio.sleep(0.02)
        return await self.inner.wrap(plaintext)


async def test_background_rotation_start_stop_resume(database: Any, tmp_path: Path) -> None:
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[0]))
    try:
        written = await write_objects(pool, 12, size=20)
    finally:
        await pool.close()
    pool = await open_pool(cfg(database, tmp_path, key=KEYS[1], previous=[KEYS[0]]))
    try:
        ring = pool.chunks.keys
        assert ring is not None
        real = ring.current
        ring.current = Slow(real)  # type: ignore[assignment]
        pool.keys._batch = 2  # type: ignore[attr-defined]
        pool.keys._concurrency = 1  # type: ignore[attr-defined]
        began = await pool.keys.start(Job.ROTATE)
        assert began.state is JobState.RUNNING and began.total == 12
        assert pool.keys.running(Job.ROTATE)
        with pytest.raises(JobRunning):
            await pool.keys.start(Job.ROTATE)
        for _ in range(1000):  # bounded: 10 s at most
            seen = await pool.keys.progress(Job.ROTATE)
            if seen is not None and seen.done >= 4:
                break
            await asyncio.sleep(0.01)
        stopped = await pool.keys.stop(Job.ROTATE)
        assert stopped is not None and stopped.state is JobState.FAILED
        assert stopped.error == "cancelled" and 4 <= stopped.done < 12
        assert not pool.keys.running(Job.ROTATE)
        ring.current = real
        await pool.keys.start(Job.ROTATE)
        finished = await pool.keys.wait(Job.ROTATE)
        assert finished is not None and finished.state is JobState.DONE and finished.done == 12
        await check_all(pool, written)
    finally:
        await pool.close()


async def test_vault_batch_rewrap_reports_a_bad_item(vault: VaultTransitServer) -> None:
    key = VaultTransitKey(vault.address, "cairn", token="root-token")
    try:
        await key.open()
        good, key_id = await key.wrap(b"k" * 44)
        vault.rotate("cairn")
        done = await key.rewrap_batch([(good, key_id), (good, key_id)])
        assert [k for _, k in done] == ["vault:transit/cairn:v2"] * 2
        assert await key.unwrap(done[0][0], done[0][1]) == b"k" * 44
        with pytest.raises(KeyUnavailable, match="Vault rewrap"):
            await key.rewrap_batch([(good, key_id), (b"vault:v1:AAAA", key_id)])
        with pytest.raises(KeyUnavailable, match="not this Vault key"):
            await key.rewrap_batch([(good, "local:0123")])
    finally:
        await key.close()
