"""SigV4 verification against requests signed by real botocore and the AWS documentation vectors.

botocore signs with its own clock; the tests pin it (``botocore.auth.get_current_datetime``) to
``SIGNED_AT`` so every signature is reproducible, and verify with an explicit ``now``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.auth
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from frontends.s3.errors import S3AuthError
from frontends.s3.sigv4 import (
    AnonymousRequest,
    AuthContext,
    PayloadMode,
    RequestParts,
    SigV4Verifier,
    canonical_query_string,
    canonical_uri,
    check_payload_sha256,
    split_query,
    verify,
    verify_async,
)

pytestmark = pytest.mark.unit

ACCESS_KEY = "AKIDCAIRNTEST0001"
SECRET = "cairn/Secret+Key=with/odd+chars"
REGION = "us-east-1"
ENDPOINT = "http://127.0.0.1:9000"
SIGNED_AT = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)

ODD_KEYS = [
    "plain.txt",
    "with space.txt",
    "unicode/日本語/ключ ü",
    "plus+sign+",
    "percent%25literal%",
    "tilde~dash-under_dot.",
    "eq=amp&question?hash#",
    "double//slash",
    "trailing/slash/",
    "/leading-slash",
    "punct;,:@!$'()*[]{}^`|\\\"<>",
    "café\u0301 combining",
    " spaces around ",
]


def secrets(access_key: str) -> str | None:
    return SECRET if access_key == ACCESS_KEY else None


# --- botocore plumbing -------------------------------------------------------------------------


class Captured(Exception):
    """Raised from botocore's before-send hook: the signed request never leaves the process."""

    def __init__(self, request: Any) -> None:
        super().__init__("captured")
        self.request = request


@dataclass(frozen=True)
class Sent:
    """A request exactly as botocore would have put it on the wire."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def raw_path(self) -> str:
        return urlsplit(self.url).path

    @property
    def query(self) -> list[tuple[str, str]]:
        return split_query(urlsplit(self.url).query)

    def header_dict(self) -> dict[str, str]:
        """Headers by lowercase name (botocore's and the CRT signer's casing differ)."""
        return {name.lower(): value for name, value in self.headers}

    def parts(self, **changes: Any) -> RequestParts:
        parts = RequestParts(self.method, self.raw_path, self.query, self.header_dict())
        return replace(parts, **changes)


def _read_body(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    data = body.read()
    return data.encode() if isinstance(data, str) else bytes(data)


def to_sent(request: Any) -> Sent:
    headers = []
    for name, value in request.headers.items():
        headers.append((name, value.decode() if isinstance(value, bytes) else value))
    if not any(name.lower() == "host" for name, _ in headers):
        # The HTTP client adds Host; botocore signs the URL's netloc (port kept).
        headers.append(("Host", urlsplit(request.url).netloc))
    return Sent(request.method, request.url, tuple(headers), _read_body(request.body))


def clean_aws_env(mp: pytest.MonkeyPatch) -> None:
    """No config file, profile or environment setting may change how botocore signs."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            mp.delenv(name)
    mp.setenv("AWS_CONFIG_FILE", "/nonexistent/cairn-test-aws-config")
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/cairn-test-aws-credentials")


def make_client(
    endpoint: str = ENDPOINT,
    *,
    region: str = REGION,
    secret: str = SECRET,
    token: str | None = None,
    hook: Callable[..., Any] | None = None,
    **config: Any,
) -> Any:
    """A real boto3 S3 client whose requests never leave the process.

    By default every request raises ``Captured`` just before the wire; ``hook(request=...)``
    replaces that (returning a botocore ``AWSResponse`` answers the request).
    """
    session = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=secret,
        aws_session_token=token,
        region_name=region,
    )
    client = session.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            # Without this, botocore presigns S3 URLs with SigV2 in the AWS regions that
            # still accept it (us-east-1 among them); header signing is SigV4 either way.
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            **config,
        ),
    )

    def capture_hook(request: Any, **_: Any) -> None:
        raise Captured(request)

    client.meta.events.register("before-send.s3", hook or capture_hook)
    return client


def capture(client: Any, operation: str, **params: Any) -> Sent:
    """Run ``operation`` through botocore up to the wire and return the signed request."""
    with pytest.raises(Captured) as info:
        getattr(client, operation)(**params)
    return to_sent(info.value.request)


