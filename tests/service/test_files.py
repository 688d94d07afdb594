"""FileService over real stores (SQLite and PostgreSQL) and local-directory backends."""

from __future__ import annotations

import asyncio
import stat
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.build import Pool, make_file_service
from appliance.errors import (
    DirectoryNotEmpty,
    InvalidArgument,
    IsADirectory,
    NoCapacity,
    NoSuchPath,
    NotADirectory,
    NotSupported,
    PathExists,
)
from appliance.services.files import AttrChanges, FileService
from appliance.services.renames import RenameJournal
from tests.service.test_objects import CHUNK, body, make_pool, read_all

pytestmark = pytest.mark.service
BUCKET = "bkt"


@pytest.fixture
async def pool(database: Any, tmp_path: Path) -> AsyncIterator[Pool]:
    made = await make_pool(database, tmp_path, ["4MiB", "4MiB"])
    yield made
    await made.close()


@pytest.fixture
def files(pool: Pool) -> FileService:
    service = make_file_service(pool)
    service.prepare()
    return service


async def write_file(files: FileService, path: str, data: bytes, mode: int = 0o644) -> None:
    node = await files.create(BUCKET, path, mode, 1000, 1000)
    await files.write(node, 0, data)
    await files.release(node)


def data_blobs(tmp_path: Path) -> set[str]:
    """Blob files on the local backends (manifests and tombstones excluded)."""
    return {
        str(p.relative_to(tmp_path))
        for p in tmp_path.glob("d*/**/*")
        if p.is_file()
        and p.name not in ("manifest", "tombstone")
        and not p.name.startswith(".cairn-tmp")
    }


async def test_create_write_visible_through_objects_with_attributes(
    pool: Pool, files: FileService
) -> None:
    await files.mkdir(BUCKET, "docs", 0o750, 1000, 1000)
    await write_file(files, "docs/a.txt", b"hello world", 0o640)
    assert await read_all(pool, "docs/a.txt") == b"hello world"
    head = await pool.objects.head_object(BUCKET, "docs/a.txt")
    assert head.user_metadata["mode"] == str(stat.S_IFREG | 0o640)
    assert head.user_metadata["uid"] == "1000"
    assert head.headers["Content-Type"] == "text/plain"
    attr = await files.stat(BUCKET, "docs/a.txt")
    assert (attr.size, attr.mode, attr.uid) == (11, stat.S_IFREG | 0o640, 1000)
    assert (await files.stat(BUCKET, "docs")).mode == stat.S_IFDIR | 0o750
    page = await files.list_dir(BUCKET, "docs")
    assert [e.name for e in page.entries] == ["a.txt"]
    with pytest.raises(PathExists):
        await files.create(BUCKET, "docs/a.txt", 0o644, 0, 0)
    with pytest.raises(NotADirectory):
        await files.create(BUCKET, "docs/a.txt/x", 0o644, 0, 0)
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "nope")


async def test_objects_put_through_s3_get_default_attributes(
    pool: Pool, files: FileService
) -> None:
    await pool.objects.put_object(BUCKET, "s3/deep/x.bin", body(b"x" * 100), size=100)
    assert (await files.stat(BUCKET, "s3")).is_dir
    attr = await files.stat(BUCKET, "s3/deep/x.bin")
    assert attr.mode == stat.S_IFREG | 0o644 and attr.size == 100
    assert attr.uid == files.uid
    node = await files.open(BUCKET, "s3/deep/x.bin")
    assert await files.read(node, 10, 20) == b"x" * 20
    await files.release(node)


