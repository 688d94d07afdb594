"""GetObject/HeadObject by part number, and UploadPartCopy by reference (no bytes move).

The e2e daemon stores 1 MiB chunks; S3's 5 MiB minimum part size applies.
"""

from __future__ import annotations

import hashlib
import random
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tests.e2e.conftest import OTHER_BUCKET, Daemon, MiB

pytestmark = pytest.mark.e2e

PART = 5 * MiB


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _error(call: Any) -> tuple[str, int]:
    with pytest.raises(ClientError) as caught:
        call()
    response = caught.value.response
    return str(response["Error"]["Code"]), int(response["ResponseMetadata"]["HTTPStatusCode"])


def _multipart(s3: Any, key: str, parts: list[bytes]) -> None:
    upload = s3.create_multipart_upload(Bucket="e2e", Key=key)["UploadId"]
    done = []
    for number, body in enumerate(parts, 1):
        etag = s3.upload_part(Bucket="e2e", Key=key, UploadId=upload, PartNumber=number, Body=body)[
            "ETag"
        ]
        done.append({"PartNumber": number, "ETag": etag})
    s3.complete_multipart_upload(
        Bucket="e2e", Key=key, UploadId=upload, MultipartUpload={"Parts": done}
    )


def test_get_and_head_by_part_number(cairn: Daemon) -> None:
    s3 = cairn.client()
    parts = [data_of(PART, 1), data_of(PART + 3, 2), data_of(1234, 3)]
    _multipart(s3, "parts/mpu", parts)
    offset = 0
    for number, body in enumerate(parts, 1):
        got = s3.get_object(Bucket="e2e", Key="parts/mpu", PartNumber=number)
        assert got["Body"].read() == body
        assert got["PartsCount"] == 3
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert got["ContentRange"] == f"bytes {offset}-{offset + len(body) - 1}/{PART * 2 + 1237}"
        head = s3.head_object(Bucket="e2e", Key="parts/mpu", PartNumber=number)
        assert head["ContentLength"] == len(body) and head["PartsCount"] == 3
        offset += len(body)
    assert "x-cairn-part-sizes" not in str(got["ResponseMetadata"]["HTTPHeaders"])
    assert _error(lambda: s3.get_object(Bucket="e2e", Key="parts/mpu", PartNumber=4)) == (
        "InvalidPartNumber",
        416,
    )
    assert _error(
        lambda: s3.get_object(Bucket="e2e", Key="parts/mpu", PartNumber=1, Range="bytes=0-1")
    ) == ("InvalidRequest", 400)
    # an object stored in one piece has one part
    s3.put_object(Bucket="e2e", Key="parts/simple", Body=b"simple")
    one = s3.get_object(Bucket="e2e", Key="parts/simple", PartNumber=1)
    assert one["Body"].read() == b"simple" and one["PartsCount"] == 1
    assert _error(lambda: s3.head_object(Bucket="e2e", Key="parts/simple", PartNumber=2))[1] == 416
    for bad in ("0", "10001", "x", "-1"):
        url = cairn.presign("GET", f"/e2e/parts/simple?partNumber={bad}")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, timeout=10)
        assert caught.value.code == 400 and b"InvalidArgument" in caught.value.read()


