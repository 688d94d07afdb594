"""The durable journal of a directory rename in progress (docs/fuse.md, "Renames").

A directory rename moves its keys one by one (each a metadata-only copy, then the old
key's removal). Before the first key moves, ``<spool dir>/<id>.rename`` records the
bucket and prefix it moves from and to, written and fsynced (file and directory); it is
removed when the last key has moved. A process that dies in the middle leaves the
journal, and the next start finishes the move (``FileService.recover``): the rename
rolls forward, so the tree ends up whole at its new name.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOURNAL_VERSION = 1
SUFFIX = ".rename"


@dataclass(frozen=True, slots=True)
class RenameJournal:
    """Keys under ``bucket``/``src`` move to ``dst_bucket``/``dst`` (both prefixes end
    with ``/``)."""

    path: Path
    bucket: str
    src: str
    dst_bucket: str
    dst: str

    @classmethod
    def create(
        cls, directory: Path, rename_id: str, bucket: str, src: str, dst_bucket: str, dst: str
    ) -> RenameJournal:
        """Write the journal durably. Raises ``OSError``."""
        journal = cls(directory / f"{rename_id}{SUFFIX}", bucket, src, dst_bucket, dst)
        doc = {
            "journal": JOURNAL_VERSION,
            "bucket": bucket,
            "src": src,
            "dst_bucket": dst_bucket,
            "dst": dst,
        }
        tmp = journal.path.with_suffix(".rename-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc, sort_keys=True).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, journal.path)
        _fsync_dir(directory)
        return journal

    @classmethod
    def load(cls, path: Path) -> RenameJournal:
        """Raises ``OSError``, ``ValueError`` and ``KeyError`` (an unreadable journal)."""
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("journal") != JOURNAL_VERSION:
            raise ValueError(f"unknown rename journal version {doc.get('journal')!r}")
        fields = [doc["bucket"], doc["src"], doc["dst_bucket"], doc["dst"]]
        if not all(isinstance(f, str) for f in fields) or not doc["src"] or not doc["dst"]:
            raise ValueError("a rename journal names two buckets and two prefixes")
        return cls(path, *fields)

    @staticmethod
    def pending(directory: Path) -> list[Path]:
        """Journals left in ``directory``, oldest first (ids sort by time)."""
        return sorted(directory.glob(f"*{SUFFIX}"))

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