async def test_partial_rewrite_writes_only_the_changed_chunk(
    pool: Pool, files: FileService, tmp_path: Path
) -> None:
    data = bytes(range(256)) * (CHUNK * 6 // 256)  # 6 chunks
    await write_file(files, "big.bin", data)
    before = data_blobs(tmp_path)
    node = await files.open(BUCKET, "big.bin")
    await files.write(node, CHUNK * 2 + 100, b"CHANGED")
    assert (
        await files.read(node, CHUNK * 2 + 98, 11)
        == data[CHUNK * 2 + 98 : CHUNK * 2 + 100]
        + b"CHANGED"
        + data[CHUNK * 2 + 107 : CHUNK * 2 + 109]
    )
    await files.release(node)
    expected = bytearray(data)
    expected[CHUNK * 2 + 100 : CHUNK * 2 + 107] = b"CHANGED"
    assert await read_all(pool, "big.bin") == bytes(expected)
    new = data_blobs(tmp_path) - before
    assert len(new) == 1, new  # one chunk rewritten, five reused (plus the manifest)
    head = await pool.objects.head_object(BUCKET, "big.bin")
    assert head.size == len(data) and head.etag.endswith("-6")


async def test_truncate_down_up_and_hole(pool: Pool, files: FileService) -> None:
    data = b"a" * (CHUNK + 500)
    await write_file(files, "t.bin", data)
    await files.set_attr(BUCKET, "t.bin", AttrChanges(size=100))
    assert await read_all(pool, "t.bin") == b"a" * 100
    await files.set_attr(BUCKET, "t.bin", AttrChanges(size=CHUNK * 2))
    assert await read_all(pool, "t.bin") == b"a" * 100 + bytes(CHUNK * 2 - 100)
    node = await files.open(BUCKET, "t.bin")
    await files.write(node, CHUNK * 3, b"end")
    await files.release(node)
    got = await read_all(pool, "t.bin")
    assert got == b"a" * 100 + bytes(CHUNK * 3 - 100) + b"end"


async def test_rename_is_metadata_only_and_follows_posix(
    pool: Pool, files: FileService, tmp_path: Path
) -> None:
    await files.mkdir(BUCKET, "src", 0o755, 0, 0)
    await files.mkdir(BUCKET, "src/sub", 0o755, 0, 0)
    for i in range(30):
        await write_file(files, f"src/sub/f{i}", f"file {i}".encode())
    await files.mkdir(BUCKET, "src/empty", 0o755, 0, 0)
    await write_file(files, "other", b"other")
    before = data_blobs(tmp_path)
    await files.rename(BUCKET, "src", BUCKET, "dst")
    assert data_blobs(tmp_path) == before  # no data blob written
    assert await read_all(pool, "dst/sub/f7") == b"file 7"
    assert (await files.stat(BUCKET, "dst/empty")).is_dir
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "src")
    await files.rename(BUCKET, "other", BUCKET, "dst/sub/f1")  # a file replaces a file
    assert await read_all(pool, "dst/sub/f1") == b"other"
    await write_file(files, "keep", b"k")
    with pytest.raises(PathExists):
        await files.rename(BUCKET, "keep", BUCKET, "dst/sub/f2", noreplace=True)
    with pytest.raises(IsADirectory):
        await files.rename(BUCKET, "keep", BUCKET, "dst/empty")
    with pytest.raises(NotADirectory):
        await files.rename(BUCKET, "dst/empty", BUCKET, "keep")
    with pytest.raises(DirectoryNotEmpty):
        await files.rename(BUCKET, "dst/empty", BUCKET, "dst/sub")
    with pytest.raises(InvalidArgument):
        await files.rename(BUCKET, "dst", BUCKET, "dst/empty/inside")


