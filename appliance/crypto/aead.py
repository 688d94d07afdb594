"""Segmented AES-256-GCM for chunk payloads (DESIGN section 4, docs/FORMAT.md format 2).

A chunk's plaintext is cut into 64 KiB segments (the last may be shorter; an empty chunk
is one empty segment). Segment ``i`` is sealed with the chunk's data key, the nonce
``base_nonce XOR i`` (big-endian, in the low 8 bytes) and the AAD
``b"cairn-seg" || chunk_id || i (8 bytes BE) || final (1 byte)``, and stored as its
ciphertext followed by the 16-byte tag. So a flipped bit, a swapped or repeated
segment, a truncated payload and a payload moved to another chunk all fail
authentication, and any segment range can be opened without the others.

This module is pure and synchronous; callers run big buffers through the CPU pool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEGMENT = 64 * 1024
"""Plaintext bytes per segment."""
TAG = 16
KEY_SIZE = 32
NONCE_SIZE = 12
DATA_KEY_SIZE = KEY_SIZE + NONCE_SIZE
"""Serialized data key: the 256-bit DEK then the 96-bit base nonce (wrapped together)."""
_SEG_LABEL = b"cairn-seg"
_SEAL_LABEL = b"cairn-seal"


class AuthenticationFailed(ValueError):
    """Ciphertext did not authenticate: damaged, reordered, truncated or misplaced."""


@dataclass(frozen=True, slots=True)
class DataKey:
    """A chunk's data key (DEK) and the base nonce of its segments."""

    key: bytes
    base_nonce: bytes

    @classmethod
    def generate(cls) -> DataKey:
        return cls(AESGCM.generate_key(bit_length=256), os.urandom(NONCE_SIZE))

    def to_bytes(self) -> bytes:
        return self.key + self.base_nonce

    @classmethod
    def from_bytes(cls, raw: bytes) -> DataKey:
        """Raises ``AuthenticationFailed`` for a blob of the wrong length."""
        if len(raw) != DATA_KEY_SIZE:
            raise AuthenticationFailed(f"a data key is {DATA_KEY_SIZE} bytes, got {len(raw)}")
        return cls(raw[:KEY_SIZE], raw[KEY_SIZE:])

    def __repr__(self) -> str:  # never print key material
        return "DataKey(<hidden>)"


def segment_count(size: int) -> int:
    """Segments of a chunk of ``size`` plaintext bytes (at least one)."""
    return max(1, -(-size // SEGMENT))


def sealed_size(size: int) -> int:
    """Stored payload bytes of a chunk of ``size`` plaintext bytes."""
    return size + TAG * segment_count(size)


def segment_span(size: int, start: int, end: int) -> tuple[int, int, int]:
    """For plaintext ``[start, end)`` (``start < end``) of a chunk of ``size`` bytes:
    ``(first_segment, payload_start, payload_end)``, the stored bytes to fetch."""
    first = start // SEGMENT
    last = (end - 1) // SEGMENT
    payload_end = min(sealed_size(size), (last + 1) * (SEGMENT + TAG))
    return first, first * (SEGMENT + TAG), payload_end


def _nonce(base: bytes, index: int) -> bytes:
    low = int.from_bytes(base[4:], "big") ^ index
    return base[:4] + low.to_bytes(8, "big")


def _aad(chunk_id: str, index: int, final: bool) -> bytes:
    return (
        _SEG_LABEL + chunk_id.encode() + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")
    )


def encrypt_into(
    key: DataKey, chunk_id: str, plaintext: bytes | bytearray | memoryview, out: memoryview
) -> None:
    """Seal ``plaintext`` into ``out``, which must be exactly ``sealed_size`` bytes."""
    size = len(plaintext)
    count = segment_count(size)
    if len(out) != sealed_size(size):
        raise ValueError("output buffer has the wrong size")
    aead = AESGCM(key.key)
    source = memoryview(plaintext)
    for i in range(count):
        lo = i * SEGMENT
        piece = source[lo : min(size, lo + SEGMENT)]
        at = i * (SEGMENT + TAG)
        aead.encrypt_into(
            _nonce(key.base_nonce, i),
            piece,
            _aad(chunk_id, i, i == count - 1),
            out[at : at + len(piece) + TAG],
        )


def encrypt_chunk(key: DataKey, chunk_id: str, plaintext: bytes | bytearray | memoryview) -> bytes:
    """The sealed payload of a chunk (convenience over ``encrypt_into``)."""
    out = bytearray(sealed_size(len(plaintext)))
    encrypt_into(key, chunk_id, plaintext, memoryview(out))
    return bytes(out)


def decrypt_segments(
    key: DataKey,
    chunk_id: str,
    size: int,
    first: int,
    stored: bytes | bytearray | memoryview,
    *,
    segments: int | None = None,
    out: bytearray | None = None,
) -> bytearray:
    """Open ``segments`` consecutive sealed segments (default: through the last one)
    starting at segment ``first`` of a chunk of ``size`` plaintext bytes; ``stored``
    must be exactly those segments' bytes. The plaintext goes into ``out`` when given
    (exactly its length) or into a new buffer; either is returned.

    Raises ``AuthenticationFailed`` on any damage, reordering or truncation.
    """
    count = segment_count(size)
    wanted = count - first if segments is None else segments
    if wanted <= 0 or first < 0 or first + wanted > count:
        raise ValueError(f"segments {first}+{wanted} outside a chunk of {count}")
    plain_lo = first * SEGMENT
    plain_hi = min(size, (first + wanted) * SEGMENT)
    data = memoryview(stored)
    if len(data) != plain_hi - plain_lo + TAG * wanted:
        raise AuthenticationFailed(
            f"chunk {chunk_id}: sealed range has {len(data)} bytes, expected "
            f"{plain_hi - plain_lo + TAG * wanted} (truncated or padded)"
        )
    if out is None:
        out = bytearray(plain_hi - plain_lo)
    elif len(out) != plain_hi - plain_lo:
        raise ValueError(f"out has {len(out)} bytes, the plaintext {plain_hi - plain_lo}")
    target = memoryview(out)
    aead = AESGCM(key.key)
    try:
        for n in range(wanted):
            i = first + n
            at = n * (SEGMENT + TAG)
            piece_len = min(SEGMENT, size - i * SEGMENT)
            aead.decrypt_into(
                _nonce(key.base_nonce, i),
                data[at : at + piece_len + TAG],
                _aad(chunk_id, i, i == count - 1),
                target[n * SEGMENT : n * SEGMENT + piece_len],
            )
    except InvalidTag as exc:
        raise AuthenticationFailed(f"chunk {chunk_id}: a segment failed authentication") from exc
    return out


def segments_in(payload_start: int, payload_end: int) -> int:
    """Segments covered by a ``segment_span`` byte range."""
    return -(-(payload_end - payload_start) // (SEGMENT + TAG))


def seal(key: DataKey, chunk_id: str, plaintext: bytes) -> bytes:
    """Seal a small header part with a chunk's data key: random nonce || ciphertext."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key.key).encrypt(nonce, plaintext, _SEAL_LABEL + chunk_id.encode())


def unseal(key: DataKey, chunk_id: str, sealed: bytes) -> bytes:
    """Open ``seal`` output; raises ``AuthenticationFailed``."""
    if len(sealed) < NONCE_SIZE + TAG:
        raise AuthenticationFailed("sealed part is too short")
    try:
        return AESGCM(key.key).decrypt(
            sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], _SEAL_LABEL + chunk_id.encode()
        )
    except InvalidTag as exc:
        raise AuthenticationFailed(f"chunk {chunk_id}: sealed header part is damaged") from exc
