"""FileService with write-back: small files commit after their close returned.

Real stores (SQLite and PostgreSQL) and local-directory backends; the commit runs as a
task of its own, so each test checks what is true before and after ``settle``."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.build import Pool, make_file_service
from appliance.errors import NoSuchKey
from appliance.meta.errors import StoreUnavailable
from appliance.services import filewrites
from appliance.services.files import AttrChanges, FileService
from tests.service.test_objects import make_pool, read_all

pytestmark = pytest.mark.service
BUCKET = "bkt"


@pytest.fixture
async def pool(database: Any, tmp_path: Path) -> AsyncIterator[Pool]:
    made = await make_pool(database, tmp_path, ["4MiB", "4MiB"])
    yield made
    await made.close()


@pytest.fixture
def files(pool: Pool) -> FileService:
    service = make_file_service(pool, write_back=True)
    service.prepare()
    return service


async def close_new(files: FileService, path: str, data: bytes) -> None:
    node = await files.create(BUCKET, path, 0o640, 1000, 1000)
    await files.write(node, 0, data)
    await files.flush(node)
    await files.release(node)


async def test_close_returns_before_the_commit_and_settle_waits_for_it(
    pool: Pool, files: FileService
) -> None:
    await close_new(files, "a.txt", b"hello")
    assert files.commits_behind == 1
    # the mount sees the file at once, from its spool
    assert (await files.stat(BUCKET, "a.txt")).size == 5
    node = await files.open(BUCKET, "a.txt")
    assert await files.read(node, 0, 100) == b"hello"
    await files.release(node)
    await files.settle()
    assert files.commits_behind == 0
    assert await read_all(pool, "a.txt") == b"hello"
    version = (await pool.objects.open_object(BUCKET, "a.txt")).version
    assert version.size == 5
    assert list(files._spool_dir.iterdir()) == []


async def test_fsync_waits_for_the_commit(pool: Pool, files: FileService) -> None:
    node = await files.create(BUCKET, "f", 0o644, 1000, 1000)
    await files.write(node, 0, b"durable")
    await files.flush(node, fsync=True)
    assert files.commits_behind == 0
    assert await read_all(pool, "f") == b"durable"
    await files.release(node)


async def test_rename_and_unlink_right_after_close_see_the_committed_file(
    pool: Pool, files: FileService
) -> None:
    await close_new(files, "tmp.1", b"one")
    await files.rename(BUCKET, "tmp.1", BUCKET, "final")  # the write-then-rename idiom
    await close_new(files, "gone", b"two")
    await files.unlink(BUCKET, "gone")
    await files.settle()
    assert await read_all(pool, "final") == b"one"
    for absent in ("tmp.1", "gone"):  # no commit landed after the change
        with pytest.raises(NoSuchKey):
            await pool.objects.open_object(BUCKET, absent)


async def test_chmod_and_xattr_after_close_reach_the_committed_version(
    pool: Pool, files: FileService
) -> None:
    await close_new(files, "m", b"meta")
    await files.set_attr(BUCKET, "m", AttrChanges(mode=0o600))
    await files.set_xattr(BUCKET, "m", "tag", "blue")
    await files.settle()
    while files.commits_behind:  # the second commit (metadata only) follows the first
        await files.settle()
    fresh = make_file_service(pool)  # what another mount, or a restart, would see
    attr = await fresh.stat(BUCKET, "m")
    assert stat.S_IMODE(attr.mode) == 0o600
    assert await fresh.get_xattr(BUCKET, "m", "tag") == "blue"
    assert await read_all(pool, "m") == b"meta"


async def test_a_failed_commit_is_retried_and_the_mount_keeps_showing_the_file(
    pool: Pool,
    files: FileService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(filewrites, "RETRY_DELAYS", (0.5, 0.05))
    store = pool.objects._store
    failing = _FailOnce(store)
    pool.objects._store = failing  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="cairn.files"):
        await close_new(files, "r", b"retry me")
        started = asyncio.get_running_loop().time()
        await files.settle()  # the first attempt failed: settle does not wait for retries
        assert asyncio.get_running_loop().time() - started < 0.4
        assert failing.failures == 1
        assert (await files.stat(BUCKET, "r")).size == 8
        while files.commits_behind:
            await files.settle()
            await asyncio.sleep(0.02)
    pool.objects._store = store  # type: ignore[assignment]
    assert await read_all(pool, "r") == b"retry me"
    assert "retrying" in caplog.text


async def test_commit_all_at_unmount_commits_what_is_behind(pool: Pool, files: FileService) -> None:
    for i in range(5):
        await close_new(files, f"u{i}", bytes([i]) * 100)
    await files.commit_all()
    for i in range(5):
        assert await read_all(pool, f"u{i}") == bytes([i]) * 100


async def test_large_files_still_commit_before_close_returns(
    pool: Pool, files: FileService
) -> None:
    big = b"x" * (pool.config.pool.chunk_size + 1)
    await close_new(files, "big", big)
    assert files.commits_behind == 0
    assert await read_all(pool, "big") == big


class _FailOnce:
    """The real store, with the first ``put_version`` failing as if the database went
    away."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put_version(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures == 0:
            self.failures += 1
            raise StoreUnavailable("the database went away")
        return await self._inner.put_version(*args, **kwargs)
