"""Pure parts of the mount: spool bookkeeping, attribute encoding, the inode table."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.services.fileattrs import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    FileAttr,
    decode,
    encode,
    format_time,
    parse_time,
    xattrs,
)
from appliance.services.spool import (
    HEADER_SIZE,
    JOURNAL_LIMIT,
    JOURNAL_XATTR,
    Segment,
    Spool,
)
from frontends.fuse.errnos import errno_of
from frontends.fuse.inodes import ROOT, InodeTable

pytestmark = pytest.mark.unit
CS = 100


def spool(tmp_path: Path, base_size: int) -> Spool:
    return Spool.create(
        tmp_path,
        "s1",
        CS,
        bucket="b",
        key="k",
        base_version="v1" if base_size else None,
        base_size=base_size,
        meta={"mode": "33188"},
        headers={},
    )


def test_segments_of_a_new_file_are_all_spool(tmp_path: Path) -> None:
    s = spool(tmp_path, 0)
    s.pwrite(0, b"x" * 250)
    assert s.segments() == [Segment(0, 250, False)]
    assert s.fills_for_write(0, 10) == []


def test_partial_write_fills_and_dirties_one_chunk(tmp_path: Path) -> None:
    s = spool(tmp_path, 450)  # base chunks 0..4, the last 50 bytes long
    assert s.fills_for_write(210, 220) == [(200, 300)]
    assert s.fills_for_write(200, 300) == []  # the whole chunk is overwritten
    assert s.fills_for_write(400, 460) == []  # covers the base part of the last chunk
    assert s.mark_dirty(210, 220)
    assert not s.mark_dirty(250, 260)  # already dirty: the journal is not rewritten
    assert s.segments() == [
        Segment(0, 200, True),
        Segment(200, 300, False),
        Segment(300, 450, True),
    ]
    assert s.new_bytes() == 100


def test_truncate_keeps_base_up_to_the_cut_and_zeros_after(tmp_path: Path) -> None:
    s = spool(tmp_path, 450)
    s.mark_dirty(300, 310)
    s.truncate(150)
    assert (s.size, s.base_size, s.dirty) == (150, 150, set())
    s.truncate(400)
    assert s.segments() == [Segment(0, 150, True), Segment(150, 400, False)]
    assert s.pread(150, 10) == bytes(10)


def test_journal_round_trip_in_the_data_files_header(tmp_path: Path) -> None:
    s = spool(tmp_path, 450)
    assert s.journal_in_header  # no second file, no xattr per spool
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.spool"]
    assert os.listxattr(tmp_path / "s1.spool") == []
    assert (tmp_path / "s1.spool").stat().st_size == HEADER_SIZE + 450
    s.mark_dirty(120, 130)
    s.pwrite(120, b"abc")
    s.close()
    again = Spool.load_data(tmp_path / "s1.spool")
    assert again is not None and again.journal_in_header
    assert (again.bucket, again.key, again.base_version) == ("b", "k", "v1")
    assert (again.dirty, again.size, again.meta) == ({1}, 450, {"mode": "33188"})
    assert again.pread(120, 3) == b"abc"
    assert again.pread_into(120, 3) == bytearray(b"abc")
    again.truncate(300)
    assert Spool.load_data(tmp_path / "s1.spool").size == 300  # type: ignore[union-attr]
    again.detach()
    assert Spool.load_data(tmp_path / "s1.spool") is None  # never recovered now
    again.save()  # a detached spool keeps no journal
    assert again.pread(120, 3) == b"abc"  # but its bytes stay readable
    assert again.mark_dirty(0, 10)  # a write to a clean chunk after the unlink
    again.truncate(280)
    assert Spool.load_data(tmp_path / "s1.spool") is None
    assert not (tmp_path / "s1.json").exists()
    again.remove()
    assert list(tmp_path.iterdir()) == []


def test_the_newest_intact_header_slot_wins(tmp_path: Path) -> None:
    s = spool(tmp_path, 450)
    s.mark_dirty(120, 130)  # seq 2, slot 0
    s.meta["mode"] = "33261"
    s.save()  # seq 3, slot 1
    s.close()
    path = tmp_path / "s1.spool"
    assert Spool.load_data(path).meta == {"mode": "33261"}  # type: ignore[union-attr]
    with path.open("r+b") as f:  # a torn write of the newest slot (seq 3, second half)
        f.seek(HEADER_SIZE // 2 + 40)
        f.write(b"\xff" * 8)
    older = Spool.load_data(path)
    assert older is not None and older.meta == {"mode": "33188"} and older.dirty == {1}
    older.save()  # writes seq 3 over the torn slot; the intact one stays
    older.close()
    assert Spool.load_data(path).journal_seq == 3  # type: ignore[union-attr]
    with path.open("r+b") as f:  # both slots unreadable: nothing to recover
        f.write(bytes(HEADER_SIZE))
    assert Spool.load_data(path) is None


def test_a_spool_from_before_the_header_is_still_recovered(tmp_path: Path) -> None:
    """Data in ``<id>.data`` from offset 0, the journal in its xattr (or in ``.json``)."""
    doc = {
        "journal": 1,
        "bucket": "b",
        "key": "old",
        "base_version": None,
        "base_size": 0,
        "chunk_size": CS,
        "dirty": [],
        "meta": {"mode": "33188"},
        "headers": {},
    }
    data = tmp_path / "old1.data"
    data.write_bytes(b"legacy bytes")
    os.setxattr(data, JOURNAL_XATTR, json.dumps(doc).encode())
    left = Spool.load_data(data)
    assert left is not None and left.journal_in_xattr and left.data_offset == 0
    assert (left.key, left.size, left.pread(0, 6)) == ("old", 12, b"legacy")
    left.meta["mode"] = "33261"
    left.save()  # stays in the xattr
    assert json.loads(os.getxattr(data, JOURNAL_XATTR))["meta"] == {"mode": "33261"}
    left.remove()
    (tmp_path / "old2.data").write_bytes(b"from json")
    (tmp_path / "old2.json").write_text(json.dumps({**doc, "key": "old2"}))
    loaded = Spool.load(tmp_path / "old2.json")
    assert (loaded.key, loaded.data_path.name, loaded.pread(0, 9)) == (
        "old2",
        "old2.data",
        b"from json",
    )
    loaded.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_journal_too_large_for_a_slot_moves_to_its_file(tmp_path: Path) -> None:
    s = spool(tmp_path, 0)
    s.pwrite(0, b"kept")
    s.meta["user.notes"] = "n" * (JOURNAL_LIMIT + 1)  # a large user.* xattr of the file
    s.save()
    assert not s.journal_in_header
    assert Spool.load_data(tmp_path / "s1.spool") is None  # the header was erased
    s.close()
    again = Spool.load(tmp_path / "s1.json")
    assert again.meta["user.notes"] == "n" * (JOURNAL_LIMIT + 1)
    assert (again.data_offset, again.size, again.pread(0, 4)) == (HEADER_SIZE, 4, b"kept")
    again.meta["user.notes"] = "short"
    again.save()  # the file wins from then on
    assert not again.journal_in_header
    again.detach()
    assert not (tmp_path / "s1.json").exists()
    again.remove()
    big = Spool.create(
        tmp_path,
        "s2",
        CS,
        bucket="b",
        key="k",
        base_version=None,
        base_size=0,
        meta={"user.notes": "n" * JOURNAL_LIMIT},
        headers={},
    )
    assert not big.journal_in_header and (tmp_path / "s2.json").exists()
    big.remove()
    assert list(tmp_path.iterdir()) == []


def test_bad_journal_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"journal": 99}')
    with pytest.raises(ValueError, match="unknown journal version"):
        Spool.load(tmp_path / "x.json")


def test_times_round_trip_and_bad_values() -> None:
    assert format_time(1_600_000_000_123_456_789) == "1600000000.123456789"
    assert parse_time("1600000000.123456789") == 1_600_000_000_123_456_789
    assert parse_time("1600000000.5") == 1_600_000_000_500_000_000
    assert parse_time("1600000000") == 1_600_000_000_000_000_000
    assert parse_time("soon") is None
    assert parse_time(None) is None


def test_attributes_round_trip_through_metadata() -> None:
    attr = FileAttr(stat.S_IFREG | 0o4750, 12, 34, 5, 10**18, 2 * 10**18, 3 * 10**18, 0, "v")
    meta = encode(attr, {"color": "red", "mode": "ignored"})
    assert meta["color"] == "red" and meta["mode"] == str(stat.S_IFREG | 0o4750)
    back = decode(
        meta,
        size=5,
        committed=datetime.now(UTC),
        default_mode=DEFAULT_FILE_MODE,
        uid=0,
        gid=0,
        version_id="v",
    )
    assert back == attr
    assert xattrs(meta) == {"color": "red"}


def test_defaults_and_type_bits_follow_the_key() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    plain = decode(
        {}, size=3, committed=when, default_mode=DEFAULT_FILE_MODE, uid=7, gid=8, version_id=None
    )
    assert (plain.mode, plain.uid, plain.gid) == (DEFAULT_FILE_MODE, 7, 8)
    assert plain.mtime_ns == int(when.timestamp()) * 10**9
    # a directory marker whose metadata claims a regular file stays a directory
    odd = decode(
        {"mode": str(stat.S_IFREG | 0o700)},
        size=0,
        committed=when,
        default_mode=DEFAULT_DIR_MODE,
        uid=0,
        gid=0,
        version_id=None,
    )
    assert odd.mode == stat.S_IFDIR | 0o700
    garbage = decode(
        {"uid": "x", "mode": "y"},
        size=0,
        committed=when,
        default_mode=DEFAULT_FILE_MODE,
        uid=1,
        gid=2,
        version_id=None,
    )
    assert (garbage.mode, garbage.uid) == (DEFAULT_FILE_MODE, 1)


def test_inode_table_moves_trees_and_forgets() -> None:
    table = InodeTable("bkt")
    root = table.get(ROOT)
    assert table.child(root, "a") == ("bkt", "a")
    a = table.ensure("bkt", "a")
    ab = table.ensure("bkt", "a/b")
    other = table.ensure("bkt", "ab")
    a.lookups = ab.lookups = other.lookups = 1
    table.moved("bkt", "a", "bkt", "z", tree=True)
    assert (a.path, ab.path, other.path) == ("z", "z/b", "ab")
    assert table.ensure("bkt", "z/b") is ab
    table.moved("bkt", "ab", "bkt", "z/c", tree=False)
    assert other.path == "z/c"
    table.forget(ab.ino, 1)
    with pytest.raises(KeyError):
        table.get(ab.ino)
    assert table.ensure("bkt", "z/b").ino != ab.ino
    multi = InodeTable(None)
    assert multi.child(multi.get(ROOT), "photos") == ("photos", "")


def test_errno_table() -> None:
    import errno

    from appliance import errors

    assert errno_of(errors.NoCapacity("full")) == errno.ENOSPC
    assert errno_of(errors.DirectoryNotEmpty("d")) == errno.ENOTEMPTY
    assert errno_of(errors.NoSuchPath("p")) == errno.ENOENT
    assert errno_of(OSError(errno.EROFS, "ro")) == errno.EROFS
    assert errno_of(ValueError("x")) is None
