"""S3 XML: responses rendered here are parsed by a real boto3 client; request documents
botocore serialises are parsed here; hostile documents are refused. Also the error table."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from frontends.s3.errors import ERRORS, NO_ROOM_CODE, S3AuthError, S3Error
from frontends.s3.sigv4 import split_query
from frontends.s3.xml import (
    NS,
    BucketInfo,
    CompletedPart,
    DeletedInfo,
    DeleteErrorInfo,
    ListObjectsPage,
    ListPartsPage,
    ListUploadsPage,
    ObjectInfo,
    ObjectToDelete,
    Owner,
    PartInfo,
    UploadInfo,
    check_encoding_type,
    escape,
    format_timestamp,
    parse_complete_multipart_upload,
    parse_create_bucket_configuration,
    parse_delete,
    quote_etag,
    read_xml_body,
    render_complete_multipart_upload,
    render_copy_object_result,
    render_copy_part_result,
    render_delete_result,
    render_error,
    render_initiate_multipart_upload,
    render_list_buckets,
    render_list_multipart_uploads,
    render_list_objects_v1,
    render_list_objects_v2,
    render_list_parts,
    render_location_constraint,
    render_s3_error,
    url_encode,
)
from tests.unit.test_s3_sigv4 import Sent, clean_aws_env, make_client, to_sent

pytestmark = pytest.mark.unit

WHEN = datetime(2026, 11, 22, 10, 30, 15, 123456, tzinfo=UTC)
OWNER = Owner("0123456789abcdef", "cairn-admin")
NASTY_KEYS = [
    "plain",
    "a b",
    "a+b",
    "100%",
    "tilde~star*",
    "ünïcödé/日本",
    "amp&lt<gt>quote\"apos'",
    "ctrl\x01\x1f-chars",
    "cr\r\nlf\ttab",
    "slash/deep/er/",
    "=?;:@$,#[]",
]


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


class Responder:
    """A before-send hook that records the request and answers with ``body``."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.headers: dict[str, str] = {}
        self.sent: Sent | None = None

    def answer(self, body: bytes, status: int = 200, **headers: str) -> None:
        self.body, self.status, self.headers = body, status, headers

    def __call__(self, request: Any, **_: Any) -> AWSResponse:
        self.sent = to_sent(request)
        headers = {"Content-Type": "application/xml", **self.headers}
        return AWSResponse(request.url, self.status, headers, _Raw(self.body))

    @property
    def query(self) -> dict[str, str]:
        assert self.sent is not None
        return dict(self.sent.query)


@pytest.fixture(scope="module")
def responder() -> Responder:
    return Responder()


@pytest.fixture(scope="module")
def client(responder: Responder) -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        clean_aws_env(mp)
        yield make_client(hook=responder)


def parse(document: bytes) -> ET.Element:
    """ElementTree (not what the code under test uses) for structural checks."""
    assert document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n')
    return ET.fromstring(document)


# --- responses through boto3 -------------------------------------------------------------------


