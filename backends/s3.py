"""A backend storing blobs as objects in one S3 (or S3-compatible) bucket, via aiobotocore.

- Keys live under an optional ``prefix`` (``<prefix>/<key>``); ``list`` strips it.
- One aiobotocore client per backend, created on first use (or by :meth:`S3Backend.open`)
  and closed by :meth:`S3Backend.close`. botocore's own retries are off
  (``total_max_attempts=1``): ``backends.retry.RetryingBackend`` retries, once, at the edge.
- Checksums are computed and validated only when an operation requires them
  (``when_required``), so older S3-compatible services accept our requests.
- A put sends the whole blob in one ``PutObject`` (blobs are bounded by the pool's chunk
  size); a streamed body is collected first and its length checked.
- Every native failure is translated by :func:`map_s3_error`, the single error table.
- A ``head`` on a missing *bucket* looks like a missing key (HEAD responses have no
  body to tell them apart) and raises ``BlobNotFound``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from backends.base import BlobBody, BlobInfo, BlobStream, ByteRange, Capabilities
from backends.errors import (
    BackendError,
    BackendFull,
    BlobNotFound,
    PermanentBackendError,
    TransientBackendError,
)
from backends.local import validate_key
from backends.memory import collect_body

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import ListObjectsV2RequestTypeDef

PIECE_SIZE = 512 * 1024
"""Streams read at most this many bytes per piece: under glibc's mmap threshold as the
daemon sets it (1 MiB), so pieces come from the heap and are reused, not faulted in."""

MAX_PUT_SIZE = 5 * 1024**3
"""S3's limit for a single PutObject."""

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_FULL_CODES = frozenset(
    {
        "QuotaExceeded",
        "EntityTooLarge",
        "InsufficientStorage",
        "StorageFull",
        "XMinioStorageFull",
        "XMinioAdminBucketQuotaExceeded",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "IncompleteBody",
        "OperationAborted",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestThrottled",
        "XMinioServerNotInitialized",
    }
)
_TRANSIENT_BOTO = (
    BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    IncompleteReadError,
    ChecksumError,
    FlexibleChecksumError,
)


def map_s3_error(exc: BaseException, *, backend: str, key: str = "") -> BackendError | None:
    """Translate a native S3 failure into a ``backends.errors`` class; None if not one.

    Missing key → ``BlobNotFound``; quota/size refusals and 507 → ``BackendFull``;
    5xx, 408/429, throttling, timeouts and connection failures → ``TransientBackendError``;
    auth failures, a missing bucket and other 4xx → ``PermanentBackendError``.
    """
    if isinstance(exc, BackendError):
        return exc
    where = f"{key!r}: " if key else ""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        text = f"{where}{code or status} {error.get('Message', '')}".rstrip()
        if code in _NOT_FOUND_CODES:
            return BlobNotFound(text, backend=backend)
        if (
            code in _FULL_CODES
            or status == 507
            or "cap exceeded" in str(error.get("Message", "")).lower()  # Backblaze B2 caps
        ):
            return BackendFull(text, backend=backend)
        if (
            code in _TRANSIENT_CODES
            or code.startswith("Throttl")
            or status in (408, 429)
            or status >= 500
        ):
            return TransientBackendError(text, backend=backend)
        return PermanentBackendError(text, backend=backend)
    text = f"{where}{type(exc).__name__}: {exc}"
    if isinstance(exc, SSLError):
        if "certificate" in str(exc).lower():
            return PermanentBackendError(text, backend=backend)
        return TransientBackendError(text, backend=backend)
    if isinstance(exc, _TRANSIENT_BOTO):
        return TransientBackendError(text, backend=backend)
    if isinstance(exc, BotoCoreError):  # no credentials, invalid parameters, ...
        return PermanentBackendError(text, backend=backend)
    if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
        return TransientBackendError(text, backend=backend)
    return None


