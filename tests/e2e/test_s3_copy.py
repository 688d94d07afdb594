"""CopyObject through boto3 and rclone: by reference, with directives and conditions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import Daemon, MiB

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def s3(cairn: Daemon) -> Any:
    return cairn.client()


@pytest.fixture
def prefix(s3: Any) -> Iterator[str]:
    name = f"copy{os.getpid()}{id(s3) % 10000}/"
    yield name
    for obj in s3.list_objects_v2(Bucket="e2e", Prefix=name).get("Contents", []):
        s3.delete_object(Bucket="e2e", Key=obj["Key"])


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_copy_moves_no_bytes_and_keeps_or_replaces_metadata(
    cairn: Daemon, s3: Any, prefix: str
) -> None:
    data = os.urandom(5 * MiB + 123)
    put = s3.put_object(
        Bucket="e2e", Key=f"{prefix}src", Body=data, ContentType="image/png", Metadata={"a": "1"}
    )
    before = sum(cairn.disk_bytes().values())
    out = s3.copy_object(
        Bucket="e2e", Key=f"{prefix}same", CopySource={"Bucket": "e2e", "Key": f"{prefix}src"}
    )
    assert out["CopyObjectResult"]["ETag"] == put["ETag"]
    assert sum(cairn.disk_bytes().values()) - before < 8192  # a manifest, not 5 MiB
    got = s3.get_object(Bucket="e2e", Key=f"{prefix}same")
    assert got["Body"].read() == data
    assert (got["ContentType"], got["Metadata"]) == ("image/png", {"a": "1"})
    s3.copy_object(
        Bucket="e2e",
        Key=f"{prefix}replaced",
        CopySource=f"e2e/{prefix}src",
        MetadataDirective="REPLACE",
        ContentType="text/plain",
        Metadata={"b": "2"},
    )
    head = s3.head_object(Bucket="e2e", Key=f"{prefix}replaced")
    assert (head["ContentType"], head["Metadata"]) == ("text/plain", {"b": "2"})
    s3.delete_object(Bucket="e2e", Key=f"{prefix}src")
    assert s3.get_object(Bucket="e2e", Key=f"{prefix}same")["Body"].read() == data


def test_copy_conditions_and_refusals(s3: Any, prefix: str) -> None:
    put = s3.put_object(Bucket="e2e", Key=f"{prefix}c", Body=b"content")
    source = {"Bucket": "e2e", "Key": f"{prefix}c"}
    with pytest.raises(ClientError) as exc:
        s3.copy_object(
            Bucket="e2e", Key=f"{prefix}x", CopySource=source, CopySourceIfMatch='"nope"'
        )
    assert error_code(exc) == "PreconditionFailed"
    with pytest.raises(ClientError) as exc:
        s3.copy_object(
            Bucket="e2e", Key=f"{prefix}x", CopySource=source, CopySourceIfNoneMatch=put["ETag"]
        )
    assert error_code(exc) == "PreconditionFailed"
    s3.copy_object(Bucket="e2e", Key=f"{prefix}x", CopySource=source, CopySourceIfMatch=put["ETag"])
    with pytest.raises(ClientError) as exc:
        s3.copy_object(Bucket="e2e", Key=f"{prefix}c", CopySource=source)
    assert error_code(exc) == "InvalidRequest"  # onto itself without new metadata
    with pytest.raises(ClientError) as exc:
        s3.copy_object(
            Bucket="e2e", Key=f"{prefix}y", CopySource={"Bucket": "e2e", "Key": f"{prefix}missing"}
        )
    assert error_code(exc) == "NoSuchKey"
    with pytest.raises(ClientError) as exc:
        s3.copy_object(Bucket="e2e", Key=f"{prefix}y", CopySource={"Bucket": "other", "Key": "k"})
    assert error_code(exc) == "AccessDenied"  # no grant on the source bucket


def test_rclone_server_side_copy_and_move(
    cairn: Daemon, s3: Any, prefix: str, tmp_path: Path
) -> None:
    local = tmp_path / "f.bin"
    local.write_bytes(os.urandom(3 * MiB))
    cairn.rclone("copyto", str(local), f"cairn:e2e/{prefix}a.bin")
    cairn.rclone("copyto", f"cairn:e2e/{prefix}a.bin", f"cairn:e2e/{prefix}b.bin")
    cairn.rclone("moveto", f"cairn:e2e/{prefix}b.bin", f"cairn:e2e/{prefix}c.bin")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="e2e", Prefix=prefix)["Contents"]}
    assert keys == {f"{prefix}a.bin", f"{prefix}c.bin"}
    assert s3.get_object(Bucket="e2e", Key=f"{prefix}c.bin")["Body"].read() == local.read_bytes()
