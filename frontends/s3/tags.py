"""Object tags: S3's rules, and the one encoding they are stored in.

Tags travel as ``x-amz-tagging: k1=v1&k2=v2`` (URL query encoding) on PUT, Copy and
CreateMultipartUpload, and as a ``<Tagging>`` document on Put/GetObjectTagging. Either
way they are checked here (at most 10, keys 1-128 and values 0-256 characters, S3's
character set, no key twice) and stored URL-encoded under ``TAGGING_HEADER`` among the
object's stored headers, which GET and HEAD never echo (they send
``x-amz-tagging-count``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, quote, urlencode

from frontends.s3.errors import S3Error

TAGGING_HEADER = "x-amz-tagging"
TAG_COUNT_HEADER = "x-amz-tagging-count"
MAX_TAGS = 10
MAX_KEY = 128
MAX_VALUE = 256
_ALLOWED = re.compile(r"[\w\s+\-=.:/@]*")

Tags = list[tuple[str, str]]


def check_tags(tags: Sequence[tuple[str, str]]) -> Tags:
    """The tags, unchanged, if S3 would take them. Raises ``InvalidTag``."""
    if len(tags) > MAX_TAGS:
        raise S3Error("InvalidTag", f"Object tags cannot be greater than {MAX_TAGS}")
    seen: set[str] = set()
    for key, value in tags:
        if not 1 <= len(key) <= MAX_KEY:
            raise S3Error("InvalidTag", f"The TagKey you have provided is invalid: {key[:200]!r}")
        if len(value) > MAX_VALUE:
            raise S3Error("InvalidTag", "The TagValue you have provided is too long")
        if not (_ALLOWED.fullmatch(key) and _ALLOWED.fullmatch(value)):
            raise S3Error(
                "InvalidTag",
                "Tags may hold letters, digits, spaces and + - = . _ : / @ only",
            )
        if key in seen:
            raise S3Error("InvalidTag", "Cannot provide multiple Tags with the same key")
        seen.add(key)
    return list(tags)


def parse_tag_header(value: str) -> Tags:
    """Tags from an ``x-amz-tagging`` header. Raises ``InvalidTag``."""
    try:
        pairs = parse_qsl(value, keep_blank_values=True, strict_parsing=bool(value))
    except ValueError as exc:
        raise S3Error("InvalidTag", "The x-amz-tagging header is not URL query encoded") from exc
    return check_tags(pairs)


def encode_tags(tags: Sequence[tuple[str, str]]) -> str:
    """The stored (and header) form of ``tags``."""
    return urlencode(list(tags), quote_via=quote)


def decode_tags(stored: str | None) -> Tags:
    """Tags from their stored form (empty when none)."""
    if not stored:
        return []
    return parse_qsl(stored, keep_blank_values=True)
