"""S3 flexible checksums (``x-amz-checksum-*``) and ``Content-MD5``: computing and verifying.

Algorithms: CRC32 (zlib), CRC32C, CRC64NVME, SHA1, SHA256, SHA512, MD5 (hashlib), and the XXHASH
family. CRC32C and CRC64NVME use ``awscrt`` (the AWS common runtime, ``botocore[crt]``) when it is
importable, else a table-driven pure-Python CRC that is correct but slow (about 10 MB/s); the
XXHASH algorithms exist only with ``awscrt`` (``checksum_available``).

Values are the base64 of the big-endian digest, as in S3 headers and trailers.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import importlib
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from types import MappingProxyType, ModuleType
from typing import Any, Protocol

from frontends.s3.errors import S3Error
from frontends.s3.streams import release_last_after_end


class ChecksumAlgorithm(enum.Enum):
    """An S3 checksum algorithm; the value is the suffix of its ``x-amz-checksum-`` header."""

    CRC32 = "crc32"
    CRC32C = "crc32c"
    CRC64NVME = "crc64nvme"
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA512 = "sha512"
    MD5 = "md5"
    XXHASH64 = "xxhash64"
    XXHASH3 = "xxhash3"
    XXHASH128 = "xxhash128"

    @property
    def header(self) -> str:
        """``x-amz-checksum-<name>``."""
        return f"x-amz-checksum-{self.value}"

    @property
    def display_name(self) -> str:
        """The name S3 uses in messages and ``x-amz-sdk-checksum-algorithm`` (``CRC32``)."""
        return self.value.upper()

    @property
    def digest_size(self) -> int:
        """Digest length in bytes."""
        return _DIGEST_SIZES[self]

    @classmethod
    def from_header(cls, name: str) -> ChecksumAlgorithm | None:
        """The algorithm of an ``x-amz-checksum-<name>`` header or trailer, else None."""
        lowered = name.strip().lower()
        if not lowered.startswith(CHECKSUM_PREFIX):
            return None
        try:
            return cls(lowered[len(CHECKSUM_PREFIX) :])
        except ValueError:
            return None


CHECKSUM_PREFIX = "x-amz-checksum-"
# Headers that start like a checksum but are not one.
NON_CHECKSUM_HEADERS = frozenset(
    ("x-amz-checksum-type", "x-amz-checksum-mode", "x-amz-checksum-algorithm")
)

_DIGEST_SIZES: Mapping[ChecksumAlgorithm, int] = MappingProxyType(
    {
        ChecksumAlgorithm.CRC32: 4,
        ChecksumAlgorithm.CRC32C: 4,
        ChecksumAlgorithm.CRC64NVME: 8,
        ChecksumAlgorithm.SHA1: 20,
        ChecksumAlgorithm.SHA256: 32,
        ChecksumAlgorithm.SHA512: 64,
        ChecksumAlgorithm.MD5: 16,
        ChecksumAlgorithm.XXHASH64: 8,
        ChecksumAlgorithm.XXHASH3: 8,
        ChecksumAlgorithm.XXHASH128: 16,
    }
)


class Hasher(Protocol):
    """An incremental checksum."""

    def update(self, data: bytes) -> None: ...

    def digest(self) -> bytes: ...


# --- CRCs ------------------------------------------------------------------------------------


def _reflected_table(poly: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _reflected_table(0x82F63B78)  # Castagnoli 0x1EDC6F41, reflected
_CRC64NVME_TABLE = _reflected_table(0x9A6C9329AC4BC9B5)  # NVMe 0xAD93D23594C93659, reflected
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _table_crc(table: tuple[int, ...], mask: int) -> Callable[[bytes, int], int]:
    def update(data: bytes, crc: int) -> int:
        crc ^= mask
        for byte in data:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ mask

    return update


crc32c_pure = _table_crc(_CRC32C_TABLE, _MASK32)
"""Pure-Python CRC32C: ``crc32c_pure(data, previous_crc) -> crc``."""
crc64nvme_pure = _table_crc(_CRC64NVME_TABLE, _MASK64)
"""Pure-Python CRC64NVME: ``crc64nvme_pure(data, previous_crc) -> crc``."""


def _load_awscrt() -> ModuleType | None:
    try:
        return importlib.import_module("awscrt.checksums")
    except ImportError:
        return None


_AWSCRT = _load_awscrt()


def _crt_function(name: str) -> Callable[[bytes, int], int] | None:
    function: Any = getattr(_AWSCRT, name, None) if _AWSCRT is not None else None
    if function is None:
        return None

    def update(data: bytes, crc: int) -> int:
        return int(function(data, crc))

    return update


CRC32C_ACCELERATED = _crt_function("crc32c")
"""``awscrt``'s CRC32C when installed, else None."""
CRC64NVME_ACCELERATED = _crt_function("crc64nvme")
"""``awscrt``'s CRC64NVME when installed, else None."""


