"""Isolation between virtual buckets: a key of bucket A can do nothing in bucket B.

The daemon serves ``e2e`` (key E2EKEY…) and ``other`` (key OTHERKEY…); every call made
with the wrong key fails with AccessDenied, whether the bucket, key or upload exists or
not, and changes nothing.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import (
    OTHER_ACCESS_KEY,
    OTHER_BUCKET,
    OTHER_SECRET_KEY,
    Daemon,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two(cairn: Daemon) -> Iterator[tuple[Any, Any]]:
    """(client of e2e, client of other), with one object and one open upload in each."""
    mine = cairn.client()
    theirs = cairn.client(access_key=OTHER_ACCESS_KEY, secret_key=OTHER_SECRET_KEY)
    mine.put_object(Bucket="e2e", Key="iso/mine.txt", Body=b"mine")
    theirs.put_object(Bucket=OTHER_BUCKET, Key="iso/theirs.txt", Body=b"theirs")
    yield mine, theirs
    mine.delete_object(Bucket="e2e", Key="iso/mine.txt")
    theirs.delete_object(Bucket=OTHER_BUCKET, Key="iso/theirs.txt")


def _denied(call: Callable[[], Any]) -> None:
    with pytest.raises(ClientError) as caught:
        call()
    error = caught.value.response["Error"]
    status = caught.value.response["ResponseMetadata"]["HTTPStatusCode"]
    assert (error["Code"], status) in (("AccessDenied", 403), ("403", 403)), error


def test_every_object_and_bucket_call_with_the_wrong_key_is_denied(
    cairn: Daemon, two: tuple[Any, Any]
) -> None:
    mine, theirs = two
    b = OTHER_BUCKET
    calls: dict[str, Callable[[], Any]] = {
        "GetObject": lambda: mine.get_object(Bucket=b, Key="iso/theirs.txt"),
        "GetObject absent": lambda: mine.get_object(Bucket=b, Key="iso/nothing"),
        "HeadObject": lambda: mine.head_object(Bucket=b, Key="iso/theirs.txt"),
        "PutObject": lambda: mine.put_object(Bucket=b, Key="iso/intruder", Body=b"x"),
        "DeleteObject": lambda: mine.delete_object(Bucket=b, Key="iso/theirs.txt"),
        "ListObjectsV2": lambda: mine.list_objects_v2(Bucket=b),
        "ListObjects": lambda: mine.list_objects(Bucket=b),
        "HeadBucket": lambda: mine.head_bucket(Bucket=b),
        "GetBucketLocation": lambda: mine.get_bucket_location(Bucket=b),
        "ListMultipartUploads": lambda: mine.list_multipart_uploads(Bucket=b),
        "CreateMultipartUpload": lambda: mine.create_multipart_upload(Bucket=b, Key="k"),
        "DeleteObjects": lambda: mine.delete_objects(
            Bucket=b, Delete={"Objects": [{"Key": "iso/theirs.txt"}]}
        ),
        "CopyObject into": lambda: mine.copy_object(
            Bucket=b, Key="iso/copied", CopySource={"Bucket": "e2e", "Key": "iso/mine.txt"}
        ),
        "CopyObject from": lambda: mine.copy_object(
            Bucket="e2e", Key="iso/stolen", CopySource={"Bucket": b, "Key": "iso/theirs.txt"}
        ),
        "DeleteBucket": lambda: mine.delete_bucket(Bucket=b),
        "CreateBucket existing": lambda: mine.create_bucket(Bucket=b),
        "CreateBucket new": lambda: mine.create_bucket(Bucket="not-yours"),
        "GetObject of a bucket that does not exist": lambda: mine.get_object(
            Bucket="no-such-bucket-here", Key="k"
        ),
    }
    for name, call in calls.items():
        try:
            _denied(call)
        except AssertionError as exc:  # name the call that leaked
            raise AssertionError(f"{name}: {exc}") from exc
    # nothing changed in the other bucket
    listed = theirs.list_objects_v2(Bucket=b)["Contents"]
    assert [o["Key"] for o in listed] == ["iso/theirs.txt"]
    assert theirs.get_object(Bucket=b, Key="iso/theirs.txt")["Body"].read() == b"theirs"
    assert "Contents" not in mine.list_objects_v2(Bucket="e2e", Prefix="iso/stolen")


def test_a_guessed_or_stolen_upload_id_is_useless_with_another_key(
    cairn: Daemon, two: tuple[Any, Any]
) -> None:
    mine, theirs = two
    upload = theirs.create_multipart_upload(Bucket=OTHER_BUCKET, Key="iso/mpu")["UploadId"]
    try:
        theirs.upload_part(
            Bucket=OTHER_BUCKET, Key="iso/mpu", UploadId=upload, PartNumber=1, Body=b"a" * 10
        )
        b = OTHER_BUCKET
        _denied(lambda: mine.list_parts(Bucket=b, Key="iso/mpu", UploadId=upload))
        _denied(
            lambda: mine.upload_part(
                Bucket=b, Key="iso/mpu", UploadId=upload, PartNumber=2, Body=b"x"
            )
        )
        _denied(
            lambda: mine.complete_multipart_upload(
                Bucket=b,
                Key="iso/mpu",
                UploadId=upload,
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"x"'}]},
            )
        )
        _denied(lambda: mine.abort_multipart_upload(Bucket=b, Key="iso/mpu", UploadId=upload))
        # the id used against the key's own bucket names no upload there
        with pytest.raises(ClientError) as own:
            mine.upload_part(Bucket="e2e", Key="iso/mpu", UploadId=upload, PartNumber=1, Body=b"x")
        assert own.value.response["Error"]["Code"] == "NoSuchUpload"
        with pytest.raises(ClientError) as own_abort:
            mine.abort_multipart_upload(Bucket="e2e", Key="iso/mpu", UploadId=upload)
        assert own_abort.value.response["Error"]["Code"] == "NoSuchUpload"
        parts = theirs.list_parts(Bucket=OTHER_BUCKET, Key="iso/mpu", UploadId=upload)
        assert [p["PartNumber"] for p in parts["Parts"]] == [1]
    finally:
        theirs.abort_multipart_upload(Bucket=OTHER_BUCKET, Key="iso/mpu", UploadId=upload)


def test_delete_objects_naming_the_other_bucket_deletes_nothing(
    cairn: Daemon, two: tuple[Any, Any]
) -> None:
    mine, theirs = two
    # keys that look like the other bucket's path, sent to the key's own bucket
    result = mine.delete_objects(
        Bucket="e2e",
        Delete={"Objects": [{"Key": f"../{OTHER_BUCKET}/iso/theirs.txt"}, {"Key": "/other/x"}]},
    )
    assert len(result.get("Deleted", [])) + len(result.get("Errors", [])) == 2
    assert theirs.get_object(Bucket=OTHER_BUCKET, Key="iso/theirs.txt")["Body"].read() == b"theirs"


def test_a_presigned_url_for_bucket_b_signed_with_a_key_of_a_is_refused(
    cairn: Daemon, two: tuple[Any, Any]
) -> None:
    for method in ("GET", "PUT", "DELETE"):
        url = cairn.presign(method, f"/{OTHER_BUCKET}/iso/theirs.txt")
        request = urllib.request.Request(url, method=method, data=b"x" if method == "PUT" else None)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 403
        assert b"<Code>AccessDenied</Code>" in caught.value.read()
    # the same URL signed by the owner works
    owner = cairn.presign(
        "GET",
        f"/{OTHER_BUCKET}/iso/theirs.txt",
        access_key=OTHER_ACCESS_KEY,
        secret_key=OTHER_SECRET_KEY,
    )
    with urllib.request.urlopen(owner, timeout=10) as response:
        assert response.read() == b"theirs"


def test_list_buckets_shows_only_what_the_key_may_see(cairn: Daemon) -> None:
    mine = [b["Name"] for b in cairn.client().list_buckets()["Buckets"]]
    theirs = cairn.client(access_key=OTHER_ACCESS_KEY, secret_key=OTHER_SECRET_KEY)
    assert mine == ["e2e"]
    assert [b["Name"] for b in theirs.list_buckets()["Buckets"]] == [OTHER_BUCKET]
    everything = [b["Name"] for b in cairn.admin_client().list_buckets()["Buckets"]]
    assert {"e2e", OTHER_BUCKET} <= set(everything)