@pytest.fixture
def pinned_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[datetime], None]:
    """Pin botocore's signing clock; returns a setter for other instants."""

    def pin(moment: datetime) -> None:
        naive = moment.astimezone(UTC).replace(tzinfo=None)

        def now(remove_tzinfo: bool = True) -> datetime:
            return naive if remove_tzinfo else naive.replace(tzinfo=UTC)

        monkeypatch.setattr(botocore.auth, "get_current_datetime", now)
        if botocore.auth.HAS_CRT:  # with awscrt installed botocore signs with the CRT signer
            crt_auth = importlib.import_module("botocore.crt.auth")
            monkeypatch.setattr(crt_auth, "get_current_datetime", now)

    pin(SIGNED_AT)
    return pin


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        clean_aws_env(mp)
        yield make_client()


@pytest.fixture(scope="module")
def token_client() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        clean_aws_env(mp)
        yield make_client(token="FwoGZXIvYXdzE+session/token==")


def ok(parts: RequestParts, *, now: datetime = SIGNED_AT, region: str = REGION) -> AuthContext:
    return verify(parts, secrets, now=now, region=region)


def refused(
    parts: RequestParts,
    code: str,
    *,
    now: datetime = SIGNED_AT,
    region: str = REGION,
    lookup: Callable[[str], str | None] = secrets,
) -> S3AuthError:
    with pytest.raises(S3AuthError) as info:
        verify(parts, lookup, now=now, region=region)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


# --- AWS documentation vectors -----------------------------------------------------------------

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_NOW = datetime(2013, 5, 24, 0, 0, 0, tzinfo=UTC)
EMPTY = hashlib.sha256(b"").hexdigest()
AWS_HOST = "examplebucket.s3.amazonaws.com"


def aws_secret(access_key: str) -> str | None:
    return AWS_SECRET if access_key == AWS_KEY else None


def aws_authorization(signed: str, signature: str) -> str:
    return (
        f"AWS4-HMAC-SHA256 Credential={AWS_KEY}/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={signed},Signature={signature}"
    )


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "signed", "signature"),
    [
        pytest.param(
            "GET",
            "/test.txt",
            [],
            {"Range": "bytes=0-9", "x-amz-content-sha256": EMPTY},
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
            id="get-object",
        ),
        pytest.param(
            "PUT",
            "/test%24file.text",
            [],
            {
                "Date": "Fri, 24 May 2013 00:00:00 GMT",
                "x-amz-storage-class": "REDUCED_REDUNDANCY",
                "x-amz-content-sha256": hashlib.sha256(b"Welcome to Amazon S3.").hexdigest(),
            },
            "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
            id="put-object",
        ),
        pytest.param(
            "GET",
            "/",
            [("lifecycle", "")],
            {"x-amz-content-sha256": EMPTY},
            "host;x-amz-content-sha256;x-amz-date",
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
            id="get-lifecycle",
        ),
        pytest.param(
            "GET",
            "/",
            [("max-keys", "2"), ("prefix", "J")],
            {"x-amz-content-sha256": EMPTY},
            "host;x-amz-content-sha256;x-amz-date",
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
            id="list-objects",
        ),
    ],
)
def test_aws_documented_header_examples_verify(
    method: str,
    path: str,
    query: list[tuple[str, str]],
    headers: dict[str, str],
    signed: str,
    signature: str,
) -> None:
    all_headers = {
        "Host": AWS_HOST,
        "x-amz-date": "20130524T000000Z",
        "Authorization": aws_authorization(signed, signature),
        **headers,
    }
    context = verify(
        RequestParts(method, path, query, all_headers), aws_secret, now=AWS_NOW, region=REGION
    )
    assert context.seed_signature == signature
    assert context.access_key == AWS_KEY
    assert context.credential_scope == "20130524/us-east-1/s3/aws4_request"
    assert context.presigned is False
    tampered = {**all_headers, "Authorization": aws_authorization(signed, "0" * 64)}
    with pytest.raises(S3AuthError) as info:
        verify(RequestParts(method, path, query, tampered), aws_secret, now=AWS_NOW, region=REGION)
    assert info.value.code == "SignatureDoesNotMatch"
    assert info.value.extra["SignatureProvided"] == "0" * 64
    assert info.value.extra["StringToSign"].startswith("AWS4-HMAC-SHA256\n20130524T000000Z\n")