def test_list_objects_v2_with_url_encoding(client: Any, responder: Responder) -> None:
    contents = [
        ObjectInfo(key, WHEN, "d41d8cd98f00b204e9800998ecf8427e", n, owner=OWNER)
        for n, key in enumerate(NASTY_KEYS)
    ]
    prefixes = ["dir one/", "ü+%/"]
    page = ListObjectsPage(
        bucket="bucket",
        max_keys=1000,
        is_truncated=True,
        contents=contents,
        common_prefixes=prefixes,
        prefix="",
        delimiter="/",
        start_after="start after~",
        continuation_token="opaque+/=",
        next_continuation_token="next+/=token",
        fetch_owner=True,
        encoding_type="url",
    )
    responder.answer(render_list_objects_v2(page))
    result = client.list_objects_v2(
        Bucket="bucket",
        Delimiter="/",
        StartAfter="start after~",
        ContinuationToken="opaque+/=",
        FetchOwner=True,
    )
    assert responder.query["encoding-type"] == "url"  # boto3 asks for it by itself
    assert [c["Key"] for c in result["Contents"]] == NASTY_KEYS
    assert [c["Prefix"] for c in result["CommonPrefixes"]] == prefixes
    first = result["Contents"][0]
    assert first["LastModified"] == WHEN.replace(microsecond=123000)
    assert first["ETag"] == '"d41d8cd98f00b204e9800998ecf8427e"'
    assert first["Size"] == 0
    assert first["StorageClass"] == "STANDARD"
    assert first["Owner"] == {"ID": OWNER.id, "DisplayName": "cairn-admin"}
    assert result["KeyCount"] == len(NASTY_KEYS) + 2
    assert result["IsTruncated"] is True
    assert result["NextContinuationToken"] == "next+/=token"
    assert result["ContinuationToken"] == "opaque+/="
    assert result["StartAfter"] == "start after~"
    assert result["Delimiter"] == "/"
    assert result["MaxKeys"] == 1000
    assert result["Name"] == "bucket"


def test_list_objects_v2_without_owner_and_empty(client: Any, responder: Responder) -> None:
    page = ListObjectsPage(
        bucket="b",
        max_keys=5,
        is_truncated=False,
        contents=[ObjectInfo("k", WHEN, '"already-quoted"', 3, owner=OWNER)],
        prefix="k",
        encoding_type="url",
    )
    responder.answer(render_list_objects_v2(page))
    result = client.list_objects_v2(Bucket="b", Prefix="k")
    assert "Owner" not in result["Contents"][0]
    assert result["Contents"][0]["ETag"] == '"already-quoted"'
    assert result["Prefix"] == "k"
    assert "Delimiter" not in result
    responder.answer(
        render_list_objects_v2(ListObjectsPage(bucket="b", max_keys=0, is_truncated=False))
    )
    empty = client.list_objects_v2(Bucket="b", MaxKeys=0)
    assert empty["KeyCount"] == 0
    assert "Contents" not in empty


def test_list_objects_v1(client: Any, responder: Responder) -> None:
    page = ListObjectsPage(
        bucket="bucket",
        max_keys=2,
        is_truncated=True,
        contents=[ObjectInfo(k, WHEN, "e", 1, owner=OWNER) for k in NASTY_KEYS[:3]],
        common_prefixes=["x y/"],
        prefix="",
        marker="m a+r%k",
        next_marker="a+b",
        delimiter="/",
        encoding_type="url",
    )
    responder.answer(render_list_objects_v1(page))
    result = client.list_objects(Bucket="bucket", Marker="m a+r%k", Delimiter="/")
    assert [c["Key"] for c in result["Contents"]] == NASTY_KEYS[:3]
    assert result["Contents"][0]["Owner"]["ID"] == OWNER.id
    assert result["Marker"] == "m a+r%k"
    assert result["NextMarker"] == "a+b"
    assert result["CommonPrefixes"] == [{"Prefix": "x y/"}]
    assert result["IsTruncated"] is True


def test_list_buckets(client: Any, responder: Responder) -> None:
    buckets = [BucketInfo("alpha", WHEN), BucketInfo("beta", WHEN + timedelta(days=1), "us-east-1")]
    responder.answer(render_list_buckets(buckets, OWNER, continuation_token="tok"))
    result = client.list_buckets()
    assert [b["Name"] for b in result["Buckets"]] == ["alpha", "beta"]
    assert result["Buckets"][0]["CreationDate"] == WHEN.replace(microsecond=123000)
    assert result["Buckets"][1]["BucketRegion"] == "us-east-1"
    assert result["Owner"] == {"ID": OWNER.id, "DisplayName": "cairn-admin"}
    assert result["ContinuationToken"] == "tok"
    root = parse(render_list_buckets([], None))
    assert root.tag == f"{{{NS}}}ListAllMyBucketsResult"


