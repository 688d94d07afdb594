"""Reading an S3 request: routing (path style and virtual hosts), query parameters,
continuation tokens, HTTP dates, the headers and user metadata an object keeps, and the
write options Cairn refuses rather than ignores. Each helper raises ``S3Error`` for bad
input and has no other effect."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import unquote

from aiohttp import web

from appliance.meta.models import WritePrecondition
from appliance.names import is_valid_bucket_name
from frontends.s3.chunked import strip_aws_chunked
from frontends.s3.errors import S3Error
from frontends.s3.tags import TAGGING_HEADER, encode_tags, parse_tag_header

STORED_HEADERS = (
    "Content-Type",
    "Cache-Control",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Expires",
)
META_PREFIX = "x-amz-meta-"
MAX_KEYS = 1000


def split_path(raw_path: str) -> tuple[str, str]:
    """``(bucket, key)`` of a path-style request; key is percent-decoded only."""
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        raise S3Error("InvalidURI", "Couldn't parse the specified URI.", 400)
    bucket, _, key = path[1:].partition("/")
    try:
        return unquote(bucket, errors="strict"), unquote(key, errors="strict")
    except UnicodeDecodeError as exc:
        raise S3Error("InvalidURI", "Couldn't parse the specified URI.", 400) from exc


def virtual_key(raw_path: str) -> str:
    """The key of a virtual-hosted-style request: the whole path, percent-decoded."""
    path = raw_path.split("?", 1)[0]
    try:
        return unquote(path[1:], errors="strict")
    except UnicodeDecodeError as exc:
        raise S3Error("InvalidURI", "Couldn't parse the specified URI.", 400) from exc


def bucket_from_host(host: str, domain: str | None) -> str | None:
    """The bucket of a virtual-hosted-style request (``bucket.<domain>[:port]``), or None
    when the request is path-style (no domain set, or another host)."""
    if domain is None or not host:
        return None
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.lower().rstrip(".")
    suffix = "." + domain
    if not name.endswith(suffix) or len(name) == len(suffix):
        return None
    bucket = name[: -len(suffix)]
    if not is_valid_bucket_name(bucket):
        raise S3Error("InvalidBucketName", f"{bucket!r} is not a valid bucket name.")
    return bucket


def http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def int_param(
    query: Mapping[str, str], name: str, default: int, *, low: int = 0, high: int = MAX_KEYS
) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise S3Error(
            "InvalidArgument", f"Provided {name} not an integer or within integer range"
        ) from exc
    if value < low:
        raise S3Error(
            "InvalidArgument", f"Argument {name} must be an integer between {low} and 2147483647"
        )
    return min(value, high)


def encode_token(marker: str) -> str:
    return base64.urlsafe_b64encode(marker.encode("utf-8")).decode("ascii")


def decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect") from exc


def stored_headers(request: web.Request) -> tuple[dict[str, str], dict[str, str]]:
    """Headers kept with an object, and its user metadata (names lowercased)."""
    headers: dict[str, str] = {}
    for name in STORED_HEADERS:
        value = request.headers.get(name)
        if name == "Content-Encoding":
            value = strip_aws_chunked(value)
        if value:
            headers[name] = value
    meta = {
        name[len(META_PREFIX) :].lower(): value
        for name, value in request.headers.items()
        if name.lower().startswith(META_PREFIX)
    }
    tagging = request.headers.get(TAGGING_HEADER)
    if tagging:
        tags = parse_tag_header(tagging)
        if tags:
            headers[TAGGING_HEADER] = encode_tags(tags)
    return headers, meta


SSE_C_HEADERS = (
    "x-amz-server-side-encryption-customer-algorithm",
    "x-amz-server-side-encryption-customer-key",
    "x-amz-server-side-encryption-customer-key-md5",
)


OBJECT_LOCK_HEADERS = (
    "x-amz-object-lock-mode",
    "x-amz-object-lock-retain-until-date",
    "x-amz-object-lock-legal-hold",
)


def parse_content_md5(request: web.Request) -> bytes | None:
    """The decoded ``Content-MD5`` header; ``InvalidDigest`` when it is not 16 bytes of
    base64."""
    value = request.headers.get("Content-MD5")
    if value is None:
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise S3Error("InvalidDigest") from exc
    if len(raw) != 16:
        raise S3Error("InvalidDigest")
    return raw


def write_precondition(request: web.Request) -> WritePrecondition | None:
    """The conditional-write headers of a PutObject or CompleteMultipartUpload.

    ``If-None-Match`` accepts only ``*`` (as S3 does); ``If-Match`` takes an ETag. They
    are checked when the write commits, atomically; a failed condition leaves the key
    as it was (412 PreconditionFailed).
    """
    if_none_match = request.headers.get("If-None-Match")
    if_match = request.headers.get("If-Match")
    if if_none_match is None and if_match is None:
        return None
    if if_none_match is not None and if_none_match.strip() != "*":
        raise S3Error("NotImplemented", "If-None-Match on a write accepts only '*'.")
    return WritePrecondition(if_none_match=if_none_match is not None, if_match=if_match)


def refuse_unsupported_writes(
    request: web.Request, *, conditional: bool, object_level: bool
) -> None:
    """Refuse write options whose promise Cairn cannot keep, instead of ignoring them.

    Ignored, each would tell the client something false: a conditional write
    (``If-None-Match: *``, ``If-Match``) would silently overwrite; SSE-C or SSE-KMS
    would store the object without the client's key (and serve it to anyone who may
    read the bucket); Object Lock would leave a "retained" object deletable. Other
    unsupported options (ACLs, tags, storage classes) are ignored as before.
    """
    headers = request.headers
    if conditional and ("If-None-Match" in headers or "If-Match" in headers):
        raise S3Error(
            "NotImplemented",
            "Conditional writes (If-None-Match, If-Match) are not implemented; "
            "nothing was written.",
        )
    if any(name in headers for name in SSE_C_HEADERS):
        raise S3Error(
            "NotImplemented",
            "Server-side encryption with customer-provided keys (SSE-C) is not implemented.",
        )
    if not object_level:
        return
    sse = headers.get("x-amz-server-side-encryption", "")
    if sse.lower().startswith("aws:kms") or "x-amz-server-side-encryption-aws-kms-key-id" in (
        headers
    ):
        raise S3Error("NotImplemented", "Server-side encryption with KMS keys is not implemented.")
    if any(name in headers for name in OBJECT_LOCK_HEADERS):
        raise S3Error("InvalidRequest", "Bucket is missing Object Lock Configuration")


def client_gone(request: web.Request, exc: BaseException) -> bool:
    """True when ``exc`` is the client's connection failing (reset, closed, broken pipe)."""
    if not isinstance(exc, ConnectionError):
        return False
    transport = request.transport
    return transport is None or transport.is_closing()