def test_aws_documented_presigned_example_verifies() -> None:
    query = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", f"{AWS_KEY}/20130524/us-east-1/s3/aws4_request"),
        ("X-Amz-Date", "20130524T000000Z"),
        ("X-Amz-Expires", "86400"),
        ("X-Amz-SignedHeaders", "host"),
        ("X-Amz-Signature", "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"),
    ]
    parts = RequestParts("GET", "/test.txt", query, {"Host": AWS_HOST})
    context = verify(parts, aws_secret, now=AWS_NOW + timedelta(hours=23), region=REGION)
    assert context.presigned
    assert context.payload_mode is PayloadMode.UNSIGNED
    assert context.expires_at == AWS_NOW + timedelta(seconds=86400)
    with pytest.raises(S3AuthError) as info:
        verify(parts, aws_secret, now=AWS_NOW + timedelta(seconds=86401), region=REGION)
    assert (info.value.code, info.value.message) == ("AccessDenied", "Request has expired")
    assert info.value.extra == {
        "X-Amz-Expires": "86400",
        "Expires": "2013-05-25T00:00:00Z",
        "ServerTime": "2013-05-25T00:00:01Z",
    }


# --- requests signed by botocore ---------------------------------------------------------------


@pytest.mark.usefixtures("pinned_clock")
@pytest.mark.parametrize("key", ODD_KEYS)
def test_botocore_object_requests_with_odd_keys_verify(client: Any, key: str) -> None:
    body = b"hello \x00 world"
    requests = [
        capture(client, "get_object", Bucket="bucket", Key=key, Range="bytes=0-9"),
        capture(client, "head_object", Bucket="bucket", Key=key),
        capture(client, "delete_object", Bucket="bucket", Key=key, VersionId="v+1/=="),
        capture(
            client,
            "put_object",
            Bucket="bucket",
            Key=key,
            Body=body,
            Metadata={"spaced": "  several   inner   spaces  ", "plain": "x"},
            ContentType="text/plain; charset=utf-8",
        ),
        capture(
            client,
            "upload_part",
            Bucket="bucket",
            Key=key,
            UploadId="upload+id/with=odd&chars",
            PartNumber=7,
            Body=body,
        ),
        capture(
            client,
            "copy_object",
            Bucket="bucket",
            Key=key,
            CopySource={"Bucket": "src", "Key": key},
        ),
    ]
    for sent in requests:
        context = ok(sent.parts())
        assert context.access_key == ACCESS_KEY
        assert context.region == REGION
        assert context.scope_date == "20261122"
        assert context.amz_date == "20261122T120000Z"
        assert not context.presigned
        assert "host" in context.signed_headers
    put = requests[3]
    context = ok(put.parts())
    assert put.body == body
    assert context.payload_mode is PayloadMode.SHA256  # plain HTTP: botocore signs the payload
    assert context.content_sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.usefixtures("pinned_clock")
def test_botocore_listing_and_bucket_requests_verify(client: Any) -> None:
    requests = [
        capture(
            client,
            "list_objects_v2",
            Bucket="bucket",
            Prefix="a/b c+d",
            Delimiter="/",
            ContinuationToken="tok+en/==",
            StartAfter="start after~",
            MaxKeys=10,
            FetchOwner=True,
        ),
        capture(client, "list_objects", Bucket="bucket", Prefix="ü/", Marker="m&n=o"),
        capture(client, "list_buckets"),
        capture(client, "list_multipart_uploads", Bucket="bucket", KeyMarker="k m"),
        capture(client, "create_bucket", Bucket="new-bucket"),
        capture(client, "get_bucket_location", Bucket="bucket"),
        capture(client, "create_multipart_upload", Bucket="bucket", Key="x y"),
        capture(
            client,
            "delete_objects",
            Bucket="bucket",
            Delete={"Objects": [{"Key": "a"}, {"Key": "b c"}], "Quiet": True},
        ),
    ]
    for sent in requests:
        ok(sent.parts())
    listing = requests[0]
    assert dict(listing.query)["prefix"] == "a/b c+d"
    assert dict(listing.query)["list-type"] == "2"


