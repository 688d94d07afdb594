"""AWS Signature Version 4 verification for S3: the Authorization header and presigned URLs.

Inputs are plain values (``RequestParts``), so the module works with any HTTP server:

- ``method``: the HTTP method.
- ``raw_path``: the request target's path as received, still percent-encoded (aiohttp:
  ``request.raw_path``; a query string after ``?`` and an absolute-form ``http://host`` prefix
  are ignored).
- ``query``: the *decoded* query items in request order, repeats kept, ``+`` decoded as a space
  (aiohttp: ``list(request.query.items())``; from a raw string: ``split_query``). A key without
  ``=`` (``?uploads``) is ``("uploads", "")``.
- ``headers``: a mapping whose ``items()`` yields every header line; names are matched without
  regard to case and repeated headers are joined with ``,`` (an aiohttp ``CIMultiDictProxy``
  does this right; a plain dict with pre-joined values works too).

The canonical request follows S3's rules: the path is not normalised (``//``, ``.``, ``..`` and a
trailing ``/`` are kept) and each segment is percent-decoded once and re-encoded once with only
RFC 3986 unreserved characters left as they are (so ``%2F`` inside a segment stays ``%2F`` and
``%25`` is never decoded twice); query keys and values are encoded the same way and sorted by key,
then value; header values are trimmed with inner whitespace runs collapsed.

``SigV4Verifier.prepare`` does every check that needs no secret (format, region, service, clock)
and returns a ``PendingAuth`` naming the access key; ``PendingAuth.finish(secret)`` checks the
signature. ``verify`` / ``SigV4Verifier.verify`` / ``verify_async`` chain the two with a secret
lookup (sync, or async for ``verify_async``) that returns ``None`` for an unknown key.

Decisions (documented S3 behaviour where S3 documents it):

- A header-signed request whose ``x-amz-date``/``Date`` is more than 15 minutes from ``now`` in
  either direction: ``RequestTimeTooSkewed``.
- A presigned URL: ``X-Amz-Expires`` must be 1..604800 (``AuthorizationQueryParametersError``);
  after ``X-Amz-Date + X-Amz-Expires``: ``AccessDenied`` "Request has expired"; an ``X-Amz-Date``
  more than 15 minutes in the future: ``AccessDenied`` "Request is not valid yet" (what S3
  answers; it never sends ``RequestTimeTooSkewed`` for query authentication).
- No ``Authorization`` header and no ``X-Amz-*`` auth parameters: ``AnonymousRequest`` (an
  ``S3AuthError`` with code ``AccessDenied``), so a caller that does not serve anonymous requests
  needs no special case and one that does can catch it.
- Header-signed requests must carry ``x-amz-content-sha256`` (``InvalidRequest`` "Missing
  required header for this request: x-amz-content-sha256", as S3) and must sign every
  ``x-amz-*`` header they carry (``AccessDenied`` "There were headers present in the request
  which were not signed"). ``host`` must be signed.
- Presigned URLs use ``UNSIGNED-PAYLOAD`` unless the query has ``X-Amz-Content-Sha256``; a signed
  ``aws-chunked`` body cannot ride on a presigned URL (``InvalidRequest``).
- SigV2 (``AWS AK:sig`` or ``AWSAccessKeyId``/``Signature`` query) is refused with S3's
  ``InvalidRequest`` "Please use AWS4-HMAC-SHA256"; SigV4a payload modes with ``NotImplemented``.
- ``X-Amz-Security-Token`` is reported in ``AuthContext.security_token`` and otherwise not
  checked: this server has no token service, the caller may refuse tokens (``InvalidToken``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import inspect
import re
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import quote, unquote_plus, unquote_to_bytes, urlsplit

from frontends.s3.errors import S3AuthError
from frontends.s3.streams import release_last_after_end

ALGORITHM = "AWS4-HMAC-SHA256"
TERMINATOR = "aws4_request"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW = timedelta(minutes=15)
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

_AMZ_DATE_RE = re.compile(r"\d{8}T\d{6}Z")
_SCOPE_DATE_RE = re.compile(r"\d{8}")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_UNRESERVED = "-_.~"

_CREDENTIAL_SHAPE = '"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request"'
_PRESIGN_REQUIRED = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Signature",
    "X-Amz-Date",
    "X-Amz-SignedHeaders",
    "X-Amz-Expires",
)
_AUTH_COMPONENTS = frozenset(("Credential", "SignedHeaders", "Signature"))
_PRESIGN_MARKERS = frozenset(("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature"))


class PayloadMode(enum.Enum):
    """How the body is protected, from ``x-amz-content-sha256`` (or presigning)."""

    UNSIGNED = "UNSIGNED-PAYLOAD"
    SHA256 = "SHA256"  # a hex sha256 of the whole body was declared and signed
    STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
    STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"

    @property
    def is_streaming(self) -> bool:
        """True when the body is ``aws-chunked`` framed."""
        return self in _STREAMING

    @property
    def signed_chunks(self) -> bool:
        """True when every chunk carries a chained signature."""
        return self in (PayloadMode.STREAMING_SIGNED, PayloadMode.STREAMING_SIGNED_TRAILER)

    @property
    def has_trailer(self) -> bool:
        """True when trailing headers follow the final chunk."""
        return self in (
            PayloadMode.STREAMING_SIGNED_TRAILER,
            PayloadMode.STREAMING_UNSIGNED_TRAILER,
        )


_STREAMING = frozenset(
    (
        PayloadMode.STREAMING_SIGNED,
        PayloadMode.STREAMING_SIGNED_TRAILER,
        PayloadMode.STREAMING_UNSIGNED_TRAILER,
    )
)
_SIGV4A_MODES = frozenset(
    ("STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER")
)


def parse_payload_hash(value: str) -> tuple[PayloadMode, str | None]:
    """Classify an ``x-amz-content-sha256`` value: (mode, lowercase hex digest or None).

    Raises ``S3AuthError`` ``InvalidArgument`` for anything else, ``NotImplemented`` for SigV4a.
    """
    value = value.strip()
    if _HEX64_RE.fullmatch(value):
        return PayloadMode.SHA256, value.lower()
    for mode in PayloadMode:
        if mode is not PayloadMode.SHA256 and value == mode.value:
            return mode, None
    if value in _SIGV4A_MODES:
        raise S3AuthError("NotImplemented", "SigV4a (ECDSA) signed payloads are not supported.")
    raise S3AuthError(
        "InvalidArgument",
        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER or a "
        "valid sha256 value.",
        ArgumentName="x-amz-content-sha256",
        ArgumentValue=value,
    )


@dataclass(frozen=True, slots=True)
class RequestParts:
    """The parts of an HTTP request that SigV4 covers (see the module docstring)."""

    method: str
    raw_path: str
    query: Sequence[tuple[str, str]]
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class AuthContext:
    """A verified request: who signed it and what the body decoders need."""

    access_key: str
    region: str
    service: str
    scope_date: str
    amz_date: str
    signing_key: bytes = field(repr=False)
    seed_signature: str
    payload_mode: PayloadMode
    content_sha256: str | None
    presigned: bool
    signed_headers: tuple[str, ...]
    security_token: str | None = None
    expires_at: datetime | None = None

    @property
    def credential_scope(self) -> str:
        """``YYYYMMDD/region/service/aws4_request``."""
        return f"{self.scope_date}/{self.region}/{self.service}/{TERMINATOR}"


class AnonymousRequest(S3AuthError):
    """The request carries no authentication at all (code ``AccessDenied``)."""

    def __init__(self) -> None:
        super().__init__("AccessDenied", "Access Denied")


SecretLookup = Callable[[str], str | None]
AsyncSecretLookup = Callable[[str], Awaitable[str | None]]


# --- canonical forms -------------------------------------------------------------------------


def uri_encode(value: str | bytes) -> str:
    """Percent-encode everything but RFC 3986 unreserved characters (UTF-8 for ``str``)."""
    return quote(value, safe=_UNRESERVED)


def canonical_uri(raw_path: str) -> str:
    """S3's canonical URI for a raw (still percent-encoded) request path.

    Each ``/``-separated segment is decoded once and encoded once; nothing is normalised.
    """
    path = raw_path
    if path.startswith(("http://", "https://")):
        path = urlsplit(path).path
    path = path.split("?", 1)[0]
    if not path:
        return "/"
    return "/".join(uri_encode(unquote_to_bytes(segment)) for segment in path.split("/"))


def canonical_query_string(pairs: Iterable[tuple[str, str]]) -> str:
    """Encode decoded query pairs, sort by encoded key then value, join as ``k=v&...``."""
    encoded = sorted((uri_encode(key), uri_encode(value)) for key, value in pairs)
    return "&".join(f"{key}={value}" for key, value in encoded)


def split_query(raw_query: str) -> list[tuple[str, str]]:
    """Decode a raw query string into pairs the way aiohttp/yarl do (``+`` is a space)."""
    pairs: list[tuple[str, str]] = []
    for item in raw_query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        pairs.append((unquote_plus(key), unquote_plus(value)))
    return pairs


def _trimall(value: str) -> str:
    return " ".join(value.split())


def header_lists(headers: Mapping[str, str]) -> dict[str, list[str]]:
    """Lowercase header name -> every value, in order (from ``headers.items()``)."""
    out: dict[str, list[str]] = {}
    for name, value in headers.items():
        out.setdefault(name.lower(), []).append(value)
    return out


def canonical_headers(headers: Mapping[str, list[str]], signed_headers: Sequence[str]) -> str:
    """The canonical header block (one ``name:value\\n`` line per signed header)."""
    lines = []
    for name in signed_headers:
        values = headers.get(name)
        if values is None:
            # Proxies may drop "Expect: 100-continue" after the client signed it.
            values = ["100-continue"] if name == "expect" else []
        lines.append(f"{name}:{','.join(_trimall(v) for v in values)}\n")
    return "".join(lines)


def build_canonical_request(
    method: str,
    uri: str,
    query: str,
    headers_block: str,
    signed_headers: Sequence[str],
    payload_hash: str,
) -> str:
    """Join the six canonical-request parts."""
    return "\n".join(
        (method.upper(), uri, query, headers_block, ";".join(signed_headers), payload_hash)
    )


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def build_string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    """``AWS4-HMAC-SHA256\\n<date>\\n<scope>\\n<sha256(canonical request)>``."""
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{_sha256_hex(canonical_request)}"


def chunk_string_to_sign(
    amz_date: str, scope: str, previous_signature: str, chunk_sha256: str
) -> str:
    """The string to sign for one ``aws-chunked`` chunk (hex sha256 of its data)."""
    return (
        f"{ALGORITHM}-PAYLOAD\n{amz_date}\n{scope}\n{previous_signature}\n"
        f"{EMPTY_SHA256}\n{chunk_sha256}"
    )


def trailer_string_to_sign(
    amz_date: str, scope: str, previous_signature: str, trailer_sha256: str
) -> str:
    """The string to sign for the trailing headers (hex sha256 of ``name:value\\n`` lines)."""
    return f"{ALGORITHM}-TRAILER\n{amz_date}\n{scope}\n{previous_signature}\n{trailer_sha256}"


def derive_signing_key(secret: str, scope_date: str, region: str, service: str) -> bytes:
    """``HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date), region), service), "aws4_request")``."""
    key = ("AWS4" + secret).encode("utf-8")
    for part in (scope_date, region, service, TERMINATOR):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def sign(signing_key: bytes, string_to_sign: str) -> str:
    """Hex HMAC-SHA256 of ``string_to_sign``."""
    return hmac.new(
        signing_key, string_to_sign.encode("utf-8", "surrogateescape"), hashlib.sha256
    ).hexdigest()


def signatures_equal(expected: str, provided: str | bytes) -> bool:
    """Constant-time comparison of a computed hex signature with the one a client sent."""
    got = provided if isinstance(provided, bytes) else provided.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(expected.encode("ascii"), got)


def format_amz_date(moment: datetime) -> str:
    """``YYYYMMDDTHHMMSSZ`` in UTC."""
    return _utc(moment).strftime(AMZ_DATE_FORMAT)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_amz_date(value: str) -> datetime | None:
    if not _AMZ_DATE_RE.fullmatch(value):
        return None
    try:
        return datetime.strptime(value, AMZ_DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def _parse_http_date(value: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return _utc(parsed)


def _valid_scope_date(value: str) -> bool:
    if not _SCOPE_DATE_RE.fullmatch(value):
        return False
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return True


# --- verification ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingAuth:
    """A request whose every check but the signature passed; ``finish`` checks that."""

    access_key: str
    region: str
    service: str
    scope_date: str
    amz_date: str
    signed_headers: tuple[str, ...]
    provided_signature: str
    canonical_request: str
    string_to_sign: str
    payload_mode: PayloadMode
    content_sha256: str | None
    presigned: bool
    security_token: str | None
    expires_at: datetime | None

    def finish(self, secret: str | None) -> AuthContext:
        """Check the signature with ``secret`` (None: unknown key).

        Raises ``S3AuthError``: ``InvalidAccessKeyId`` or ``SignatureDoesNotMatch``.
        """
        if secret is None:
            raise S3AuthError("InvalidAccessKeyId", AWSAccessKeyId=self.access_key)
        key = derive_signing_key(secret, self.scope_date, self.region, self.service)
        expected = sign(key, self.string_to_sign)
        if not signatures_equal(expected, self.provided_signature.lower()):
            raise S3AuthError(
                "SignatureDoesNotMatch",
                AWSAccessKeyId=self.access_key,
                StringToSign=self.string_to_sign,
                SignatureProvided=self.provided_signature,
                CanonicalRequest=self.canonical_request,
            )
        return AuthContext(
            access_key=self.access_key,
            region=self.region,
            service=self.service,
            scope_date=self.scope_date,
            amz_date=self.amz_date,
            signing_key=key,
            seed_signature=expected,
            payload_mode=self.payload_mode,
            content_sha256=self.content_sha256,
            presigned=self.presigned,
            signed_headers=self.signed_headers,
            security_token=self.security_token,
            expires_at=self.expires_at,
        )


@dataclass(frozen=True, slots=True)
class _Credential:
    access_key: str
    scope_date: str
    region: str
    service: str


class SigV4Verifier:
    """Verifies SigV4 requests for one server region (and service, ``s3``).

    Every method raises ``S3AuthError`` (see the module docstring for the codes) or
    ``AnonymousRequest`` when the request carries no authentication.
    """

    def __init__(
        self,
        region: str,
        *,
        service: str = "s3",
        max_skew: timedelta = MAX_SKEW,
        max_presign_expires: int = MAX_PRESIGN_EXPIRES,
    ) -> None:
        self.region = region
        self.service = service
        self.max_skew = max_skew
        self.max_presign_expires = max_presign_expires

    def verify(
        self, request: RequestParts, lookup_secret: SecretLookup, now: datetime
    ) -> AuthContext:
        """Verify ``request`` with a synchronous secret lookup."""
        pending = self.prepare(request, now)
        return pending.finish(lookup_secret(pending.access_key))

    async def verify_async(
        self,
        request: RequestParts,
        lookup_secret: SecretLookup | AsyncSecretLookup,
        now: datetime,
    ) -> AuthContext:
        """Verify ``request`` with a secret lookup that may be sync or async."""
        pending = self.prepare(request, now)
        found = lookup_secret(pending.access_key)
        secret = await found if inspect.isawaitable(found) else found
        return pending.finish(secret)

    def prepare(self, request: RequestParts, now: datetime) -> PendingAuth:
        """Every check that needs no secret; the result names the access key to look up."""
        now = _utc(now)
        headers = header_lists(request.headers)
        query_keys = {key for key, _ in request.query}
        authorization = headers.get("authorization")
        presigned = bool(_PRESIGN_MARKERS & query_keys)
        sigv2_query = "AWSAccessKeyId" in query_keys and "Signature" in query_keys
        if authorization is not None and (presigned or sigv2_query):
            raise S3AuthError(
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be "
                "specified",
                ArgumentName="Authorization",
                ArgumentValue=",".join(authorization),
            )
        if authorization is not None:
            return self._prepare_header(request, headers, ",".join(authorization), now)
        if presigned:
            return self._prepare_presigned(request, headers, now)
        if sigv2_query:
            raise _unsupported_mechanism()
        raise AnonymousRequest()

    # -- Authorization header --

    def _prepare_header(
        self,
        request: RequestParts,
        headers: dict[str, list[str]],
        authorization: str,
        now: datetime,
    ) -> PendingAuth:
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme != ALGORITHM:
            if scheme == "AWS":
                raise _unsupported_mechanism()
            raise S3AuthError(
                "InvalidArgument",
                "Unsupported Authorization Type",
                ArgumentName="Authorization",
                ArgumentValue=authorization,
            )
        components: dict[str, str] = {}
        for item in rest.split(","):
            name, sep, value = item.strip().partition("=")
            if not sep or name in components or name not in _AUTH_COMPONENTS:
                raise _header_malformed(
                    "the authorization header requires three components: Credential, "
                    "SignedHeaders, and Signature."
                )
            components[name] = value.strip()
        if len(components) != 3:
            raise _header_malformed(
                "the authorization header requires three components: Credential, "
                "SignedHeaders, and Signature."
            )
        credential = self._parse_credential(components["Credential"], _header_malformed)
        signed_headers = _parse_signed_headers(components["SignedHeaders"], _header_malformed)

        amz_date_values = headers.get("x-amz-date")
        if amz_date_values is not None:
            raw_date = ",".join(amz_date_values)
            moment = _parse_amz_date(raw_date.strip())
        elif (date_values := headers.get("date")) is not None:
            raw_date = ",".join(date_values)
            moment = _parse_http_date(raw_date)
        else:
            raw_date, moment = "", None
        if moment is None:
            raise S3AuthError(
                "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header"
            )
        amz_date = format_amz_date(moment)
        if credential.scope_date != amz_date[:8]:
            raise _header_malformed(
                f'Invalid credential date "{credential.scope_date}". This date is not the same '
                f'as X-Amz-Date: "{amz_date[:8]}".'
            )
        if abs(moment - now) > self.max_skew:
            raise S3AuthError(
                "RequestTimeTooSkewed",
                RequestTime=raw_date,
                ServerTime=_iso(now),
                MaxAllowedSkewMilliseconds=int(self.max_skew.total_seconds() * 1000),
            )

        sha_values = headers.get("x-amz-content-sha256")
        if sha_values is None:
            raise S3AuthError(
                "InvalidRequest", "Missing required header for this request: x-amz-content-sha256"
            )
        payload_hash = ",".join(sha_values).strip()
        mode, declared = parse_payload_hash(payload_hash)

        signed_set = set(signed_headers)
        unsigned = sorted(n for n in headers if n.startswith("x-amz-") and n not in signed_set)
        if unsigned:
            raise S3AuthError(
                "AccessDenied",
                "There were headers present in the request which were not signed",
                HeadersNotSigned=", ".join(unsigned),
            )

        canonical = build_canonical_request(
            request.method,
            canonical_uri(request.raw_path),
            canonical_query_string(request.query),
            canonical_headers(headers, signed_headers),
            signed_headers,
            payload_hash,
        )
        token = headers.get("x-amz-security-token")
        return self._pending(
            credential,
            amz_date,
            signed_headers,
            components["Signature"],
            canonical,
            mode,
            declared,
            presigned=False,
            security_token=",".join(token) if token is not None else None,
            expires_at=None,
        )

    # -- presigned URL --

    def _prepare_presigned(
        self, request: RequestParts, headers: dict[str, list[str]], now: datetime
    ) -> PendingAuth:
        params: dict[str, list[str]] = {}
        for key, value in request.query:
            params.setdefault(key, []).append(value)

        def single(name: str) -> str:
            values = params.get(name)
            if values is None:
                raise _query_error(
                    "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                    "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and "
                    "X-Amz-Expires parameters."
                )
            if len(values) != 1:
                raise _query_error(f"{name} must be given once")
            return values[0]

        for name in _PRESIGN_REQUIRED:
            single(name)
        if single("X-Amz-Algorithm") != ALGORITHM:
            raise _query_error(f'X-Amz-Algorithm only supports "{ALGORITHM}"')
        credential = self._parse_credential(single("X-Amz-Credential"), _credential_param_error)
        raw_date = single("X-Amz-Date")
        moment = _parse_amz_date(raw_date)
        if moment is None:
            raise _query_error(
                "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""
            )
        raw_expires = single("X-Amz-Expires")
        if not raw_expires.isdigit() or not raw_expires.isascii():
            raise _query_error("X-Amz-Expires should be a number")
        expires = int(raw_expires)
        if expires < 1:
            raise _query_error("X-Amz-Expires must be positive")
        if expires > self.max_presign_expires:
            raise _query_error(
                "X-Amz-Expires must be less than a week (in seconds) that is "
                f"{self.max_presign_expires}"
            )
        if credential.scope_date != raw_date[:8]:
            raise _query_error(
                f'Invalid credential date "{credential.scope_date}". This date is not the same '
                f'as X-Amz-Date: "{raw_date[:8]}".'
            )
        signed_headers = _parse_signed_headers(single("X-Amz-SignedHeaders"), _query_error)
        if moment - now > self.max_skew:
            raise S3AuthError("AccessDenied", "Request is not valid yet")
        expires_at = moment + timedelta(seconds=expires)
        if now > expires_at:
            raise S3AuthError(
                "AccessDenied",
                "Request has expired",
                extra={
                    "X-Amz-Expires": raw_expires,
                    "Expires": _iso(expires_at),
                    "ServerTime": _iso(now),
                },
            )

        query_sha = params.get("X-Amz-Content-Sha256")
        payload_hash = query_sha[0] if query_sha else "UNSIGNED-PAYLOAD"
        header_sha = headers.get("x-amz-content-sha256")
        mode, declared = parse_payload_hash(
            ",".join(header_sha) if header_sha is not None else payload_hash
        )
        if mode.signed_chunks:
            raise S3AuthError(
                "InvalidRequest", "Signed aws-chunked payloads cannot be used with presigned URLs."
            )

        canonical = build_canonical_request(
            request.method,
            canonical_uri(request.raw_path),
            canonical_query_string(
                (key, value) for key, value in request.query if key != "X-Amz-Signature"
            ),
            canonical_headers(headers, signed_headers),
            signed_headers,
            payload_hash,
        )
        token = params.get("X-Amz-Security-Token")
        return self._pending(
            credential,
            raw_date,
            signed_headers,
            single("X-Amz-Signature"),
            canonical,
            mode,
            declared,
            presigned=True,
            security_token=token[0] if token else None,
            expires_at=expires_at,
        )

    # -- shared --

    def _parse_credential(self, value: str, error: Callable[[str], S3AuthError]) -> _Credential:
        parts = value.rsplit("/", 4)
        if len(parts) != 5 or not parts[0]:
            raise error(f"the Credential is mal-formed; expecting {_CREDENTIAL_SHAPE}.")
        access_key, scope_date, region, service, terminator = parts
        if not _valid_scope_date(scope_date):
            raise error(f"the Credential is mal-formed; expecting {_CREDENTIAL_SHAPE}.")
        if region != self.region:
            err = error(f"the region '{region}' is wrong; expecting '{self.region}'")
            err.extra["Region"] = self.region
            raise err
        if service != self.service:
            raise error(
                f'incorrect service "{service}". This endpoint belongs to "{self.service}".'
            )
        if terminator != TERMINATOR:
            raise error(f'incorrect terminal "{terminator}". This endpoint uses "{TERMINATOR}".')
        return _Credential(access_key, scope_date, region, service)

    def _pending(
        self,
        credential: _Credential,
        amz_date: str,
        signed_headers: tuple[str, ...],
        signature: str,
        canonical: str,
        mode: PayloadMode,
        declared: str | None,
        *,
        presigned: bool,
        security_token: str | None,
        expires_at: datetime | None,
    ) -> PendingAuth:
        scope = f"{credential.scope_date}/{credential.region}/{credential.service}/{TERMINATOR}"
        return PendingAuth(
            access_key=credential.access_key,
            region=credential.region,
            service=credential.service,
            scope_date=credential.scope_date,
            amz_date=amz_date,
            signed_headers=signed_headers,
            provided_signature=signature,
            canonical_request=canonical,
            string_to_sign=build_string_to_sign(amz_date, scope, canonical),
            payload_mode=mode,
            content_sha256=declared,
            presigned=presigned,
            security_token=security_token,
            expires_at=expires_at,
        )


def _parse_signed_headers(value: str, error: Callable[[str], S3AuthError]) -> tuple[str, ...]:
    names = [name.strip().lower() for name in value.split(";")]
    if not value.strip() or any(not name for name in names) or len(set(names)) != len(names):
        raise error("the SignedHeaders component is malformed.")
    if "host" not in names:
        raise error("the SignedHeaders component must include host.")
    return tuple(sorted(names))


def _header_malformed(detail: str) -> S3AuthError:
    return S3AuthError(
        "AuthorizationHeaderMalformed", f"The authorization header is malformed; {detail}"
    )


def _query_error(detail: str) -> S3AuthError:
    return S3AuthError("AuthorizationQueryParametersError", detail)


def _credential_param_error(detail: str) -> S3AuthError:
    return _query_error(f"Error parsing the X-Amz-Credential parameter; {detail}")


def _unsupported_mechanism() -> S3AuthError:
    return S3AuthError(
        "InvalidRequest",
        f"The authorization mechanism you have provided is not supported. Please use {ALGORITHM}.",
    )


def verify(
    request: RequestParts,
    lookup_secret: SecretLookup,
    *,
    now: datetime,
    region: str,
    service: str = "s3",
) -> AuthContext:
    """Verify a SigV4 request (header or presigned).

    Raises ``S3AuthError`` (``AnonymousRequest`` when it carries no authentication).
    """
    return SigV4Verifier(region, service=service).verify(request, lookup_secret, now)


async def verify_async(
    request: RequestParts,
    lookup_secret: SecretLookup | AsyncSecretLookup,
    *,
    now: datetime,
    region: str,
    service: str = "s3",
) -> AuthContext:
    """``verify`` with a secret lookup that may be a coroutine function."""
    return await SigV4Verifier(region, service=service).verify_async(request, lookup_secret, now)


# --- declared payload hash -------------------------------------------------------------------


async def check_payload_sha256(
    pieces: AsyncIterable[bytes], expected_hex: str
) -> AsyncIterator[bytes]:
    """Re-yield a body, checking its sha256 against the declared ``x-amz-content-sha256``.

    Never buffers the body. The final piece is only yielded once the digest matched; a mismatch
    raises ``S3AuthError("XAmzContentSHA256Mismatch")`` at the end of the stream instead.
    """
    expected = expected_hex.lower()

    async def hashed() -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        async for piece in pieces:
            digest.update(piece)
            yield piece
        computed = digest.hexdigest()
        if not hmac.compare_digest(computed.encode(), expected.encode("utf-8", "replace")):
            raise S3AuthError(
                "XAmzContentSHA256Mismatch",
                ClientComputedContentSHA256=expected,
                S3ComputedContentSHA256=computed,
            )

    async for piece in release_last_after_end(hashed()):
        yield piece
