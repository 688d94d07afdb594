"""Multipart checksums from part checksums: CRC combination against CRCs of the whole."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.s3.checksums import ChecksumAlgorithm, compute_checksum
from frontends.s3.mpchecksums import COMPOSITE, FULL_OBJECT, choose, composite, full_object

pytestmark = pytest.mark.unit

CRCS = [ChecksumAlgorithm.CRC32, ChecksumAlgorithm.CRC32C, ChecksumAlgorithm.CRC64NVME]


@settings(max_examples=60, deadline=None)
@given(
    algorithm=st.sampled_from(CRCS),
    sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_full_object_crc_equals_the_crc_of_the_whole(
    algorithm: ChecksumAlgorithm, sizes: list[int], seed: int
) -> None:
    rng = random.Random(seed)
    parts = [rng.randbytes(size) for size in sizes]
    combined = full_object(algorithm, [(compute_checksum(algorithm, p), len(p)) for p in parts])
    assert combined == compute_checksum(algorithm, b"".join(parts))


def test_full_object_with_large_parts() -> None:
    rng = random.Random(7)
    parts = [rng.randbytes(5 * 1024 * 1024 + 3), rng.randbytes(5 * 1024 * 1024 + 3), b"end"]
    for algorithm in CRCS:
        values = [(compute_checksum(algorithm, p), len(p)) for p in parts]
        assert full_object(algorithm, values) == compute_checksum(algorithm, b"".join(parts))


def test_composite_is_the_hash_of_the_part_hashes() -> None:
    parts = [b"a" * 100, b"b" * 50]
    values = [compute_checksum(ChecksumAlgorithm.SHA256, p) for p in parts]
    expected = hashlib.sha256(b"".join(base64.b64decode(v) for v in values)).digest()
    assert composite(ChecksumAlgorithm.SHA256, values) == (
        base64.b64encode(expected).decode() + "-2"
    )


def test_choose() -> None:
    crc, sha = ChecksumAlgorithm.CRC32, ChecksumAlgorithm.SHA256
    both = [{crc: "x", sha: "y"}, {crc: "x", sha: "y"}]
    assert choose(None, None, both) == (crc, COMPOSITE)
    assert choose(sha, None, both) == (sha, COMPOSITE)
    assert choose(crc, "FULL_OBJECT", both) == (crc, FULL_OBJECT)
    assert choose(sha, "FULL_OBJECT", both) == (sha, COMPOSITE)  # not a CRC
    assert choose(crc, None, [{crc: "x"}, {sha: "y"}]) is None
    nvme = ChecksumAlgorithm.CRC64NVME
    assert choose(nvme, None, [{nvme: "x"}]) == (nvme, FULL_OBJECT)
    assert choose(None, None, []) is None
