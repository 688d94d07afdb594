"""Segment AEAD framing, data-key wrapping and local master keys (appliance.crypto)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from appliance.crypto.aead import (
    SEGMENT,
    TAG,
    AuthenticationFailed,
    DataKey,
    decrypt_segments,
    encrypt_chunk,
    seal,
    sealed_size,
    segment_count,
    segment_span,
    segments_in,
    unseal,
)
from appliance.crypto.keys import KeyRing, LocalKey, decode_key, local_key_id, read_key_file
from appliance.errors import KeyUnavailable

pytestmark = pytest.mark.unit
STRIDE = SEGMENT + TAG
SIZES = [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 5]


def plain_range(key: DataKey, chunk_id: str, stored: bytes, size: int, a: int, b: int) -> bytes:
    first, lo, hi = segment_span(size, a, b)
    out = decrypt_segments(key, chunk_id, size, first, stored[lo:hi], segments=segments_in(lo, hi))
    skip = a - first * SEGMENT
    return bytes(out[skip : skip + b - a])


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_whole_and_every_range_shape(size: int) -> None:
    key = DataKey.generate()
    data = os.urandom(size)
    stored = encrypt_chunk(key, "C1", data)
    assert len(stored) == sealed_size(size) == size + TAG * segment_count(size)
    assert bytes(decrypt_segments(key, "C1", size, 0, stored)) == data
    if size == 0:
        return
    for a, b in [(0, 1), (size - 1, size), (0, size), (size // 3, size // 3 + 2)]:
        assert plain_range(key, "C1", stored, size, a, b) == data[a:b]
    if size > SEGMENT:  # a range inside segment 1 fetches exactly that segment
        first, lo, hi = segment_span(size, SEGMENT + 10, SEGMENT + 20)
        assert (first, lo, hi) == (1, STRIDE, min(len(stored), 2 * STRIDE))


def test_ciphertext_hides_the_plaintext() -> None:
    data = b"very recognisable plaintext " * 5000
    stored = encrypt_chunk(DataKey.generate(), "C1", data)
    assert b"recognisable" not in stored


def _tamper_cases(stored: bytes) -> dict[str, bytes]:
    segs = [stored[i : i + STRIDE] for i in range(0, len(stored), STRIDE)]
    flipped = bytearray(stored)
    flipped[len(stored) // 2] ^= 0x01
    return {
        "flipped bit": bytes(flipped),
        "swapped segments": segs[1] + segs[0] + b"".join(segs[2:]),
        "repeated segment": segs[0] + segs[0] + b"".join(segs[2:]),
        "truncated by a byte": stored[:-1],
        "truncated at a segment boundary": b"".join(segs[:-1]),
    }


@pytest.mark.parametrize("case", list(_tamper_cases(b"\x00" * (3 * STRIDE + 21))))
def test_tampering_is_detected(case: str) -> None:
    size = 3 * SEGMENT + 5
    key = DataKey.generate()
    stored = encrypt_chunk(key, "C1", os.urandom(size))
    bad = _tamper_cases(stored)[case]
    with pytest.raises(AuthenticationFailed):
        decrypt_segments(key, "C1", size, 0, bad)


def test_a_partial_range_must_have_its_exact_length() -> None:
    key = DataKey.generate()
    stored = encrypt_chunk(key, "C1", os.urandom(3 * SEGMENT))
    assert decrypt_segments(key, "C1", 3 * SEGMENT, 1, stored[STRIDE : 2 * STRIDE], segments=1)
    with pytest.raises(AuthenticationFailed, match="truncated"):
        decrypt_segments(key, "C1", 3 * SEGMENT, 1, stored[STRIDE : 2 * STRIDE - 1], segments=1)


def test_truncated_segments_fail_even_when_read_as_a_shorter_chunk() -> None:
    # Dropping the final segment and claiming the chunk was shorter: the last kept
    # segment was sealed as not-final, so it does not authenticate as the final one.
    key = DataKey.generate()
    stored = encrypt_chunk(key, "C1", os.urandom(2 * SEGMENT + 7))
    with pytest.raises(AuthenticationFailed):
        decrypt_segments(key, "C1", 2 * SEGMENT, 0, stored[: 2 * STRIDE])


def test_a_blob_moved_to_another_chunk_or_key_is_detected() -> None:
    key = DataKey.generate()
    stored = encrypt_chunk(key, "C1", os.urandom(1000))
    with pytest.raises(AuthenticationFailed):
        decrypt_segments(key, "C2", 1000, 0, stored)  # AAD binds the chunk id
    with pytest.raises(AuthenticationFailed):
        decrypt_segments(DataKey.generate(), "C1", 1000, 0, stored)
    with pytest.raises(AuthenticationFailed):  # segment 0 presented as segment 1
        decrypt_segments(key, "C1", SEGMENT + 1000, 1, stored, segments=1)


def test_seal_and_unseal() -> None:
    key = DataKey.generate()
    sealed = seal(key, "C1", b'{"bucket":"b"}')
    assert unseal(key, "C1", sealed) == b'{"bucket":"b"}'
    assert b"bucket" not in sealed
    with pytest.raises(AuthenticationFailed):
        unseal(key, "C2", sealed)
    with pytest.raises(AuthenticationFailed):
        unseal(key, "C1", sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_data_key_serialisation_and_repr() -> None:
    key = DataKey.generate()
    assert DataKey.from_bytes(key.to_bytes()) == key
    assert key.key.hex() not in repr(key)
    with pytest.raises(AuthenticationFailed):
        DataKey.from_bytes(b"short")


async def test_local_keys_wrap_and_ring_uses_previous_keys() -> None:
    old, new = LocalKey(os.urandom(32)), LocalKey(os.urandom(32))
    wrapped, old_id = await old.wrap(b"x" * 44)
    assert old_id.startswith("local:") and len(old_id) == 22
    ring = KeyRing(new, [old])
    assert ring.current_id == new.current_id != old_id
    assert await ring.unwrap(wrapped, old_id) == b"x" * 44
    rewrapped, new_id = await ring.rewrap(wrapped, old_id)
    assert new_id == new.current_id and await ring.unwrap(rewrapped, new_id) == b"x" * 44
    with pytest.raises(KeyUnavailable, match="previous_keys"):
        await KeyRing(new).unwrap(wrapped, old_id)
    damaged = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(AuthenticationFailed):
        await ring.unwrap(damaged, old_id)
    # a wrapped key cannot be passed off under another key id
    with pytest.raises(KeyUnavailable):
        await old.unwrap(wrapped, new.current_id)


def test_key_decoding(tmp_path: Path) -> None:
    raw = os.urandom(32)
    assert decode_key(base64.b64encode(raw).decode() + "\n", what="k") == raw
    with pytest.raises(ValueError, match="32 bytes"):
        decode_key(base64.b64encode(b"short").decode(), what="k")
    with pytest.raises(ValueError, match="base64"):
        decode_key("not base64!", what="k")
    (tmp_path / "raw").write_bytes(raw)
    (tmp_path / "b64").write_text(base64.b64encode(raw).decode() + "\n")
    assert read_key_file(tmp_path / "raw") == read_key_file(tmp_path / "b64") == raw
    assert local_key_id(raw) == LocalKey(raw).current_id
