"""The Backend contract: one suite run against memory, local and S3 (moto), plus
backend-specific edges, the retry wrapper and the fault injector."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from backends.base import Backend, BlobInfo, BlobStream, ByteRange
from backends.blobwriter import BlobWriter
from backends.errors import (
    BackendFull,
    BlobNotFound,
    InvalidBlobKey,
    PermanentBackendError,
    TransientBackendError,
    is_transient,
)
from backends.faults import FaultyBackend
from backends.local import TEMP_PREFIX, LocalBackend
from backends.memory import MemoryBackend
from backends.retry import RetryingBackend
from backends.s3 import S3Backend, map_s3_error
from tests.fixtures_moto import MotoS3, free_port, make_s3_backend, moto_unavailable

pytestmark = pytest.mark.contract

BackendFactory = Callable[[str], Backend]

MiB = 1024 * 1024


# -- helpers -------------------------------------------------------------------------


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def read_all(stream: BlobStream) -> bytes:
    out = bytearray()
    try:
        async for piece in stream:
            out += piece
    finally:
        await stream.aclose()
    return bytes(out)


async def drain(stream: BlobStream, into: bytearray) -> None:
    """Append the stream's pieces to ``into`` (so a test can see what arrived before an error)."""
    async for piece in stream:
        into += piece


async def get_bytes(b: Backend, key: str, byte_range: ByteRange | None = None) -> bytes:
    return await read_all(await b.get(key, byte_range))


async def chunks(data: bytes, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        await asyncio.sleep(0)
        yield data[i : i + piece]


async def list_keys(b: Backend, prefix: str = "", **kwargs: object) -> list[str]:
    return [info.key async for info in b.list(prefix, **kwargs)]  # type: ignore[arg-type]


async def failing_body(data: bytes) -> AsyncIterator[bytes]:
    yield data
    raise RuntimeError("client went away")


# -- the contract, on every backend ---------------------------------------------------


async def test_put_get_round_trip(backend: Backend) -> None:
    data = blob(1000)
    info = await backend.put("a/b/c", data, size=len(data))
    assert info.key == "a/b/c"
    assert info.size == 1000
    assert await get_bytes(backend, "a/b/c") == data


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
async def test_put_accepts_buffers(backend: Backend, wrap: Callable[[bytes], object]) -> None:
    data = blob(300, seed=1)
    await backend.put("k", wrap(data), size=300)  # type: ignore[arg-type]
    assert await get_bytes(backend, "k") == data


async def test_put_async_iterable(backend: Backend) -> None:
    data = blob(200_000, seed=2)
    info = await backend.put("streamed", chunks(data, 7_000), size=len(data))
    assert info.size == len(data)
    assert await get_bytes(backend, "streamed") == data
    assert (await backend.head("streamed")).size == len(data)


async def test_empty_blob(backend: Backend) -> None:
    await backend.put("empty", b"", size=0)
    assert await get_bytes(backend, "empty") == b""
    assert (await backend.head("empty")).size == 0
    assert await get_bytes(backend, "empty", ByteRange(0, 10)) == b""
    assert await get_bytes(backend, "empty", ByteRange(5)) == b""
    await backend.put("empty-stream", chunks(b""), size=0)
    assert await list_keys(backend) == ["empty", "empty-stream"]


async def test_large_blob_streams_in_pieces(backend: Backend) -> None:
    data = os.urandom(20 * MiB)
    await backend.put("big/blob", chunks(data, MiB), size=len(data))
    stream = await backend.get("big/blob")
    digest = hashlib.sha256()
    total = biggest = 0
    async for piece in stream:
        digest.update(piece)
        total += len(piece)
        biggest = max(biggest, len(piece))
    await stream.aclose()
    assert total == len(data)
    assert digest.digest() == hashlib.sha256(data).digest()
    # pieces are bounded by one default chunk (8 MiB): a get streams, it never returns a
    # large blob as one piece
    assert biggest <= 8 * MiB, "a get must stream, not return the blob as one piece"


@pytest.mark.parametrize(
    ("make_body", "size", "error"),
    [
        pytest.param(lambda: b"x" * 11, 10, PermanentBackendError, id="buffer-too-long"),
        pytest.param(lambda: b"x" * 9, 10, PermanentBackendError, id="buffer-too-short"),
        pytest.param(lambda: chunks(b"x" * 11, 3), 10, PermanentBackendError, id="stream-too-long"),
        pytest.param(lambda: chunks(b"x" * 9, 3), 10, TransientBackendError, id="stream-too-short"),
        pytest.param(lambda: failing_body(b"x" * 5), 10, TransientBackendError, id="stream-raises"),
    ],
)
async def test_size_mismatch_rejected_and_nothing_left(
    backend: Backend, make_body: Callable[[], object], size: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await backend.put("dir/bad", make_body(), size=size)  # type: ignore[arg-type]
    with pytest.raises(BlobNotFound):
        await backend.head("dir/bad")
    assert await list_keys(backend) == []


async def test_failed_put_keeps_previous_blob(backend: Backend) -> None:
    await backend.put("k", b"old", size=3)
    with pytest.raises(TransientBackendError):
        await backend.put("k", chunks(b"new-but-short"), size=100)
    assert await get_bytes(backend, "k") == b"old"


async def test_overwrite_replaces(backend: Backend) -> None:
    await backend.put("k", b"first version", size=13)
    await backend.put("k", b"second", size=6)
    assert await get_bytes(backend, "k") == b"second"
    assert (await backend.head("k")).size == 6
    assert await list_keys(backend) == ["k"]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, None),
        (10, None),
        (10, 20),
        (0, 1),
        (99, None),
        (90, 200),  # end beyond size: clipped
        (100, None),  # start at size: empty
        (150, None),  # start beyond size: empty
        (150, 160),
        (5, 5),  # empty range
    ],
)
async def test_ranges(backend: Backend, start: int, end: int | None) -> None:
    data = blob(100, seed=3)
    await backend.put("r", data, size=100)
    assert await get_bytes(backend, "r", ByteRange(start, end)) == data[start:end]