def test_upload_part_copy_by_reference_with_ranges(cairn: Daemon) -> None:
    s3 = cairn.client()
    source = data_of(12 * MiB + 7, 10)
    s3.put_object(Bucket="e2e", Key="parts/source", Body=source)
    before = cairn.blob_set()
    upload = s3.create_multipart_upload(Bucket="e2e", Key="parts/assembled")["UploadId"]
    first = (MiB // 2, MiB // 2 + PART)  # starts and ends inside chunks
    copied1 = s3.upload_part_copy(
        Bucket="e2e",
        Key="parts/assembled",
        UploadId=upload,
        PartNumber=1,
        CopySource={"Bucket": "e2e", "Key": "parts/source"},
        CopySourceRange=f"bytes={first[0]}-{first[1] - 1}",
    )["CopyPartResult"]["ETag"]
    middle = data_of(PART, 11)
    uploaded = s3.upload_part(
        Bucket="e2e", Key="parts/assembled", UploadId=upload, PartNumber=2, Body=middle
    )["ETag"]
    copied3 = s3.upload_part_copy(
        Bucket="e2e",
        Key="parts/assembled",
        UploadId=upload,
        PartNumber=3,
        CopySource="e2e/parts/source",
        CopySourceRange=f"bytes={7 * MiB + 3}-{len(source) - 1}",
    )["CopyPartResult"]["ETag"]
    listed = s3.list_parts(Bucket="e2e", Key="parts/assembled", UploadId=upload)["Parts"]
    assert [p["Size"] for p in listed] == [PART, PART, len(source) - 7 * MiB - 3]
    s3.complete_multipart_upload(
        Bucket="e2e",
        Key="parts/assembled",
        UploadId=upload,
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": copied1},
                {"PartNumber": 2, "ETag": uploaded},
                {"PartNumber": 3, "ETag": copied3},
            ]
        },
    )
    expected = source[first[0] : first[1]] + middle + source[7 * MiB + 3 :]
    got = s3.get_object(Bucket="e2e", Key="parts/assembled")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    ranged = s3.get_object(Bucket="e2e", Key="parts/assembled", Range="bytes=5242870-5242890")
    assert ranged["Body"].read() == expected[5242870:5242891]
    # only the uploaded part's 5 chunks and the completion's manifest were written
    assert len(cairn.blob_set() - before) == 5 + 1
    # the source can go: the assembled object keeps its chunks alive
    s3.delete_object(Bucket="e2e", Key="parts/source")
    cairn.wait_blobs_settled(quiet=2.0)
    got = s3.get_object(Bucket="e2e", Key="parts/assembled")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    s3.delete_object(Bucket="e2e", Key="parts/assembled")


def test_boto3_managed_copy_uses_upload_part_copy(cairn: Daemon) -> None:
    s3 = cairn.client()
    body = data_of(11 * MiB + 5, 20)
    s3.put_object(Bucket="e2e", Key="parts/managed-src", Body=body)
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)
    before = cairn.blob_set()
    s3.copy(
        {"Bucket": "e2e", "Key": "parts/managed-src"}, "e2e", "parts/managed-dst", Config=config
    )
    assert len(cairn.blob_set() - before) == 1  # the manifest only
    got = s3.get_object(Bucket="e2e", Key="parts/managed-dst")
    assert got["Body"].read() == body and got["ETag"].endswith('-3"')


@pytest.mark.parametrize(
    ("source", "range_", "code"),
    [
        ("e2e/parts/bad-src", "bytes=0-99999999", "InvalidArgument"),
        ("e2e/parts/bad-src", "bytes=5-2", "InvalidArgument"),
        ("e2e/parts/bad-src", "bytes=a-b", "InvalidArgument"),
        ("e2e/parts/bad-src", "0-10", "InvalidArgument"),
        ("raw:e2e/parts/%ZZbad", None, "InvalidArgument"),
        ("raw:e2e/parts/%ff%fe", None, "InvalidArgument"),
        ("e2e/parts/%ZZbad", None, "NoSuchKey"),  # boto3 encodes it: a valid, absent key
        ("e2e", None, "InvalidArgument"),
        ("e2e/parts/absent", None, "NoSuchKey"),
        (f"{OTHER_BUCKET}/anything", None, "AccessDenied"),
    ],
)
def test_bad_upload_part_copy_changes_nothing(
    cairn: Daemon, source: str, range_: str | None, code: str
) -> None:
    s3 = cairn.client()
    if source.startswith("raw:"):  # sent as is, not percent-encoded by botocore
        raw = source[len("raw:") :]

        def set_raw(params: Any, **_: Any) -> None:
            params["headers"]["x-amz-copy-source"] = raw

        s3.meta.events.register("before-call.s3.UploadPartCopy", set_raw)
        source = "e2e/placeholder"
    s3.put_object(Bucket="e2e", Key="parts/bad-src", Body=b"0123456789")
    upload = s3.create_multipart_upload(Bucket="e2e", Key="parts/bad")["UploadId"]
    try:
        extra = {"CopySourceRange": range_} if range_ else {}
        got = _error(
            lambda: s3.upload_part_copy(
                Bucket="e2e",
                Key="parts/bad",
                UploadId=upload,
                PartNumber=1,
                CopySource=source,
                **extra,
            )
        )
        assert got[0] == code
        assert s3.list_parts(Bucket="e2e", Key="parts/bad", UploadId=upload).get("Parts", []) == []
    finally:
        s3.abort_multipart_upload(Bucket="e2e", Key="parts/bad", UploadId=upload)


