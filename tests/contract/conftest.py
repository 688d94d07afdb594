"""Fixtures for the backend contract suite: every Backend, built fresh for each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from backends.base import Backend
from backends.blobwriter import BlobWriter
from backends.diskcache import DiskCache, DiskCachedBackend
from backends.local import LocalBackend
from backends.memory import MemoryBackend
from tests.fixtures_moto import MotoS3, make_s3_backend, moto_s3

__all__ = ["moto_s3"]

BACKEND_KINDS = ["memory", "local", "local-writer", "s3", "s3-prefixed", "local-diskcached"]
"""``local-writer``: a local backend whose small puts a ``BlobWriter`` process makes;
``local-diskcached``: a local backend behind the disk cache, which must keep the contract."""


BackendFactory = Callable[[str], Backend]


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def make_backend(request: pytest.FixtureRequest, local_root: Path) -> BackendFactory:
    """Build a fresh backend of a kind; S3 kinds get their own bucket on moto."""

    def build(kind: str) -> Backend:
        if kind == "memory":
            return MemoryBackend("mem")
        if kind == "local":
            return LocalBackend("local", local_root, fsync=True)
        if kind == "local-writer":
            return LocalBackend("local", local_root, fsync=True, writer=BlobWriter())
        if kind == "local-diskcached":
            cache = DiskCache(local_root.parent / "diskcache", 64 * 1024**2)
            return DiskCachedBackend(LocalBackend("local", local_root, fsync=True), cache)
        if kind in ("s3", "s3-prefixed"):
            moto: MotoS3 = request.getfixturevalue("moto_s3")
            bucket = moto.new_bucket()
            request.addfinalizer(lambda: moto.delete_bucket(bucket))
            prefix = "pool/one" if kind == "s3-prefixed" else ""
            return make_s3_backend(moto, bucket, prefix=prefix)
        raise ValueError(kind)

    return build


@pytest.fixture(params=BACKEND_KINDS)
async def backend(
    request: pytest.FixtureRequest, make_backend: BackendFactory
) -> AsyncIterator[Backend]:
    """Each backend kind in turn, closed after the test."""
    b = make_backend(request.param)
    if isinstance(b, DiskCachedBackend):
        await b.cache.open()
    try:
        yield b
    finally:
        await b.close()
        if isinstance(b, LocalBackend) and b.writer is not None:
            await b.writer.close()
        if isinstance(b, DiskCachedBackend):
            await b.cache.close()