@pytest.mark.usefixtures("pinned_clock")
def test_session_token_is_signed_and_reported(token_client: Any) -> None:
    sent = capture(token_client, "get_object", Bucket="b", Key="k")
    context = ok(sent.parts())
    assert context.security_token == "FwoGZXIvYXdzE+session/token=="
    presigned = token_client.generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60
    )
    context = ok(presigned_parts("GET", presigned))
    assert context.security_token == "FwoGZXIvYXdzE+session/token=="


@pytest.mark.usefixtures("pinned_clock")
def test_date_header_instead_of_x_amz_date() -> None:
    request = AWSRequest(
        method="GET",
        url=f"{ENDPOINT}/bucket/some%20key",
        headers={"Date": "placeholder", "x-amz-meta-a": " a   b "},
    )
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET), "s3", REGION).add_auth(request)
    headers = dict(request.headers.items())
    assert "X-Amz-Date" not in headers
    assert headers["Date"] == "Sun, 22 Nov 2026 12:00:00 -0000"  # naive in RFC 2822 terms
    headers["Host"] = "127.0.0.1:9000"
    context = ok(RequestParts("GET", "/bucket/some%20key", [], headers))
    assert context.amz_date == "20261122T120000Z"
    assert "date" in context.signed_headers


@pytest.mark.usefixtures("pinned_clock")
def test_repeated_headers_are_joined_with_commas(client: Any) -> None:
    request = AWSRequest(method="GET", url=f"{ENDPOINT}/bucket/k")
    request.headers.add_header("x-amz-meta-multi", "  one  ")
    request.headers.add_header("x-amz-meta-multi", "two   three")
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET), "s3", REGION).add_auth(request)

    class MultiHeaders(dict[str, str]):
        """Like aiohttp's CIMultiDict: items() yields every header line."""

        def __init__(self, pairs: list[tuple[str, str]]) -> None:
            super().__init__()
            self._pairs = pairs

        def items(self) -> Any:
            return list(self._pairs)

    pairs = [*request.headers.items(), ("Host", "127.0.0.1:9000")]
    assert [v for k, v in pairs if k == "x-amz-meta-multi"] == ["  one  ", "two   three"]
    ok(RequestParts("GET", "/bucket/k", [], MultiHeaders(pairs)))


# --- presigned URLs ----------------------------------------------------------------------------


def presigned_parts(method: str, url: str, **headers: str) -> RequestParts:
    split = urlsplit(url)
    return RequestParts(
        method, split.path, split_query(split.query), {"Host": split.netloc, **headers}
    )


@pytest.mark.usefixtures("pinned_clock")
@pytest.mark.parametrize("key", ODD_KEYS)
def test_presigned_urls_with_odd_keys_verify(client: Any, key: str) -> None:
    for operation, method in (
        ("get_object", "GET"),
        ("put_object", "PUT"),
        ("delete_object", "DELETE"),
    ):
        url = client.generate_presigned_url(
            operation, Params={"Bucket": "bucket", "Key": key}, ExpiresIn=3600
        )
        context = ok(presigned_parts(method, url), now=SIGNED_AT + timedelta(minutes=59))
        assert context.presigned
        assert context.payload_mode is PayloadMode.UNSIGNED
        assert context.signed_headers == ("host",)


@pytest.mark.usefixtures("pinned_clock")
def test_presigned_url_with_operation_query_parameters(client: Any) -> None:
    url = client.generate_presigned_url(
        "list_objects_v2",
        Params={"Bucket": "bucket", "Prefix": "a/b", "ContinuationToken": "x+y/z=="},
        ExpiresIn=600,
    )
    parts = presigned_parts("GET", url)
    assert ("prefix", "a/b") in parts.query
    ok(parts)
    ok(presigned_parts("GET", url, **{"X-Amz-Meta-Unsigned": "ignored for presign"}))
    # Changing any query item (here the expiry) invalidates the signature.
    tampered = [(k, "601" if k == "X-Amz-Expires" else v) for k, v in parts.query]
    refused(replace(parts, query=tampered), "SignatureDoesNotMatch")
    extra = [*parts.query, ("x-id", "GetObject")]
    refused(replace(parts, query=extra), "SignatureDoesNotMatch")


