"""Conditional requests (RFC 7232 as S3 applies them) and byte ranges."""

from __future__ import annotations

from aiohttp import web

from appliance.errors import InvalidRange
from appliance.meta.models import ObjectVersion
from frontends.s3.errors import S3Error
from frontends.s3.requests import parse_http_date


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single ``bytes=`` range; None to serve the whole object.

    Raises ``InvalidRange`` when the range starts past the end.
    """
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                raise InvalidRange(value)
            return (max(0, size - suffix), size) if size else unsatisfiable(value)
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    except ValueError:
        return None
    if start >= size or (last != "" and int(last) < start):
        if last != "" and int(last) < start:
            return None  # syntactically invalid: ignored, as S3 does
        raise InvalidRange(value)
    return start, end


def unsatisfiable(value: str) -> tuple[int, int]:
    raise InvalidRange(value)


def etag_matches(header: str, etag: str) -> bool:
    wanted = [t.strip().strip('"') for t in header.split(",")]
    return "*" in wanted or etag.strip('"') in wanted


def check_conditions(
    request: web.Request,
    version: ObjectVersion,
    *,
    prefix: str = "",
    not_modified: str = "NotModified",
) -> None:
    """RFC 7232 / S3 conditional requests. Raises PreconditionFailed or ``not_modified``.

    GET/HEAD read ``If-*``; CopyObject reads ``x-amz-copy-source-if-*`` (``prefix``) and
    answers PreconditionFailed where a GET would answer NotModified.
    """
    headers = request.headers
    modified = version.created_at.replace(microsecond=0)
    if_match = headers.get(f"{prefix}If-Match")
    if_none_match = headers.get(f"{prefix}If-None-Match")
    if if_match is not None:
        if not etag_matches(if_match, version.etag):
            raise S3Error("PreconditionFailed", Condition=f"{prefix}If-Match")
    elif (since := headers.get(f"{prefix}If-Unmodified-Since")) is not None:
        moment = parse_http_date(since)
        if moment is not None and modified > moment:
            raise S3Error("PreconditionFailed", Condition=f"{prefix}If-Unmodified-Since")
    if if_none_match is not None:
        if etag_matches(if_none_match, version.etag):
            raise S3Error(not_modified, Condition=f"{prefix}If-None-Match")
    elif (since := headers.get(f"{prefix}If-Modified-Since")) is not None:
        moment = parse_http_date(since)
        if moment is not None and modified <= moment:
            raise S3Error(not_modified, Condition=f"{prefix}If-Modified-Since")