async def test_head(backend: Backend) -> None:
    data = blob(4321, seed=4)
    await backend.put("x/y", data, size=len(data))
    info = await backend.head("x/y")
    assert info.key == "x/y"
    assert info.size == 4321
    assert info.modified is not None


async def test_missing_blob(backend: Backend) -> None:
    with pytest.raises(BlobNotFound):
        await backend.head("nope")
    with pytest.raises(BlobNotFound):
        await backend.get("nope")
    with pytest.raises(BlobNotFound):
        await backend.get("nope/deeper", ByteRange(5, 10))
    with pytest.raises(BlobNotFound):
        await backend.get("nope", ByteRange(3, 3))
    await backend.put("dir/real", b"1", size=1)
    with pytest.raises(BlobNotFound):
        await backend.head("dir")  # a "directory" is not a blob
    with pytest.raises(BlobNotFound):
        await backend.get("dir")


async def test_delete_is_idempotent(backend: Backend) -> None:
    await backend.put("d/k", b"data", size=4)
    await backend.delete("d/k")
    with pytest.raises(BlobNotFound):
        await backend.head("d/k")
    await backend.delete("d/k")
    await backend.delete("never/existed")
    assert await list_keys(backend) == []
    await backend.put("d/k", b"again", size=5)  # the key is usable after a delete
    assert await get_bytes(backend, "d/k") == b"again"


async def test_list_prefix_start_after_and_pages(backend: Backend) -> None:
    keys = ["p/1", "p/2", "p/3", "p/4", "p/5", "p/6", "p/7"]
    for i, key in enumerate(keys):
        await backend.put(key, b"x" * i, size=i)
    await backend.put("q/1", b"", size=0)
    await backend.put("pp", b"", size=0)

    infos = [info async for info in backend.list("p/", page_size=2)]
    assert [i.key for i in infos] == keys
    assert [i.size for i in infos] == list(range(7))
    assert await list_keys(backend, page_size=2) == [*keys, "pp", "q/1"]
    assert await list_keys(backend, "p") == [*keys, "pp"]
    assert await list_keys(backend, "p/", start_after="p/3", page_size=2) == keys[3:]
    assert await list_keys(backend, "p/", start_after="p/35", page_size=2) == keys[3:]
    assert await list_keys(backend, "", start_after="p/7", page_size=2) == ["pp", "q/1"]
    assert await list_keys(backend, "", start_after="a", page_size=3) == [*keys, "pp", "q/1"]
    assert await list_keys(backend, "p/", start_after="z") == []
    assert await list_keys(backend, "nothing/") == []
    assert await list_keys(backend, "p/1") == ["p/1"]
    with pytest.raises(ValueError):  # noqa: PT011
        backend.list(page_size=0)


async def test_list_order_is_ascending_by_full_key(backend: Backend) -> None:
    keys = ["a-c", "a/b", "a/c/d", "a0", "a.b", "ab/c", "z", "ü/x", "A", "a b", "a/b-c", "a/b0"]
    for key in keys:
        await backend.put(key, b"", size=0)
    assert await list_keys(backend) == sorted(keys)
    assert await list_keys(backend, page_size=1) == sorted(keys)
    assert await list_keys(backend, start_after="a/b") == [k for k in sorted(keys) if k > "a/b"]
    assert await list_keys(backend, start_after="a/") == [k for k in sorted(keys) if k > "a/"]
    assert await list_keys(backend, "a/") == ["a/b", "a/b-c", "a/b0", "a/c/d"]


SPECIAL_KEYS = [
    "a b/ü+%&=?.txt",
    "x/with space",
    "x/plus+sign",
    "x/percent%20encoded",
    "x/emoji-🙂",
    "x/quote'\"",
    "x/hash#frag",
    "x/colon:semi;star*",
    "x/tilde~caret^",
    "x/.hidden",
    "x/...",
    "日本/語",
]


async def test_special_keys(backend: Backend) -> None:
    for i, key in enumerate(SPECIAL_KEYS):
        data = key.encode() * (i + 1)
        await backend.put(key, data, size=len(data))
        assert await get_bytes(backend, key) == data
        assert (await backend.head(key)).size == len(data)
    assert await list_keys(backend) == sorted(SPECIAL_KEYS)
    assert await list_keys(backend, "x/") == sorted(k for k in SPECIAL_KEYS if k.startswith("x/"))
    for key in SPECIAL_KEYS:
        await backend.delete(key)
    assert await list_keys(backend) == []


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a//b", "a/../b", "..", ".", "a/./b", "a/", "nul\x00", "back\\slash", "é" * 513],
)
async def test_invalid_keys_rejected(backend: Backend, key: str) -> None:
    with pytest.raises(InvalidBlobKey):
        await backend.put(key, b"x", size=1)
    with pytest.raises(InvalidBlobKey):
        await backend.get(key)
    with pytest.raises(InvalidBlobKey):
        await backend.head(key)
    with pytest.raises(InvalidBlobKey):
        await backend.delete(key)