@pytest.mark.usefixtures("pinned_clock")
def test_presigned_expiry_rules(client: Any) -> None:
    def url(expires: int) -> RequestParts:
        return presigned_parts(
            "GET",
            client.generate_presigned_url(
                "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=expires
            ),
        )

    week = url(604800)
    ok(week, now=SIGNED_AT + timedelta(seconds=604800))
    error = refused(week, "AccessDenied", now=SIGNED_AT + timedelta(seconds=604801))
    assert error.message == "Request has expired"
    assert error.status == 403
    error = refused(url(604801), "AuthorizationQueryParametersError")
    assert "604800" in error.message
    hour = url(3600)
    error = refused(hour, "AccessDenied", now=SIGNED_AT + timedelta(seconds=3601))
    assert error.extra["Expires"] == "2026-11-22T13:00:00Z"
    # Dated in the future: tolerated up to the 15-minute skew, refused beyond.
    ok(hour, now=SIGNED_AT - timedelta(minutes=14))
    error = refused(hour, "AccessDenied", now=SIGNED_AT - timedelta(minutes=16))
    assert error.message == "Request is not valid yet"
    zero = [(k, "0" if k == "X-Amz-Expires" else v) for k, v in hour.query]
    refused(replace(hour, query=zero), "AuthorizationQueryParametersError")
    words = [(k, "soon" if k == "X-Amz-Expires" else v) for k, v in hour.query]
    refused(replace(hour, query=words), "AuthorizationQueryParametersError")


@pytest.mark.usefixtures("pinned_clock")
def test_presigned_parameter_errors(client: Any) -> None:
    parts = presigned_parts(
        "GET",
        client.generate_presigned_url(
            "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60
        ),
    )
    error = refused(parts, "AuthorizationQueryParametersError", region="eu-west-1")
    assert "the region 'us-east-1' is wrong; expecting 'eu-west-1'" in error.message
    assert error.extra["Region"] == "eu-west-1"
    for missing in ("X-Amz-Date", "X-Amz-Signature", "X-Amz-SignedHeaders", "X-Amz-Expires"):
        query = [(k, v) for k, v in parts.query if k != missing]
        refused(replace(parts, query=query), "AuthorizationQueryParametersError")
    mutations: dict[str, str] = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA1",
        "X-Amz-Date": "2026-11-22T12:00:00Z",
        "X-Amz-Credential": "onlykey",
        "X-Amz-SignedHeaders": "x-amz-date",
    }
    for name, value in mutations.items():
        query = [(k, value if k == name else v) for k, v in parts.query]
        refused(replace(parts, query=query), "AuthorizationQueryParametersError")
    doubled = [*parts.query, ("X-Amz-Date", "20261122T120000Z")]
    refused(replace(parts, query=doubled), "AuthorizationQueryParametersError")
    both = replace(parts, headers={**parts.headers, "Authorization": "AWS4-HMAC-SHA256 x"})
    refused(both, "InvalidArgument")
    chunked = replace(
        parts,
        headers={**parts.headers, "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"},
    )
    refused(chunked, "InvalidRequest")
    unknown = [
        (k, v.replace(ACCESS_KEY, "AKIDUNKNOWN") if k == "X-Amz-Credential" else v)
        for k, v in parts.query
    ]
    refused(replace(parts, query=unknown), "InvalidAccessKeyId")


# --- refusals of header-signed requests --------------------------------------------------------


@pytest.fixture
def signed_get(client: Any, pinned_clock: Any) -> Sent:
    return capture(
        client,
        "get_object",
        Bucket="bucket",
        Key="dir/some key+x",
        Range="bytes=0-9",
        IfMatch='"etag"',
    )


def with_header(sent: Sent, name: str, value: str | None) -> RequestParts:
    headers = {k: v for k, v in sent.headers if k.lower() != name.lower()}
    if value is not None:
        headers[name] = value
    return sent.parts(headers=headers)


def auth_header(sent: Sent) -> str:
    return sent.header_dict()["authorization"]


def test_signed_get_verifies(signed_get: Sent) -> None:
    context = ok(signed_get.parts())
    assert context.payload_mode is PayloadMode.SHA256
    assert context.content_sha256 == EMPTY


def test_wrong_secret_or_unknown_key(signed_get: Sent) -> None:
    error = refused(signed_get.parts(), "SignatureDoesNotMatch", lookup=lambda _: "other-secret")
    assert error.status == 403
    assert error.extra["AWSAccessKeyId"] == ACCESS_KEY
    assert error.extra["CanonicalRequest"].startswith("GET\n/bucket/dir/some%20key%2Bx\n")
    error = refused(signed_get.parts(), "InvalidAccessKeyId", lookup=lambda _: None)
    assert error.extra["AWSAccessKeyId"] == ACCESS_KEY


