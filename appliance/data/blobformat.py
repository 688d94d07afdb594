"""Blob names and the self-describing blob header (formats 1 and 2, see docs/FORMAT.md).

Every blob starts with a header that says what it is, so the metadata store can be
rebuilt by listing the backends. This module is pure: it encodes and decodes bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"CRNB"
FORMAT_VERSION = 1
"""Unencrypted chunks and manifests: unchanged since the first release."""
FORMAT_VERSION_SEALED = 2
"""Encrypted chunks and sealed manifests (flag bit 0 set); see ``appliance.crypto``."""
READABLE_VERSIONS = frozenset({FORMAT_VERSION, FORMAT_VERSION_SEALED})
FLAG_ENCRYPTED = 0x01
"""The payload is AES-256-GCM segments and the header body's identity is sealed."""
_FIXED = struct.Struct(">4sBBHI")  # magic, version, flags, reserved, body length
FIXED_SIZE = _FIXED.size
CRC_SIZE = 4
MAX_HEADER_BODY = 1 << 20
PREFIX_DIGEST_HEX = 40


class BlobFormatError(ValueError):
    """The bytes are not a Cairn blob of a known format version, or are damaged."""


@dataclass(frozen=True, slots=True)
class ObjectIdentity:
    """Who an object is, carried by chunk 0 and by manifests for recovery."""

    bucket: str
    key: str
    size: int
    etag: str
    chunk_count: int
    headers: Mapping[str, str] = field(default_factory=dict)
    user_metadata: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "key": self.key,
            "size": self.size,
            "etag": self.etag,
            "chunk_count": self.chunk_count,
            "headers": dict(self.headers),
            "user_metadata": dict(self.user_metadata),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ObjectIdentity:
        try:
            return cls(
                bucket=str(raw["bucket"]),
                key=str(raw["key"]),
                size=int(raw["size"]),
                etag=str(raw["etag"]),
                chunk_count=int(raw["chunk_count"]),
                headers={str(k): str(v) for k, v in dict(raw.get("headers", {})).items()},
                user_metadata={
                    str(k): str(v) for k, v in dict(raw.get("user_metadata", {})).items()
                },
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BlobFormatError(f"bad object identity in blob header: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """Header of a chunk blob. ``identity`` is set on chunk 0 of an object version.

    An encrypted header (format 2) carries ``wrapped_dek``, ``key_id`` and ``sealed``
    (the SHA-256 and identity, encrypted by ``appliance.crypto``) instead of ``sha256``
    and ``identity`` in clear; decoded, its ``sha256`` is empty and ``identity`` None.
    """

    chunk_id: str
    version_id: str
    index: int
    size: int
    sha256: bytes
    identity: ObjectIdentity | None = None
    encrypted: bool = False
    wrapped_dek: bytes | None = None
    key_id: str | None = None
    sealed: bytes | None = None


def object_prefix(bucket: str, key: str, secret: bytes | None = None) -> str:
    """The blob prefix of an object: ``<d[:2]>/<d>`` with ``d`` a digest of its identity.

    Without ``secret`` the digest is SHA-256 (names recoverable without the database);
    with it, HMAC-SHA256, which hides bucket and key names from providers.
    """
    material = bucket.encode() + b"\x00" + key.encode()
    if secret is None:
        digest = hashlib.sha256(material).hexdigest()
    else:
        digest = hmac.new(secret, material, hashlib.sha256).hexdigest()
    digest = digest[:PREFIX_DIGEST_HEX]
    return f"{digest[:2]}/{digest}"


def chunk_blob_key(prefix: str, version_id: str, index: int) -> str:
    """Blob key of chunk ``index`` written by ``version_id`` under an object prefix."""
    return f"{prefix}/{version_id}/{index:06d}"


def manifest_blob_key(prefix: str, version_id: str) -> str:
    """Blob key of the manifest of a version whose chunks live elsewhere."""
    return f"{prefix}/{version_id}/manifest"


def tombstone_blob_key(prefix: str, version_id: str) -> str:
    """Blob key of the tombstone a delete writes under an object prefix."""
    return f"{prefix}/{version_id}/{TOMBSTONE_NAME}"


CHUNK0_NAME = "000000"
MANIFEST_NAME = "manifest"
TOMBSTONE_NAME = "tombstone"


def _frame(flags: int, body: Mapping[str, Any]) -> bytes:
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    if len(encoded) > MAX_HEADER_BODY:
        raise BlobFormatError("blob header too large")
    version = FORMAT_VERSION_SEALED if flags & FLAG_ENCRYPTED else FORMAT_VERSION
    head = _FIXED.pack(MAGIC, version, flags, 0, len(encoded)) + encoded
    return head + struct.pack(">I", zlib.crc32(head))


def encode_chunk_header(header: ChunkHeader) -> bytes:
    """Bytes to write before the chunk's payload (format 1, or 2 when encrypted)."""
    body: dict[str, Any] = {
        "kind": "chunk",
        "chunk_id": header.chunk_id,
        "version_id": header.version_id,
        "index": header.index,
        "size": header.size,
    }
    if header.encrypted:
        if header.wrapped_dek is None or header.key_id is None or header.sealed is None:
            raise BlobFormatError(
                "an encrypted chunk header needs a wrapped DEK, key id and sealed part"
            )
        body["dek"] = header.wrapped_dek.hex()
        body["key_id"] = header.key_id
        body["sealed"] = header.sealed.hex()
        return _frame(FLAG_ENCRYPTED, body)
    body["sha256"] = header.sha256.hex()
    if header.identity is not None:
        body["object"] = header.identity.to_json()
    return _frame(0, body)


def encode_sealed_part(sha256: bytes, identity: ObjectIdentity | None) -> bytes:
    """The plaintext that an encrypted chunk header seals: its SHA-256 and identity."""
    body: dict[str, Any] = {"sha256": sha256.hex()}
    if identity is not None:
        body["object"] = identity.to_json()
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode_sealed_part(data: bytes) -> tuple[bytes, ObjectIdentity | None]:
    """Inverse of ``encode_sealed_part``; raises ``BlobFormatError``."""
    try:
        body = json.loads(data)
        sha256 = bytes.fromhex(body["sha256"])
        identity = ObjectIdentity.from_json(body["object"]) if "object" in body else None
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BlobFormatError):
            raise
        raise BlobFormatError(f"bad sealed header part: {exc}") from exc
    return sha256, identity


def header_size(fixed: bytes) -> int:
    """Total header length (fixed part, body, CRC) from the first ``FIXED_SIZE`` bytes.

    Raises ``BlobFormatError`` when the bytes are not a Cairn blob header.
    """
    if len(fixed) < FIXED_SIZE:
        raise BlobFormatError("blob is shorter than a header")
    magic, version, _flags, _reserved, length = _FIXED.unpack_from(fixed)
    if magic != MAGIC:
        raise BlobFormatError("not a Cairn blob (bad magic)")
    if version not in READABLE_VERSIONS:
        raise BlobFormatError(f"blob format version {version} is not supported")
    if length > MAX_HEADER_BODY:
        raise BlobFormatError("blob header length is implausible")
    return FIXED_SIZE + int(length) + CRC_SIZE


def _unframe(data: bytes) -> tuple[int, dict[str, Any], int]:
    total = header_size(data)
    if len(data) < total:
        raise BlobFormatError("blob header is truncated")
    (crc,) = struct.unpack_from(">I", data, total - CRC_SIZE)
    if zlib.crc32(data[: total - CRC_SIZE]) != crc:
        raise BlobFormatError("blob header checksum mismatch")
    version, flags = data[4], data[5]
    if bool(flags & FLAG_ENCRYPTED) != (version == FORMAT_VERSION_SEALED):
        raise BlobFormatError(f"blob format version {version} with flags {flags:#x} is invalid")
    try:
        body = json.loads(data[FIXED_SIZE : total - CRC_SIZE])
    except ValueError as exc:
        raise BlobFormatError(f"blob header body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BlobFormatError("blob header body is not an object")
    return flags, body, total


def decode_chunk_header(data: bytes) -> tuple[ChunkHeader, int]:
    """Parse a chunk header from the start of ``data``; return it and its length."""
    flags, body, total = _unframe(data)
    if body.get("kind") != "chunk":
        raise BlobFormatError(f"expected a chunk blob, found {body.get('kind')!r}")
    encrypted = bool(flags & FLAG_ENCRYPTED)
    try:
        common: dict[str, Any] = {
            "chunk_id": str(body["chunk_id"]),
            "version_id": str(body["version_id"]),
            "index": int(body["index"]),
            "size": int(body["size"]),
        }
        if encrypted:
            header = ChunkHeader(
                **common,
                sha256=b"",
                encrypted=True,
                wrapped_dek=bytes.fromhex(body["dek"]),
                key_id=str(body["key_id"]),
                sealed=bytes.fromhex(body["sealed"]),
            )
        else:
            header = ChunkHeader(
                **common,
                sha256=bytes.fromhex(body["sha256"]),
                identity=ObjectIdentity.from_json(body["object"]) if "object" in body else None,
            )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BlobFormatError):
            raise
        raise BlobFormatError(f"bad chunk header: {exc}") from exc
    return header, total


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One ref of a version whose chunk blob lives under another prefix."""

    offset: int
    length: int
    chunk_id: str
    chunk_offset: int
    blob_key: str
    chunk_size: int
    sha256: bytes


@dataclass(frozen=True, slots=True)
class Manifest:
    version_id: str
    identity: ObjectIdentity
    entries: tuple[ManifestEntry, ...]


@dataclass(frozen=True, slots=True)
class SealedManifest:
    """An encrypted manifest: ``sealed`` is ``encode_manifest_body`` encrypted."""

    version_id: str
    chunk_id: str
    """The manifest's own chunk id (the AAD of ``sealed``)."""
    wrapped_dek: bytes
    key_id: str
    sealed: bytes


def encode_manifest(manifest: Manifest) -> bytes:
    """A manifest blob (header only: the body lists the version's refs)."""
    return _frame(0, manifest_body(manifest))


def encode_manifest_body(manifest: Manifest) -> bytes:
    """The manifest's header body as bytes (what a sealed manifest encrypts)."""
    return json.dumps(manifest_body(manifest), sort_keys=True, separators=(",", ":")).encode()


def encode_sealed_manifest(manifest: SealedManifest) -> bytes:
    """A sealed manifest blob (format 2): version id, wrapped key and sealed body."""
    return _frame(
        FLAG_ENCRYPTED,
        {
            "kind": "manifest",
            "version_id": manifest.version_id,
            "chunk_id": manifest.chunk_id,
            "dek": manifest.wrapped_dek.hex(),
            "key_id": manifest.key_id,
            "sealed": manifest.sealed.hex(),
        },
    )


def decode_sealed_manifest(data: bytes) -> SealedManifest:
    """Parse a sealed manifest blob; raises ``BlobFormatError``."""
    flags, body, _total = _unframe(data)
    if body.get("kind") != "manifest" or not flags & FLAG_ENCRYPTED:
        raise BlobFormatError("expected a sealed manifest blob")
    try:
        return SealedManifest(
            str(body["version_id"]),
            str(body["chunk_id"]),
            bytes.fromhex(body["dek"]),
            str(body["key_id"]),
            bytes.fromhex(body["sealed"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BlobFormatError(f"bad sealed manifest: {exc}") from exc


def manifest_body(manifest: Manifest) -> dict[str, Any]:
    """The JSON body of a manifest (format 1 header body)."""
    return {
        "kind": "manifest",
        "version_id": manifest.version_id,
        "object": manifest.identity.to_json(),
        "refs": [
            [
                e.offset,
                e.length,
                e.chunk_id,
                e.chunk_offset,
                e.blob_key,
                e.chunk_size,
                e.sha256.hex(),
            ]
            for e in manifest.entries
        ],
    }


def decode_manifest(data: bytes) -> Manifest:
    """Parse an unencrypted manifest blob; raises ``BlobFormatError``."""
    flags, body, _total = _unframe(data)
    if flags & FLAG_ENCRYPTED:
        raise BlobFormatError("the manifest is sealed: decode it with its data key")
    return manifest_from_body(body)


def decode_manifest_body(data: bytes) -> Manifest:
    """Parse the plaintext of a sealed manifest (``encode_manifest_body`` output)."""
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise BlobFormatError(f"sealed manifest body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BlobFormatError("sealed manifest body is not an object")
    return manifest_from_body(body)


def manifest_from_body(body: Mapping[str, Any]) -> Manifest:
    """A ``Manifest`` from its JSON body; raises ``BlobFormatError``."""
    if body.get("kind") != "manifest":
        raise BlobFormatError(f"expected a manifest blob, found {body.get('kind')!r}")
    try:
        entries = tuple(
            ManifestEntry(int(o), int(n), str(c), int(co), str(b), int(cs), bytes.fromhex(h))
            for o, n, c, co, b, cs, h in body["refs"]
        )
        return Manifest(str(body["version_id"]), ObjectIdentity.from_json(body["object"]), entries)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BlobFormatError):
            raise
        raise BlobFormatError(f"bad manifest: {exc}") from exc


def encode_tombstone(version_id: str) -> bytes:
    """A tombstone blob (format 1 framing, header only): the key was deleted at
    ``version_id``. It names no bucket or key (the prefix does), so nothing is sealed."""
    return _frame(0, {"kind": "tombstone", "version_id": version_id})


def decode_tombstone(data: bytes) -> str:
    """The version id of a tombstone blob; raises ``BlobFormatError``."""
    _flags, body, _total = _unframe(data)
    if body.get("kind") != "tombstone":
        raise BlobFormatError(f"expected a tombstone blob, found {body.get('kind')!r}")
    try:
        return str(body["version_id"])
    except KeyError as exc:
        raise BlobFormatError("bad tombstone: no version id") from exc


def blob_kind(data: bytes) -> str:
    """The ``kind`` of a blob from its whole header (``chunk``, ``manifest``,
    ``tombstone``); raises ``BlobFormatError``."""
    _flags, body, _total = _unframe(data)
    return str(body.get("kind"))
