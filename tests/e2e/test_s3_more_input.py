"""DeleteObjects with bad documents or too many keys, and the aws cli's s3api for
checksums and conditional writes."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e


def _delete_document(keys: list[str]) -> bytes:
    objects = "".join(f"<Object><Key>{k}</Key></Object>" for k in keys)
    return f"<Delete>{objects}</Delete>".encode()


@pytest.mark.parametrize(
    "document",
    [
        _delete_document([f"del/k{i}" for i in range(1001)]),
        b"<Delete><Object><Key>del/k0</Key></Object>",
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;">]><Delete><Object><Key>&c;</Key></Object></Delete>',
        b"<Delete></Delete>",
        b"<Delete><Object><Key>del/k0</Key><Key>del/k1</Key></Object></Delete>",
        b"<NotDelete/>",
    ],
    ids=["1001 keys", "truncated", "entity bomb", "no object", "two keys", "wrong root"],
)
def test_bad_delete_objects_documents_delete_nothing(cairn: Daemon, document: bytes) -> None:
    s3 = cairn.client()
    s3.put_object(Bucket="e2e", Key="del/k0", Body=b"keep me")
    md5 = base64.b64encode(hashlib.md5(document).digest()).decode()
    url = cairn.presign("POST", "/e2e?delete=")
    request = urllib.request.Request(
        url, data=document, method="POST", headers={"Content-MD5": md5}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    assert b"<Code>MalformedXML</Code>" in caught.value.read()
    assert s3.get_object(Bucket="e2e", Key="del/k0")["Body"].read() == b"keep me"
    s3.delete_object(Bucket="e2e", Key="del/k0")


def test_aws_cli_s3api_checksums_and_conditional_writes(cairn: Daemon, tmp_path: Path) -> None:
    body = tmp_path / "body.txt"
    body.write_bytes(b"checksummed body")
    crc32 = base64.b64encode(zlib.crc32(b"checksummed body").to_bytes(4, "big")).decode()
    put = json.loads(
        cairn.aws(
            "s3api", "put-object", "--bucket", "e2e", "--key", "cli/sum.txt",
            "--body", str(body), "--checksum-algorithm", "CRC32",
        )
    )  # fmt: skip
    assert put["ChecksumCRC32"] == crc32
    head = json.loads(
        cairn.aws(
            "s3api", "head-object", "--bucket", "e2e", "--key", "cli/sum.txt",
            "--checksum-mode", "ENABLED",
        )
    )  # fmt: skip
    assert head["ChecksumCRC32"] == crc32
    attributes = json.loads(
        cairn.aws(
            "s3api", "get-object-attributes", "--bucket", "e2e", "--key", "cli/sum.txt",
            "--object-attributes", "Checksum", "ObjectSize",
        )
    )  # fmt: skip
    assert attributes["Checksum"]["ChecksumCRC32"] == crc32
    assert attributes["ObjectSize"] == len(b"checksummed body")

    # If-None-Match: * refuses to overwrite; If-Match with a stale ETag too
    refused = cairn.aws(
        "s3api", "put-object", "--bucket", "e2e", "--key", "cli/sum.txt",
        "--body", str(body), "--if-none-match", "*",
        ok_codes=(254, 255),
    )  # fmt: skip
    assert refused == ""
    created = json.loads(
        cairn.aws(
            "s3api", "put-object", "--bucket", "e2e", "--key", "cli/new.txt",
            "--body", str(body), "--if-none-match", "*",
        )
    )  # fmt: skip
    assert created["ETag"]
    cairn.aws(
        "s3api", "put-object", "--bucket", "e2e", "--key", "cli/new.txt",
        "--body", str(body), "--if-match", '"0123456789abcdef0123456789abcdef"',
        ok_codes=(254, 255),
    )  # fmt: skip
    cairn.aws(
        "s3api", "put-object", "--bucket", "e2e", "--key", "cli/new.txt",
        "--body", str(body), "--if-match", created["ETag"],
    )  # fmt: skip
    for key in ("cli/sum.txt", "cli/new.txt"):
        cairn.client().delete_object(Bucket="e2e", Key=key)
