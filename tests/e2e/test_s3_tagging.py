"""Object tagging through boto3 and the aws cli: stored, returned, changed in place,
copied by directive, and bad tag sets refused without changing anything."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e


def _tags(s3: Any, key: str) -> dict[str, str]:
    got = s3.get_object_tagging(Bucket="e2e", Key=key)["TagSet"]
    return {t["Key"]: t["Value"] for t in got}


def _code(call: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


def test_tags_on_put_get_and_in_place_changes(cairn: Daemon) -> None:
    s3 = cairn.client()
    s3.put_object(Bucket="e2e", Key="tag/a", Body=b"a", Tagging="team=blue&note=a%20b%2Bc")
    assert _tags(s3, "tag/a") == {"team": "blue", "note": "a b+c"}
    head = s3.head_object(Bucket="e2e", Key="tag/a")
    assert head["ResponseMetadata"]["HTTPHeaders"]["x-amz-tagging-count"] == "2"
    assert "x-amz-tagging" not in head["ResponseMetadata"]["HTTPHeaders"]
    etag, modified = head["ETag"], head["LastModified"]

    s3.put_object_tagging(
        Bucket="e2e", Key="tag/a", Tagging={"TagSet": [{"Key": "k", "Value": "v/1:@=."}]}
    )
    assert _tags(s3, "tag/a") == {"k": "v/1:@=."}
    after = s3.head_object(Bucket="e2e", Key="tag/a")
    assert (after["ETag"], after["LastModified"]) == (etag, modified)  # no new version
    s3.delete_object_tagging(Bucket="e2e", Key="tag/a")
    assert _tags(s3, "tag/a") == {}
    assert (
        "x-amz-tagging-count"
        not in s3.head_object(Bucket="e2e", Key="tag/a")["ResponseMetadata"]["HTTPHeaders"]
    )
    assert _code(lambda: s3.get_object_tagging(Bucket="e2e", Key="tag/none")) == "NoSuchKey"
    assert (
        _code(
            lambda: s3.put_object_tagging(
                Bucket="e2e", Key="tag/none", Tagging={"TagSet": [{"Key": "k", "Value": "v"}]}
            )
        )
        == "NoSuchKey"
    )


def test_copy_keeps_or_replaces_tags_by_directive(cairn: Daemon) -> None:
    s3 = cairn.client()
    s3.put_object(Bucket="e2e", Key="tag/src", Body=b"s", Tagging="a=1", Metadata={"m": "source"})
    source = {"Bucket": "e2e", "Key": "tag/src"}
    s3.copy_object(Bucket="e2e", Key="tag/copy", CopySource=source)
    assert _tags(s3, "tag/copy") == {"a": "1"}
    s3.copy_object(
        Bucket="e2e", Key="tag/re", CopySource=source, TaggingDirective="REPLACE", Tagging="b=2"
    )
    assert _tags(s3, "tag/re") == {"b": "2"}
    assert s3.head_object(Bucket="e2e", Key="tag/re")["Metadata"] == {"m": "source"}
    s3.copy_object(
        Bucket="e2e",
        Key="tag/meta",
        CopySource=source,
        MetadataDirective="REPLACE",
        Metadata={"m": "new"},
    )
    assert _tags(s3, "tag/meta") == {"a": "1"}
    assert s3.head_object(Bucket="e2e", Key="tag/meta")["Metadata"] == {"m": "new"}


def test_multipart_upload_carries_its_tags(cairn: Daemon) -> None:
    s3 = cairn.client()
    upload = s3.create_multipart_upload(Bucket="e2e", Key="tag/mpu", Tagging="x=y")["UploadId"]
    etag = s3.upload_part(
        Bucket="e2e", Key="tag/mpu", UploadId=upload, PartNumber=1, Body=b"p" * 100
    )["ETag"]
    s3.complete_multipart_upload(
        Bucket="e2e",
        Key="tag/mpu",
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
    )
    assert _tags(s3, "tag/mpu") == {"x": "y"}


@pytest.mark.parametrize(
    "tagset",
    [
        [{"Key": f"k{i}", "Value": "v"} for i in range(11)],
        [{"Key": "same", "Value": "1"}, {"Key": "same", "Value": "2"}],
        [{"Key": "k" * 129, "Value": "v"}],
        [{"Key": "k", "Value": "v" * 257}],
        [{"Key": "bad<char>", "Value": "v"}],
    ],
    ids=["11 tags", "duplicate key", "long key", "long value", "bad character"],
)
def test_bad_tag_sets_are_refused_and_change_nothing(cairn: Daemon, tagset: Any) -> None:
    s3 = cairn.client()
    s3.put_object(Bucket="e2e", Key="tag/bad", Body=b"b", Tagging="keep=me")
    code = _code(
        lambda: s3.put_object_tagging(Bucket="e2e", Key="tag/bad", Tagging={"TagSet": tagset})
    )
    assert code == "InvalidTag"
    assert _tags(s3, "tag/bad") == {"keep": "me"}
    header = "&".join(f"{t['Key']}={t['Value']}" for t in tagset)
    assert _code(lambda: s3.put_object(Bucket="e2e", Key="tag/bad", Body=b"new", Tagging=header))
    assert s3.get_object(Bucket="e2e", Key="tag/bad")["Body"].read() == b"b"


@pytest.mark.parametrize(
    "body",
    [
        b"<Tagging><TagSet><Tag><Key>k</Key>",
        b'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;">]>'
        b"<Tagging><TagSet><Tag><Key>&b;</Key><Value>v</Value></Tag></TagSet></Tagging>",
        b"<Tagging><TagSet><Tag><Value>v</Value></Tag></TagSet></Tagging>",
        b"<Other/>",
    ],
    ids=["truncated", "entity bomb", "no key", "wrong root"],
)
def test_malformed_tagging_xml_is_refused(cairn: Daemon, body: bytes) -> None:
    import urllib.error
    import urllib.request

    cairn.client().put_object(Bucket="e2e", Key="tag/xml", Body=b"x", Tagging="keep=me")
    url = cairn.presign("PUT", "/e2e/tag/xml?tagging=")
    request = urllib.request.Request(url, data=body, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert b"<Code>MalformedXML</Code>" in caught.value.read()
    assert _tags(cairn.client(), "tag/xml") == {"keep": "me"}


def test_aws_cli_s3api_tagging(cairn: Daemon) -> None:
    cairn.client().put_object(Bucket="e2e", Key="tag/cli", Body=b"c")
    tagging = json.dumps({"TagSet": [{"Key": "env", "Value": "prod"}]})
    cairn.aws(
        "s3api", "put-object-tagging", "--bucket", "e2e", "--key", "tag/cli", "--tagging", tagging
    )
    out = json.loads(
        cairn.aws("s3api", "get-object-tagging", "--bucket", "e2e", "--key", "tag/cli")
    )
    assert out["TagSet"] == [{"Key": "env", "Value": "prod"}]
