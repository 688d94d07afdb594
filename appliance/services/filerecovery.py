"""Recovery at mount time: directory renames cut short are finished, then spools left
by a dead process are committed or reported. Part of ``appliance.services.files``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

from appliance.errors import NoSuchPath
from appliance.meta.models import ObjectVersion
from appliance.services.fileattrs import DEFAULT_FILE_MODE, decode, xattrs
from appliance.services.filemeta import FileMeta
from appliance.services.filetypes import OpenFile, Recovered
from appliance.services.objects import ObjectHandle
from appliance.services.renames import RenameJournal
from appliance.services.spool import Spool

log = logging.getLogger("cairn.files")


class FileRecovery(FileMeta):
    """What a dead process left behind (see ``appliance.services.files``)."""

    async def recover(self) -> list[Recovered]:
        """Commit what a dead process left in the spool directory.

        A file is committed to its own key when that key still holds the version its
        writes started from; otherwise to ``<key>.cairn-recovered-<spool id>`` so no
        newer data is overwritten. A spool that cannot be committed is kept and
        reported. Never raises for one file's failure.

        Directory renames cut short (their journals, ``appliance.services.renames``) are
        finished first, so spools of files under them find their new keys.
        """
        out: list[Recovered] = [
            await self._recover_rename(p) for p in RenameJournal.pending(self._spool_dir)
        ]
        for journal in sorted(self._spool_dir.glob("*.json")):
            try:
                spool = Spool.load(journal)
            except (OSError, ValueError, KeyError) as exc:
                out.append(Recovered("?", "?", None, 0, f"{journal}: unreadable: {exc}"))
                continue
            out.append(await self._recover_one(spool))
        inner = [*self._spool_dir.glob("*.spool"), *self._spool_dir.glob("*.data")]
        for data in sorted(inner):
            if data.with_suffix(".json").exists():
                continue  # recovered above, or kept after it failed
            try:
                left = Spool.load_data(data)
            except (OSError, ValueError, KeyError) as exc:
                out.append(Recovered("?", "?", None, 0, f"{data}: unreadable: {exc}"))
                continue
            if left is None:
                # no journal: the spool of a file unlinked while open, nothing to keep
                with contextlib.suppress(OSError):
                    data.unlink()
                continue
            out.append(await self._recover_one(left))
        return out

    async def _recover_rename(self, path: Path) -> Recovered:
        """Roll a directory rename forward; a journal that cannot be finished is kept."""
        try:
            journal = RenameJournal.load(path)
        except (OSError, ValueError, KeyError) as exc:
            return Recovered("?", "?", None, 0, f"{path}: unreadable rename journal: {exc}")
        try:
            moved = await self._finish_rename(journal)
        except Exception as exc:
            log.error(
                "rename recovery: %s/%s -> %s/%s not finished, journal kept in %s: %s",
                journal.bucket,
                journal.src,
                journal.dst_bucket,
                journal.dst,
                path,
                exc,
            )
            return Recovered(journal.bucket, journal.src, None, 0, f"rename kept: {exc}")
        log.warning(
            "rename recovery: %s/%s -> %s/%s finished (%d keys were left to move)",
            journal.bucket,
            journal.src,
            journal.dst_bucket,
            journal.dst,
            moved,
        )
        detail = f"directory rename finished ({moved} keys moved)"
        return Recovered(journal.bucket, journal.src, journal.dst, 0, detail)

    async def _recover_one(self, spool: Spool) -> Recovered:
        size = spool.size
        original = spool.key  # the spool's key moves to where it is committed
        try:
            current = await self._store.get_current(spool.bucket, spool.key)
            if current is not None and _already_committed(spool, current, self._chunk_size):
                # the process died after the commit, before the spool was removed
                spool.remove()
                log.info("spool recovery: %s/%s was committed already", spool.bucket, spool.key)
                return Recovered(spool.bucket, spool.key, spool.key, size, "committed already")
            base: ObjectHandle | None = None
            if spool.base_version is not None:
                version = await self._store.get_version(spool.base_version)
                if version is not None:
                    layout = await self._store.get_layout(version.version_id)
                    base = ObjectHandle(version, tuple(layout))
            same = (current.version_id if current else None) == spool.base_version
            key = spool.key if same else f"{spool.key}.cairn-recovered-{spool.spool_id}"
            if (
                spool.base_version is not None
                and base is None
                and any(s.from_base for s in spool.segments())
            ):
                raise NoSuchPath("the version the writes started from is gone")
            attr = decode(
                spool.meta,
                size=size,
                committed=current.created_at if current else _epoch(),
                default_mode=DEFAULT_FILE_MODE,
                uid=self.uid,
                gid=self.gid,
                version_id=None,
            )
            node = OpenFile(
                spool.bucket,
                key,
                attr,
                xattrs(spool.meta),
                spool.headers,
                base,
                spool=spool,
                committed=base is not None,
            )
            spool.key = key
            await self._commit_spool(node, spool.meta)
            spool.remove()
            detail = "committed" if same else "the key changed meanwhile: committed aside"
            log.warning(
                "spool recovery: %s/%s (%d bytes) %s as %s",
                spool.bucket,
                original,
                size,
                detail,
                key,
            )
            return Recovered(spool.bucket, original, key, size, detail)
        except Exception as exc:
            log.error(
                "spool recovery: %s/%s (%d bytes) could not be committed, kept in %s: %s",
                spool.bucket,
                original,
                size,
                spool.data_path,
                exc,
            )
            spool.close()
            return Recovered(spool.bucket, original, None, size, f"kept: {exc}")


_TIMES = frozenset({"mtime", "ctime", "atime"})
"""Attributes a spool's journal may hold older values of than its commit (a write
changes them in memory only)."""


def _already_committed(spool: Spool, current: ObjectVersion, chunk_size: int) -> bool:
    """Whether ``current`` is this spool's own commit: a version newer than the spool,
    of one chunk at most, with its bytes (MD5) and its metadata apart from the times.
    Committing the spool again would change nothing but the times."""
    if current.version_id == spool.base_version or current.version_id <= spool.spool_id:
        return False
    if current.size != spool.size or spool.size > chunk_size:
        return False
    if any(seg.from_base for seg in spool.segments()):
        return False
    ours = {k: v for k, v in spool.meta.items() if k not in _TIMES}
    theirs = {k: v for k, v in current.user_metadata.items() if k not in _TIMES}
    if ours != theirs:
        return False
    md5 = hashlib.md5(usedforsecurity=False)
    md5.update(spool.pread(0, spool.size))
    return current.etag == md5.hexdigest()


def _epoch() -> datetime:
    return datetime.fromtimestamp(0, UTC)