async def test_longest_key_accepted(backend: Backend) -> None:
    key = "/".join(["k" * 200] * 5) + "/" + "z" * 19  # 1024 bytes
    assert len(key.encode()) == 1024
    await backend.put(key, b"ok", size=2)
    assert await get_bytes(backend, key) == b"ok"


async def test_put_is_invisible_until_complete(backend: Backend) -> None:
    await backend.put("k", b"old", size=3)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"new-"
        await release.wait()
        yield b"data"

    writer = asyncio.create_task(backend.put("k", slow_body(), size=8))
    writer2 = asyncio.create_task(backend.put("fresh", slow_body(), size=8))
    await asyncio.sleep(0.05)
    assert await get_bytes(backend, "k") == b"old"
    assert (await backend.head("k")).size == 3
    with pytest.raises(BlobNotFound):
        await backend.head("fresh")
    assert await list_keys(backend) == ["k"]
    release.set()
    await asyncio.gather(writer, writer2)
    assert await get_bytes(backend, "k") == b"new-data"
    assert await get_bytes(backend, "fresh") == b"new-data"


async def test_concurrent_puts_and_gets(backend: Backend) -> None:
    datas = {f"c/{i:02d}": blob(10_000 + i, seed=i) for i in range(24)}
    await asyncio.gather(*(backend.put(k, d, size=len(d)) for k, d in datas.items()))
    got = await asyncio.gather(*(get_bytes(backend, k) for k in datas))
    assert got == list(datas.values())
    assert await list_keys(backend, "c/") == sorted(datas)


async def test_abandoned_stream_can_be_closed(backend: Backend) -> None:
    data = blob(3 * MiB, seed=5)
    await backend.put("k", data, size=len(data))
    unread = await backend.get("k")
    await unread.aclose()
    partly = await backend.get("k")
    first = await partly.__aiter__().__anext__()
    assert first == data[: len(first)]
    await partly.aclose()
    await partly.aclose()  # closing twice is harmless
    assert await get_bytes(backend, "k") == data


async def test_closed_backend_refuses_calls(make_backend: BackendFactory) -> None:
    for kind in ("memory", "local", "s3"):
        b = make_backend(kind)
        await b.put("k", b"v", size=1)
        await b.close()
        with pytest.raises(PermanentBackendError):
            await b.head("k")
        with pytest.raises(PermanentBackendError):
            await b.put("k", b"v", size=1)
        with pytest.raises(PermanentBackendError):
            await list_keys(b)


async def test_capabilities(make_backend: BackendFactory) -> None:
    assert make_backend("memory").capabilities.durable is False
    assert make_backend("local").capabilities.durable is True
    s3 = make_backend("s3")
    assert s3.capabilities.durable is True
    assert s3.capabilities.max_blob_size == 5 * 1024**3
    await s3.close()
    memory = MemoryBackend("m")
    for b in (memory, s3, FaultyBackend(memory), RetryingBackend(memory)):
        assert isinstance(b, Backend)


# -- local backend specifics -----------------------------------------------------------


MakeLocal = Callable[[Path], LocalBackend]


@pytest.fixture(params=["threads", "writer"])
async def make_local(request: pytest.FixtureRequest) -> AsyncIterator[MakeLocal]:
    """Local backends whose small puts run in worker threads, or in a ``BlobWriter``."""
    writers: list[BlobWriter] = []

    def build(root: Path) -> LocalBackend:
        if request.param == "threads":
            return LocalBackend("local", root)
        writers.append(BlobWriter())
        return LocalBackend("local", root, writer=writers[-1])

    yield build
    for writer in writers:
        await writer.close()


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def files_under(root: Path) -> list[str]:
    return sorted(str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs)


async def test_local_layout_and_cleanup(local_root: Path, make_local: MakeLocal) -> None:
    b = make_local(local_root)
    await b.put("a/b/c/d", b"data", size=4)
    assert (local_root / "a/b/c/d").read_bytes() == b"data"
    with pytest.raises(TransientBackendError):
        await b.put("a/x/y", chunks(b"short"), size=10)
    with pytest.raises(PermanentBackendError):
        await b.put("a/x/z", chunks(b"too long"), size=3)
    assert files_under(local_root) == ["a/b/c/d"], "failed puts leave no temp files"
    assert not (local_root / "a/x").exists(), "failed puts leave no empty directories"
    await b.delete("a/b/c/d")
    assert entries(local_root) == [], "delete removes now-empty parents and keeps the root"


async def test_local_cancelled_put_leaves_nothing(local_root: Path) -> None:
    b = LocalBackend("local", local_root)

    async def stalled() -> AsyncIterator[bytes]:
        yield b"part"
        await asyncio.sleep(3600)
        yield b"never"

    task = asyncio.create_task(b.put("s/k", stalled(), size=100))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(local_root) == []