class _Crc:
    def __init__(self, update: Callable[[bytes, int], int], size: int) -> None:
        self._update = update
        self._size = size
        self._crc = 0

    def update(self, data: bytes) -> None:
        self._crc = self._update(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(self._size, "big")


def _zlib_crc32(data: bytes, crc: int) -> int:
    return zlib.crc32(data, crc) & _MASK32


class _XXHash:
    def __init__(self, factory: Callable[[], Any]) -> None:
        self._state: Any = factory()

    def update(self, data: bytes) -> None:
        self._state.update(data)

    def digest(self) -> bytes:
        return bytes(self._state.finalize())


def _xxhash_factory(algorithm: ChecksumAlgorithm) -> Callable[[], Any] | None:
    xxhash: Any = getattr(_AWSCRT, "XXHash", None) if _AWSCRT is not None else None
    if xxhash is None:
        return None
    name = {
        ChecksumAlgorithm.XXHASH64: "new_xxhash64",
        ChecksumAlgorithm.XXHASH3: "new_xxhash3_64",
        ChecksumAlgorithm.XXHASH128: "new_xxhash3_128",
    }[algorithm]
    factory: Callable[[], Any] | None = getattr(xxhash, name, None)
    return factory


_HASHLIB_NAMES: Mapping[ChecksumAlgorithm, str] = MappingProxyType(
    {
        ChecksumAlgorithm.SHA1: "sha1",
        ChecksumAlgorithm.SHA256: "sha256",
        ChecksumAlgorithm.SHA512: "sha512",
        ChecksumAlgorithm.MD5: "md5",
    }
)


def checksum_available(algorithm: ChecksumAlgorithm) -> bool:
    """True when this process can compute ``algorithm``."""
    if algorithm in (
        ChecksumAlgorithm.XXHASH64,
        ChecksumAlgorithm.XXHASH3,
        ChecksumAlgorithm.XXHASH128,
    ):
        return _xxhash_factory(algorithm) is not None
    return True


def new_hasher(algorithm: ChecksumAlgorithm) -> Hasher:
    """A fresh incremental hasher; ``S3Error`` ``InvalidRequest`` if it is not available."""
    if algorithm is ChecksumAlgorithm.CRC32:
        return _Crc(_zlib_crc32, 4)
    if algorithm is ChecksumAlgorithm.CRC32C:
        return _Crc(CRC32C_ACCELERATED or crc32c_pure, 4)
    if algorithm is ChecksumAlgorithm.CRC64NVME:
        return _Crc(CRC64NVME_ACCELERATED or crc64nvme_pure, 8)
    hashlib_name = _HASHLIB_NAMES.get(algorithm)
    if hashlib_name is not None:
        return hashlib.new(hashlib_name)
    factory = _xxhash_factory(algorithm)
    if factory is None:
        raise S3Error(
            "InvalidRequest",
            f"The {algorithm.display_name} checksum algorithm is not supported by this server.",
        )
    return _XXHash(factory)


def compute_checksum(algorithm: ChecksumAlgorithm, data: bytes) -> str:
    """The base64 checksum of ``data``."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return base64.b64encode(hasher.digest()).decode("ascii")


def _decode_b64(value: str, size: int) -> bytes | None:
    try:
        raw = base64.b64decode(value.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return raw if len(raw) == size else None


def parse_checksum_headers(headers: Mapping[str, str]) -> dict[ChecksumAlgorithm, str]:
    """The ``x-amz-checksum-<alg>`` values of a request (at most one, as S3 allows).

    Raises ``S3Error`` ``InvalidRequest`` for an unknown algorithm, a malformed value or more
    than one checksum header. ``x-amz-checksum-type``/``-mode``/``-algorithm`` are ignored.
    """
    found: dict[ChecksumAlgorithm, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if not lowered.startswith(CHECKSUM_PREFIX) or lowered in NON_CHECKSUM_HEADERS:
            continue
        algorithm = ChecksumAlgorithm.from_header(lowered)
        if algorithm is None:
            raise S3Error(
                "InvalidRequest", f"The checksum header {lowered} is not supported by this server."
            )
        if found:
            raise S3Error(
                "InvalidRequest",
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not "
                "allowed.",
            )
        if _decode_b64(value, algorithm.digest_size) is None:
            raise S3Error("InvalidRequest", f"Value for {algorithm.header} header is invalid.")
        found[algorithm] = value.strip()
    return found


class ChecksumVerifier:
    """Computes checksums over a body and checks them against declared values at the end.

    ``expected``: declared values by algorithm (from headers; trailers are added later with
    ``expect``). ``content_md5``: the ``Content-MD5`` header (``S3Error`` ``InvalidDigest`` when
    malformed). ``compute``: more algorithms to compute without a declared value (e.g. to store
    them). Malformed ``expected`` values raise ``S3Error`` ``InvalidRequest``; an algorithm this
    process cannot compute raises ``InvalidRequest`` as well.
    """

    def __init__(
        self,
        expected: Mapping[ChecksumAlgorithm, str] | None = None,
        *,
        content_md5: str | None = None,
        compute: Iterable[ChecksumAlgorithm] = (),
    ) -> None:
        self._hashers: dict[ChecksumAlgorithm, Hasher] = {}
        self._expected: dict[ChecksumAlgorithm, bytes] = {}
        self._content_md5: bytes | None = None
        self._finished: dict[ChecksumAlgorithm, bytes] | None = None
        self._started = False
        for algorithm, value in (expected or {}).items():
            self.expect(algorithm, value)
        for algorithm in compute:
            self.track(algorithm)
        if content_md5 is not None:
            raw = _decode_b64(content_md5, 16)
            if raw is None:
                raise S3Error("InvalidDigest")
            self._content_md5 = raw
            self.track(ChecksumAlgorithm.MD5)

    def track(self, algorithm: ChecksumAlgorithm) -> None:
        """Also compute ``algorithm`` (before any ``update``; ``RuntimeError`` after)."""
        if algorithm not in self._hashers:
            if self._started or self._finished is not None:
                raise RuntimeError("cannot add an algorithm after data was hashed")
            self._hashers[algorithm] = new_hasher(algorithm)

    @property
    def algorithms(self) -> tuple[ChecksumAlgorithm, ...]:
        """Every algorithm being computed."""
        return tuple(self._hashers)

    def expect(self, algorithm: ChecksumAlgorithm, value: str, *, source: str = "header") -> None:
        """Declare the expected base64 ``value`` for ``algorithm`` (before ``verify``).

        The algorithm must already be computed when data has been hashed (``RuntimeError``).
        """
        raw = _decode_b64(value, algorithm.digest_size)
        if raw is None:
            raise S3Error("InvalidRequest", f"Value for {algorithm.header} {source} is invalid.")
        self.track(algorithm)
        self._expected[algorithm] = raw

    def update(self, data: bytes) -> None:
        """Feed body bytes."""
        if self._finished is not None:
            raise RuntimeError("checksums already finished")
        self._started = True
        for hasher in self._hashers.values():
            hasher.update(data)

    def _digests(self) -> dict[ChecksumAlgorithm, bytes]:
        if self._finished is None:
            self._finished = {alg: hasher.digest() for alg, hasher in self._hashers.items()}
        return self._finished

    def results(self) -> dict[ChecksumAlgorithm, str]:
        """Every computed checksum, base64; ends hashing (no ``update`` afterwards)."""
        return {alg: base64.b64encode(raw).decode("ascii") for alg, raw in self._digests().items()}

    def verify(self) -> dict[ChecksumAlgorithm, str]:
        """End hashing and check every declared value; returns ``results()``.

        Raises ``S3Error`` ``BadDigest`` on the first mismatch (Content-MD5 first).
        """
        digests = self._digests()
        if self._content_md5 is not None:
            computed = digests[ChecksumAlgorithm.MD5]
            if not hmac.compare_digest(computed, self._content_md5):
                raise S3Error(
                    "BadDigest",
                    "The Content-MD5 you specified did not match what we received.",
                    ExpectedDigest=base64.b64encode(self._content_md5).decode("ascii"),
                    CalculatedDigest=base64.b64encode(computed).decode("ascii"),
                )
        for algorithm, expected in self._expected.items():
            if not hmac.compare_digest(digests[algorithm], expected):
                raise S3Error(
                    "BadDigest",
                    f"The {algorithm.display_name} you specified did not match the calculated "
                    "checksum.",
                )
        return self.results()

    async def wrap(self, pieces: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """Re-yield ``pieces`` while hashing them; ``verify`` before the final piece is yielded."""

        async def hashed() -> AsyncIterator[bytes]:
            async for piece in pieces:
                self.update(piece)
                yield piece
            self.verify()

        async for piece in release_last_after_end(hashed()):
            yield piece