def test_multipart_round_trip(client: Any, responder: Responder) -> None:
    responder.answer(render_initiate_multipart_upload("bucket", "big file+", "upload/id+1=="))
    created = client.create_multipart_upload(Bucket="bucket", Key="big file+")
    assert (created["Bucket"], created["Key"], created["UploadId"]) == (
        "bucket",
        "big file+",
        "upload/id+1==",
    )

    responder.answer(
        render_complete_multipart_upload(
            "http://127.0.0.1:9000/bucket/big%20file%2B",
            "bucket",
            "big file+",
            "3858f62230ac3c915f300c664312c11f-2",
            checksums={"CRC32": "AAAAAA=="},
            checksum_type="COMPOSITE",
        )
    )
    parts = [
        {
            "PartNumber": 1,
            "ETag": '"a54357aff0632cce46d942af68356b38"',
            "ChecksumCRC32": "AAAAAA==",
        },
        {"PartNumber": 2, "ETag": '"0c78aef83f66abc1fa1e8477f296d394"'},
    ]
    completed = client.complete_multipart_upload(
        Bucket="bucket", Key="big file+", UploadId="u", MultipartUpload={"Parts": parts}
    )
    assert completed["ETag"] == '"3858f62230ac3c915f300c664312c11f-2"'
    assert completed["ChecksumCRC32"] == "AAAAAA=="
    assert completed["ChecksumType"] == "COMPOSITE"
    assert completed["Location"] == "http://127.0.0.1:9000/bucket/big%20file%2B"
    # The document botocore sent parses back to the same parts.
    assert responder.sent is not None
    assert parse_complete_multipart_upload(responder.sent.body) == [
        CompletedPart(1, "a54357aff0632cce46d942af68356b38", {"CRC32": "AAAAAA=="}),
        CompletedPart(2, "0c78aef83f66abc1fa1e8477f296d394"),
    ]

    page = ListPartsPage(
        bucket="bucket",
        key="big file+",
        upload_id="u",
        max_parts=2,
        is_truncated=True,
        parts=[PartInfo(n, WHEN, f"etag{n}", 5 * 1024 * 1024, {"SHA256": "x"}) for n in (1, 2)],
        initiator=OWNER,
        owner=OWNER,
    )
    responder.answer(render_list_parts(page))
    listed = client.list_parts(Bucket="bucket", Key="big file+", UploadId="u", MaxParts=2)
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2]
    assert listed["Parts"][0]["ETag"] == '"etag1"'
    assert listed["Parts"][0]["ChecksumSHA256"] == "x"
    assert listed["NextPartNumberMarker"] == 2
    assert listed["IsTruncated"] is True
    assert listed["Initiator"]["ID"] == OWNER.id

    uploads = ListUploadsPage(
        bucket="bucket",
        max_uploads=10,
        is_truncated=False,
        uploads=[UploadInfo("big file+", "u1", WHEN, OWNER, OWNER)],
        common_prefixes=["p/"],
        key_marker="k",
        next_key_marker="big file+",
        next_upload_id_marker="u1",
        prefix="",
        delimiter="/",
    )
    responder.answer(render_list_multipart_uploads(uploads))
    listed_uploads = client.list_multipart_uploads(Bucket="bucket", KeyMarker="k", Delimiter="/")
    upload = listed_uploads["Uploads"][0]
    assert (upload["Key"], upload["UploadId"]) == ("big file+", "u1")
    assert upload["Initiated"] == WHEN.replace(microsecond=123000)
    assert listed_uploads["NextKeyMarker"] == "big file+"
    assert listed_uploads["CommonPrefixes"] == [{"Prefix": "p/"}]