@pytest.mark.slow
def test_copy_of_a_2_gib_object_is_metadata_only(cairn: Daemon) -> None:
    """A 2 GiB object assembled by UploadPartCopy from a 6 MiB one, then copied: the copy
    takes well under a second and writes one manifest blob, nothing else."""
    s3 = cairn.client(max_pool_connections=16)
    seed = data_of(6 * MiB, 30)
    s3.put_object(Bucket="e2e", Key="big/seed", Body=seed)
    upload = s3.create_multipart_upload(Bucket="e2e", Key="big/2g")["UploadId"]
    count = (2 * 1024 * MiB) // len(seed) + 1
    parts = []
    for number in range(1, count + 1):
        etag = s3.upload_part_copy(
            Bucket="e2e",
            Key="big/2g",
            UploadId=upload,
            PartNumber=number,
            CopySource="e2e/big/seed",
        )["CopyPartResult"]["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    s3.complete_multipart_upload(
        Bucket="e2e", Key="big/2g", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    size = s3.head_object(Bucket="e2e", Key="big/2g")["ContentLength"]
    assert size == count * len(seed) > 2 * 1024 * MiB
    before_blobs, before_bytes = cairn.blob_set(), sum(cairn.disk_bytes().values())
    started = time.monotonic()
    s3.copy_object(Bucket="e2e", Key="big/2g-copy", CopySource="e2e/big/2g")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"a 2 GiB copy took {elapsed:.2f} s"
    new = cairn.blob_set() - before_blobs
    assert len(new) == 1  # its manifest
    grown = sum(cairn.disk_bytes().values()) - before_bytes
    assert grown < 2 * MiB, grown  # the manifest (a few hundred bytes per chunk) only
    last = s3.get_object(Bucket="e2e", Key="big/2g-copy", Range=f"bytes={size - 100}-{size - 1}")
    assert last["Body"].read() == seed[-100:]
    middle = (count // 2) * len(seed) + 12345
    got = s3.get_object(Bucket="e2e", Key="big/2g-copy", Range=f"bytes={middle}-{middle + 9}")
    assert got["Body"].read() == seed[12345:12355]
    for key in ("big/2g-copy", "big/2g", "big/seed"):
        s3.delete_object(Bucket="e2e", Key=key)


def test_get_object_attributes(cairn: Daemon) -> None:
    s3 = cairn.client()
    parts = [data_of(PART, 40), data_of(PART, 41), data_of(10, 42)]
    _multipart(s3, "parts/attrs-mpu", parts)
    everything = ["ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"]
    got = s3.get_object_attributes(Bucket="e2e", Key="parts/attrs-mpu", ObjectAttributes=everything)
    head = s3.head_object(Bucket="e2e", Key="parts/attrs-mpu")
    assert got["ETag"] == head["ETag"].strip('"')
    assert got["ObjectSize"] == 2 * PART + 10 and got["StorageClass"] == "STANDARD"
    assert got["ObjectParts"]["TotalPartsCount"] == 3
    assert [(p["PartNumber"], p["Size"]) for p in got["ObjectParts"]["Parts"]] == [
        (1, PART),
        (2, PART),
        (3, 10),
    ]
    paged = s3.get_object_attributes(
        Bucket="e2e",
        Key="parts/attrs-mpu",
        ObjectAttributes=["ObjectParts"],
        MaxParts=2,
        PartNumberMarker=1,
    )["ObjectParts"]
    assert [p["PartNumber"] for p in paged["Parts"]] == [2, 3] and not paged["IsTruncated"]
    first = s3.get_object_attributes(
        Bucket="e2e", Key="parts/attrs-mpu", ObjectAttributes=["ObjectParts"], MaxParts=1
    )["ObjectParts"]
    assert first["IsTruncated"] and first["NextPartNumberMarker"] == 1

    s3.put_object(Bucket="e2e", Key="parts/attrs", Body=b"hello", ChecksumAlgorithm="SHA256")
    simple = s3.get_object_attributes(Bucket="e2e", Key="parts/attrs", ObjectAttributes=everything)
    assert simple["Checksum"]["ChecksumSHA256"] == ("LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=")
    assert "ObjectParts" not in simple and simple["ObjectSize"] == 5
    assert (
        _error(
            lambda: s3.get_object_attributes(
                Bucket="e2e", Key="parts/absent", ObjectAttributes=["ETag"]
            )
        )[0]
        == "NoSuchKey"
    )
    url = cairn.presign("GET", "/e2e/parts/attrs?attributes=")
    with pytest.raises(urllib.error.HTTPError) as caught:  # no x-amz-object-attributes
        urllib.request.urlopen(url, timeout=10)
    assert caught.value.code == 400 and b"InvalidArgument" in caught.value.read()