async def test_rmdir_unlink_symlink_mknod_xattr(pool: Pool, files: FileService) -> None:
    await files.mkdir(BUCKET, "d", 0o755, 0, 0)
    await write_file(files, "d/f", b"1")
    with pytest.raises(DirectoryNotEmpty):
        await files.rmdir(BUCKET, "d")
    with pytest.raises(IsADirectory):
        await files.unlink(BUCKET, "d")
    await files.unlink(BUCKET, "d/f")
    assert (await files.stat(BUCKET, "d")).is_dir  # the marker keeps it
    await files.rmdir(BUCKET, "d")
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "d")
    await files.symlink(BUCKET, "ln", "../target/x", 0, 0)
    assert (await files.stat(BUCKET, "ln")).is_link
    assert await files.readlink(BUCKET, "ln") == "../target/x"
    fifo = await files.mknod(BUCKET, "fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert stat.S_ISFIFO(fifo.mode)
    with pytest.raises(NotSupported):
        await files.link(BUCKET, "fifo", BUCKET, "fifo2")
    await write_file(files, "x", b"x")
    await files.set_xattr(BUCKET, "x", "color", "blue")
    assert (await pool.objects.head_object(BUCKET, "x")).user_metadata["color"] == "blue"
    assert await files.list_xattrs(BUCKET, "x") == {"color": "blue"}
    await files.set_xattr(BUCKET, "x", "color", None)
    assert await files.list_xattrs(BUCKET, "x") == {}
    with pytest.raises(InvalidArgument):
        await files.set_xattr(BUCKET, "x", "mode", "1")
    await files.set_attr(BUCKET, "x", AttrChanges(mode=0o4755, uid=5, mtime_ns=10**18))
    head = await pool.objects.head_object(BUCKET, "x")
    assert head.user_metadata["mode"] == str(stat.S_IFREG | 0o4755)
    assert head.user_metadata["mtime"] == "1000000000.000000000"


async def test_listing_pages_and_pending_files(pool: Pool, files: FileService) -> None:
    await files.mkdir(BUCKET, "many", 0o755, 0, 0)
    for i in range(25):
        await write_file(files, f"many/{i:03d}", b"")
    names: list[str] = []
    after = None
    while True:
        page = await files.list_dir(BUCKET, "many", after=after, limit=7)
        names += [e.name for e in page.entries]
        if page.marker is None:
            break
        after = page.marker
    assert names == [f"{i:03d}" for i in range(25)]
    node = await files.create(BUCKET, "many/new", 0o644, 0, 0)
    assert [n for n, _ in files.pending_names(BUCKET, "many")] == ["new"]
    assert (await files.stat(BUCKET, "many/new")).size == 0
    await files.release(node)
    assert files.pending_names(BUCKET, "many") == []
    assert (await pool.objects.head_object(BUCKET, "many/new")).size == 0


async def test_no_capacity_on_write_keeps_committed_data(pool: Pool, files: FileService) -> None:
    await write_file(files, "keep.bin", b"k" * CHUNK)
    node = await files.create(BUCKET, "fill.bin", 0o644, 0, 0)
    written = 0
    refused: NoCapacity | None = None
    while written < 200 and refused is None:  # 8 MiB of quota in all; 12.5 MiB tried
        try:
            written += await files.write(node, written * CHUNK, b"f" * CHUNK) // CHUNK
        except NoCapacity as exc:
            refused = exc
    assert refused is not None
    assert 100 <= written < 128  # refused before the quota is passed
    await files.set_attr(BUCKET, "fill.bin", AttrChanges(size=0))
    await files.release(node)
    assert await read_all(pool, "keep.bin") == b"k" * CHUNK
    cap = await files.capacity()
    assert cap.total_bytes == 8 * 1024 * 1024


async def test_spool_recovery_commits_what_a_dead_process_left(
    pool: Pool, files: FileService, tmp_path: Path
) -> None:
    data = b"b" * (CHUNK * 3)
    await write_file(files, "base.bin", data)
    node = await files.open(BUCKET, "base.bin")
    await files.write(node, CHUNK + 1, b"NEW")
    fresh = await files.create(BUCKET, "fresh.bin", 0o600, 7, 7)
    await files.write(fresh, 0, b"fresh bytes")
    noted = await files.create(BUCKET, "noted.bin", 0o600, 7, 7)
    await files.write(noted, 0, b"noted")
    # a journal too large for a header slot goes to <id>.json
    await files.set_xattr(BUCKET, "noted.bin", "notes", "n" * 3000)
    assert noted.spool is not None and not noted.spool.journal_in_header
    assert fresh.spool is not None and fresh.spool.journal_in_header
    # the process dies here: nothing committed, the spool stays
    for n in (node, fresh, noted):
        assert n.spool is not None
        n.spool.close()
    again = make_file_service(pool)
    report = await again.recover()
    assert sorted((r.key, r.committed_as, r.size) for r in report) == [
        ("base.bin", "base.bin", CHUNK * 3),
        ("fresh.bin", "fresh.bin", 11),
        ("noted.bin", "noted.bin", 5),
    ]
    assert (await pool.objects.head_object(BUCKET, "noted.bin")).user_metadata[
        "notes"
    ] == "n" * 3000
    expected = bytearray(data)
    expected[CHUNK + 1 : CHUNK + 4] = b"NEW"
    assert await read_all(pool, "base.bin") == bytes(expected)
    assert await read_all(pool, "fresh.bin") == b"fresh bytes"
    assert (await again.stat(BUCKET, "fresh.bin")).uid == 7
    assert list((tmp_path / "cairn-spool").iterdir()) == []


async def test_recovery_sets_aside_when_the_key_changed(pool: Pool, files: FileService) -> None:
    await write_file(files, "k", b"old")
    node = await files.open(BUCKET, "k")
    await files.write(node, 0, b"mine")
    assert node.spool is not None
    node.spool.close()
    await pool.objects.put_object(BUCKET, "k", body(b"theirs"), size=6)
    report = await make_file_service(pool).recover()
    assert len(report) == 1 and report[0].committed_as is not None
    assert report[0].committed_as.startswith("k.cairn-recovered-")
    assert await read_all(pool, "k") == b"theirs"
    assert await read_all(pool, report[0].committed_as) == b"mine"


async def test_recovery_drops_a_spool_whose_commit_landed(
    pool: Pool, files: FileService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process died between a commit and the removal of its spool: the next mount
    finds the version already there (same bytes, same attributes but the times) and
    makes no second copy; a spool whose attributes differ is still set aside."""
    from appliance.services.spool import Spool

    with monkeypatch.context() as patch:
        patch.setattr(Spool, "remove", Spool.close)  # the spool outlives its commit
        await write_file(files, "done.bin", b"committed bytes")
        await write_file(files, "moded.bin", b"same bytes")
    left = sorted(p.name for p in (tmp_path / "cairn-spool").iterdir())
    assert len(left) == 2
    # the second one's commit holds another mode than its spool's journal
    await pool.objects.put_object(
        BUCKET,
        "moded.bin",
        body(b"same bytes"),
        size=10,
        user_metadata={
            **(await pool.objects.head_object(BUCKET, "moded.bin")).user_metadata,
            "mode": str(stat.S_IFREG | 0o600),
        },
    )
    report = await make_file_service(pool).recover()
    outcome = {r.key: (r.committed_as, r.detail) for r in report}
    assert outcome["done.bin"] == ("done.bin", "committed already")
    aside = outcome["moded.bin"][0]
    assert aside is not None and aside.startswith("moded.bin.cairn-recovered-")
    assert await read_all(pool, aside) == b"same bytes"
    listed = await pool.objects.list_objects(BUCKET)
    assert sorted(e.key for e in listed.entries) == ["done.bin", "moded.bin", aside]
    assert list((tmp_path / "cairn-spool").iterdir()) == []


async def test_recovery_finishes_a_directory_rename_cut_short(
    pool: Pool, files: FileService, tmp_path: Path
) -> None:
    for directory in ("src", "src/sub", "src/empty"):
        await files.mkdir(BUCKET, directory, 0o700, 5, 5)
    for i in range(30):
        await write_file(files, f"src/sub/f{i:02d}", f"file {i}".encode())
    spool_dir = tmp_path / "cairn-spool"
    # what a process that died after moving ten keys leaves: its journal, a split tree
    RenameJournal.create(spool_dir, "0001", BUCKET, "src/", BUCKET, "dst/")
    listed = await pool.store.list_objects(BUCKET, prefix="src/")
    for entry in listed.entries[:10]:
        await files._move_key(BUCKET, entry.key, BUCKET, "dst/" + entry.key[len("src/") :])
    (spool_dir / "0002.rename").write_text("not json")
    report = await make_file_service(pool).recover()
    done = [r for r in report if r.committed_as == "dst/"]
    assert len(done) == 1 and "moved" in done[0].detail
    assert [r.committed_as for r in report if r not in done] == [None]  # the unreadable one
    assert (await pool.store.list_objects(BUCKET, prefix="src/")).entries == ()
    for i in range(30):
        assert await read_all(pool, f"dst/sub/f{i:02d}") == f"file {i}".encode()
    assert (await files.stat(BUCKET, "dst/empty")).mode == stat.S_IFDIR | 0o700
    assert [p.name for p in spool_dir.iterdir()] == ["0002.rename"]  # kept, reported


class CountingStore:
    """The real store, counting the calls made to it (which lookups reached it)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._inner, name)
        if not callable(found):
            return found

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return found(*args, **kwargs)

        return call


async def put_walk_files(pool: Pool, count: int) -> None:
    for i in range(count):
        data = b"x" * (i % 7)
        await pool.objects.put_object(BUCKET, f"walk/f{i:04d}", body(data), size=len(data))


async def test_a_walk_over_a_directory_is_answered_from_listings(
    pool: Pool, files: FileService
) -> None:
    await put_walk_files(pool, 400)
    counting = CountingStore(files._store)
    files._store = counting
    for i in range(400):
        assert (await files.stat(BUCKET, f"walk/f{i:04d}")).size == i % 7
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "walk/f0100a")  # between listed names
    queries = counting.calls["get_current"] + counting.calls["list_directory"]
    assert queries < 40, counting.calls  # a point query per name would be 400
    assert counting.calls["list_directory"] >= 3