def test_list_multipart_uploads_url_encoding() -> None:
    page = ListUploadsPage(
        bucket="b",
        max_uploads=1,
        is_truncated=True,
        uploads=[UploadInfo("a b\x01", "id", WHEN)],
        key_marker="k m",
        next_key_marker="a b\x01",
        prefix="p q",
        encoding_type="url",
    )
    root = parse(render_list_multipart_uploads(page))
    ns = {"s3": NS}
    assert root.findtext("s3:Upload/s3:Key", namespaces=ns) == "a+b%01"
    assert root.findtext("s3:KeyMarker", namespaces=ns) == "k+m"
    assert root.findtext("s3:NextKeyMarker", namespaces=ns) == "a+b%01"
    assert root.findtext("s3:Prefix", namespaces=ns) == "p+q"
    assert root.findtext("s3:EncodingType", namespaces=ns) == "url"


def test_copy_location_and_delete(client: Any, responder: Responder) -> None:
    responder.answer(render_copy_object_result("abc", WHEN, checksums={"CRC32C": "AAAAAA=="}))
    copied = client.copy_object(Bucket="b", Key="k", CopySource={"Bucket": "s", "Key": "k"})
    assert copied["CopyObjectResult"]["ETag"] == '"abc"'
    assert copied["CopyObjectResult"]["LastModified"] == WHEN.replace(microsecond=123000)
    assert copied["CopyObjectResult"]["ChecksumCRC32C"] == "AAAAAA=="

    responder.answer(render_copy_part_result("def", WHEN))
    part = client.upload_part_copy(
        Bucket="b", Key="k", UploadId="u", PartNumber=1, CopySource={"Bucket": "s", "Key": "k"}
    )
    assert part["CopyPartResult"]["ETag"] == '"def"'

    responder.answer(render_location_constraint("us-east-1"))
    assert client.get_bucket_location(Bucket="b")["LocationConstraint"] is None
    responder.answer(render_location_constraint("eu-west-1"))
    assert client.get_bucket_location(Bucket="b")["LocationConstraint"] == "eu-west-1"

    responder.answer(
        render_delete_result(
            [DeletedInfo("a b"), DeletedInfo("v", version_id="1", delete_marker=True)],
            [DeleteErrorInfo("locked", "AccessDenied", "Access Denied")],
        )
    )
    objects = [{"Key": "a b"}, {"Key": "v", "VersionId": "1"}, {"Key": "locked"}]
    result = client.delete_objects(Bucket="b", Delete={"Objects": objects, "Quiet": False})
    assert result["Deleted"] == [
        {"Key": "a b"},
        {"Key": "v", "VersionId": "1", "DeleteMarker": True},
    ]
    assert result["Errors"] == [
        {"Key": "locked", "Code": "AccessDenied", "Message": "Access Denied"}
    ]
    assert responder.sent is not None
    assert parse_delete(responder.sent.body).objects == (
        ObjectToDelete("a b"),
        ObjectToDelete("v", "1"),
        ObjectToDelete("locked"),
    )

    responder.answer(b"")
    client.create_bucket(Bucket="nb", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    assert responder.sent is not None
    assert parse_create_bucket_configuration(responder.sent.body) == "eu-west-1"


def test_errors_reach_the_client(client: Any, responder: Responder) -> None:
    error = S3Error("NoSuchKey", Key="missing key")
    document = render_s3_error(
        error, resource="/b/missing%20key", request_id="REQ1", host_id="HOST1"
    )
    root = parse(document)
    assert (root.findtext("RequestId"), root.findtext("HostId")) == ("REQ1", "HOST1")
    # botocore takes the ids from the headers S3 also sends (and drops the XML copies).
    responder.answer(
        document, status=error.status, **{"x-amz-request-id": "REQ1", "x-amz-id-2": "HOST1"}
    )
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket="b", Key="missing key")
    response = info.value.response
    assert response["Error"] == {
        "Code": "NoSuchKey",
        "Message": "The specified key does not exist.",
        "Key": "missing key",
        "Resource": "/b/missing%20key",
    }
    assert response["ResponseMetadata"]["RequestId"] == "REQ1"
    assert response["ResponseMetadata"]["HostId"] == "HOST1"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 404

    auth = S3AuthError(
        "SignatureDoesNotMatch",
        StringToSign="AWS4-HMAC-SHA256\n20261122T120000Z\n...",
        SignatureProvided="abc",
    )
    responder.answer(render_s3_error(auth, request_id="R2"), status=auth.status)
    with pytest.raises(ClientError) as info:
        client.list_buckets()
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert info.value.response["Error"]["SignatureProvided"] == "abc"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    root = parse(
        render_s3_error(
            S3Error("AccessDenied", "Request has expired", extra={"X-Amz-Expires": "60"})
        )
    )
    assert root.tag == "Error"  # S3's Error has no namespace
    assert [child.tag for child in root] == ["Code", "Message", "X-Amz-Expires"]


