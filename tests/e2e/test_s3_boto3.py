"""boto3 against the real daemon: the core suite on every database/placement combination.

The listing test stores 2,500 keys on SQLite + pack and a smaller set elsewhere (the
listing SQL differs per database; paging is exercised either way).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tests.e2e.conftest import CHUNK_SIZE, Daemon, MiB

pytestmark = pytest.mark.e2e


def error_code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def status_of(exc: ClientError) -> int:
    return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])


def request_id_of(exc: ClientError) -> str:
    return str(exc.response["ResponseMetadata"]["HTTPHeaders"].get("x-amz-request-id", ""))


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def s3(cairn_matrix: Daemon) -> Any:
    return cairn_matrix.client(max_pool_connections=16)


def full_matrix(daemon: Daemon) -> bool:
    return daemon.spec.db == "sqlite" and daemon.spec.placement == "pack"


# -- objects ---------------------------------------------------------------------------


def test_put_get_head_delete(cairn_matrix: Daemon, s3: Any) -> None:
    body = payload(2 * CHUNK_SIZE + 12345, 1)
    put = s3.put_object(Bucket="e2e", Key="basic/object.bin", Body=body)
    md5 = hashlib.md5(body).hexdigest()
    assert put["ETag"] == f'"{md5}"'
    assert put["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"]

    got = s3.get_object(Bucket="e2e", Key="basic/object.bin")
    assert got["Body"].read() == body
    assert got["ETag"] == f'"{md5}"'
    assert got["ContentLength"] == len(body)

    head = s3.head_object(Bucket="e2e", Key="basic/object.bin")
    assert head["ContentLength"] == len(body)
    assert head["ETag"] == f'"{md5}"'
    assert head["ContentType"] == "binary/octet-stream"
    assert head["AcceptRanges"] == "bytes"
    assert abs(head["LastModified"] - datetime.now(UTC)) < timedelta(minutes=5)

    empty = s3.put_object(Bucket="e2e", Key="basic/empty", Body=b"")
    assert empty["ETag"] == '"d41d8cd98f00b204e9800998ecf8427e"'
    assert s3.get_object(Bucket="e2e", Key="basic/empty")["Body"].read() == b""

    s3.delete_object(Bucket="e2e", Key="basic/object.bin")
    s3.delete_object(Bucket="e2e", Key="basic/empty")
    s3.delete_object(Bucket="e2e", Key="basic/never-existed")  # S3: deleting nothing succeeds
    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket="e2e", Key="basic/object.bin")
    assert error_code(missing.value) == "NoSuchKey"
    assert request_id_of(missing.value)
    with pytest.raises(ClientError) as missing_head:
        s3.head_object(Bucket="e2e", Key="basic/object.bin")
    assert status_of(missing_head.value) == 404
    assert request_id_of(missing_head.value)


def test_bucket_calls(cairn_matrix: Daemon, s3: Any) -> None:
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert names == ["e2e"]  # "other" exists but this key has no grant on it
    s3.head_bucket(Bucket="e2e")
    location = s3.get_bucket_location(Bucket="e2e")["LocationConstraint"]
    assert location in (None, "us-east-1")


RANGE_SIZE = 3 * CHUNK_SIZE + 123


@pytest.fixture(scope="module")
def ranged(s3: Any) -> Iterator[bytes]:
    body = payload(RANGE_SIZE, 2)
    s3.put_object(Bucket="e2e", Key="ranges/object", Body=body)
    yield body
    s3.delete_object(Bucket="e2e", Key="ranges/object")


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=0-0", 0, 0),
        # middle, across two chunk boundaries
        (f"bytes={CHUNK_SIZE - 5}-{2 * CHUNK_SIZE + 7}", CHUNK_SIZE - 5, 2 * CHUNK_SIZE + 7),
        # exactly one chunk
        (f"bytes={CHUNK_SIZE}-{2 * CHUNK_SIZE - 1}", CHUNK_SIZE, 2 * CHUNK_SIZE - 1),
        ("bytes=-100", RANGE_SIZE - 100, RANGE_SIZE - 1),
        (f"bytes=-{RANGE_SIZE + 50}", 0, RANGE_SIZE - 1),  # suffix longer than the object
        (f"bytes={3 * CHUNK_SIZE - 1}-", 3 * CHUNK_SIZE - 1, RANGE_SIZE - 1),  # open-ended
        (f"bytes={RANGE_SIZE - 1}-", RANGE_SIZE - 1, RANGE_SIZE - 1),  # last byte
        (f"bytes=100-{RANGE_SIZE + 1000}", 100, RANGE_SIZE - 1),  # end past the end: clipped
    ],
)
def test_range_reads(s3: Any, ranged: bytes, header: str, start: int, end: int) -> None:
    got = s3.get_object(Bucket="e2e", Key="ranges/object", Range=header)
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes {start}-{end}/{RANGE_SIZE}"
    assert got["ContentLength"] == end - start + 1
    assert got["Body"].read() == ranged[start : end + 1]


@pytest.mark.parametrize(
    "header", [f"bytes={RANGE_SIZE}-", f"bytes={RANGE_SIZE + 10}-{RANGE_SIZE + 20}"]
)
def test_range_past_the_end_is_416(s3: Any, ranged: bytes, header: str) -> None:
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket="e2e", Key="ranges/object", Range=header)
    assert status_of(err.value) == 416
    assert error_code(err.value) == "InvalidRange"
    headers = err.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert headers["content-range"] == f"bytes */{RANGE_SIZE}"
    assert request_id_of(err.value)


def test_overwrite_replaces_data_and_metadata(s3: Any) -> None:
    first = payload(CHUNK_SIZE + 10, 3)
    second = payload(100, 4)
    s3.put_object(
        Bucket="e2e",
        Key="over/key",
        Body=first,
        Metadata={"gen": "1", "only-first": "x"},
        ContentType="text/plain",
    )
    s3.put_object(Bucket="e2e", Key="over/key", Body=second, Metadata={"gen": "2"})
    got = s3.get_object(Bucket="e2e", Key="over/key")
    assert got["Body"].read() == second
    assert got["Metadata"] == {"gen": "2"}
    assert got["ContentType"] == "binary/octet-stream"
    assert got["ETag"] == f'"{hashlib.md5(second).hexdigest()}"'
    listed = s3.list_objects_v2(Bucket="e2e", Prefix="over/")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("over/key", 100)]
    s3.delete_object(Bucket="e2e", Key="over/key")


def test_stored_headers_and_user_metadata(s3: Any) -> None:
    expires = datetime(2031, 5, 17, 8, 30, tzinfo=UTC)
    s3.put_object(
        Bucket="e2e",
        Key="meta/doc.txt.gz",
        Body=b"not really gzip",
        Metadata={"Owner": "Ada", "project-id": "42", "note": "two  spaces"},
        ContentType="text/plain; charset=utf-8",
        CacheControl="max-age=3600, public",
        ContentDisposition='attachment; filename="doc.txt.gz"',
        ContentEncoding="gzip",
        ContentLanguage="en-GB",
        Expires=expires,
    )
    for call in (s3.get_object, s3.head_object):
        got = call(Bucket="e2e", Key="meta/doc.txt.gz")
        assert got["Metadata"] == {"owner": "Ada", "project-id": "42", "note": "two  spaces"}
        assert got["ContentType"] == "text/plain; charset=utf-8"
        assert got["CacheControl"] == "max-age=3600, public"
        assert got["ContentDisposition"] == 'attachment; filename="doc.txt.gz"'
        assert got["ContentEncoding"] == "gzip"
        assert got["ContentLanguage"] == "en-GB"
        assert got["ResponseMetadata"]["HTTPHeaders"]["expires"] == "Sat, 17 May 2031 08:30:00 GMT"
    overridden = s3.get_object(
        Bucket="e2e",
        Key="meta/doc.txt.gz",
        ResponseContentType="application/gzip",
        ResponseContentDisposition="inline",
    )
    assert overridden["ContentType"] == "application/gzip"
    assert overridden["ContentDisposition"] == "inline"
    s3.delete_object(Bucket="e2e", Key="meta/doc.txt.gz")


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_content_encoding_is_stored_not_decoded(s3: Any, coding: str) -> None:
    """Content-Encoding describes the stored object: its bytes are kept exactly as sent."""
    text = b"Cairn keeps compressed bytes compressed. " * 2000
    body = gzip.compress(text) if coding == "gzip" else zlib.compress(text)
    s3.put_object(Bucket="e2e", Key=f"enc/{coding}", Body=body, ContentEncoding=coding)
    got = s3.get_object(Bucket="e2e", Key=f"enc/{coding}")
    assert got["ContentEncoding"] == coding
    assert got["ContentLength"] == len(body)
    assert got["Body"].read() == body
    assert got["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    with pytest.raises(ClientError):  # not compressed at all: still stored as sent
        s3.head_object(Bucket="e2e", Key=f"enc/{coding}-plain")
    s3.put_object(Bucket="e2e", Key=f"enc/{coding}-plain", Body=b"plain", ContentEncoding=coding)
    assert s3.get_object(Bucket="e2e", Key=f"enc/{coding}-plain")["Body"].read() == b"plain"
    s3.delete_objects(
        Bucket="e2e",
        Delete={"Objects": [{"Key": f"enc/{coding}"}, {"Key": f"enc/{coding}-plain"}]},
    )


def test_delete_objects(s3: Any) -> None:
    keys = [f"bulk/{i}" for i in range(5)]
    for key in keys:
        s3.put_object(Bucket="e2e", Key=key, Body=key.encode())
    result = s3.delete_objects(
        Bucket="e2e",
        Delete={"Objects": [{"Key": k} for k in [*keys[:3], "bulk/absent"]], "Quiet": False},
    )
    assert sorted(d["Key"] for d in result["Deleted"]) == [*keys[:3], "bulk/absent"]
    assert not result.get("Errors")
    listed = s3.list_objects_v2(Bucket="e2e", Prefix="bulk/")
    assert [o["Key"] for o in listed["Contents"]] == keys[3:]
    quiet = s3.delete_objects(
        Bucket="e2e", Delete={"Objects": [{"Key": k} for k in keys[3:]], "Quiet": True}
    )
    assert not quiet.get("Deleted") and not quiet.get("Errors")
    assert s3.list_objects_v2(Bucket="e2e", Prefix="bulk/")["KeyCount"] == 0


def test_write_options_that_cannot_be_honoured_are_refused(s3: Any) -> None:
    """SSE-C, SSE-KMS and Object Lock are refused, never ignored (ignored, the client
    would believe in encryption or retention that is not there)."""
    s3.put_object(Bucket="e2e", Key="refuse/lock", Body=b"first")

    def code_of(call: Any, **params: Any) -> tuple[int, str]:
        with pytest.raises(ClientError) as err:
            call(Bucket="e2e", **params)
        return status_of(err.value), error_code(err.value)

    put = s3.put_object
    sse_c = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": "k" * 32}
    assert code_of(put, Key="refuse/sse-c", Body=b"s", **sse_c) == (501, "NotImplemented")
    kms = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "key-1"}
    assert code_of(put, Key="refuse/kms", Body=b"s", **kms) == (501, "NotImplemented")
    lock = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": datetime(2040, 1, 1)}
    assert code_of(put, Key="refuse/worm", Body=b"s", **lock) == (400, "InvalidRequest")
    create = s3.create_multipart_upload
    assert code_of(create, Key="refuse/mpu-kms", **kms) == (501, "NotImplemented")
    assert code_of(create, Key="refuse/mpu-worm", **lock) == (400, "InvalidRequest")

    upload_id = create(Bucket="e2e", Key="refuse/lock")["UploadId"]
    part = dict(Key="refuse/lock", UploadId=upload_id, PartNumber=1, Body=b"mp")
    assert code_of(s3.upload_part, **part, **sse_c) == (501, "NotImplemented")
    assert s3.get_object(Bucket="e2e", Key="refuse/lock")["Body"].read() == b"first"
    s3.abort_multipart_upload(Bucket="e2e", Key="refuse/lock", UploadId=upload_id)
    listed = s3.list_objects_v2(Bucket="e2e", Prefix="refuse/")["Contents"]
    assert [o["Key"] for o in listed] == ["refuse/lock"]
    s3.delete_object(Bucket="e2e", Key="refuse/lock")


def test_conditional_writes_are_atomic(s3: Any) -> None:
    """If-None-Match: * and If-Match on PutObject and CompleteMultipartUpload."""

    def status(call: Any, **params: Any) -> int:
        try:
            call(Bucket="e2e", **params)
        except ClientError as err:
            return status_of(err)
        return 200

    put = s3.put_object
    assert status(put, Key="cw/k", Body=b"one", IfNoneMatch="*") == 200
    assert status(put, Key="cw/k", Body=b"two", IfNoneMatch="*") == 412
    etag = s3.head_object(Bucket="e2e", Key="cw/k")["ETag"]
    assert status(put, Key="cw/k", Body=b"three", IfMatch='"0000"') == 412
    assert status(put, Key="cw/missing", Body=b"x", IfMatch=etag) == 412
    assert s3.get_object(Bucket="e2e", Key="cw/k")["Body"].read() == b"one"
    assert status(put, Key="cw/k", Body=b"four", IfMatch=etag) == 200
    assert s3.get_object(Bucket="e2e", Key="cw/k")["Body"].read() == b"four"
    assert s3.list_objects_v2(Bucket="e2e", Prefix="cw/missing")["KeyCount"] == 0

    upload_id = s3.create_multipart_upload(Bucket="e2e", Key="cw/k")["UploadId"]
    part_etag = s3.upload_part(
        Bucket="e2e", Key="cw/k", UploadId=upload_id, PartNumber=1, Body=b"mp"
    )["ETag"]
    done = {"Parts": [{"PartNumber": 1, "ETag": part_etag}]}
    complete = s3.complete_multipart_upload
    assert (
        status(complete, Key="cw/k", UploadId=upload_id, MultipartUpload=done, IfNoneMatch="*")
        == 412
    )
    assert s3.get_object(Bucket="e2e", Key="cw/k")["Body"].read() == b"four"
    current = s3.head_object(Bucket="e2e", Key="cw/k")["ETag"]
    assert (
        status(complete, Key="cw/k", UploadId=upload_id, MultipartUpload=done, IfMatch=current)
        == 200
    )
    assert s3.get_object(Bucket="e2e", Key="cw/k")["Body"].read() == b"mp"
    s3.delete_object(Bucket="e2e", Key="cw/k")


# -- conditional requests and presigned URLs ------------------------------------------------


def test_conditional_get_and_head(s3: Any) -> None:
    s3.put_object(Bucket="e2e", Key="cond/key", Body=b"conditional")
    etag = s3.head_object(Bucket="e2e", Key="cond/key")["ETag"]
    past = datetime.now(UTC) - timedelta(days=1)
    future = datetime.now(UTC) + timedelta(days=1)

    def outcome(call: Any, **conditions: Any) -> int:
        try:
            response = call(Bucket="e2e", Key="cond/key", **conditions)
        except ClientError as exc:
            response = exc.response
        assert response["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"]
        return int(response["ResponseMetadata"]["HTTPStatusCode"])

    for call in (s3.get_object, s3.head_object):
        assert outcome(call, IfMatch=etag) == 200
        assert outcome(call, IfMatch='"0123456789abcdef0123456789abcdef"') == 412
        assert outcome(call, IfMatch="*") == 200
        assert outcome(call, IfNoneMatch=etag) == 304
        assert outcome(call, IfNoneMatch='"0123456789abcdef0123456789abcdef"') == 200
        assert outcome(call, IfModifiedSince=past) == 200
        assert outcome(call, IfModifiedSince=future) == 304
        assert outcome(call, IfUnmodifiedSince=future) == 200
        assert outcome(call, IfUnmodifiedSince=past) == 412
        # RFC 7232 precedence: If-Match true wins over If-Unmodified-Since false, and
        # If-None-Match wins over If-Modified-Since.
        assert outcome(call, IfMatch=etag, IfUnmodifiedSince=past) == 200
        assert outcome(call, IfNoneMatch=etag, IfModifiedSince=past) == 304
    with pytest.raises(ClientError) as failed:
        s3.get_object(Bucket="e2e", Key="cond/key", IfMatch='"nope"')
    assert error_code(failed.value) == "PreconditionFailed"
    s3.delete_object(Bucket="e2e", Key="cond/key")


def _urlopen(request: urllib.request.Request | str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def test_presigned_put_and_get_with_plain_http(s3: Any) -> None:
    body = payload(CHUNK_SIZE + 777, 5)
    put_url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": "e2e", "Key": "presigned/file.bin"}, ExpiresIn=300
    )
    assert "X-Amz-Signature=" in put_url
    status, headers, _ = _urlopen(urllib.request.Request(put_url, data=body, method="PUT"))
    assert status == 200
    assert headers["etag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert headers["x-amz-request-id"]

    get_url = s3.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": "e2e",
            "Key": "presigned/file.bin",
            "ResponseContentDisposition": 'attachment; filename="x.bin"',
        },
        ExpiresIn=300,
    )
    status, headers, data = _urlopen(get_url)
    assert status == 200
    assert data == body
    assert headers["content-disposition"] == 'attachment; filename="x.bin"'
    assert headers["x-amz-request-id"]

    ranged = urllib.request.Request(get_url, headers={"Range": "bytes=10-19"})
    status, _, data = _urlopen(ranged)
    assert (status, data) == (206, body[10:20])
    s3.delete_object(Bucket="e2e", Key="presigned/file.bin")


# -- multipart -------------------------------------------------------------------------------


def test_multipart_upload_file_50mib(cairn_matrix: Daemon, s3: Any, tmp_path: Path) -> None:
    source = tmp_path / "fifty.bin"
    data = payload(50 * MiB, 6)
    source.write_bytes(data)
    part = 8 * MiB
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=4)
    s3.upload_file(str(source), "e2e", "mpu/fifty.bin", Config=config)

    parts = [data[i : i + part] for i in range(0, len(data), part)]
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    head = s3.head_object(Bucket="e2e", Key="mpu/fifty.bin")
    assert head["ETag"] == f'"{expected}-{len(parts)}"'
    assert head["ContentLength"] == len(data)
    listed = s3.list_objects_v2(Bucket="e2e", Prefix="mpu/")["Contents"]
    assert listed[0]["ETag"] == head["ETag"]

    got = s3.get_object(Bucket="e2e", Key="mpu/fifty.bin")["Body"]
    digest = hashlib.sha256()
    for piece in iter(lambda: got.read(MiB), b""):
        digest.update(piece)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    middle = s3.get_object(Bucket="e2e", Key="mpu/fifty.bin", Range=f"bytes={part - 3}-{part + 2}")
    assert middle["Body"].read() == data[part - 3 : part + 3]
    s3.delete_object(Bucket="e2e", Key="mpu/fifty.bin")


def test_list_parts_list_uploads_and_abort(s3: Any) -> None:
    first = s3.create_multipart_upload(Bucket="e2e", Key="mpu/listed", ContentType="text/csv")
    second = s3.create_multipart_upload(Bucket="e2e", Key="mpu/listed-too")
    upload_id = first["UploadId"]
    etags = {}
    for number in (1, 2, 3):
        body = payload(100_000 + number, 10 + number)
        result = s3.upload_part(
            Bucket="e2e", Key="mpu/listed", UploadId=upload_id, PartNumber=number, Body=body
        )
        etags[number] = result["ETag"]
        assert result["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'

    parts = s3.list_parts(Bucket="e2e", Key="mpu/listed", UploadId=upload_id)
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in parts["Parts"]] == [
        (n, etags[n], 100_000 + n) for n in (1, 2, 3)
    ]
    assert parts["IsTruncated"] is False
    page = s3.list_parts(Bucket="e2e", Key="mpu/listed", UploadId=upload_id, MaxParts=2)
    assert [p["PartNumber"] for p in page["Parts"]] == [1, 2]
    assert page["IsTruncated"] is True
    rest = s3.list_parts(
        Bucket="e2e",
        Key="mpu/listed",
        UploadId=upload_id,
        PartNumberMarker=page["NextPartNumberMarker"],
    )
    assert [p["PartNumber"] for p in rest["Parts"]] == [3]

    uploads = s3.list_multipart_uploads(Bucket="e2e", Prefix="mpu/listed")["Uploads"]
    assert sorted((u["Key"], u["UploadId"]) for u in uploads) == sorted(
        [("mpu/listed", upload_id), ("mpu/listed-too", second["UploadId"])]
    )
    paged = s3.list_multipart_uploads(Bucket="e2e", Prefix="mpu/listed", MaxUploads=1)
    assert paged["IsTruncated"] is True
    assert len(paged["Uploads"]) == 1
    after = s3.list_multipart_uploads(
        Bucket="e2e",
        Prefix="mpu/listed",
        KeyMarker=paged["NextKeyMarker"],
        UploadIdMarker=paged["NextUploadIdMarker"],
    )
    assert [u["Key"] for u in after["Uploads"]] == ["mpu/listed-too"]

    s3.abort_multipart_upload(Bucket="e2e", Key="mpu/listed", UploadId=upload_id)
    with pytest.raises(ClientError) as gone:
        s3.list_parts(Bucket="e2e", Key="mpu/listed", UploadId=upload_id)
    assert error_code(gone.value) == "NoSuchUpload"
    with pytest.raises(ClientError) as again:
        s3.abort_multipart_upload(Bucket="e2e", Key="mpu/listed", UploadId=upload_id)
    assert error_code(again.value) == "NoSuchUpload"
    left = s3.list_multipart_uploads(Bucket="e2e", Prefix="mpu/listed").get("Uploads", [])
    assert [u["UploadId"] for u in left] == [second["UploadId"]]
    s3.abort_multipart_upload(Bucket="e2e", Key="mpu/listed-too", UploadId=second["UploadId"])
    assert not s3.list_multipart_uploads(Bucket="e2e", Prefix="mpu/").get("Uploads")
    with pytest.raises(ClientError):
        s3.head_object(Bucket="e2e", Key="mpu/listed")


def test_multipart_keeps_headers_and_rejects_small_parts(s3: Any) -> None:
    upload = s3.create_multipart_upload(
        Bucket="e2e", Key="mpu/small", ContentType="text/csv", Metadata={"origin": "mpu"}
    )
    upload_id = upload["UploadId"]
    small = [payload(1000, 20), payload(1000, 21)]
    etags = [
        s3.upload_part(
            Bucket="e2e", Key="mpu/small", UploadId=upload_id, PartNumber=n + 1, Body=body
        )["ETag"]
        for n, body in enumerate(small)
    ]
    parts = [{"PartNumber": n + 1, "ETag": e} for n, e in enumerate(etags)]
    with pytest.raises(ClientError) as too_small:
        s3.complete_multipart_upload(
            Bucket="e2e", Key="mpu/small", UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    assert error_code(too_small.value) == "EntityTooSmall"
    # the last part may be small: one part alone completes
    done = s3.complete_multipart_upload(
        Bucket="e2e", Key="mpu/small", UploadId=upload_id, MultipartUpload={"Parts": parts[:1]}
    )
    assert done["ETag"].endswith('-1"')
    got = s3.get_object(Bucket="e2e", Key="mpu/small")
    assert got["Body"].read() == small[0]
    assert got["ContentType"] == "text/csv"
    assert got["Metadata"] == {"origin": "mpu"}
    s3.delete_object(Bucket="e2e", Key="mpu/small")


# -- listing ---------------------------------------------------------------------------------


def listing_key(i: int) -> str:
    if i % 10 == 0:
        return f"top-{i:05d}"
    return f"dir{i % 7}/sub{i % 3}/k{i:05d}"


@pytest.fixture(scope="module")
def listed_keys(cairn_matrix: Daemon, s3: Any) -> list[str]:
    count = 2500 if full_matrix(cairn_matrix) else 600
    keys = sorted(listing_key(i) for i in range(count))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket="e2e", Key=f"list/{k}", Body=b"."), keys))
    return keys  # the daemon goes with the module: no cleanup (one test deletes 1,000 keys)


def list_v2_all(s3: Any, **params: Any) -> tuple[list[str], list[str], int]:
    keys: list[str] = []
    prefixes: list[str] = []
    token: str | None = None
    for pages in range(1, 1001):
        extra = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket="e2e", **params, **extra)
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert page["KeyCount"] == len(page.get("Contents", [])) + len(
            page.get("CommonPrefixes", [])
        )
        assert page["KeyCount"] <= params.get("MaxKeys", 1000)
        if not page["IsTruncated"]:
            return keys, prefixes, pages
        token = page["NextContinuationToken"]
    raise AssertionError("listing did not end")


def expected_delimited(keys: list[str], prefix: str) -> tuple[list[str], list[str]]:
    direct, prefixes = [], set()
    for key in keys:
        full = f"list/{key}"
        if not full.startswith(prefix):
            continue
        rest = full[len(prefix) :]
        if "/" in rest:
            prefixes.add(prefix + rest.split("/", 1)[0] + "/")
        else:
            direct.append(full)
    return direct, sorted(prefixes)


@pytest.mark.parametrize("max_keys", [1000, 97])
def test_list_v2_pages_through_every_key(s3: Any, listed_keys: list[str], max_keys: int) -> None:
    keys, prefixes, pages = list_v2_all(s3, Prefix="list/", MaxKeys=max_keys)
    assert keys == [f"list/{k}" for k in listed_keys]
    assert prefixes == []
    assert pages == -(-len(listed_keys) // max_keys)


@pytest.mark.parametrize(("prefix", "max_keys"), [("list/", 1000), ("list/", 3), ("list/dir3/", 2)])
def test_list_v2_with_delimiter(
    s3: Any, listed_keys: list[str], prefix: str, max_keys: int
) -> None:
    keys, prefixes, _ = list_v2_all(s3, Prefix=prefix, Delimiter="/", MaxKeys=max_keys)
    direct, common = expected_delimited(listed_keys, prefix)
    assert keys == direct
    assert prefixes == common


def test_list_v2_start_after(s3: Any, listed_keys: list[str]) -> None:
    middle = f"list/{listed_keys[len(listed_keys) // 2]}"
    keys, _, _ = list_v2_all(s3, Prefix="list/", StartAfter=middle)
    assert keys == [f"list/{k}" for k in listed_keys if f"list/{k}" > middle]


@pytest.mark.parametrize("delimiter", [None, "/"])
def test_list_v1_marker_paging(s3: Any, listed_keys: list[str], delimiter: str | None) -> None:
    keys: list[str] = []
    prefixes: list[str] = []
    marker = ""
    extra = {"Delimiter": delimiter} if delimiter else {}
    for _ in range(1000):
        page = s3.list_objects(Bucket="e2e", Prefix="list/", Marker=marker, MaxKeys=250, **extra)
        contents = [o["Key"] for o in page.get("Contents", [])]
        keys += contents
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert page.get("Marker", "") == marker
        if not page["IsTruncated"]:
            break
        if delimiter:
            marker = page["NextMarker"]  # S3 returns NextMarker only with a delimiter
        else:
            assert "NextMarker" not in page
            marker = contents[-1]
    else:
        raise AssertionError("listing did not end")
    if delimiter:
        direct, common = expected_delimited(listed_keys, "list/")
        assert (keys, prefixes) == (direct, common)
    else:
        assert keys == [f"list/{k}" for k in listed_keys]


def test_delete_objects_takes_1000_keys(s3: Any, listed_keys: list[str]) -> None:
    """Last of the listing tests: it deletes (up to) 1,000 of the listed keys at once."""
    batch = listed_keys[:1000]
    result = s3.delete_objects(
        Bucket="e2e", Delete={"Objects": [{"Key": f"list/{k}"} for k in batch], "Quiet": True}
    )
    assert not result.get("Errors") and not result.get("Deleted")
    keys, _, _ = list_v2_all(s3, Prefix="list/")
    assert keys == [f"list/{k}" for k in listed_keys[len(batch) :]]
    with pytest.raises(ClientError) as too_many:
        s3.delete_objects(Bucket="e2e", Delete={"Objects": [{"Key": f"x{i}"} for i in range(1001)]})
    assert error_code(too_many.value) == "MalformedXML"


ODD_KEYS = [
    "odd/with space",
    "odd/plus+sign",
    "odd/percent%20literal",
    "odd/amp&lt<gt>\"quote'",
    "odd/ünïcødé/文件",
    "odd/emoji-😀",
    "odd/question?mark#hash",
    "odd/tab\tand\x01ctl",
    "odd/double//slash",
    "odd/trailing/",
    "odd/./dot/../segments",
    "odd/~tilde!*()",
    "odd/=equals;semi:colon,comma@at$",
]


def test_odd_keys_round_trip_and_list_with_url_encoding(s3: Any) -> None:
    for i, key in enumerate(ODD_KEYS):
        s3.put_object(Bucket="e2e", Key=key, Body=str(i).encode())
    for i, key in enumerate(ODD_KEYS):
        assert s3.get_object(Bucket="e2e", Key=key)["Body"].read() == str(i).encode(), key
    # boto3 asks for encoding-type=url itself and decodes the answer
    decoded = [o["Key"] for o in s3.list_objects_v2(Bucket="e2e", Prefix="odd/")["Contents"]]
    assert decoded == sorted(ODD_KEYS, key=lambda k: k.encode())
    # asked for explicitly, boto3 leaves the encoded form for us to check
    raw = s3.list_objects_v2(Bucket="e2e", Prefix="odd/", EncodingType="url")
    assert raw["EncodingType"] == "url"
    encoded = [o["Key"] for o in raw["Contents"]]
    assert [unquote_plus(k) for k in encoded] == decoded
    assert all(" " not in k and "\t" not in k and "\x01" not in k for k in encoded)
    assert "odd/with+space" in encoded
    assert "odd/plus%2Bsign" in encoded
    delimited = s3.list_objects_v2(Bucket="e2e", Prefix="odd/", Delimiter="/", EncodingType="url")
    assert sorted(unquote_plus(p["Prefix"]) for p in delimited["CommonPrefixes"]) == [
        "odd/./",
        "odd/double/",
        "odd/trailing/",
        "odd/ünïcødé/",
    ]
    v1 = s3.list_objects(Bucket="e2e", Prefix="odd/", EncodingType="url")
    assert [unquote_plus(o["Key"]) for o in v1["Contents"]] == decoded
    # XML 1.0 cannot carry U+0001 (botocore sends it raw, which S3 refuses too): that key
    # goes by DeleteObject, the rest in one DeleteObjects.
    xml_safe = [k for k in ODD_KEYS if "\x01" not in k]
    s3.delete_objects(Bucket="e2e", Delete={"Objects": [{"Key": k} for k in xml_safe]})
    for key in set(ODD_KEYS) - set(xml_safe):
        s3.delete_object(Bucket="e2e", Key=key)
    assert s3.list_objects_v2(Bucket="e2e", Prefix="odd/")["KeyCount"] == 0


def test_listing_without_encoding_escapes_xml(cairn_matrix: Daemon, s3: Any) -> None:
    key = "xml/amp&lt<gt>\"quote'"
    s3.put_object(Bucket="e2e", Key=key, Body=b"x")
    url = cairn_matrix.presign("GET", "/e2e?list-type=2&prefix=xml%2F")  # no encoding-type
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = resp.read().decode()
    assert "<Key>xml/amp&amp;lt&lt;gt&gt;" in body
    import xml.etree.ElementTree as ET

    root = ET.fromstring(body)
    keys = [el.text for el in root.iter() if el.tag.endswith("Key")]
    assert keys == [key]
    s3.delete_object(Bucket="e2e", Key=key)


def test_space_returns_after_deletes(cairn_matrix: Daemon, s3: Any) -> None:
    """Deleted data leaves the backends (GC runs every few seconds with no delay)."""
    before = cairn_matrix.blob_set()
    s3.put_object(Bucket="e2e", Key="gc/victim", Body=payload(3 * CHUNK_SIZE, 30))
    added = cairn_matrix.blob_set() - before
    assert len(added) == 3
    s3.delete_object(Bucket="e2e", Key="gc/victim")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and cairn_matrix.blob_set() & added:
        time.sleep(0.25)
    assert not cairn_matrix.blob_set() & added
    # the files are gone from the disks too, not just unlisted
    for backend, key in added:
        assert not (cairn_matrix.backends[backend] / key).exists()
    assert os.path.isdir(next(iter(cairn_matrix.backends.values())))
