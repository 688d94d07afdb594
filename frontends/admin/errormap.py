"""The admin API's one table from domain errors to HTTP status and error code."""

from __future__ import annotations

from appliance import errors as domain
from appliance.meta.errors import MetaError
from appliance.services.keys import JobRunning

_TABLE: dict[type[BaseException], tuple[int, str]] = {
    domain.NoSuchBucket: (404, "NoSuchBucket"),
    domain.NoSuchAccessKey: (404, "NoSuchAccessKey"),
    domain.InvalidBucketName: (400, "InvalidBucketName"),
    domain.InvalidArgument: (400, "InvalidArgument"),
    domain.BucketExists: (409, "BucketExists"),
    domain.AccessKeyExists: (409, "AccessKeyExists"),
    domain.BucketNotEmpty: (409, "BucketNotEmpty"),
    domain.MetadataUnavailable: (503, "MetadataUnavailable"),
    domain.KeyUnavailable: (503, "KeyUnavailable"),
    JobRunning: (409, "JobRunning"),
}


def to_http_error(exc: BaseException) -> tuple[int, str] | None:
    """(status, code) for a domain or metadata error; None for anything else."""
    for cls in type(exc).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    if isinstance(exc, MetaError):
        return 503, "MetadataUnavailable"
    return None