def test_no_room_error_is_not_retried_by_botocore(client: Any, responder: Responder) -> None:
    error = S3Error(NO_ROOM_CODE)
    assert error.status == 507
    responder.answer(render_s3_error(error, request_id="R"), status=error.status)
    started = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket="b", Key="k", Body=b"x")
    assert info.value.response["Error"]["Code"] == "InsufficientStorage"
    assert info.value.response["ResponseMetadata"]["RetryAttempts"] == 0
    assert time.monotonic() - started < 5


# --- rendering details -------------------------------------------------------------------------


def test_escaping_without_url_encoding() -> None:
    page = ListObjectsPage(
        bucket="b",
        max_keys=10,
        is_truncated=False,
        contents=[ObjectInfo("a&b<c>\"d'\r\n\tz", WHEN, "e", 1)],
        prefix="p&q",
    )
    document = render_list_objects_v2(page)
    assert b"<Key>a&amp;b&lt;c&gt;&quot;d'&#xD;\n\tz</Key>" in document
    assert b"<ETag>&quot;e&quot;</ETag>" in document
    root = parse(document)
    assert root.findtext(f"{{{NS}}}Contents/{{{NS}}}Key") == "a&b<c>\"d'\r\n\tz"
    assert escape("\x00\x1f\ufffe\ud800ok") == "&#x0;&#x1F;&#xFFFE;&#xD800;ok"
    assert (
        render_list_objects_v2(
            ListObjectsPage(bucket="b", max_keys=1, is_truncated=False, prefix="\udcff")
        )
        .decode()
        .count("&#xDCFF;")
        == 1
    )


def test_url_encode_matches_s3() -> None:
    assert url_encode("a b+c/d*e~f%g") == "a+b%2Bc/d*e%7Ef%25g"
    assert url_encode("ü\x01") == "%C3%BC%01"
    assert url_encode("AZaz09-_.") == "AZaz09-_."
    assert split_query("k=" + url_encode("x y+z/%")) == [("k", "x y+z/%")]


def test_timestamps_and_etags() -> None:
    assert format_timestamp(WHEN) == "2026-11-22T10:30:15.123Z"
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"
    plus_two = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5, 999999, plus_two)) == (
        "2026-01-02T01:04:05.999Z"
    )
    assert quote_etag("abc") == '"abc"'
    assert quote_etag('"abc"') == '"abc"'
    assert quote_etag('W/"abc"') == 'W/"abc"'
    assert quote_etag('"') == '"""'


def test_location_constraint_and_encoding_type() -> None:
    assert render_location_constraint(None).endswith(
        f'<LocationConstraint xmlns="{NS}"></LocationConstraint>'.encode()
    )
    assert check_encoding_type(None) is None
    assert check_encoding_type("url") == "url"
    with pytest.raises(S3Error) as info:
        check_encoding_type("base64")
    assert (info.value.code, info.value.extra["ArgumentName"]) == (
        "InvalidArgument",
        "encoding-type",
    )


