"""Blob formats 1 and 2: the committed samples decode, headers round-trip, damage is detected."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

from appliance.crypto.aead import DataKey, decrypt_segments, sealed_size, unseal
from appliance.crypto.keys import LocalKey, local_key_id
from appliance.data.blobformat import (
    FIXED_SIZE,
    FLAG_ENCRYPTED,
    FORMAT_VERSION_SEALED,
    BlobFormatError,
    ChunkHeader,
    Manifest,
    ManifestEntry,
    ObjectIdentity,
    SealedManifest,
    chunk_blob_key,
    decode_chunk_header,
    decode_manifest,
    decode_manifest_body,
    decode_sealed_manifest,
    decode_sealed_part,
    encode_chunk_header,
    encode_manifest,
    encode_manifest_body,
    encode_sealed_manifest,
    encode_sealed_part,
    header_size,
    manifest_blob_key,
    object_prefix,
)

pytestmark = pytest.mark.unit
SAMPLE = Path(__file__).parent / "data" / "chunk-v1.blob"


def test_committed_sample_blob_decodes() -> None:
    blob = SAMPLE.read_bytes()
    header, length = decode_chunk_header(blob)
    payload = blob[length:]
    assert payload == b"Cairn sample chunk v1\n" * 3
    assert (header.chunk_id, header.version_id, header.index) == (
        "01JDS0SAMPLECHUNK000000000",
        "01JDS0SAMPLEVERSION0000000",
        0,
    )
    assert header.size == len(payload) and header.sha256 == hashlib.sha256(payload).digest()
    assert header.identity is not None
    assert (header.identity.bucket, header.identity.key, header.identity.chunk_count) == (
        "samples",
        "docs/hello.txt",
        1,
    )
    assert header.identity.headers == {"Content-Type": "text/plain"}
    assert header.identity.user_metadata == {"origin": "format-test"}
    assert not header.encrypted
    assert length == len(blob) - header.size  # header length = stored size - size


def test_prefixes_are_stable_and_hide_names_with_a_secret() -> None:
    assert (
        object_prefix("samples", "docs/hello.txt") == "87/877d3cbd6a035a97f06400a15ce6fe37fd969657"
    )
    hidden = object_prefix("samples", "docs/hello.txt", secret=b"k" * 32)
    assert hidden != object_prefix("samples", "docs/hello.txt") and len(hidden) == 43
    # bucket names never contain NUL, so the first NUL always ends the bucket name
    assert object_prefix("ab", "c") != object_prefix("a", "bc")
    prefix = object_prefix("b", "k")
    assert chunk_blob_key(prefix, "V", 7) == f"{prefix}/V/000007"
    assert manifest_blob_key(prefix, "V") == f"{prefix}/V/manifest"


def test_encrypted_header_round_trip_and_requirements() -> None:
    identity = ObjectIdentity("secret-bucket", "secret/key", 10, "e", 1)
    header = ChunkHeader(
        "c",
        "v",
        3,
        10,
        b"\x01" * 32,
        identity=identity,
        encrypted=True,
        wrapped_dek=b"\x02" * 60,
        key_id="k1",
        sealed=b"\x03" * 40,
    )
    encoded = encode_chunk_header(header)
    assert encoded[4] == FORMAT_VERSION_SEALED and encoded[5] == FLAG_ENCRYPTED
    # neither the identity nor the SHA-256 is written in clear: they are in ``sealed``
    assert b"secret" not in encoded and (b"\x01" * 32).hex().encode() not in encoded
    decoded, _ = decode_chunk_header(encoded)
    assert decoded == ChunkHeader(
        "c",
        "v",
        3,
        10,
        b"",
        encrypted=True,
        wrapped_dek=b"\x02" * 60,
        key_id="k1",
        sealed=b"\x03" * 40,
    )
    with pytest.raises(BlobFormatError, match="wrapped DEK"):
        encode_chunk_header(ChunkHeader("c", "v", 0, 1, b"", encrypted=True))
    assert decode_sealed_part(encode_sealed_part(b"\x01" * 32, identity)) == (
        b"\x01" * 32,
        identity,
    )


def test_version_and_flag_must_agree() -> None:
    blob = bytearray(SAMPLE.read_bytes())
    blob[5] = FLAG_ENCRYPTED  # a version-1 blob claiming to be encrypted, CRC fixed up
    total = header_size(bytes(blob[:FIXED_SIZE]))
    blob[total - 4 : total] = struct.pack(">I", zlib.crc32(bytes(blob[: total - 4])))
    with pytest.raises(BlobFormatError, match="invalid"):
        decode_chunk_header(bytes(blob))


def test_sealed_manifest_round_trip() -> None:
    identity = ObjectIdentity("b", "k", 1, "e", 1)
    manifest = Manifest("V", identity, (ManifestEntry(0, 1, "c", 0, "x/y", 1, b"\x00" * 32),))
    sealed = SealedManifest("V", "M1", b"w" * 60, "local:abc", b"s" * 50)
    blob = encode_sealed_manifest(sealed)
    assert decode_sealed_manifest(blob) == sealed
    with pytest.raises(BlobFormatError, match="sealed"):
        decode_manifest(blob)
    assert decode_manifest_body(encode_manifest_body(manifest)) == manifest


def test_manifest_round_trip() -> None:
    identity = ObjectIdentity("b", "big.iso", 300, '"abc-2"', 2)
    manifest = Manifest(
        "V2",
        identity,
        (
            ManifestEntry(0, 200, "c1", 0, "aa/x/P1/000000", 200, b"\x00" * 32),
            ManifestEntry(200, 100, "c2", 50, "aa/x/P2/000000", 150, b"\x11" * 32),
        ),
    )
    assert decode_manifest(encode_manifest(manifest)) == manifest
    with pytest.raises(BlobFormatError, match="expected a chunk"):
        decode_chunk_header(encode_manifest(manifest))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "version 9"),
        (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "checksum"),
        (lambda b: b[: FIXED_SIZE + 5], "truncated"),
        (lambda b: b[:6], "shorter than a header"),
    ],
)
def test_damaged_headers_are_detected(mutate: object, message: str) -> None:
    blob = SAMPLE.read_bytes()
    with pytest.raises(BlobFormatError, match=message):
        decode_chunk_header(mutate(blob))  # type: ignore[operator]


def test_header_size_from_fixed_part() -> None:
    blob = SAMPLE.read_bytes()
    _, length = decode_chunk_header(blob)
    assert header_size(blob[:FIXED_SIZE]) == length


ENCRYPTED_SAMPLE = Path(__file__).parent / "data" / "chunk-v2-encrypted.blob"
SAMPLE_MASTER_KEY = bytes(range(32))
"""The master key of the committed encrypted sample (never use a key like this)."""


async def test_committed_encrypted_sample_decodes() -> None:
    blob = ENCRYPTED_SAMPLE.read_bytes()
    header, length = decode_chunk_header(blob)
    assert blob[4] == FORMAT_VERSION_SEALED and header.encrypted
    assert header.key_id == "local:01d423df2558fbaa" == local_key_id(SAMPLE_MASTER_KEY)
    assert header.identity is None and b"samples" not in blob and b"secret.txt" not in blob
    assert header.wrapped_dek is not None and header.sealed is not None
    data_key = DataKey.from_bytes(
        await LocalKey(SAMPLE_MASTER_KEY).unwrap(header.wrapped_dek, header.key_id)
    )
    sha256, identity = decode_sealed_part(unseal(data_key, header.chunk_id, header.sealed))
    assert identity is not None
    assert (identity.bucket, identity.key, identity.chunk_count) == (
        "samples",
        "docs/secret.txt",
        1,
    )
    assert identity.user_metadata == {"origin": "format-test"}
    payload = decrypt_segments(data_key, header.chunk_id, header.size, 0, blob[length:])
    assert bytes(payload) == b"Cairn sample chunk v2\n" * 3000
    assert hashlib.sha256(payload).digest() == sha256
    # header length = stored size - sealed size, as for range reads without the header
    assert length == len(blob) - sealed_size(header.size)


def test_tombstone_round_trip_and_layout() -> None:
    from appliance.data.blobformat import (
        blob_kind,
        decode_tombstone,
        encode_tombstone,
        tombstone_blob_key,
    )

    blob = encode_tombstone("01HZZZZZZZZZZZZZZZZZZZZZZZ")
    assert blob[:6] == b"CRNB\x01\x00"  # format 1 framing, not sealed
    assert header_size(blob) == len(blob)  # header only, no payload
    assert blob_kind(blob) == "tombstone"
    assert decode_tombstone(blob) == "01HZZZZZZZZZZZZZZZZZZZZZZZ"
    assert b'"kind":"tombstone"' in blob and b"bucket" not in blob
    with pytest.raises(BlobFormatError):
        decode_tombstone(blob[:-1] + bytes([blob[-1] ^ 1]))  # CRC
    with pytest.raises(BlobFormatError):
        decode_chunk_header(blob)
    assert tombstone_blob_key("ab/abcd", "V") == "ab/abcd/V/tombstone"
