"""BufferPool and HeadroomBuffer: exact sizes, the free-byte bound, refcount-guarded reuse."""

from __future__ import annotations

import pytest

from appliance.data.buffers import (
    HEADROOM,
    MIN_POOLED,
    BufferPool,
    HeadroomBuffer,
    PooledBuffer,
    payload_view,
)

pytestmark = pytest.mark.unit
MiB = 1 << 20


def test_a_given_buffer_is_reused_for_the_same_size_only() -> None:
    pool = BufferPool(64 * MiB)
    first = pool.take(2 * MiB)
    assert isinstance(first, PooledBuffer) and len(first) == 2 * MiB
    pool.give(first)
    assert pool.take(3 * MiB) is not first
    assert pool.take(2 * MiB) is first
    assert (pool.hits, pool.misses) == (1, 2)


def test_small_buffers_and_foreign_objects_are_not_pooled() -> None:
    pool = BufferPool(64 * MiB)
    small = pool.take(MIN_POOLED - 1)
    assert type(small) is bytearray
    pool.give(small)
    pool.give(bytearray(2 * MiB))  # not lent by a pool: ignored
    pool.give(b"x" * (2 * MiB))
    assert pool.free_bytes == 0


def test_free_buffers_are_bounded_and_the_oldest_go_first() -> None:
    pool = BufferPool(5 * MiB)
    a, b, c = pool.take(2 * MiB), pool.take(2 * MiB), pool.take(2 * MiB)
    for buf in (a, b, c):
        pool.give(buf)
    assert pool.free_bytes == 4 * MiB
    assert pool.take(2 * MiB) is c  # newest first
    assert pool.take(2 * MiB) is b
    assert pool.take(2 * MiB) is not a  # a was dropped to keep the bound
    pool.clear()
    assert pool.free_bytes == 0


def test_a_zero_sized_pool_lends_plain_buffers() -> None:
    pool = BufferPool(0)
    buf = pool.take(2 * MiB)
    pool.give(buf)
    assert pool.free_bytes == 0


def test_a_shared_buffer_is_not_recycled() -> None:
    pool = BufferPool(64 * MiB)
    buf = pool.take(2 * MiB)
    kept = [buf]  # someone else (a cache) still holds it
    pool.give_if_unshared(buf, holders=1)
    assert pool.free_bytes == 0
    view = memoryview(kept.pop())  # a view counts as a holder too
    pool.give_if_unshared(buf, holders=1)
    assert pool.free_bytes == 0
    view.release()
    del view
    pool.give_if_unshared(buf, holders=1)
    assert pool.free_bytes == 2 * MiB


def test_headroom_frames_a_header_without_copying_the_data() -> None:
    buf = bytearray(HEADROOM + 10)
    buf[HEADROOM:] = b"0123456789"
    payload = HeadroomBuffer(buf, HEADROOM, 10)
    assert len(payload) == 10 and bytes(payload_view(payload)) == b"0123456789"
    framed = payload.framed(b"HEAD")
    assert framed is not None and bytes(framed) == b"HEAD0123456789"
    assert framed.obj is buf  # the same memory
    assert payload.framed(b"x" * (HEADROOM + 1)) is None
    with pytest.raises(ValueError, match="do not fit"):
        HeadroomBuffer(bytearray(10), 5, 6)
    assert payload_view(b"abc") == b"abc"