async def put_and_cancel(b: Backend, data: bytes, delays: list[float]) -> set[str]:
    """Start a put of ``data`` at ``cancel/<i>`` and cancel it after each delay; return
    the keys whose put completed all the same."""
    completed: set[str] = set()
    for i, delay in enumerate(delays):
        key = f"cancel/{i}"
        task = asyncio.create_task(b.put(key, data, size=len(data)))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
            completed.add(key)
    return completed


async def test_local_put_cancelled_at_any_moment_leaves_no_debris(local_root: Path) -> None:
    b = LocalBackend("local", local_root)
    data = blob(6 * MiB, seed=11)
    completed = await put_and_cancel(b, data, [0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05])
    await asyncio.sleep(0.3)  # cleanups wait for the writer threads they raced with
    present = files_under(local_root)
    assert not [f for f in present if TEMP_PREFIX in f], "no temporary files remain"
    # a put cancelled during its final rename may still have completed, but never partially
    assert completed <= set(present)
    for key in present:
        assert await get_bytes(b, key) == data


async def test_local_skips_temp_files_and_foreign_entries(local_root: Path) -> None:
    b = LocalBackend("local", local_root)
    await b.put("d/k", b"1", size=1)
    (local_root / "d" / f"{TEMP_PREFIX}leftover").write_bytes(b"partial")
    (local_root / f"{TEMP_PREFIX}other").write_bytes(b"partial")
    os.mkfifo(local_root / "d" / "fifo")
    assert await list_keys(b) == ["d/k"]


async def test_local_key_conflicts_with_directory(local_root: Path, make_local: MakeLocal) -> None:
    b = make_local(local_root)
    await b.put("a", b"file", size=4)
    with pytest.raises(PermanentBackendError):
        await b.put("a/b", b"x", size=1)
    with pytest.raises(BlobNotFound):
        await b.head("a/b")
    await b.put("d/e", b"x", size=1)
    with pytest.raises(PermanentBackendError):
        await b.put("d", b"x", size=1)
    await b.delete("d")  # a directory is no blob: nothing to delete
    assert await list_keys(b) == ["a", "d/e"]


