"""The checksum of a multipart object, from its parts' checksums (no byte is read again).

S3 gives a multipart object one of two kinds of checksum:

- ``COMPOSITE`` (any algorithm): the algorithm applied to the concatenated binary part
  checksums, base64, followed by ``-<number of parts>``;
- ``FULL_OBJECT`` (CRC32, CRC32C, CRC64NVME only; always for CRC64NVME): the CRC of the
  whole object, obtained by combining the parts' CRCs with their lengths, as zlib's
  ``crc32_combine`` does (a linear map over GF(2) per appended length).

``choose`` picks what to compute from what the upload asked for
(``x-amz-checksum-algorithm``/``-type`` at CreateMultipartUpload) and what every part
carries; ``None`` when the parts do not all have that checksum.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence

from frontends.s3.checksums import ChecksumAlgorithm, new_hasher

COMPOSITE = "COMPOSITE"
FULL_OBJECT = "FULL_OBJECT"

# reflected polynomial and width of the CRCs that can be combined
_CRCS: dict[ChecksumAlgorithm, tuple[int, int]] = {
    ChecksumAlgorithm.CRC32: (0xEDB88320, 32),
    ChecksumAlgorithm.CRC32C: (0x82F63B78, 32),
    ChecksumAlgorithm.CRC64NVME: (0x9A6C9329AC4BC9B5, 64),
}

Matrix = tuple[int, ...]
"""A GF(2) matrix as ``width`` column vectors."""


def _times(matrix: Matrix, vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _compose(a: Matrix, b: Matrix) -> Matrix:
    """The matrix of applying ``b`` then ``a``."""
    return tuple(_times(a, column) for column in b)


@functools.lru_cache(maxsize=64)
def _zeros_operator(poly: int, width: int, nbytes: int) -> Matrix:
    """The map that feeds ``nbytes`` zero bytes through a reflected CRC register."""
    one_bit = (poly, *(1 << n for n in range(width - 1)))
    byte = one_bit
    for _ in range(3):  # 2, 4, 8 zero bits
        byte = _compose(byte, byte)
    result: Matrix | None = None
    square = byte
    while nbytes:
        if nbytes & 1:
            result = square if result is None else _compose(square, result)
        nbytes >>= 1
        if nbytes:
            square = _compose(square, square)
    return result if result is not None else tuple(1 << n for n in range(width))


def combinable(algorithm: ChecksumAlgorithm) -> bool:
    """True for the CRCs a FULL_OBJECT checksum can be made of."""
    return algorithm in _CRCS


def crc_combine(algorithm: ChecksumAlgorithm, crc_a: int, crc_b: int, len_b: int) -> int:
    """The CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    poly, width = _CRCS[algorithm]
    if len_b == 0:
        return crc_a
    return _times(_zeros_operator(poly, width, len_b), crc_a) ^ crc_b


def full_object(algorithm: ChecksumAlgorithm, parts: Sequence[tuple[str, int]]) -> str:
    """The whole object's CRC (base64) from (part CRC base64, part size) in order."""
    size = _CRCS[algorithm][1] // 8
    total: int | None = None
    for value, length in parts:
        crc = int.from_bytes(base64.b64decode(value), "big")
        total = crc if total is None else crc_combine(algorithm, total, crc, length)
    return base64.b64encode((total or 0).to_bytes(size, "big")).decode()


def composite(algorithm: ChecksumAlgorithm, values: Sequence[str]) -> str:
    """``base64(H(part1 || part2 ...))-N`` from the parts' base64 checksums."""
    hasher = new_hasher(algorithm)
    for value in values:
        hasher.update(base64.b64decode(value))
    return f"{base64.b64encode(hasher.digest()).decode()}-{len(values)}"


def choose(
    requested: ChecksumAlgorithm | None,
    requested_type: str | None,
    part_checksums: Sequence[dict[ChecksumAlgorithm, str]],
) -> tuple[ChecksumAlgorithm, str] | None:
    """(algorithm, COMPOSITE|FULL_OBJECT) to compute, or None when no algorithm is on
    every part. Without a request, the first algorithm every part carries is used."""
    if not part_checksums:
        return None
    common = set(part_checksums[0])
    for found in part_checksums[1:]:
        common &= set(found)
    if requested is not None:
        algorithm = requested if requested in common else None
    else:
        algorithm = next((a for a in ChecksumAlgorithm if a in common), None)
    if algorithm is None:
        return None
    if algorithm is ChecksumAlgorithm.CRC64NVME:
        return algorithm, FULL_OBJECT
    if (requested_type or "").upper() == FULL_OBJECT and algorithm in _CRCS:
        return algorithm, FULL_OBJECT
    return algorithm, COMPOSITE
