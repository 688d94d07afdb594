"""Per-bucket CORS: a browser-style upload with a presigned URL after a preflight."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e

APP = "https://photos.example.org"
RULES = {
    "CORSRules": [
        {
            "ID": "browser uploads",
            "AllowedOrigins": [APP, "https://*.example.net"],
            "AllowedMethods": ["PUT", "GET"],
            "AllowedHeaders": ["content-type", "x-amz-meta-*"],
            "ExposeHeaders": ["ETag"],
            "MaxAgeSeconds": 600,
        },
        {"AllowedOrigins": ["*"], "AllowedMethods": ["GET"]},
    ]
}


@pytest.fixture
def with_cors(cairn: Daemon) -> Iterator[Any]:
    admin = cairn.admin_client()
    admin.put_bucket_cors(Bucket="e2e", CORSConfiguration=RULES)
    yield admin
    admin.delete_bucket_cors(Bucket="e2e")


def _request(
    url: str, method: str, headers: dict[str, str], data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_rules_round_trip_and_need_admin(cairn: Daemon, with_cors: Any) -> None:
    got = with_cors.get_bucket_cors(Bucket="e2e")["CORSRules"]
    assert got[0]["AllowedOrigins"] == RULES["CORSRules"][0]["AllowedOrigins"]
    assert got[0]["MaxAgeSeconds"] == 600 and got[0]["ID"] == "browser uploads"
    assert got[1] == {"AllowedOrigins": ["*"], "AllowedMethods": ["GET"]}
    with pytest.raises(ClientError) as denied:
        cairn.client().put_bucket_cors(Bucket="e2e", CORSConfiguration=RULES)
    assert denied.value.response["Error"]["Code"] == "AccessDenied"


def test_preflight_then_presigned_browser_upload(cairn: Daemon, with_cors: Any) -> None:
    url = f"{cairn.endpoint}/e2e/browser/photo.jpg"
    status, headers, _ = _request(
        url,
        "OPTIONS",
        {
            "Origin": APP,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "Content-Type, X-Amz-Meta-Album",
        },
    )
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == APP
    assert "PUT" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "Content-Type, X-Amz-Meta-Album"
    assert headers["Access-Control-Max-Age"] == "600"

    presigned = cairn.presign("PUT", "/e2e/browser/photo.jpg")
    status, headers, _ = _request(
        presigned, "PUT", {"Origin": APP, "Content-Type": "image/jpeg"}, b"\xff\xd8jpeg"
    )
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == APP
    assert headers["Access-Control-Expose-Headers"] == "ETag"
    assert "ETag" in headers
    body = cairn.client().get_object(Bucket="e2e", Key="browser/photo.jpg")["Body"].read()
    assert body == b"\xff\xd8jpeg"

    # a wildcard origin rule answers '*' for GET from anywhere
    status, headers, _ = _request(
        cairn.presign("GET", "/e2e/browser/photo.jpg"), "GET", {"Origin": "https://else.org"}
    )
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    # an origin matching the single wildcard pattern
    status, headers, _ = _request(
        url,
        "OPTIONS",
        {"Origin": "https://cdn.example.net", "Access-Control-Request-Method": "PUT"},
    )
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://cdn.example.net"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"}, 403, None),
        ({"Origin": APP, "Access-Control-Request-Method": "DELETE"}, 403, None),
        (
            {
                "Origin": APP,
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "x-amz-acl",
            },
            403,
            None,
        ),
        ({"Access-Control-Request-Method": "PUT"}, 400, b"BadRequest"),
        ({"Origin": APP}, 400, b"BadRequest"),
    ],
)
def test_preflights_that_no_rule_allows_are_refused(
    cairn: Daemon, with_cors: Any, headers: dict[str, str], status: int, code: bytes | None
) -> None:
    got, answer, body = _request(f"{cairn.endpoint}/e2e/x", "OPTIONS", headers)
    assert got == status
    assert "Access-Control-Allow-Origin" not in answer
    assert (code or b"CORSResponse") in body


def test_no_rules_means_no_cors(cairn: Daemon) -> None:
    status, _, body = _request(
        f"{cairn.endpoint}/e2e/x",
        "OPTIONS",
        {"Origin": APP, "Access-Control-Request-Method": "GET"},
    )
    assert status == 403 and b"not enabled" in body
    with pytest.raises(ClientError) as missing:
        cairn.admin_client().get_bucket_cors(Bucket="e2e")
    assert missing.value.response["Error"]["Code"] == "NoSuchCORSConfiguration"


@pytest.mark.parametrize(
    "document",
    [
        b"<CORSConfiguration><CORSRule><AllowedOrigin>x</AllowedOrigin>",
        b'<!DOCTYPE c [<!ENTITY a "aaaa">]><CORSConfiguration><CORSRule><AllowedOrigin>&a;'
        b"</AllowedOrigin><AllowedMethod>GET</AllowedMethod></CORSRule></CORSConfiguration>",
        b"<CORSConfiguration><CORSRule><AllowedMethod>GET</AllowedMethod></CORSRule>"
        b"</CORSConfiguration>",
        b"<CORSConfiguration><CORSRule><AllowedOrigin>*</AllowedOrigin>"
        b"<AllowedMethod>PATCH</AllowedMethod></CORSRule></CORSConfiguration>",
        b"<CORSConfiguration/>",
    ],
    ids=["truncated", "entity", "no origin", "bad method", "no rule"],
)
def test_bad_cors_documents_are_refused_and_change_nothing(
    cairn: Daemon, with_cors: Any, document: bytes
) -> None:
    from tests.e2e.conftest import ADMIN_ACCESS_KEY, ADMIN_SECRET_KEY

    url = cairn.presign(
        "PUT", "/e2e?cors=", access_key=ADMIN_ACCESS_KEY, secret_key=ADMIN_SECRET_KEY
    )
    status, _, body = _request(url, "PUT", {}, document)
    assert status == 400
    assert b"MalformedXML" in body or b"InvalidRequest" in body
    assert len(with_cors.get_bucket_cors(Bucket="e2e")["CORSRules"]) == 2
