"""The encrypting chunk store: wraps ``ChunkStore`` and keeps its interface (DESIGN 2, 4).

Writes for a bucket the ``EncryptionPolicy`` encrypts get a fresh data key per chunk,
wrapped by the key ring's current master key; the blob is a format-2 header (wrapped
key, key id, sealed SHA-256 and identity) followed by the segmented AES-256-GCM payload
(``appliance.crypto.aead``), and its prefix is an HMAC of bucket and key. Other writes go
to the inner store unchanged.

Reads look at the chunk row: a chunk with a wrapped data key is decrypted, any other is
read by the inner store. A range read fetches only the segments that cover the range,
in one ranged GET per replica tried; a replica whose bytes do not authenticate is
skipped like a corrupt one, so no wrong byte is ever returned.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

from cachetools import LRUCache

from appliance.crypto.aead import (
    SEGMENT,
    AuthenticationFailed,
    DataKey,
    decrypt_segments,
    encrypt_into,
    seal,
    sealed_size,
    segment_span,
    segments_in,
    unseal,
)
from appliance.crypto.keys import KeyRing
from appliance.data.blobformat import (
    ChunkHeader,
    Manifest,
    SealedManifest,
    encode_chunk_header,
    encode_manifest_body,
    encode_sealed_manifest,
    encode_sealed_part,
    object_prefix,
)
from appliance.data.buffers import ChunkPayload, payload_view
from appliance.data.chunkstore import ChunkStore, WrittenChunk
from appliance.data.cpu import CpuPool
from appliance.data.storage import ChunkStorageWrapper
from appliance.errors import DataCorrupted, KeyUnavailable
from appliance.meta.models import Chunk, Location, NewChunk

log = logging.getLogger("cairn.crypto")

INLINE_CRYPTO_LIMIT = 256 * 1024
"""Buffers smaller than this are sealed/opened on the loop: cheaper than a thread hop."""


class EncryptionPolicy:
    """Which buckets are encrypted: a pool default and per-bucket overrides."""

    def __init__(
        self, *, default: bool, buckets: Mapping[str, bool] | None = None, prefix_secret: bytes
    ) -> None:
        self._default = default
        self._buckets = dict(buckets or {})
        self._secret = prefix_secret

    def encrypts(self, bucket: str | None) -> bool:
        if bucket is None:
            return self._default
        return self._buckets.get(bucket, self._default)

    @property
    def any(self) -> bool:
        """True when some bucket (or the default) is encrypted."""
        return self._default or any(self._buckets.values())

    @property
    def secret(self) -> bytes:
        """The HMAC key of hidden blob prefixes (whatever a bucket's setting is now)."""
        return self._secret

    def prefix_secret(self, bucket: str) -> bytes | None:
        return self._secret if self.encrypts(bucket) else None


def _decrypt_into(
    key: DataKey,
    chunk_id: str,
    size: int,
    first: int,
    stored: bytes | bytearray,
    segments: int,
    out: bytearray,
) -> None:
    decrypt_segments(key, chunk_id, size, first, stored, segments=segments, out=out)


class EncryptingChunkStore(ChunkStorageWrapper[ChunkStore]):
    """``ChunkStore``'s interface, encrypting per the policy (see module docstring)."""

    def __init__(
        self,
        inner: ChunkStore,
        keys: KeyRing | None,
        cpu: CpuPool,
        policy: EncryptionPolicy,
        *,
        key_cache_size: int = 4096,
    ) -> None:
        if keys is None and policy.any:
            raise ValueError("an encrypting policy needs a key ring")
        super().__init__(inner)
        self.keys = keys
        self.policy = policy
        self._cpu = cpu
        self._data_keys: LRUCache[tuple[str, bytes], DataKey] = LRUCache(key_cache_size)

    # -- naming ----------------------------------------------------------------------
    def blob_prefix(self, bucket: str, key: str) -> str:
        """HMAC-derived for encrypted buckets (names hidden), SHA-256 otherwise."""
        return object_prefix(bucket, key, self.policy.prefix_secret(bucket))

    # -- keys ------------------------------------------------------------------------
    def _ring(self) -> KeyRing:
        if self.keys is None:
            raise KeyUnavailable("the chunk is encrypted but no master key is configured")
        return self.keys

    async def _new_key(self) -> tuple[DataKey, bytes, str]:
        data_key = DataKey.generate()
        wrapped, key_id = await self._ring().wrap(data_key.to_bytes())
        return data_key, wrapped, key_id

    async def data_key(self, chunk_id: str, wrapped: bytes, key_id: str) -> DataKey:
        """The unwrapped data key of a chunk (cached by chunk id and wrapped bytes).

        Raises ``KeyUnavailable``, or ``DataCorrupted`` when the wrapped key is damaged.
        """
        cached = self._data_keys.get((chunk_id, wrapped))
        if cached is not None:
            return cached
        try:
            data_key = DataKey.from_bytes(await self._ring().unwrap(wrapped, key_id))
        except AuthenticationFailed as exc:
            raise DataCorrupted(f"chunk {chunk_id}: {exc}") from exc
        self._data_keys[(chunk_id, wrapped)] = data_key
        return data_key

    # -- writes ----------------------------------------------------------------------
    async def write_chunk(
        self,
        header: ChunkHeader,
        payload: ChunkPayload,
        blob_key: str,
        *,
        bucket: str | None = None,
    ) -> WrittenChunk:
        """As ``ChunkStore.write_chunk``; also raises ``KeyUnavailable``."""
        if not self.policy.encrypts(bucket):
            return await self.inner.write_chunk(header, payload, blob_key, bucket=bucket)
        data_key, wrapped, key_id = await self._new_key()
        sealed = seal(data_key, header.chunk_id, encode_sealed_part(header.sha256, header.identity))
        head = encode_chunk_header(
            replace(
                header,
                identity=None,
                encrypted=True,
                wrapped_dek=wrapped,
                key_id=key_id,
                sealed=sealed,
            )
        )
        buffers = self.inner.buffers
        blob = buffers.take(len(head) + sealed_size(len(payload)))
        blob[: len(head)] = head
        out = memoryview(blob)[len(head) :]
        data = payload_view(payload)
        if len(data) < INLINE_CRYPTO_LIMIT:
            encrypt_into(data_key, header.chunk_id, data, out)
        else:
            await self._cpu.run(encrypt_into, data_key, header.chunk_id, data, out)
        out.release()
        locations = await self.inner.place(
            blob, blob_key, header.version_id, header.chunk_id, bucket=bucket
        )
        stored_size = len(blob)
        buffers.give(blob)  # written: no backend keeps a reference
        chunk = NewChunk(
            chunk_id=header.chunk_id,
            size=header.size,
            sha256=header.sha256,
            stored_size=stored_size,
            wrapped_dek=wrapped,
            key_id=key_id,
        )
        return WrittenChunk(chunk, locations, self.inner.policy.factor_for(bucket))

    async def write_manifest(
        self, manifest: Manifest, blob_key: str, chunk_id: str, *, bucket: str | None = None
    ) -> WrittenChunk:
        """As ``ChunkStore.write_manifest``; an encrypted bucket's manifest is sealed."""
        if not self.policy.encrypts(bucket):
            return await self.inner.write_manifest(manifest, blob_key, chunk_id, bucket=bucket)
        data_key, wrapped, key_id = await self._new_key()
        sealed = seal(data_key, chunk_id, encode_manifest_body(manifest))
        blob = encode_sealed_manifest(
            SealedManifest(manifest.version_id, chunk_id, wrapped, key_id, sealed)
        )
        locations = await self.inner.place(
            blob, blob_key, manifest.version_id, chunk_id, bucket=bucket
        )
        chunk = NewChunk(chunk_id, 0, hashlib.sha256(blob).digest(), len(blob), wrapped, key_id)
        return WrittenChunk(chunk, locations, self.inner.policy.factor_for(bucket))

    async def replicate(
        self,
        chunk: Chunk,
        sources: Sequence[Location],
        count: int,
        *,
        keep: Sequence[str] = (),
        rewrite: str | None = None,
    ) -> tuple[tuple[Location, int | None], ...]:
        """As ``ChunkStore.replicate``; an encrypted chunk's copy is verified by
        authenticating every segment (no key is needed for a manifest or a plain chunk).
        Also raises ``KeyUnavailable``."""
        if chunk.wrapped_dek is None or chunk.key_id is None or chunk.size == 0:
            return await self.inner.replicate(chunk, sources, count, keep=keep, rewrite=rewrite)
        data_key = await self.data_key(chunk.chunk_id, chunk.wrapped_dek, chunk.key_id)
        header_len = chunk.stored_size - sealed_size(chunk.size)

        async def check(chunk: Chunk, blob: bytes | bytearray, backend: str) -> None:
            sealed = memoryview(blob)[header_len:]
            try:
                await self._cpu.run(
                    decrypt_segments, data_key, chunk.chunk_id, chunk.size, 0, sealed
                )
            except AuthenticationFailed as exc:
                log.error("chunk %s on %s failed authentication", chunk.chunk_id, backend)
                raise DataCorrupted(str(exc)) from exc

        return await self.inner.replicate(
            chunk, sources, count, keep=keep, rewrite=rewrite, check=check
        )

    # -- reads -----------------------------------------------------------------------
    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray:
        """As ``ChunkStore.read``; also raises ``KeyUnavailable``."""
        if chunk.wrapped_dek is None or chunk.key_id is None:
            return await self.inner.read(chunk, locations, start, end)
        if not 0 <= start <= end <= chunk.size:
            raise ValueError(f"range [{start}, {end}) outside chunk of {chunk.size} bytes")
        if start == end:
            return b""
        header_len = chunk.stored_size - sealed_size(chunk.size)
        if header_len <= 0:
            raise DataCorrupted(f"chunk {chunk.chunk_id}: stored size is impossible")
        data_key = await self.data_key(chunk.chunk_id, chunk.wrapped_dek, chunk.key_id)
        first, lo, hi = segment_span(chunk.size, start, end)
        segments = segments_in(lo, hi)
        skip = start - first * SEGMENT

        buffers = self.inner.buffers
        plain_size = min(chunk.size, (first + segments) * SEGMENT) - first * SEGMENT

        async def check(stored: bytes | bytearray, backend: str) -> bytes | bytearray:
            out = buffers.take(plain_size)
            try:
                if len(stored) < INLINE_CRYPTO_LIMIT:
                    plain = decrypt_segments(
                        data_key,
                        chunk.chunk_id,
                        chunk.size,
                        first,
                        stored,
                        segments=segments,
                        out=out,
                    )
                else:  # handed off: the worker keeps no reference to either buffer
                    await self._cpu.run_handing_off(
                        _decrypt_into,
                        data_key,
                        chunk.chunk_id,
                        chunk.size,
                        first,
                        stored,
                        segments,
                        out,
                    )
                    plain = out
            except AuthenticationFailed as exc:
                log.error("chunk %s on %s failed authentication", chunk.chunk_id, backend)
                raise DataCorrupted(str(exc)) from exc
            buffers.give(stored)  # fetched for this read alone: nobody else holds it
            if skip == 0 and len(plain) == end - start:
                return plain
            wanted = plain[skip : skip + end - start]
            buffers.give(plain)
            return wanted

        return await self.inner.read_stored(
            chunk, locations, header_len + lo, header_len + hi, check
        )

    async def open_sealed(self, chunk_id: str, wrapped: bytes, key_id: str, sealed: bytes) -> bytes:
        """Decrypt a sealed header part or manifest body (recovery, tests)."""
        data_key = await self.data_key(chunk_id, wrapped, key_id)
        try:
            return unseal(data_key, chunk_id, sealed)
        except AuthenticationFailed as exc:
            raise DataCorrupted(str(exc)) from exc
