"""Checksums of multipart objects: composite and full-object, computed from the parts'
checksums at completion, returned with x-amz-checksum-mode and validated by botocore."""

from __future__ import annotations

import base64
import hashlib
import io
import random
import zlib
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tests.e2e.conftest import Daemon, MiB

pytestmark = pytest.mark.e2e
PART = 5 * MiB


def _upload(
    s3: Any, key: str, parts: list[bytes], algorithm: str, kind: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    extra = {"ChecksumType": kind} if kind else {}
    upload = s3.create_multipart_upload(
        Bucket="e2e", Key=key, ChecksumAlgorithm=algorithm, **extra
    )["UploadId"]
    done = []
    for number, body in enumerate(parts, 1):
        answer = s3.upload_part(
            Bucket="e2e",
            Key=key,
            UploadId=upload,
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm=algorithm,
        )
        field = f"Checksum{algorithm}"
        done.append({"PartNumber": number, "ETag": answer["ETag"], field: answer[field]})
    result = s3.complete_multipart_upload(
        Bucket="e2e", Key=key, UploadId=upload, MultipartUpload={"Parts": done}
    )
    return result, done


def _parts(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(PART), rng.randbytes(PART), rng.randbytes(4321)]


def test_composite_sha256(cairn: Daemon) -> None:
    s3 = cairn.client()
    parts = _parts(1)
    result, _ = _upload(s3, "mpsum/sha", parts, "SHA256")
    digests = b"".join(hashlib.sha256(p).digest() for p in parts)
    expected = base64.b64encode(hashlib.sha256(digests).digest()).decode() + "-3"
    assert result["ChecksumSHA256"] == expected and result["ChecksumType"] == "COMPOSITE"
    head = s3.head_object(Bucket="e2e", Key="mpsum/sha", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == expected and head["ChecksumType"] == "COMPOSITE"
    attributes = s3.get_object_attributes(
        Bucket="e2e", Key="mpsum/sha", ObjectAttributes=["Checksum"]
    )["Checksum"]
    assert attributes["ChecksumSHA256"] == expected
    got = s3.get_object(Bucket="e2e", Key="mpsum/sha", ChecksumMode="ENABLED")["Body"].read()
    assert got == b"".join(parts)
    assert "ChecksumSHA256" not in s3.head_object(Bucket="e2e", Key="mpsum/sha")  # mode off


def test_full_object_crc32_is_validated_by_botocore(cairn: Daemon) -> None:
    s3 = cairn.client()
    parts = _parts(2)
    result, _ = _upload(s3, "mpsum/crc", parts, "CRC32", "FULL_OBJECT")
    whole = base64.b64encode(zlib.crc32(b"".join(parts)).to_bytes(4, "big")).decode()
    assert result["ChecksumCRC32"] == whole and result["ChecksumType"] == "FULL_OBJECT"
    # botocore checks the body it receives against a full-object checksum
    got = s3.get_object(Bucket="e2e", Key="mpsum/crc", ChecksumMode="ENABLED")
    assert got["ChecksumCRC32"] == whole
    assert got["Body"].read() == b"".join(parts)


def test_crc64nvme_is_always_full_object(cairn: Daemon) -> None:
    s3 = cairn.client()
    parts = _parts(3)
    result, _ = _upload(s3, "mpsum/nvme", parts, "CRC64NVME")
    assert result["ChecksumType"] == "FULL_OBJECT"
    got = s3.get_object(Bucket="e2e", Key="mpsum/nvme", ChecksumMode="ENABLED")
    assert got["Body"].read() == b"".join(parts)


def test_list_parts_shows_part_checksums_and_bad_ones_are_refused(cairn: Daemon) -> None:
    s3 = cairn.client()
    upload = s3.create_multipart_upload(Bucket="e2e", Key="mpsum/bad", ChecksumAlgorithm="CRC32")[
        "UploadId"
    ]
    body = b"x" * PART
    etag = s3.upload_part(
        Bucket="e2e", Key="mpsum/bad", UploadId=upload, PartNumber=1, Body=body,
        ChecksumAlgorithm="CRC32",
    )["ETag"]  # fmt: skip
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    listed = s3.list_parts(Bucket="e2e", Key="mpsum/bad", UploadId=upload)["Parts"]
    assert listed[0]["ChecksumCRC32"] == crc
    with pytest.raises(ClientError) as wrong:
        s3.complete_multipart_upload(
            Bucket="e2e",
            Key="mpsum/bad",
            UploadId=upload,
            MultipartUpload={
                "Parts": [{"PartNumber": 1, "ETag": etag, "ChecksumCRC32": "AAAAAA=="}]
            },
        )
    assert wrong.value.response["Error"]["Code"] == "InvalidPart"
    s3.abort_multipart_upload(Bucket="e2e", Key="mpsum/bad", UploadId=upload)
    with pytest.raises(ClientError) as unsupported:
        s3.create_multipart_upload(
            Bucket="e2e", Key="mpsum/x", ChecksumAlgorithm="SHA256", ChecksumType="FULL_OBJECT"
        )
    assert unsupported.value.response["Error"]["Code"] == "InvalidRequest"


def test_boto3_managed_multipart_upload_round_trips_with_validation(cairn: Daemon) -> None:
    s3 = cairn.client()
    body = random.Random(4).randbytes(3 * PART + 11)
    s3.upload_fileobj(
        io.BytesIO(body),
        "e2e",
        "mpsum/managed",
        Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART),
    )
    got = s3.get_object(Bucket="e2e", Key="mpsum/managed", ChecksumMode="ENABLED")
    assert got["Body"].read() == body