def test_render_error_fields() -> None:
    document = render_error(
        "InvalidArgument",
        "bad <arg>",
        resource="/b",
        request_id="r",
        host_id="h",
        extra=[("ArgumentName", "x"), ("not a name", "dropped")],
    )
    root = parse(document)
    assert [child.tag for child in root] == [
        "Code",
        "Message",
        "ArgumentName",
        "Resource",
        "RequestId",
        "HostId",
    ]
    assert root.findtext("Message") == "bad <arg>"


# --- parsing request documents -----------------------------------------------------------------


def complete(parts: str, *, root: str = f'<CompleteMultipartUpload xmlns="{NS}">') -> bytes:
    return (root + parts + "</CompleteMultipartUpload>").encode()


def part(number: str, etag: str = '"e"', extra: str = "") -> str:
    return f"<Part><PartNumber>{number}</PartNumber><ETag>{etag}</ETag>{extra}</Part>"


def test_complete_multipart_upload_variants() -> None:
    expected = [CompletedPart(1, "e"), CompletedPart(3, "f")]
    body = part("1") + part("3", "f")
    assert parse_complete_multipart_upload(complete(body)) == expected
    assert (
        parse_complete_multipart_upload(complete(body, root="<CompleteMultipartUpload>"))
        == expected
    )
    prefixed = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<s3:CompleteMultipartUpload xmlns:s3="{NS}">'
        "<s3:Part><s3:PartNumber> 1 </s3:PartNumber><s3:ETag>&quot;e&quot;</s3:ETag></s3:Part>"
        "</s3:CompleteMultipartUpload>"
    ).encode()
    assert parse_complete_multipart_upload(prefixed) == [CompletedPart(1, "e")]
    spaced = complete(
        "\n  " + part(" 2 ", '  "abc"  ', "<ChecksumSHA256>x</ChecksumSHA256>") + "\n"
    )
    assert parse_complete_multipart_upload(spaced) == [CompletedPart(2, "abc", {"SHA256": "x"})]
    many = complete("".join(part(str(n)) for n in range(1, 10_001)))
    assert len(parse_complete_multipart_upload(many)) == 10_000


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (complete(part("0")), "between 1 and 10000"),
        (complete(part("10001")), "between 1 and 10000"),
        (complete(part("abc")), "not an integer"),
        (complete(part("1.5")), "not an integer"),
        (complete(part("")), "not an integer"),
        (complete("<Part><ETag>e</ETag></Part>"), "no <PartNumber>"),
        (complete(part("1", "")), "no <ETag>"),
        (complete("<Part><PartNumber>1</PartNumber><PartNumber>2</PartNumber></Part>"), "repeated"),
        (complete(part("1", extra="<Size>5</Size>")), "unexpected"),
        (
            complete(
                part("1", extra="<ChecksumCRC32>a</ChecksumCRC32><ChecksumCRC32>b</ChecksumCRC32>")
            ),
            "twice",
        ),
        (complete("<Other/>"), "unexpected <Other>"),
        (complete("text" + part("1")), "contains text"),
        (complete(""), "names no part"),
        (b"<Delete><Object><Key>k</Key></Object></Delete>", "root element is <Delete>"),
        (b"<CompleteMultipartUpload>", "not well-formed"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"not xml at all", "not well-formed"),
        (complete(part("1")) + b"<Second/>", "not well-formed"),
        (b"<a:CompleteMultipartUpload/>", "not well-formed"),
        (complete(part("1", "<b>e</b>")), "must not contain elements"),
        (complete(part("1"), root="<CompleteMultipartUpload>" + "<x>" * 20), "not well-formed"),
        (complete("".join(part(str(n)) for n in range(1, 10_002))), "not between 1 and 10000"),
    ],
)
def test_complete_multipart_upload_refusals(document: bytes, fragment: str) -> None:
    with pytest.raises(S3Error) as info:
        parse_complete_multipart_upload(document)
    assert (info.value.code, info.value.status) == ("MalformedXML", 400)
    assert fragment in info.value.message, info.value.message