class _S3Stream:
    """A ``BlobStream`` over a GetObject response body; releases the response on aclose.

    ``skip`` bytes are dropped first and at most ``limit`` bytes are yielded: this covers
    servers that ignore the Range header and answer 200 with the whole object.
    """

    def __init__(
        self,
        body: StreamingBody | None,
        *,
        expected: int,
        skip: int = 0,
        limit: int | None = None,
        backend: str,
        key: str,
    ) -> None:
        self._body = body
        self._expected = expected
        self._received = 0
        self._skip = skip
        self._remaining = limit
        self._backend = backend
        self._key = key

    def __aiter__(self) -> _S3Stream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._body is None or self._remaining == 0:
                await self.aclose()
                raise StopAsyncIteration
            try:
                piece = await self._body.read(PIECE_SIZE)
            except Exception as exc:
                await self.aclose()
                raise TransientBackendError(
                    f"{self._key!r}: stream broke after {self._received} bytes: {exc!r}",
                    backend=self._backend,
                ) from exc
            if not piece:
                received = self._received
                await self.aclose()
                if received != self._expected:
                    raise TransientBackendError(
                        f"{self._key!r}: stream ended after {received} of {self._expected} bytes",
                        backend=self._backend,
                    )
                raise StopAsyncIteration
            self._received += len(piece)
            if self._skip:
                dropped = min(self._skip, len(piece))
                self._skip -= dropped
                piece = piece[dropped:]
            if self._remaining is not None:
                piece = piece[: self._remaining]
                self._remaining -= len(piece)
            if piece:
                return piece

    async def aclose(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            await body.__aexit__(None, None, None)  # closes (or releases) the response


class S3Backend:
    """Blobs as objects in ``bucket`` under ``prefix``; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        endpoint_url: str | None,
        region: str,
        bucket: str,
        prefix: str = "",
        access_key: str,
        secret_key: str,
        path_style: bool = False,
        max_connections: int = 32,
        connect_timeout: float = 10,
        read_timeout: float = 60,
    ) -> None:
        self._name = name
        self._endpoint_url = endpoint_url
        self._region = region
        self._bucket = bucket
        base = prefix.strip("/")
        if base:
            validate_key(base, backend=name)
        self._base = f"{base}/" if base else ""
        self._access_key = access_key
        self._secret_key = secret_key
        self._config = AioConfig(
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path" if path_style else "virtual"},
            retries={"total_max_attempts": 1, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._capabilities = Capabilities(max_blob_size=MAX_PUT_SIZE)
        self._client: S3Client | None = None
        self._stack: AsyncExitStack | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def bucket(self) -> str:
        return self._bucket

    async def open(self) -> None:
        """Create the client now instead of on first use (no network traffic)."""
        await self._s3()

    async def _s3(self) -> S3Client:
        if self._closed:
            raise PermanentBackendError("backend is closed", backend=self._name)
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    stack = AsyncExitStack()
                    client = await stack.enter_async_context(
                        get_session().create_client(
                            "s3",
                            region_name=self._region,
                            endpoint_url=self._endpoint_url,
                            aws_access_key_id=self._access_key,
                            aws_secret_access_key=self._secret_key,
                            config=self._config,
                        )
                    )
                    self._stack, self._client = stack, client
        return self._client

    def _key(self, key: str) -> str:
        validate_key(key, backend=self._name)
        return self._base + key

    def _error(self, exc: Exception, key: str) -> Exception:
        return map_s3_error(exc, backend=self._name, key=key) or exc

    async def put(self, key: str, body: BlobBody, *, size: int) -> BlobInfo:
        """Store the blob with one PutObject; the size is checked before sending.

        Raises as :func:`backends.memory.collect_body` for size mismatches, then as
        :func:`map_s3_error`.
        """
        full = self._key(key)
        if size > MAX_PUT_SIZE:
            raise BackendFull(f"blob of {size} bytes exceeds {MAX_PUT_SIZE}", backend=self._name)
        if isinstance(body, bytes | bytearray) and len(body) == size:
            data: bytes | bytearray = body  # sent as it is: no copy of a chunk-sized buffer
        else:
            data = await collect_body(body, size, backend=self._name)
        client = await self._s3()
        try:
            resp = await client.put_object(
                Bucket=self._bucket,
                Key=full,
                Body=data,  # type: ignore[arg-type]  # botocore takes a bytearray as a blob
                ContentLength=size,
            )
        except Exception as exc:
            raise self._error(exc, key) from exc
        return BlobInfo(key=key, size=size, etag=_etag(resp.get("ETag")))

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        """Open a GetObject stream (ranged when asked); ``BlobNotFound`` if absent.

        A range starting at or past the end yields an empty stream. Errors while
        streaming raise ``TransientBackendError``.
        """
        full = self._key(key)
        client = await self._s3()
        start = byte_range.start if byte_range else 0
        end = byte_range.end if byte_range else None
        if end is not None and end <= start:
            await self.head(key)  # nothing to read, but the blob must exist
            return _S3Stream(None, expected=0, backend=self._name, key=key)
        header = None
        if start > 0 or end is not None:
            header = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            if header is None:
                resp = await client.get_object(Bucket=self._bucket, Key=full)
            else:
                resp = await client.get_object(Bucket=self._bucket, Key=full, Range=header)
        except ClientError as exc:
            if _status(exc) == 416 or exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return _S3Stream(None, expected=0, backend=self._name, key=key)
            raise self._error(exc, key) from exc
        except Exception as exc:
            raise self._error(exc, key) from exc
        ignored_range = header is not None and resp["ResponseMetadata"]["HTTPStatusCode"] == 200
        return _S3Stream(
            resp["Body"],
            expected=resp.get("ContentLength", 0),
            skip=start if ignored_range else 0,
            limit=None if end is None else end - start,
            backend=self._name,
            key=key,
        )

    async def head(self, key: str) -> BlobInfo:
        """Return size, modification time and ETag; ``BlobNotFound`` if absent."""
        full = self._key(key)
        client = await self._s3()
        try:
            resp = await client.head_object(Bucket=self._bucket, Key=full)
        except Exception as exc:
            raise self._error(exc, key) from exc
        return BlobInfo(
            key=key,
            size=resp.get("ContentLength", 0),
            modified=resp.get("LastModified"),
            etag=_etag(resp.get("ETag")),
        )

    async def delete(self, key: str) -> None:
        """DeleteObject; idempotent (a 404 from a strict S3-compatible counts as done)."""
        full = self._key(key)
        client = await self._s3()
        try:
            await client.delete_object(Bucket=self._bucket, Key=full)
        except Exception as exc:
            error = self._error(exc, key)
            if isinstance(error, BlobNotFound):
                return
            raise error from exc

    def list(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[BlobInfo]:
        """Yield blobs under ``prefix`` ascending, after ``start_after``, via
        ListObjectsV2 pages of ``page_size`` keys (S3 caps pages at 1000)."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        return self._list(prefix, start_after, page_size)

    async def _list(
        self, prefix: str, start_after: str | None, page_size: int
    ) -> AsyncIterator[BlobInfo]:
        client = await self._s3()
        request: ListObjectsV2RequestTypeDef = {
            "Bucket": self._bucket,
            "Prefix": self._base + prefix,
            "MaxKeys": page_size,
        }
        if start_after is not None:
            request["StartAfter"] = self._base + start_after
        cut = len(self._base)
        while True:
            try:
                resp = await client.list_objects_v2(**request)
            except Exception as exc:
                raise self._error(exc, prefix) from exc
            for obj in resp.get("Contents", []):
                full = obj.get("Key", "")
                if not full.startswith(self._base):
                    continue
                yield BlobInfo(
                    key=full[cut:],
                    size=obj.get("Size", 0),
                    modified=obj.get("LastModified"),
                    etag=_etag(obj.get("ETag")),
                )
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return
            request["ContinuationToken"] = token
            request.pop("StartAfter", None)

    async def close(self) -> None:
        """Close the client and its connection pool; later calls raise
        ``PermanentBackendError``."""
        self._closed = True
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def _etag(value: Any) -> str | None:
    return value.strip('"') if isinstance(value, str) and value else None


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