async def test_local_symlinks_are_not_followed(
    local_root: Path, tmp_path: Path, make_local: MakeLocal
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (local_root / "link").symlink_to(outside, target_is_directory=True)
    (local_root / "filelink").symlink_to(outside / "secret")
    b = make_local(local_root)

    with pytest.raises(InvalidBlobKey):
        await b.get("link/secret")
    with pytest.raises(InvalidBlobKey):
        await b.head("link/secret")
    with pytest.raises(InvalidBlobKey):
        await b.put("link/new", b"x", size=1)
    with pytest.raises(InvalidBlobKey):
        await b.delete("link/secret")
    with pytest.raises(InvalidBlobKey):
        await b.get("filelink")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    assert await list_keys(b) == []
    assert await list_keys(b, "link/") == []


async def test_local_root_symlink_is_fine(
    tmp_path: Path, local_root: Path, make_local: MakeLocal
) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(local_root, target_is_directory=True)
    b = make_local(alias)
    await b.put("k/v", b"x", size=1)
    assert (local_root / "k/v").read_bytes() == b"x"
    assert await list_keys(b) == ["k/v"]


async def test_local_rejects_overlong_segment(local_root: Path, make_local: MakeLocal) -> None:
    b = make_local(local_root)
    with pytest.raises(InvalidBlobKey):
        await b.put("a/" + "n" * 256, b"x", size=1)
    await b.put("a/" + "n" * 255, b"x", size=1)


async def test_local_missing_root_is_permanent(tmp_path: Path, make_local: MakeLocal) -> None:
    b = make_local(tmp_path / "not-mounted")
    with pytest.raises(PermanentBackendError) as info:
        await b.put("k", b"x", size=1)
    assert not isinstance(info.value, BlobNotFound)
    assert not (tmp_path / "not-mounted").exists()
    with pytest.raises(BlobNotFound):
        await b.head("k")
    assert await list_keys(b) == []


async def test_local_streams_release_file_descriptors(local_root: Path) -> None:
    b = LocalBackend("local", local_root, fsync=False)
    await b.put("k", blob(3 * MiB), size=3 * MiB)
    before = len(os.listdir("/proc/self/fd"))
    streams = [await b.get("k") for _ in range(20)]
    assert len(os.listdir("/proc/self/fd")) >= before + 20
    for s in streams[:10]:
        await s.aclose()
    for s in streams[10:]:
        await read_all(s)
    assert len(os.listdir("/proc/self/fd")) == before


async def test_local_list_skips_directories_it_does_not_need(
    local_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = LocalBackend("local", local_root)
    for key in ["a/1", "a/2", "b/1", "b/2", "c/1"]:
        await b.put(key, b"", size=0)
    denied = str(local_root / "a")
    real_scandir = os.scandir

    def scandir(path: str) -> Any:  # the OS refusing to read "a" (root ignores chmod)
        if os.fspath(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert await list_keys(b, "b/") == ["b/1", "b/2"]
    assert await list_keys(b, start_after="a0") == ["b/1", "b/2", "c/1"]
    assert await list_keys(b, start_after="a~", page_size=1) == ["b/1", "b/2", "c/1"]
    with pytest.raises(PermanentBackendError):
        await list_keys(b)


async def test_writer_cancelled_puts_land_whole_or_not_and_never_later(local_root: Path) -> None:
    writer = BlobWriter()
    b = LocalBackend("local", local_root, writer=writer)
    try:
        data = blob(200_000, seed=3)
        delays = [0, 0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.05] * 3
        completed = await put_and_cancel(b, data, delays)
        present = files_under(local_root)
        await asyncio.sleep(0.3)
        assert files_under(local_root) == present, "nothing lands after the cancelled put ended"
        assert not [f for f in present if TEMP_PREFIX in f]
        assert completed <= set(present)
        for key in present:
            assert await get_bytes(b, key) == data
    finally:
        await writer.close()


async def test_writer_process_killed_fails_puts_transiently_then_restarts(
    local_root: Path,
) -> None:
    writer = BlobWriter()
    b = LocalBackend("local", local_root, writer=writer)
    try:
        await b.put("first", b"1", size=1)
        first_pid = writer.pid
        assert first_pid is not None
        data = blob(100_000, seed=4)
        puts = [asyncio.create_task(b.put(f"k/{i}", data, size=len(data))) for i in range(30)]
        await asyncio.sleep(0.002)
        os.kill(first_pid, signal.SIGKILL)
        results = await asyncio.gather(*puts, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, TransientBackendError) for r in failed), failed
        for i, r in enumerate(results):
            if not isinstance(r, BaseException):
                assert await get_bytes(b, f"k/{i}") == data
        await b.put("after", b"2", size=1)  # a new helper takes over
        assert writer.pid not in (None, first_pid)
        assert await get_bytes(b, "after") == b"2"
    finally:
        await writer.close()
    assert writer.pid is None


async def test_closed_writer_refuses_puts(local_root: Path) -> None:
    writer = BlobWriter()
    b = LocalBackend("local", local_root, writer=writer)
    await b.put("k", b"v", size=1)
    await writer.close()
    await writer.close()
    with pytest.raises(PermanentBackendError):
        await b.put("k2", b"v", size=1)
    big = blob(2 * MiB)
    await b.put("big", big, size=len(big))  # larger buffers never used the writer
    assert files_under(local_root) == ["big", "k"]


async def test_writer_closed_while_its_helper_starts(local_root: Path) -> None:
    writer = BlobWriter()
    b = LocalBackend("local", local_root, writer=writer)
    put = asyncio.create_task(b.put("k", b"v", size=1))
    await asyncio.sleep(0)  # the put has started the helper; its socket is not connected yet
    await asyncio.wait_for(writer.close(), 30)
    # it ends, landed or failed as transient (the socket closed before the answer)
    outcome = (await asyncio.wait((put,), timeout=30))[0]
    assert outcome, "the put still waits on a closed writer"
    if put.exception() is None:
        assert (local_root / "k").read_bytes() == b"v"
    else:
        assert isinstance(put.exception(), TransientBackendError), put.exception()
    assert writer.pid is None


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


async def test_writer_ends_with_the_process_that_started_it(local_root: Path) -> None:
    # the parent dies with puts in flight and replies unread (its helper's reads then
    # fail with ECONNRESET): the helper ends quietly and every blob is whole or absent
    script = (
        "import asyncio, os, sys\n"
        "from pathlib import Path\n"
        "from backends.blobwriter import BlobWriter\n"
        "from backends.local import LocalBackend\n"
        "async def main():\n"
        "    w = BlobWriter()\n"
        "    b = LocalBackend('l', Path(sys.argv[1]), writer=w)\n"
        "    await b.put('k', b'v', size=1)\n"
        "    print(w.pid, flush=True)\n"
        "    data = bytes(100_000)\n"
        "    puts = [asyncio.ensure_future(b.put(f'x/{i}', data, size=len(data)))\n"
        "            for i in range(100)]\n"
        "    await asyncio.sleep(0.02)\n"
        "    os.kill(os.getpid(), 9)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(local_root),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert parent.stdout is not None and parent.stderr is not None
    helper = int(await asyncio.wait_for(parent.stdout.readline(), 30))
    await parent.wait()
    for _ in range(100):
        if _process_state(helper) in ("gone", "Z"):  # a zombie when no init reaps it
            break
        await asyncio.sleep(0.05)
    else:
        os.kill(helper, signal.SIGKILL)
        pytest.fail("the blob writer outlived its parent")
    errors = (await asyncio.wait_for(parent.stderr.read(), 30)).decode()
    assert "Traceback" not in errors, errors
    assert (local_root / "k").read_bytes() == b"v"
    for key in await list_keys(LocalBackend("l", local_root), "x/"):
        assert (local_root / key).read_bytes() == bytes(100_000)


# -- S3 backend specifics ----------------------------------------------------------------


def test_moto_required_fails_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_REQUIRE_MOTO", "1")
    with pytest.raises(pytest.fail.Exception):
        moto_unavailable("it is a test")
    monkeypatch.delenv("CAIRN_REQUIRE_MOTO")
    with pytest.raises(pytest.skip.Exception):
        moto_unavailable("it is a test")


async def test_s3_prefix_is_applied(moto_s3: MotoS3) -> None:
    bucket = moto_s3.new_bucket()
    try:
        b = make_s3_backend(moto_s3, bucket, prefix="/pool/one/")
        other = make_s3_backend(moto_s3, bucket, prefix="pool/two")
        await b.put("k/1", b"x", size=1)
        await other.put("k/1", b"y", size=1)
        assert sorted(moto_s3.keys(bucket)) == ["pool/one/k/1", "pool/two/k/1"]
        assert await list_keys(b) == ["k/1"]
        assert await get_bytes(other, "k/1") == b"y"
        await b.close()
        await other.close()
    finally:
        moto_s3.delete_bucket(bucket)
    with pytest.raises(InvalidBlobKey):
        make_s3_backend(moto_s3, bucket, prefix="a/../b")


async def test_s3_wrong_credentials_is_permanent(moto_s3: MotoS3) -> None:
    bucket = moto_s3.new_bucket()
    b = make_s3_backend(moto_s3, bucket, access_key="AKIAWRONG", secret_key="wrong")
    try:
        with moto_s3.require_auth():
            for call in (
                lambda: b.put("k", b"x", size=1),
                lambda: b.head("k"),
                lambda: b.get("k"),
                lambda: list_keys(b),
            ):
                with pytest.raises(PermanentBackendError) as info:
                    await call()
                assert not isinstance(info.value, BlobNotFound)
    finally:
        await b.close()
        moto_s3.delete_bucket(bucket)


async def test_s3_missing_bucket_is_permanent(moto_s3: MotoS3) -> None:
    b = make_s3_backend(moto_s3, "no-such-bucket-cairn")
    try:
        for call in (lambda: b.put("k", b"x", size=1), lambda: list_keys(b)):
            with pytest.raises(PermanentBackendError) as info:
                await call()
            assert not isinstance(info.value, BlobNotFound)
    finally:
        await b.close()


async def test_s3_connection_refused_is_transient() -> None:
    b = S3Backend(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        bucket="b",
        access_key="a",
        secret_key="s",
        path_style=True,
        connect_timeout=1,
    )
    try:
        for call in (
            lambda: b.put("k", b"x", size=1),
            lambda: b.head("k"),
            lambda: b.get("k"),
            lambda: b.delete("k"),
            lambda: list_keys(b),
        ):
            with pytest.raises(TransientBackendError):
                await call()
    finally:
        await b.close()


class FakeS3:
    """A tiny HTTP server that misbehaves on purpose (stalls, truncates, 503s).

    Each GET takes the next behaviour from ``plan``; when the plan is empty it serves
    ``data`` honouring ``Range``. Used to test the S3 adapter's handling of broken
    responses that moto cannot produce.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.plan: list[str] = []
        self.ranges: list[str | None] = []
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeS3:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._stop.set()  # ends stalled responses
        self._server.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                if not await self._respond(writer, lines[0].split()[0], headers.get("range")):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _respond(
        self, writer: asyncio.StreamWriter, method: str, range_header: str | None
    ) -> bool:
        behaviour = self.plan.pop(0) if self.plan and method == "GET" else "ok"
        self.ranges.append(range_header)
        if behaviour == "stall":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 30)
            return False
        if behaviour == "503":
            body = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            writer.write(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return True
        start, end = 0, len(self.data)
        status = "200 OK"
        extra = ""
        if range_header:
            first, _, last = range_header.removeprefix("bytes=").partition("-")
            start, end = int(first), (int(last) + 1 if last else len(self.data))
            status = "206 Partial Content"
            extra = f"Content-Range: bytes {start}-{end - 1}/{len(self.data)}\r\n"
        body = self.data[start:end]
        writer.write(
            (
                f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}"
                'ETag: "abc"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
        )
        if method == "HEAD":
            await writer.drain()
            return True
        if behaviour == "truncate":
            writer.write(body[: len(body) // 2])
            await writer.drain()
            return False
        writer.write(body)
        await writer.drain()
        return True


def fake_s3_backend(url: str, **overrides: object) -> S3Backend:
    args: dict[str, object] = {
        "endpoint_url": url,
        "region": "us-east-1",
        "bucket": "bucket",
        "access_key": "a",
        "secret_key": "s",
        "path_style": True,
        "connect_timeout": 1,
        "read_timeout": 1,
    }
    args.update(overrides)
    return S3Backend("fake", **args)  # type: ignore[arg-type]


async def test_s3_truncated_response_is_transient() -> None:
    data = blob(300_000, seed=6)
    async with FakeS3(data) as server:
        b = fake_s3_backend(server.url)
        try:
            server.plan = ["truncate"]
            with pytest.raises(TransientBackendError):
                await get_bytes(b, "k")
            assert await get_bytes(b, "k") == data
        finally:
            await b.close()


async def test_s3_read_timeout_and_503_are_transient() -> None:
    async with FakeS3(b"data") as server:
        b = fake_s3_backend(server.url, read_timeout=0.3)
        try:
            server.plan = ["stall"]
            with pytest.raises(TransientBackendError):
                await b.get("k")
            server.plan = ["503"]
            with pytest.raises(TransientBackendError):
                await b.get("k")
        finally:
            await b.close()


async def test_s3_retry_resumes_a_truncated_response() -> None:
    data = blob(400_000, seed=7)
    async with FakeS3(data) as server:
        b = RetryingBackend(fake_s3_backend(server.url), sleep=no_sleep)
        try:
            server.plan = ["503", "truncate", "truncate"]
            assert await get_bytes(b, "k", ByteRange(1000)) == data[1000:]
            assert b.resumes == 2
            assert b.retries == 3
            # the resumes asked for the bytes after those already delivered
            assert server.ranges[0] == server.ranges[1] == "bytes=1000-"
            assert server.ranges[2] == f"bytes={1000 + (len(data) - 1000) // 2}-"
        finally:
            await b.close()


def _client_error(code: str, status: int, message: str = "") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_client_error("NoSuchKey", 404), BlobNotFound),
        (_client_error("404", 404), BlobNotFound),
        (_client_error("NoSuchBucket", 404), PermanentBackendError),
        (_client_error("AccessDenied", 403), PermanentBackendError),
        (_client_error("InvalidAccessKeyId", 403), PermanentBackendError),
        (_client_error("SignatureDoesNotMatch", 403), PermanentBackendError),
        (_client_error("InvalidArgument", 400), PermanentBackendError),
        (_client_error("SlowDown", 503), TransientBackendError),
        (_client_error("InternalError", 500), TransientBackendError),
        (_client_error("", 502), TransientBackendError),
        (_client_error("", 504), TransientBackendError),
        (_client_error("RequestTimeout", 400), TransientBackendError),
        (_client_error("ThrottlingException", 400), TransientBackendError),
        (_client_error("TooManyRequests", 429), TransientBackendError),
        (_client_error("QuotaExceeded", 403), BackendFull),
        (_client_error("EntityTooLarge", 400), BackendFull),
        (_client_error("XMinioStorageFull", 507), BackendFull),
        (_client_error("AccessDenied", 403, "Storage cap exceeded."), BackendFull),
        (EndpointConnectionError(endpoint_url="http://x"), TransientBackendError),
        (ReadTimeoutError(endpoint_url="http://x"), TransientBackendError),
        (TimeoutError(), TransientBackendError),
        (ConnectionResetError(), TransientBackendError),
    ],
)
def test_s3_error_table(exc: BaseException, expected: type[Exception]) -> None:
    mapped = map_s3_error(exc, backend="s3", key="k")
    assert type(mapped) is expected
    assert map_s3_error(ValueError("a bug"), backend="s3") is None


# -- the retry wrapper and the fault injector ---------------------------------------------

RETRY_KINDS = ["memory", "s3"]


async def no_sleep(_delay: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture(params=RETRY_KINDS)
async def faulty(
    request: pytest.FixtureRequest, make_backend: BackendFactory
) -> AsyncIterator[FaultyBackend]:
    """A FaultyBackend over a real backend (memory, then S3 on moto)."""
    inner = make_backend(request.param)
    try:
        yield FaultyBackend(inner)
    finally:
        await inner.close()


def retrying(inner: Backend, attempts: int = 4) -> RetryingBackend:
    return RetryingBackend(inner, attempts=attempts, sleep=no_sleep, rng=random.Random(1))


OPS: list[tuple[str, Callable[[Backend], Awaitable[object]]]] = [
    ("put", lambda b: b.put("k", b"value", size=5)),
    ("get", lambda b: get_bytes(b, "k")),
    ("head", lambda b: b.head("k")),
    ("delete", lambda b: b.delete("k")),
    ("list", lambda b: list_keys(b)),
]


@pytest.mark.parametrize(("op", "call"), OPS, ids=[op for op, _ in OPS])
async def test_retry_succeeds_after_transient_failures(
    faulty: FaultyBackend, op: str, call: Callable[[Backend], Awaitable[object]]
) -> None:
    await faulty.inner.put("k", b"value", size=5)
    b = retrying(faulty, attempts=4)
    faulty.fail_next(op, 3)  # type: ignore[arg-type]
    await call(b)
    assert faulty.calls[op] == 4
    assert b.retries == 3


@pytest.mark.parametrize(("op", "call"), OPS, ids=[op for op, _ in OPS])
async def test_retry_gives_up_after_attempts(
    faulty: FaultyBackend, op: str, call: Callable[[Backend], Awaitable[object]]
) -> None:
    await faulty.inner.put("k", b"value", size=5)
    b = retrying(faulty, attempts=3)
    faulty.fail_always(op)  # type: ignore[arg-type]
    with pytest.raises(TransientBackendError):
        await call(b)
    assert faulty.calls[op] == 3
    assert b.retries == 2


@pytest.mark.parametrize(("op", "call"), OPS, ids=[op for op, _ in OPS])
async def test_permanent_errors_are_not_retried(
    faulty: FaultyBackend, op: str, call: Callable[[Backend], Awaitable[object]]
) -> None:
    await faulty.inner.put("k", b"value", size=5)
    b = retrying(faulty)
    faulty.fail_call(op, 1, PermanentBackendError("refused"))  # type: ignore[arg-type]
    with pytest.raises(PermanentBackendError, match="refused"):
        await call(b)
    assert faulty.calls[op] == 1
    assert b.retries == 0


async def test_missing_blob_is_not_retried(faulty: FaultyBackend) -> None:
    b = retrying(faulty)
    with pytest.raises(BlobNotFound):
        await b.get("absent")
    with pytest.raises(BlobNotFound):
        await b.head("absent")
    assert faulty.calls["get"] == faulty.calls["head"] == 1
    assert b.retries == 0


async def test_streamed_put_is_not_retried(faulty: FaultyBackend) -> None:
    b = retrying(faulty)
    faulty.fail_next("put", 1)
    with pytest.raises(TransientBackendError):
        await b.put("k", chunks(b"value"), size=5)
    assert faulty.calls["put"] == 1
    await b.put("k", chunks(b"value"), size=5)
    assert await get_bytes(b, "k") == b"value"


async def test_cut_stream_resumes_byte_identical(faulty: FaultyBackend) -> None:
    data = os.urandom(3 * MiB + 12345)
    await faulty.inner.put("k", data, size=len(data))
    b = retrying(faulty, attempts=5)
    faulty.cut_stream_after(1_000_000, times=3)
    assert await get_bytes(b, "k") == data
    assert faulty.calls["get"] == 4
    assert b.resumes == 3

    faulty.cut_stream_after(100_000, times=2)
    rng = ByteRange(500_000, 2_500_000)
    assert await get_bytes(b, "k", rng) == data[500_000:2_500_000]
    assert b.resumes == 5


async def test_cut_stream_gives_up_after_attempts(faulty: FaultyBackend) -> None:
    data = blob(50_000, seed=8)
    await faulty.inner.put("k", data, size=len(data))
    b = retrying(faulty, attempts=3)
    faulty.cut_stream_after(1000, times=10)
    stream = await b.get("k")
    received = bytearray()
    with pytest.raises(TransientBackendError):
        await drain(stream, received)
    assert bytes(received) == data[:3000], "all bytes before the failure are delivered"
    assert faulty.calls["get"] == 3
    await stream.aclose()


async def test_open_failures_and_cuts_share_the_budget(faulty: FaultyBackend) -> None:
    data = blob(50_000, seed=9)
    await faulty.inner.put("k", data, size=len(data))
    b = retrying(faulty, attempts=4)
    faulty.fail_next("get", 2)
    faulty.cut_stream_after(1000, times=1)
    assert await get_bytes(b, "k") == data  # 2 failed opens + 1 cut = 3 failures < 4
    faulty.fail_call("get", 2)
    faulty.cut_stream_after(1000, times=3)
    with pytest.raises(TransientBackendError):
        await get_bytes(b, "k")


async def test_cut_stream_without_retry_surfaces(faulty: FaultyBackend) -> None:
    data = blob(50_000, seed=10)
    await faulty.inner.put("k", data, size=len(data))
    faulty.cut_stream_after(1234)
    stream = await faulty.get("k")
    received = bytearray()
    with pytest.raises(TransientBackendError) as info:
        await drain(stream, received)
    assert is_transient(info.value)
    assert len(received) == 1234
    await stream.aclose()
    assert await get_bytes(faulty, "k") == data, "only the programmed number of cuts"


async def test_retry_list_resumes_after_last_key() -> None:
    class BreaksMidList(FaultyBackend):
        """Fails a listing once, after it has yielded two keys."""

        broke = False

        def list(
            self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
        ) -> AsyncIterator[BlobInfo]:
            return self._breaking(prefix, start_after, page_size)

        async def _breaking(
            self, prefix: str, start_after: str | None, page_size: int
        ) -> AsyncIterator[BlobInfo]:
            count = 0
            async for info in super().list(prefix, start_after=start_after, page_size=page_size):
                if count == 2 and not self.broke:
                    self.broke = True
                    raise TransientBackendError("connection reset mid-listing")
                count += 1
                yield info

    inner = MemoryBackend("m")
    keys = [f"k{i}" for i in range(6)]
    for key in keys:
        await inner.put(key, b"", size=0)
    faulty = BreaksMidList(inner)
    b = retrying(faulty)
    assert await list_keys(b, page_size=2) == keys
    assert faulty.calls["list"] == 2
    assert b.retries == 1


async def test_backoff_is_jittered_exponential_and_capped() -> None:
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    faulty = FaultyBackend(MemoryBackend("m"))
    b = RetryingBackend(
        faulty, attempts=8, base_delay=0.1, max_delay=1.0, sleep=record, rng=random.Random(3)
    )
    faulty.fail_always("head")
    with pytest.raises(TransientBackendError):
        await b.head("k")
    assert len(delays) == 7
    caps = [min(1.0, 0.1 * 2**n) for n in range(7)]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) == 7, "full jitter: delays are random"


async def test_real_sleep_default_is_small() -> None:
    faulty = FaultyBackend(MemoryBackend("m"))
    await faulty.put("k", b"v", size=1)
    b = RetryingBackend(faulty, attempts=3, base_delay=0.01)
    faulty.fail_next("head", 2)
    assert (await b.head("k")).size == 1


async def test_faulty_backend_programming() -> None:
    faulty = FaultyBackend(MemoryBackend("m"))
    await faulty.put("k", b"v", size=1)
    faulty.fail_call("head", 2, BackendFull("full"))
    await faulty.head("k")
    with pytest.raises(BackendFull):
        await faulty.head("k")
    await faulty.head("k")
    assert faulty.calls["head"] == 3
    faulty.fail_always("delete")
    with pytest.raises(TransientBackendError):
        await faulty.delete("k")
    faulty.clear()
    await faulty.delete("k")
    faulty.latency(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BlobNotFound):
        await faulty.head("k")
    assert loop.time() - started >= 0.045
    with pytest.raises(ValueError):  # noqa: PT011
        faulty.fail_call("copy", 1)  # type: ignore[arg-type]
    assert faulty.calls == {"put": 1, "get": 0, "head": 4, "delete": 2, "list": 0}
