"""The S3 frontend's one table from domain errors to S3 errors."""

from __future__ import annotations

from appliance import errors as domain
from appliance.meta.errors import MetaError
from frontends.s3.errors import NO_ROOM_CODE, S3Error

_TABLE: dict[type[BaseException], tuple[str, str | None]] = {
    domain.NoSuchBucket: ("NoSuchBucket", "The specified bucket does not exist"),
    domain.NoSuchKey: ("NoSuchKey", "The specified key does not exist."),
    domain.NoSuchUpload: (
        "NoSuchUpload",
        "The specified multipart upload does not exist. The upload ID may be invalid, or the "
        "upload may have been aborted or completed.",
    ),
    domain.InvalidPart: ("InvalidPart", None),
    domain.InvalidPartOrder: ("InvalidPartOrder", None),
    domain.EntityTooSmall: ("EntityTooSmall", None),
    domain.EntityTooLarge: ("EntityTooLarge", None),
    domain.IncompleteBody: ("IncompleteBody", None),
    domain.BadDigest: ("BadDigest", None),
    domain.InvalidRange: ("InvalidRange", "The requested range is not satisfiable"),
    domain.PreconditionFailed: (
        "PreconditionFailed",
        "At least one of the pre-conditions you specified did not hold",
    ),
    domain.NoCapacity: (NO_ROOM_CODE, None),
    domain.BackendsUnavailable: ("ServiceUnavailable", None),
    domain.DataCorrupted: ("InternalError", None),
    domain.MetadataUnavailable: ("ServiceUnavailable", None),
    domain.KeyUnavailable: ("ServiceUnavailable", None),
    domain.InvalidObjectName: ("KeyTooLongError", None),
    domain.InvalidBucketName: ("InvalidBucketName", None),
    domain.BucketExists: ("BucketAlreadyExists", None),
    domain.BucketNotEmpty: ("BucketNotEmpty", "The bucket you tried to delete is not empty."),
    domain.InvalidArgument: ("InvalidArgument", None),
}


def to_s3_error(exc: BaseException) -> S3Error | None:
    """The S3 error for a domain (or metadata) error; None for anything else."""
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, domain.InvalidObjectName) and "longer" not in str(exc):
        return S3Error("InvalidArgument", str(exc))
    for cls in type(exc).__mro__:
        entry = _TABLE.get(cls)
        if entry is not None:
            code, message = entry
            return S3Error(code, message or str(exc) or None)
    if isinstance(exc, MetaError):
        return S3Error(
            "ServiceUnavailable", "The metadata store is unavailable; please retry shortly."
        )
    return None
