"""Identifiers: time-sortable version and chunk ids, and upload ids.

Version ids sort by creation time (DESIGN section 3) so the newest version of a key
can be told from blob names alone, without the database.
"""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_sortable_id(now_ms: int | None = None) -> str:
    """Return a 26-character ULID-style id: 48-bit milliseconds, then 10 bits of the
    microsecond within that millisecond, then 70 random bits.

    Ids made in different microseconds sort by time, so one process's successive ids
    (a write that begins after another committed) always sort after the earlier ones;
    ids of the same microsecond (concurrent writers) sort at random. With ``now_ms``
    (tests) the microsecond bits are 0.
    """
    if now_ms is None:
        ns = time.time_ns()
        ms, micro = ns // 1_000_000, (ns // 1_000) % 1_000
    else:
        ms, micro = now_ms, 0
    if not 0 <= ms < 1 << 48:
        raise ValueError("timestamp out of range for a sortable id")
    rand = int.from_bytes(os.urandom(9), "big") >> 2  # 70 bits
    return _encode(ms, 10) + _encode((micro << 70) | rand, 16)


def sortable_id_time_ms(value: str) -> int:
    """Return the millisecond timestamp embedded in ``value``; ValueError if malformed."""
    if len(value) != 26:
        raise ValueError(f"not a sortable id: {value!r}")
    ms = 0
    for ch in value[:10]:
        idx = _CROCKFORD.find(ch)
        if idx < 0:
            raise ValueError(f"not a sortable id: {value!r}")
        ms = (ms << 5) | idx
    return ms


def successor_id(value: str) -> str:
    """The smallest sortable id greater than ``value`` (its last digit plus one, with
    carry). A rewrite of a version takes this id, so any write that began after the
    original one still sorts after the rewrite. ValueError if malformed or the largest."""
    if len(value) != 26 or any(ch not in _CROCKFORD for ch in value):
        raise ValueError(f"not a sortable id: {value!r}")
    digits = [_CROCKFORD.index(ch) for ch in value]
    for i in range(len(digits) - 1, -1, -1):
        if digits[i] < 31:
            digits[i] += 1
            return "".join(_CROCKFORD[d] for d in digits)
        digits[i] = 0
    raise ValueError("the largest id has no successor")
