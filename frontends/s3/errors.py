"""S3 error codes, their HTTP status and default message, and the exception that carries them.

``S3Error`` is what every building block of the S3 frontend raises; the request handler turns it
into the XML error document (``frontends.s3.xml.render_error``) with the status from this table.

Pool-specific decision: when no backend has room for a write we answer ``InsufficientStorage``
with HTTP 507 (the status MinIO uses for a full pool). S3 itself has no such code. 507 is not in
botocore's (nor the other AWS SDKs') list of retryable statuses, so a client fails at once with a
readable code instead of retrying a ``ServiceUnavailable`` for a minute and then reporting a
misleading error. ``QuotaExceeded`` (403, the Ceph RGW code) is for an administrator-set quota.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """The HTTP status and default message S3 uses for one error code."""

    status: int
    message: str


ERRORS: Mapping[str, ErrorSpec] = MappingProxyType(
    {
        # 3xx
        "NotModified": ErrorSpec(304, "Not Modified"),
        "PermanentRedirect": ErrorSpec(
            301,
            "The bucket you are attempting to access must be addressed using the specified "
            "endpoint. Please send all future requests to this endpoint.",
        ),
        # 400
        "AuthorizationHeaderMalformed": ErrorSpec(400, "The authorization header is malformed."),
        "AuthorizationQueryParametersError": ErrorSpec(
            400, "Error parsing the query-string authentication parameters."
        ),
        "BadRequest": ErrorSpec(400, "Bad Request"),
        "BadDigest": ErrorSpec(
            400, "The Content-MD5 or checksum you specified did not match what we received."
        ),
        "EntityTooLarge": ErrorSpec(400, "Your proposed upload exceeds the maximum allowed size."),
        "EntityTooSmall": ErrorSpec(
            400, "Your proposed upload is smaller than the minimum allowed object size."
        ),
        "ExpiredToken": ErrorSpec(400, "The provided token has expired."),
        "IllegalLocationConstraintException": ErrorSpec(
            400, "The specified location constraint is not valid for this endpoint."
        ),
        "IncompleteBody": ErrorSpec(
            400, "You did not provide the number of bytes specified by the Content-Length header."
        ),
        "InvalidArgument": ErrorSpec(400, "Invalid Argument"),
        "InvalidBucketName": ErrorSpec(400, "The specified bucket is not valid."),
        "InvalidDigest": ErrorSpec(400, "The Content-MD5 you specified was invalid."),
        "InvalidTag": ErrorSpec(400, "The tag provided was not a valid tag."),
        "InvalidLocationConstraint": ErrorSpec(
            400, "The specified location constraint is not valid."
        ),
        "InvalidPart": ErrorSpec(
            400,
            "One or more of the specified parts could not be found. The part might not have "
            "been uploaded, or the specified entity tag might not have matched the part's "
            "entity tag.",
        ),
        "InvalidPartOrder": ErrorSpec(
            400,
            "The list of parts was not in ascending order. The parts list must be specified "
            "in order by part number.",
        ),
        "InvalidRequest": ErrorSpec(400, "Invalid Request"),
        "InvalidStorageClass": ErrorSpec(400, "The storage class you specified is not valid."),
        "InvalidToken": ErrorSpec(400, "The provided token is malformed or otherwise invalid."),
        "InvalidURI": ErrorSpec(400, "Couldn't parse the specified URI."),
        "KeyTooLongError": ErrorSpec(400, "Your key is too long."),
        "MalformedTrailerError": ErrorSpec(
            400,
            "The request contained trailing data that was not well-formed or did not conform "
            "to our published schema.",
        ),
        "MalformedXML": ErrorSpec(
            400,
            "The XML you provided was not well-formed or did not validate against our "
            "published schema.",
        ),
        "MetadataTooLarge": ErrorSpec(
            400, "Your metadata headers exceed the maximum allowed metadata size."
        ),
        "MissingRequestBodyError": ErrorSpec(400, "Request Body is empty."),
        "MissingSecurityHeader": ErrorSpec(400, "Your request is missing a required header."),
        "RequestTimeout": ErrorSpec(
            400,
            "Your socket connection to the server was not read from or written to within the "
            "timeout period.",
        ),
        "TooManyBuckets": ErrorSpec(400, "You have attempted to create more buckets than allowed."),
        "UnexpectedContent": ErrorSpec(400, "This request does not support content."),
        "XAmzContentSHA256Mismatch": ErrorSpec(
            400, "The provided 'x-amz-content-sha256' header does not match what was computed."
        ),
        # 403
        "AccessDenied": ErrorSpec(403, "Access Denied"),
        "InvalidAccessKeyId": ErrorSpec(
            403, "The AWS Access Key Id you provided does not exist in our records."
        ),
        "InvalidObjectState": ErrorSpec(
            403, "The operation is not valid for the object's storage class."
        ),
        "QuotaExceeded": ErrorSpec(403, "The quota for this bucket or account is exhausted."),
        "RequestTimeTooSkewed": ErrorSpec(
            403, "The difference between the request time and the server's time is too large."
        ),
        "SignatureDoesNotMatch": ErrorSpec(
            403,
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method.",
        ),
        # 404
        "NoSuchBucket": ErrorSpec(404, "The specified bucket does not exist."),
        "NoSuchKey": ErrorSpec(404, "The specified key does not exist."),
        "NoSuchUpload": ErrorSpec(
            404,
            "The specified upload does not exist. The upload ID may be invalid, or the upload "
            "may have been aborted or completed.",
        ),
        "NoSuchVersion": ErrorSpec(
            404, "The version ID specified in the request does not match an existing version."
        ),
        "NoSuchBucketPolicy": ErrorSpec(404, "The bucket policy does not exist."),
        "NoSuchCORSConfiguration": ErrorSpec(404, "The CORS configuration does not exist."),
        "CORSResponse": ErrorSpec(403, "This CORS request is not allowed."),
        "NoSuchLifecycleConfiguration": ErrorSpec(
            404, "The lifecycle configuration does not exist."
        ),
        "NoSuchTagSet": ErrorSpec(404, "The TagSet does not exist."),
        # 405 .. 416
        "MethodNotAllowed": ErrorSpec(
            405, "The specified method is not allowed against this resource."
        ),
        "BucketAlreadyExists": ErrorSpec(
            409,
            "The requested bucket name is not available. The bucket namespace is shared by all "
            "users of the system. Please select a different name and try again.",
        ),
        "BucketAlreadyOwnedByYou": ErrorSpec(
            409,
            "Your previous request to create the named bucket succeeded and you already own it.",
        ),
        "BucketNotEmpty": ErrorSpec(409, "The bucket you tried to delete is not empty."),
        "ConditionalRequestConflict": ErrorSpec(
            409, "A conflicting operation occurred. Please retry the request."
        ),
        "OperationAborted": ErrorSpec(
            409,
            "A conflicting conditional operation is currently in progress against this "
            "resource. Please try again.",
        ),
        "MissingContentLength": ErrorSpec(411, "You must provide the Content-Length HTTP header."),
        "PreconditionFailed": ErrorSpec(
            412, "At least one of the preconditions you specified did not hold."
        ),
        "InvalidRange": ErrorSpec(416, "The requested range is not satisfiable"),
        "InvalidPartNumber": ErrorSpec(416, "The requested partnumber is not satisfiable"),
        # 5xx
        "InternalError": ErrorSpec(500, "We encountered an internal error. Please try again."),
        "NotImplemented": ErrorSpec(
            501, "A header you provided implies functionality that is not implemented."
        ),
        "ServiceUnavailable": ErrorSpec(503, "Please reduce your request rate."),
        "SlowDown": ErrorSpec(503, "Please reduce your request rate."),
        "InsufficientStorage": ErrorSpec(
            507, "No storage backend of this pool has room for the request."
        ),
    }
)

#: The code for "no backend of the pool has room for this write" (see the module docstring).
NO_ROOM_CODE = "InsufficientStorage"


class S3Error(Exception):
    """An S3 error: code, message, HTTP status and extra XML fields (``Region``, ``Key``...).

    ``message`` and ``status`` default to the table entry for ``code``; an unknown code needs
    both, else ``ValueError``. Extra fields come as keyword arguments (``BucketName="b"``) or,
    for names that are not identifiers (``X-Amz-Expires``), in ``extra``; they are rendered in
    that order after ``Message``. Values are converted with ``str``.
    """

    code: str
    message: str
    status: int
    extra: dict[str, str]

    def __init__(
        self,
        code: str,
        message: str | None = None,
        status: int | None = None,
        *,
        extra: Mapping[str, object] | None = None,
        **fields: object,
    ) -> None:
        spec = ERRORS.get(code)
        if spec is None:
            if message is None or status is None:
                raise ValueError(f"unknown S3 error code {code!r} needs a message and a status")
            spec = ErrorSpec(status, message)
        self.code = code
        self.message = spec.message if message is None else message
        self.status = spec.status if status is None else status
        merged: dict[str, str] = {}
        for source in (extra or {}, fields):
            for name, value in source.items():
                merged[name] = str(value)
        self.extra = merged
        super().__init__(f"{code}: {self.message}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, {self.status})"


class S3AuthError(S3Error):
    """An authentication failure (signature, credential, time or payload-hash check)."""


def error_spec(code: str) -> ErrorSpec | None:
    """The table entry for ``code``, or None when S3 has no such code in this table."""
    return ERRORS.get(code)