def test_tampering_breaks_the_signature(signed_get: Sent) -> None:
    auth = auth_header(signed_get)
    last = auth[-1]
    flipped = auth[:-1] + ("0" if last != "0" else "1")
    tampered = [
        with_header(signed_get, "Authorization", flipped),
        with_header(signed_get, "Range", "bytes=0-10"),
        with_header(signed_get, "If-Match", '"other"'),
        with_header(signed_get, "Host", "127.0.0.1:9001"),
        signed_get.parts(raw_path="/bucket/dir/some%20key%2By"),
        signed_get.parts(raw_path="/bucket/dir/some%20key+x/"),
        signed_get.parts(raw_path="/bucket/dir%2Fsome%20key%2Bx"),  # same key, other encoding
        signed_get.parts(raw_path="/bucket//dir/some%20key%2Bx"),
        signed_get.parts(query=[("versionId", "1")]),
        signed_get.parts(method="DELETE"),
    ]
    for parts in tampered:
        refused(parts, "SignatureDoesNotMatch")
    # Encodings that decode to the same bytes are the same request.
    ok(signed_get.parts(raw_path="/bucket/dir/some%20key+x"))
    ok(signed_get.parts(raw_path="/bucket/d%69r/some%20key%2bx"))
    # Headers that are not signed may change.
    ok(with_header(signed_get, "User-Agent", "something else"))


def test_clock_skew(signed_get: Sent) -> None:
    for offset in (timedelta(minutes=14, seconds=59), timedelta(minutes=-15)):
        ok(signed_get.parts(), now=SIGNED_AT + offset)
    for offset in (timedelta(minutes=15, seconds=1), timedelta(minutes=-16)):
        error = refused(signed_get.parts(), "RequestTimeTooSkewed", now=SIGNED_AT + offset)
        assert error.status == 403
        assert error.extra["RequestTime"] == "20261122T120000Z"
        assert error.extra["MaxAllowedSkewMilliseconds"] == "900000"
    naive = (SIGNED_AT + timedelta(minutes=1)).replace(tzinfo=None)
    ok(signed_get.parts(), now=naive)


def test_wrong_region_and_service(signed_get: Sent) -> None:
    error = refused(signed_get.parts(), "AuthorizationHeaderMalformed", region="eu-west-1")
    assert error.message == (
        "The authorization header is malformed; the region 'us-east-1' is wrong; "
        "expecting 'eu-west-1'"
    )
    assert error.extra == {"Region": "eu-west-1"}
    assert error.status == 400
    sts = auth_header(signed_get).replace("/s3/", "/sts/")
    refused(with_header(signed_get, "Authorization", sts), "AuthorizationHeaderMalformed")
    verifier = SigV4Verifier(REGION, service="sts")
    with pytest.raises(S3AuthError) as info:
        verifier.verify(signed_get.parts(), secrets, SIGNED_AT)
    assert info.value.code == "AuthorizationHeaderMalformed"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda a: a.split(", Signature=")[0],
        lambda a: a.replace("SignedHeaders=", "Signed="),
        lambda a: a.replace("Credential=", "Credential=x, Credential="),
        lambda a: a.replace("/aws4_request", "/aws5_request"),
        lambda a: a.replace("/20261122/", "/2026-11-22/"),
        lambda a: a.replace("/20261122/", "/20261123/"),
        lambda a: a.replace("Credential=AKIDCAIRNTEST0001/", "Credential="),
        lambda a: a.replace("SignedHeaders=", "SignedHeaders=;"),
        lambda a: a.replace("SignedHeaders=host;", "SignedHeaders="),
        lambda a: a.replace(", ", " "),
    ],
)
def test_malformed_authorization_header(signed_get: Sent, mangle: Callable[[str], str]) -> None:
    mangled = mangle(auth_header(signed_get))
    assert mangled != auth_header(signed_get)
    refused(with_header(signed_get, "Authorization", mangled), "AuthorizationHeaderMalformed")


