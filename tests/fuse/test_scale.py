"""The mount at scale: a directory of 100,000 entries, and a directory rename cut short
by ``kill -9`` and finished at the next start."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from appliance.ids import new_sortable_id
from appliance.meta.models import VersionKind
from appliance.meta.sqlite import SqliteMetadataStore
from tests.e2e.conftest import BUCKET
from tests.fuse.conftest import MountDaemon, MountFactory

pytestmark = [pytest.mark.fuse, pytest.mark.e2e]

EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"


def _add_empty_objects(db: Path, keys: list[str]) -> None:
    """Commit a zero-byte object at each key straight through the metadata store (the
    daemon is stopped: SQLite has one writer), much faster than 100,000 creates."""

    async def run() -> None:
        store = SqliteMetadataStore(db, gc_delay=timedelta(hours=1))
        await store.open()
        try:

            async def one(key: str) -> None:
                vid = new_sortable_id()
                await store.begin_version(vid, BUCKET, key, kind=VersionKind.OBJECT)
                await store.commit_version(vid, size=0, etag=EMPTY_MD5)

            for start in range(0, len(keys), 200):
                await asyncio.gather(*(one(k) for k in keys[start : start + 200]))
        finally:
            await store.close()

    asyncio.run(run())


def _rss_kib(daemon: MountDaemon) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_directory_of_100000_entries_lists_in_pages(mount_factory: MountFactory) -> None:
    count = 100_000
    daemon = mount_factory()
    daemon.stop_and_check()
    names = [f"entry-{i:06d}" for i in range(count)]
    _add_empty_objects(daemon.root / "cairn.db", [f"big/{n}" for n in names])
    daemon.start()
    (daemon.mnt / "small").mkdir()
    (daemon.mnt / "small" / "f").write_bytes(b"x")
    os.listdir(daemon.mnt / "small")  # warm up the listing path
    before = _rss_kib(daemon)
    started = time.monotonic()
    listed = os.listdir(daemon.mnt / "big")
    took = time.monotonic() - started
    grew_mib = (_rss_kib(daemon) - before) / 1024
    print(f"listed {count} entries in {took:.1f} s; the daemon grew {grew_mib:.0f} MiB")
    assert len(listed) == count and set(listed) == set(names)
    # One page of attributes is held per open directory; what does grow is the inode
    # table (the kernel keeps a lookup on every entry it was given): about 40 MiB here.
    # Holding all 100,000 versions at once (dataclasses, metadata dicts, attributes)
    # would add more than the margin.
    assert grew_mib < 64, f"the daemon grew {grew_mib:.0f} MiB listing {count} entries"
    assert took < 120
    # stat of entries listed (readdirplus gave the kernel their attributes)
    assert os.stat(daemon.mnt / "big" / names[-1]).st_size == 0
