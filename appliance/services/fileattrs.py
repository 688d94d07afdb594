"""POSIX attributes of files kept in S3 user metadata (docs/fuse.md).

A file's mode, owner, times and device number are user metadata entries of its version,
so S3 clients see them as ``x-amz-meta-mode`` etc. The names and encodings follow s3fs
and rclone so those tools read them too:

- ``mode``: the whole ``st_mode`` (type bits included) in decimal, e.g. ``33188``;
- ``uid``, ``gid``, ``rdev``: decimal;
- ``mtime``, ``ctime``, ``atime``: seconds since the epoch with up to 9 decimals.

Every other user metadata entry is an extended attribute ``user.<name>``.
Objects written through S3 without these entries get defaults (0644 files, 0755
directories, owned by the mounting user, times from the version's commit).
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

RESERVED = frozenset({"mode", "uid", "gid", "rdev", "mtime", "ctime", "atime"})
"""User metadata names holding POSIX attributes; not visible as extended attributes."""

DEFAULT_FILE_MODE = stat.S_IFREG | 0o644
DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755


@dataclass(frozen=True, slots=True)
class FileAttr:
    """What ``stat`` shows of one entry. ``version_id`` is None for directories without
    a marker object and for bucket roots."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    rdev: int = 0
    version_id: str | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    def with_changes(self, **changes: int) -> FileAttr:
        return replace(self, **changes)  # type: ignore[arg-type]


def ns_of(when: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime (microsecond precision)."""
    return round(when.timestamp() * 1_000_000) * 1000


def format_time(ns: int) -> str:
    """``seconds.nnnnnnnnn`` as s3fs and rclone read it."""
    seconds, frac = divmod(ns, 1_000_000_000)
    return f"{seconds}.{frac:09d}"


def parse_time(text: str | None) -> int | None:
    """Nanoseconds from ``seconds[.fraction]``; None when absent or malformed."""
    if not text:
        return None
    whole, _, frac = text.strip().partition(".")
    try:
        seconds = int(whole)
        nanos = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        return None
    return seconds * 1_000_000_000 + nanos


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def decode(
    meta: Mapping[str, str],
    *,
    size: int,
    committed: datetime,
    default_mode: int,
    uid: int,
    gid: int,
    version_id: str | None,
) -> FileAttr:
    """Attributes from a version's user metadata, defaults for what is missing.

    A ``mode`` whose type bits disagree with ``default_mode``'s kind of entry is ignored
    for the type (a key ending in ``/`` is always a directory, any other key never is).
    """
    stamp = ns_of(committed)
    mode = _int(meta.get("mode"))
    if mode is None:
        mode = default_mode
    elif stat.S_ISDIR(default_mode) != stat.S_ISDIR(mode) or stat.S_IFMT(mode) == 0:
        mode = stat.S_IFMT(default_mode) | stat.S_IMODE(mode)
    mtime = parse_time(meta.get("mtime"))
    mtime = stamp if mtime is None else mtime
    ctime = parse_time(meta.get("ctime"))
    atime = parse_time(meta.get("atime"))
    return FileAttr(
        mode=mode,
        uid=_or(_int(meta.get("uid")), uid),
        gid=_or(_int(meta.get("gid")), gid),
        size=size,
        mtime_ns=mtime,
        ctime_ns=max(mtime, stamp) if ctime is None else ctime,
        atime_ns=mtime if atime is None else atime,
        rdev=_int(meta.get("rdev")) or 0,
        version_id=version_id,
    )


def encode(attr: FileAttr, extra: Mapping[str, str]) -> dict[str, str]:
    """User metadata for ``attr`` plus ``extra`` (the extended attributes)."""
    meta = {k: v for k, v in extra.items() if k not in RESERVED}
    meta.update(
        mode=str(attr.mode),
        uid=str(attr.uid),
        gid=str(attr.gid),
        mtime=format_time(attr.mtime_ns),
        ctime=format_time(attr.ctime_ns),
        atime=format_time(attr.atime_ns),
    )
    if attr.rdev:
        meta["rdev"] = str(attr.rdev)
    return meta


def xattrs(meta: Mapping[str, str]) -> dict[str, str]:
    """The user metadata entries that are extended attributes (``user.<name>``)."""
    return {k: v for k, v in meta.items() if k not in RESERVED}