def test_other_header_refusals(signed_get: Sent) -> None:
    refused(with_header(signed_get, "X-Amz-Date", None), "AccessDenied")
    error = refused(with_header(signed_get, "X-Amz-Date", "yesterday"), "AccessDenied")
    assert "valid Date or x-amz-date" in error.message
    error = refused(with_header(signed_get, "X-Amz-Content-SHA256", None), "InvalidRequest")
    assert "x-amz-content-sha256" in error.message
    refused(with_header(signed_get, "X-Amz-Content-SHA256", "abc"), "InvalidArgument")
    error = refused(with_header(signed_get, "X-Amz-Meta-Late", "added"), "AccessDenied")
    assert error.extra["HeadersNotSigned"] == "x-amz-meta-late"
    refused(with_header(signed_get, "Authorization", "AWS AKID:c2lnbmF0dXJl"), "InvalidRequest")
    refused(with_header(signed_get, "Authorization", "Bearer token"), "InvalidArgument")
    sigv4a = "AWS4-ECDSA-P256-SHA256 Credential=x"
    refused(with_header(signed_get, "Authorization", sigv4a), "InvalidArgument")


def test_anonymous_and_sigv2_query(signed_get: Sent) -> None:
    anonymous = with_header(signed_get, "Authorization", None)
    with pytest.raises(AnonymousRequest) as info:
        ok(anonymous)
    assert (info.value.code, info.value.status) == ("AccessDenied", 403)
    assert isinstance(info.value, S3AuthError)
    v2 = [("AWSAccessKeyId", ACCESS_KEY), ("Signature", "abc"), ("Expires", "1")]
    refused(replace(anonymous, query=v2), "InvalidRequest")


async def test_prepare_finish_and_async_lookup(signed_get: Sent) -> None:
    verifier = SigV4Verifier(REGION)
    pending = verifier.prepare(signed_get.parts(), SIGNED_AT)
    assert pending.access_key == ACCESS_KEY
    context = pending.finish(SECRET)
    assert len(context.signing_key) == 32
    assert context.seed_signature == auth_header(signed_get).rsplit("=", 1)[1]

    async def lookup(access_key: str) -> str | None:
        return secrets(access_key)

    assert (await verify_async(signed_get.parts(), lookup, now=SIGNED_AT, region=REGION)) == context
    assert await verifier.verify_async(signed_get.parts(), secrets, SIGNED_AT) == context


# --- canonical forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("", "/"),
        ("/", "/"),
        ("/b/k", "/b/k"),
        ("/b/a b", "/b/a%20b"),
        ("/b/a%2fb", "/b/a%2Fb"),
        ("/b/a%252F", "/b/a%252F"),
        ("/b//k/./../", "/b//k/./../"),
        ("/b/k~-_.", "/b/k~-_."),
        ("/b/%7E%41", "/b/~A"),
        ("/b/ü", "/b/%C3%BC"),
        ("/b/k?x=1", "/b/k"),
        ("http://host:9000/b/k%20", "/b/k%20"),
        ("/b/a+b=c&d", "/b/a%2Bb%3Dc%26d"),
    ],
)
def test_canonical_uri(raw: str, canonical: str) -> None:
    assert canonical_uri(raw) == canonical


def test_canonical_query_string_and_split() -> None:
    pairs = split_query("b=2&a=&c&a=1&%E2%9C%93=x+y&sp%20ace=%2B")
    assert pairs == [("b", "2"), ("a", ""), ("c", ""), ("a", "1"), ("✓", "x y"), ("sp ace", "+")]
    assert canonical_query_string(pairs) == "%E2%9C%93=x%20y&a=&a=1&b=2&c=&sp%20ace=%2B"
    assert canonical_query_string([]) == ""


# --- declared payload hash ---------------------------------------------------------------------


async def _pieces(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def test_payload_sha256_checker() -> None:
    body = [b"abc", b"", b"def", b"ghi"]
    digest = hashlib.sha256(b"".join(body)).hexdigest()
    assert [p async for p in check_payload_sha256(_pieces(*body), digest.upper())] == [
        b"abc",
        b"def",
        b"ghi",
    ]
    received: list[bytes] = []

    async def consume() -> None:
        async for piece in check_payload_sha256(_pieces(*body), EMPTY):
            received.append(piece)

    with pytest.raises(S3AuthError) as info:
        await consume()
    assert info.value.code == "XAmzContentSHA256Mismatch"
    assert info.value.status == 400
    assert info.value.extra["S3ComputedContentSHA256"] == digest
    assert received == [b"abc", b"def"]  # the final piece is withheld on failure