async def test_changes_made_here_show_at_once_over_listed_names(
    pool: Pool, files: FileService
) -> None:
    await put_walk_files(pool, 300)
    for i in range(300):
        await files.stat(BUCKET, f"walk/f{i:04d}")
    counting = CountingStore(files._store)
    files._store = counting
    assert (await files.stat(BUCKET, "walk/f0150")).size == 150 % 7
    assert sum(counting.calls.values()) == 0  # listed: the test runs over the spans
    files._store = counting._inner

    await files.unlink(BUCKET, "walk/f0100")
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "walk/f0100")
    await files.set_attr(BUCKET, "walk/f0101", AttrChanges(mode=0o600))
    assert stat.S_IMODE((await files.stat(BUCKET, "walk/f0101")).mode) == 0o600
    await files.symlink(BUCKET, "walk/f0102x", "target", 0, 0)
    assert (await files.stat(BUCKET, "walk/f0102x")).is_link
    await write_file(files, "walk/f0103x", b"abc")
    assert (await files.stat(BUCKET, "walk/f0103x")).size == 3
    await files.rename(BUCKET, "walk/f0104", BUCKET, "walk/f0104y")
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "walk/f0104")
    assert (await files.stat(BUCKET, "walk/f0104y")).size == 104 % 7
    await files.mkdir(BUCKET, "walk/f0105d", 0o755, 0, 0)
    assert (await files.stat(BUCKET, "walk/f0105d")).is_dir
    await files.rename(BUCKET, "walk/f0105d", BUCKET, "walk/f0106d")
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "walk/f0105d")
    assert (await files.stat(BUCKET, "walk/f0106d")).is_dir
    await files.rmdir(BUCKET, "walk/f0106d")
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "walk/f0106d")
    node = await files.open(BUCKET, "walk/f0107")
    await files.write(node, 0, b"longer now")
    await files.release(node)
    assert (await files.stat(BUCKET, "walk/f0107")).size == 10


async def test_changes_made_through_s3_show_within_the_attribute_timeout(
    pool: Pool, files: FileService
) -> None:
    await put_walk_files(pool, 200)
    for i in range(200):
        await files.stat(BUCKET, f"walk/f{i:04d}")
    await pool.objects.put_object(BUCKET, "walk/f0150z", body(b"new"), size=3)
    await pool.objects.delete_object(BUCKET, "walk/f0151")
    await asyncio.sleep(1.05)  # the mount's attribute timeout (1 s) has passed
    assert (await files.stat(BUCKET, "walk/f0150z")).size == 3
    with pytest.raises(NoSuchPath):
        await files.stat(BUCKET, "walk/f0151")
