"""Checksums of a multipart object: what CreateMultipartUpload asks for, what each part
stored, and the object's checksum computed from them at completion
(``frontends.s3.mpchecksums`` does the arithmetic)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aiohttp import web

from appliance.meta.models import MultipartUpload, Part
from frontends.s3 import mpchecksums
from frontends.s3 import xml as s3xml
from frontends.s3.checksums import CHECKSUM_PREFIX, ChecksumAlgorithm
from frontends.s3.errors import S3Error

WANTED_ALGORITHM = "x-cairn-checksum-algorithm"


WANTED_TYPE = "x-cairn-checksum-type"


CHECKSUM_TYPE_HEADER = "x-amz-checksum-type"


def completed_checksum(
    sent_headers: Mapping[str, str],
    upload: MultipartUpload,
    listed: Sequence[s3xml.CompletedPart],
    stored: Mapping[int, Part],
) -> dict[str, str]:
    """The stored checksum headers of the object a completion makes, computed from
    its parts' checksums (``frontends.s3.mpchecksums``); empty when the parts do not
    all carry one. Raises ``InvalidPart`` when a part's checksum in the request
    differs from the one stored, and ``BadDigest`` when a full-object checksum sent
    with the completion differs from the one computed."""
    per_part: list[dict[ChecksumAlgorithm, str]] = []
    sizes: list[int] = []
    for item in listed:
        part = stored.get(item.part_number)
        if part is None:
            return {}  # the completion itself reports the missing part
        found = stored_checksums(part.headers)
        for name, value in item.checksums.items():
            algorithm = ChecksumAlgorithm.from_header(CHECKSUM_PREFIX + name.lower())
            if algorithm is not None and found.get(algorithm, value) != value:
                raise S3Error(
                    "InvalidPart",
                    f"The {algorithm.display_name} checksum of part {item.part_number} "
                    "does not match the uploaded part.",
                )
        per_part.append(found)
        sizes.append(part.size)
    requested = upload.headers.get(WANTED_ALGORITHM)
    choice = mpchecksums.choose(
        ChecksumAlgorithm(requested.lower()) if requested else None,
        upload.headers.get(WANTED_TYPE),
        per_part,
    )
    if choice is None:
        return {}
    algorithm, kind = choice
    values = [found[algorithm] for found in per_part]
    if kind == mpchecksums.FULL_OBJECT:
        value = mpchecksums.full_object(algorithm, list(zip(values, sizes, strict=True)))
        sent = sent_headers.get(algorithm.header)
        if sent is not None and sent != value:
            raise S3Error("BadDigest", f"The {algorithm.display_name} you specified did not "
                          "match the calculated checksum.")  # fmt: skip
    else:
        value = mpchecksums.composite(algorithm, values)
    return {algorithm.header: value, CHECKSUM_TYPE_HEADER: kind}


def stored_checksums(headers: Mapping[str, str]) -> dict[ChecksumAlgorithm, str]:
    """The ``x-amz-checksum-<algorithm>`` values among stored headers."""
    found: dict[ChecksumAlgorithm, str] = {}
    for name, value in headers.items():
        algorithm = ChecksumAlgorithm.from_header(name)
        if algorithm is not None:
            found[algorithm] = value
    return found


def requested_checksum(request: web.Request) -> dict[str, str]:
    """What CreateMultipartUpload asks for (``x-amz-checksum-algorithm``/``-type``), as
    internal stored headers. Raises ``InvalidRequest`` for an unknown value."""
    raw = request.headers.get("x-amz-checksum-algorithm")
    kind = request.headers.get("x-amz-checksum-type")
    if raw is None:
        if kind is not None:
            raise S3Error("InvalidRequest", "x-amz-checksum-type needs x-amz-checksum-algorithm.")
        return {}
    try:
        algorithm = ChecksumAlgorithm(raw.strip().lower())
    except ValueError as exc:
        raise S3Error("InvalidRequest", f"Checksum algorithm {raw!r} is not supported.") from exc
    chosen = (kind or "").strip().upper() or (
        mpchecksums.FULL_OBJECT
        if algorithm is ChecksumAlgorithm.CRC64NVME
        else mpchecksums.COMPOSITE
    )
    if chosen not in (mpchecksums.COMPOSITE, mpchecksums.FULL_OBJECT) or (
        chosen == mpchecksums.FULL_OBJECT and not mpchecksums.combinable(algorithm)
    ):
        raise S3Error(
            "InvalidRequest",
            f"The {chosen} checksum type cannot be used with the "
            f"{algorithm.display_name} checksum algorithm.",
        )
    return {WANTED_ALGORITHM: algorithm.display_name, WANTED_TYPE: chosen}