def test_complete_multipart_upload_order() -> None:
    for numbers in (["2", "1"], ["1", "1"], ["1", "3", "2"]):
        with pytest.raises(S3Error) as info:
            parse_complete_multipart_upload(complete("".join(part(n) for n in numbers)))
        assert info.value.code == "InvalidPartOrder"


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&lol9;</ETag></Part>
</CompleteMultipartUpload>"""

HOSTILE = {
    "billion laughs": BILLION_LAUGHS,
    "external entity": b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Delete><Object><Key>&xxe;</Key></Object></Delete>""",
    "parameter entity": b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x.dtd"> %p;]>
<Delete><Object><Key>k</Key></Object></Delete>""",
    "external dtd": b"""<?xml version="1.0"?>
<!DOCTYPE Delete SYSTEM "http://127.0.0.1:1/evil.dtd">
<Delete><Object><Key>k</Key></Object></Delete>""",
    "utf-16 doctype": (
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE d [<!ENTITY a "b">]>'
        "<Delete><Object><Key>&a;</Key></Object></Delete>"
    ).encode("utf-16"),
    "undefined entity": b"<Delete><Object><Key>&undefined;</Key></Object></Delete>",
    "deep nesting": b"<Delete>" + b"<Object>" * 5000 + b"</Object>" * 5000 + b"</Delete>",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_documents_are_refused(name: str) -> None:
    for parser in (parse_delete, parse_complete_multipart_upload):
        started = time.monotonic()
        with pytest.raises(S3Error) as info:
            parser(HOSTILE[name])
        assert info.value.code == "MalformedXML"
        expected = {"undefined entity": "undefined entity", "deep nesting": "nested deeper"}
        assert expected.get(name, "DTDs and entity declarations") in info.value.message
        assert time.monotonic() - started < 1


def test_huge_garbage_is_refused_quickly() -> None:
    garbage = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    started = time.monotonic()
    with pytest.raises(S3Error) as info:
        parse_complete_multipart_upload(garbage)
    assert "larger than" in info.value.message
    with pytest.raises(S3Error) as info:
        parse_complete_multipart_upload(garbage, max_size=len(garbage))
    assert "not well-formed" in info.value.message
    big_but_valid_shape = b"<Delete>" + b" " * (10 * 1024 * 1024) + b"</Delete>"
    with pytest.raises(S3Error):
        parse_delete(big_but_valid_shape)
    assert time.monotonic() - started < 5


async def test_read_xml_body_limit() -> None:
    async def pieces(count: int) -> Any:
        for _ in range(count):
            yield b"x" * 1000

    assert len(await read_xml_body(pieces(3), max_size=3000)) == 3000
    with pytest.raises(S3Error) as info:
        await read_xml_body(pieces(4), max_size=3000)
    assert info.value.code == "MalformedXML"


def test_delete_documents() -> None:
    document = (
        f'<Delete xmlns="{NS}"><Quiet> TRUE </Quiet>'
        "<Object><Key> spaced key\n</Key></Object>"
        '<Object><Key>v</Key><VersionId>3</VersionId><ETag>"e"</ETag>'
        "<LastModifiedTime>2026-01-01T00:00:00Z</LastModifiedTime><Size>4</Size></Object>"
        "</Delete>"
    ).encode()
    request = parse_delete(document)
    assert request.quiet is True
    assert request.objects == (ObjectToDelete(" spaced key\n"), ObjectToDelete("v", "3", "e"))
    assert parse_delete(b"<Delete><Object><Key>k</Key></Object></Delete>").quiet is False
    thousand = "".join(f"<Object><Key>{n}</Key></Object>" for n in range(1000))
    assert len(parse_delete(f"<Delete>{thousand}</Delete>".encode()).objects) == 1000
    refused = [
        f"<Delete>{thousand}<Object><Key>x</Key></Object></Delete>",
        "<Delete></Delete>",
        "<Delete><Quiet>maybe</Quiet><Object><Key>k</Key></Object></Delete>",
        "<Delete><Quiet>true</Quiet><Quiet>true</Quiet><Object><Key>k</Key></Object></Delete>",
        "<Delete><Object><Key></Key></Object></Delete>",
        "<Delete><Object><VersionId>1</VersionId></Object></Delete>",
        "<Delete><Object><Key>a</Key><Key>b</Key></Object></Delete>",
        "<Delete><Thing/></Delete>",
        "<Remove><Object><Key>k</Key></Object></Remove>",
    ]
    for bad in refused:
        with pytest.raises(S3Error) as info:
            parse_delete(bad.encode())
        assert info.value.code == "MalformedXML", bad


def test_create_bucket_configuration() -> None:
    assert parse_create_bucket_configuration(b"") is None
    body = (
        f'<CreateBucketConfiguration xmlns="{NS}">'
        "<LocationConstraint>eu-west-1</LocationConstraint></CreateBucketConfiguration>"
    )
    assert parse_create_bucket_configuration(body.encode()) == "eu-west-1"
    assert parse_create_bucket_configuration(b"<CreateBucketConfiguration/>") is None
    with pytest.raises(S3Error):
        parse_create_bucket_configuration(b"<Other/>")


# --- the error table ---------------------------------------------------------------------------


def test_error_table_statuses() -> None:
    expected = {
        "AccessDenied": 403,
        "NoSuchBucket": 404,
        "NoSuchKey": 404,
        "NoSuchUpload": 404,
        "InvalidPart": 400,
        "InvalidPartOrder": 400,
        "EntityTooSmall": 400,
        "EntityTooLarge": 400,
        "InvalidRange": 416,
        "PreconditionFailed": 412,
        "NotModified": 304,
        "BadDigest": 400,
        "InvalidDigest": 400,
        "IncompleteBody": 400,
        "InvalidArgument": 400,
        "InvalidRequest": 400,
        "MalformedXML": 400,
        "KeyTooLongError": 400,
        "SignatureDoesNotMatch": 403,
        "InvalidAccessKeyId": 403,
        "RequestTimeTooSkewed": 403,
        "AuthorizationHeaderMalformed": 400,
        "AuthorizationQueryParametersError": 400,
        "XAmzContentSHA256Mismatch": 400,
        "MissingContentLength": 411,
        "NotImplemented": 501,
        "InternalError": 500,
        "ServiceUnavailable": 503,
        "SlowDown": 503,
        "MethodNotAllowed": 405,
        "BucketNotEmpty": 409,
        "BucketAlreadyExists": 409,
        "BucketAlreadyOwnedByYou": 409,
        "InvalidBucketName": 400,
        "MissingSecurityHeader": 400,
        "ExpiredToken": 400,
        "InsufficientStorage": 507,
    }
    for code, status in expected.items():
        assert ERRORS[code].status == status, code
        assert S3Error(code).status == status
        assert S3Error(code).message == ERRORS[code].message
    assert all(spec.message.strip() for spec in ERRORS.values())


def test_s3_error_construction() -> None:
    error = S3Error("NoSuchBucket", BucketName="b")
    assert (error.code, error.status, error.extra) == ("NoSuchBucket", 404, {"BucketName": "b"})
    assert str(error) == "NoSuchBucket: The specified bucket does not exist."
    custom = S3Error("AccessDenied", "Request has expired", extra={"X-Amz-Expires": 5}, Other=1)
    assert custom.extra == {"X-Amz-Expires": "5", "Other": "1"}
    assert S3Error("InvalidRequest", status=418).status == 418
    assert S3Error("XCairnSomething", "message", 499).status == 499
    with pytest.raises(ValueError, match="needs a message and a status"):
        S3Error("XCairnUnknown")
    assert isinstance(S3AuthError("AccessDenied"), S3Error)
    assert "S3Error('NoSuchKey'" in repr(S3Error("NoSuchKey"))
