"""The S3 HTTP frontend (aiohttp): path-style requests onto the core's services.

Every request is authenticated (SigV4 header or presigned URL), checked against the
credential's grants on the bucket, and answered with S3's XML; every response carries
``x-amz-request-id``. Bodies stream in and out: a PUT's body is decoded and verified
piece by piece (aws-chunked signatures, checksums) on its way into the chunk writer,
and a GET's chunks are written to the socket as they arrive.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from appliance.clock import utcnow
from appliance.data.buffers import BufferPool
from appliance.data.cpu import CpuPool
from appliance.errors import BucketExists, InvalidRange
from appliance.meta.models import (
    Credential,
    ObjectVersion,
    Part,
    Permission,
)
from appliance.services.access import AccessService
from appliance.services.admin import AdminService
from appliance.services.bucketconfig import CORS, BucketConfigService
from appliance.services.multipart import (
    MAX_PART_NUMBER,
    PART_SIZES_HEADER,
    MultipartService,
    part_range,
)
from appliance.services.objects import ObjectService, check_key
from frontends.s3 import cors
from frontends.s3 import xml as s3xml
from frontends.s3.checksums import (
    ChecksumAlgorithm,
)
from frontends.s3.chunked import RequestBody
from frontends.s3.conditions import check_conditions, parse_range
from frontends.s3.errormap import to_s3_error
from frontends.s3.errors import S3Error
from frontends.s3.objchecksums import (
    CHECKSUM_TYPE_HEADER,
    WANTED_ALGORITHM,
    WANTED_TYPE,
    completed_checksum,
    requested_checksum,
    stored_checksums,
)
from frontends.s3.requests import (
    MAX_KEYS,
    META_PREFIX,
    bucket_from_host,
    client_gone,
    decode_token,
    encode_token,
    http_date,
    int_param,
    parse_content_md5,
    refuse_unsupported_writes,
    split_path,
    stored_headers,
    virtual_key,
    write_precondition,
)
from frontends.s3.sigv4 import AuthContext, RequestParts, SigV4Verifier
from frontends.s3.streams import send_piece
from frontends.s3.tags import (
    TAG_COUNT_HEADER,
    TAGGING_HEADER,
    check_tags,
    decode_tags,
    encode_tags,
    parse_tag_header,
)

log = logging.getLogger("cairn.s3")

REQUEST_ID_KEY = "cairn.request_id"
BUCKET_KEY = "cairn.bucket"

CHECKSUM_HEADER_PREFIX = "x-amz-checksum-"
DEFAULT_CONTENT_TYPE = "binary/octet-stream"
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}
UNSUPPORTED_SUBRESOURCES = (
    "acl",
    "policy",
    "versioning",
    "lifecycle",
    "website",
    "object-lock",
    "retention",
    "legal-hold",
    "replication",
    "encryption",
    "logging",
    "notification",
    "accelerate",
    "requestPayment",
    "inventory",
    "analytics",
    "metrics",
    "ownershipControls",
    "publicAccessBlock",
    "intelligent-tiering",
    "versions",
    "torrent",
    "restore",
    "select",
)


class _Request:
    """What the handlers need of one request after routing and authentication."""

    def __init__(self, request: web.Request, bucket: str, key: str, credential: Credential) -> None:
        self.http = request
        self.bucket = bucket
        self.key = key
        self.credential = credential
        self.query = request.query


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_COPY_RANGE = re.compile(r"bytes=(\d{1,19})-(\d{1,19})")

INTERNAL_HEADER_PREFIX = "x-cairn-"
"""Stored headers of Cairn's own (part sizes...): never sent to clients."""


def _part_number_param(req: _Request) -> int | None:
    raw = req.query.get("partNumber")
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PART_NUMBER:
        raise S3Error(
            "InvalidArgument",
            f"Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive",
            ArgumentName="partNumber",
            ArgumentValue=raw[:100],
        )
    return int(raw)


class S3Frontend:
    """aiohttp handler for the S3 API, over the core's services."""

    def __init__(
        self,
        objects: ObjectService,
        multipart: MultipartService,
        access: AccessService,
        admin: AdminService,
        bucket_config: BucketConfigService,
        cpu: CpuPool,
        *,
        region: str,
        domain: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        buffers: BufferPool | None = None,
    ) -> None:
        self._objects = objects
        self._multipart = multipart
        self._access = access
        self._admin = admin
        self._bucket_config = bucket_config
        self._cpu = cpu
        self._buffers = buffers or BufferPool(0)
        self._region = region
        self._domain = domain
        self._clock = clock
        self._verifier = SigV4Verifier(region)
        self._host_id = secrets.token_hex(8)

    def install(self, app: web.Application) -> None:
        """Route every path not claimed before to the S3 API. Build ``app`` with
        ``handler_args=S3Frontend.handler_args()``."""
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_response_prepare.append(self._stamp_ids)

    @staticmethod
    def handler_args() -> dict[str, Any]:
        """aiohttp connection options an app serving S3 needs:

        - request-body decompression off: in S3, ``Content-Encoding`` (gzip, deflate, br)
          describes the object being stored, and its bytes must be kept exactly as sent
          (and as signed). Left on, aiohttp would store the decompressed body (or fail
          with a 500 on bytes that are not gzip).
        - a protocol logger that reports malformed HTTP from a client (bad chunked
          framing, oversized headers) at INFO, not as a server ERROR with a traceback.
        """
        return {
            "auto_decompress": False,
            "logger": _HttpLogger(logging.getLogger("cairn.s3.http"), {}),
        }

    async def _stamp_ids(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every S3 response carries its request id, streamed ones too (headers go out at
        ``prepare``, before the handler returns)."""
        request_id = request.get(REQUEST_ID_KEY)
        if request_id is not None:
            response.headers["x-amz-request-id"] = request_id
            response.headers["x-amz-id-2"] = self._host_id
        origin = request.headers.get("Origin")
        bucket = request.get(BUCKET_KEY)
        if origin and bucket and request.method != "OPTIONS":
            try:
                rules = cors.load_rules(await self._bucket_config.get(bucket, CORS))
            except Exception:
                log.info("CORS rules of %s unavailable for a response", bucket, exc_info=True)
                return
            rule = cors.first_match(rules, origin, request.method)
            if rule is not None:
                response.headers.update(rule.response_headers(origin, preflight=False))

    # -- entry -----------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = secrets.token_hex(8).upper()
        request[REQUEST_ID_KEY] = request_id
        resource = request.path
        try:
            response = await self._dispatch(request)
        except Exception as exc:  # mapped to an S3 error document below
            error = to_s3_error(exc)
            if error is None and client_gone(request, exc):
                # The client hung up while sending its body: nothing was stored and
                # nobody is left to answer. Not a server error.
                log.info("%s %s: the client went away: %r", request.method, request.path, exc)
                error = S3Error("IncompleteBody")
            elif error is None and isinstance(exc, RequestPayloadError):
                # aiohttp could not parse the body's HTTP framing: the client's fault.
                log.info("%s %s: malformed request body: %s", request.method, request.path, exc)
                error = S3Error("IncompleteBody")
            if error is None:
                log.exception("internal error on %s %s", request.method, request.path)
                error = S3Error("InternalError")
            return self._error(request, error, resource, request_id)
        response.headers["x-amz-request-id"] = request_id
        response.headers["x-amz-id-2"] = self._host_id
        return response

    def _error(
        self, request: web.Request, error: S3Error, resource: str, request_id: str
    ) -> web.Response:
        headers = {"x-amz-request-id": request_id, "x-amz-id-2": self._host_id}
        if error.code == "NotModified":
            return web.Response(status=304, headers=headers)
        body = b""
        if request.method != "HEAD":
            body = s3xml.render_s3_error(
                error, resource=resource, request_id=request_id, host_id=self._host_id
            )
        if error.code == "InvalidRange" and "size" in error.extra:
            headers["Content-Range"] = f"bytes */{error.extra.pop('size')}"
        response = web.Response(status=error.status, body=body, headers=headers)
        if body:
            response.content_type = "application/xml"
        if error.status >= 500 or error.code in ("IncompleteBody", "XAmzContentSHA256Mismatch"):
            response.force_close()
        return response

    async def _authenticate(self, request: web.Request) -> Credential:
        parts = RequestParts(
            request.method, request.raw_path, list(request.query.items()), request.headers
        )
        pending = self._verifier.prepare(parts, self._clock())
        credential = await self._access.credential(pending.access_key)
        auth = pending.finish(credential.secret if credential else None)
        assert credential is not None  # finish() refuses an unknown key
        request["cairn.auth"] = auth
        return credential

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        bucket, key = split_path(request.raw_path)
        virtual = bucket_from_host(request.headers.get("Host", ""), self._domain)
        if virtual is not None:  # the whole path is the key
            bucket, key = virtual, virtual_key(request.raw_path)
        request[BUCKET_KEY] = bucket
        if request.method == "OPTIONS":
            return await self._preflight(request, bucket)
        credential = await self._authenticate(request)
        if not bucket:
            if request.method != "GET":
                raise S3Error(
                    "MethodNotAllowed", "The specified method is not allowed against this resource."
                )
            return await self._list_buckets(credential)
        req = _Request(request, bucket, key, credential)
        for name in UNSUPPORTED_SUBRESOURCES:
            if name in request.query:
                raise S3Error(
                    "NotImplemented", f"Cairn does not implement the '{name}' subresource."
                )
        if not key:
            if "tagging" in request.query:
                raise S3Error("NotImplemented", "Cairn does not implement bucket tagging.")
            if "cors" in request.query:
                return await self._bucket_cors(req)
            return await self._bucket_call(req)
        if "tagging" in request.query:
            return await self._object_tagging(req)
        return await self._object_call(req)

    async def _preflight(self, request: web.Request, bucket: str) -> web.Response:
        """A browser's CORS preflight: no signature; the bucket's first matching rule
        answers 200 with its ``Access-Control-*`` headers, else 403."""
        origin = request.headers.get("Origin")
        method = request.headers.get("Access-Control-Request-Method")
        if not bucket:
            raise S3Error("MethodNotAllowed", "OPTIONS needs a bucket.")
        if not origin or not method:
            raise S3Error(
                "BadRequest",
                "Insufficient information. Origin request header needed."
                if not origin
                else "Insufficient information. Access-Control-Request-Method header needed.",
            )
        requested = cors.requested_headers(request.headers.get("Access-Control-Request-Headers"))
        rules = cors.load_rules(await self._bucket_config.get(bucket, CORS))
        if not rules:
            raise S3Error("CORSResponse", "CORS is not enabled for this bucket.")
        rule = cors.first_match(rules, origin, method, requested)
        if rule is None:
            raise S3Error("CORSResponse", "This CORS request is not allowed.")
        return web.Response(
            headers=rule.response_headers(origin, preflight=True, requested=requested)
        )

    async def _bucket_cors(self, req: _Request) -> web.Response:
        """Get/Put/DeleteBucketCors: reading needs any permission on the bucket, changing
        needs ``admin``."""
        method = req.http.method
        if method == "GET":
            self._require_any(req)
            await self._objects.get_bucket(req.bucket)
            rules = cors.load_rules(await self._bucket_config.get(req.bucket, CORS))
            if not rules:
                raise S3Error("NoSuchCORSConfiguration")
            return web.Response(body=cors.render_cors_xml(rules), content_type="application/xml")
        if method == "PUT":
            self._require(req, Permission.ADMIN)
            raw = await s3xml.read_xml_body(self._body(req.http))
            rules = cors.parse_cors_xml(raw)
            await self._bucket_config.set(req.bucket, CORS, cors.dump_rules(rules))
            return web.Response()
        if method == "DELETE":
            self._require(req, Permission.ADMIN)
            await self._bucket_config.set(req.bucket, CORS, "")
            return web.Response(status=204)
        raise S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )

    def _require(self, req: _Request, permission: Permission) -> None:
        if not self._access.allows(req.credential, req.bucket, permission):
            raise S3Error("AccessDenied", "Access Denied")

    # -- service and bucket calls ----------------------------------------------------
    async def _list_buckets(self, credential: Credential) -> web.Response:
        buckets = await self._objects.list_buckets()
        visible = set(self._access.visible_buckets(credential, [b.name for b in buckets]))
        body = s3xml.render_list_buckets(
            [s3xml.BucketInfo(b.name, b.created_at) for b in buckets if b.name in visible],
            s3xml.Owner(credential.access_key, credential.access_key),
        )
        return web.Response(body=body, content_type="application/xml")

    async def _bucket_call(self, req: _Request) -> web.StreamResponse:
        method, query = req.http.method, req.query
        if method == "HEAD":
            self._require_any(req)
            await self._objects.get_bucket(req.bucket)
            return web.Response(headers={"x-amz-bucket-region": self._region})
        if method == "GET":
            if "location" in query:
                self._require_any(req)
                await self._objects.get_bucket(req.bucket)
                return web.Response(
                    body=s3xml.render_location_constraint(self._region),
                    content_type="application/xml",
                )
            if "uploads" in query:
                self._require(req, Permission.LIST)
                return await self._list_uploads(req)
            self._require(req, Permission.LIST)
            if query.get("list-type") == "2":
                return await self._list_objects(req, v2=True)
            return await self._list_objects(req, v2=False)
        if method == "PUT":
            return await self._create_bucket(req)
        if method == "POST" and "delete" in query:
            self._require(req, Permission.DELETE)
            return await self._delete_objects(req)
        if method == "DELETE":
            self._require(req, Permission.ADMIN)
            await self._admin.delete_bucket(req.bucket)
            return web.Response(status=204)
        raise S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )

    async def _create_bucket(self, req: _Request) -> web.Response:
        """CreateBucket: needs ``admin`` on the name (or on ``*``). A bucket the key can
        already use answers ``BucketAlreadyOwnedByYou`` (rclone and others treat that as
        success); one it cannot answers ``BucketAlreadyExists`` to an admin key and
        ``AccessDenied`` to any other, so a plain key learns nothing of other buckets."""
        if req.http.headers.get("x-amz-bucket-object-lock-enabled", "").lower() == "true":
            raise S3Error("NotImplemented", "Cairn does not implement S3 Object Lock.")
        if self._allows_any(req) and await self._objects.bucket_exists(req.bucket):
            raise S3Error("BucketAlreadyOwnedByYou")
        self._require(req, Permission.ADMIN)
        constraint = s3xml.parse_create_bucket_configuration(
            await s3xml.read_xml_body(self._body(req.http))
        )
        if constraint not in (None, self._region):
            raise S3Error(
                "InvalidLocationConstraint",
                f"This endpoint serves region {self._region!r}; the location constraint "
                f"{constraint!r} is not valid here.",
            )
        try:
            await self._admin.create_bucket(req.bucket)
        except BucketExists as exc:
            raise S3Error("BucketAlreadyExists") from exc
        return web.Response(headers={"Location": f"/{req.bucket}"})

    def _allows_any(self, req: _Request) -> bool:
        return any(self._access.allows(req.credential, req.bucket, p) for p in Permission)

    def _require_any(self, req: _Request) -> None:
        if not any(self._access.allows(req.credential, req.bucket, p) for p in Permission):
            raise S3Error("AccessDenied", "Access Denied")

    async def _list_objects(self, req: _Request, *, v2: bool) -> web.Response:
        query = req.query
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter") or None
        encoding = s3xml.check_encoding_type(query.get("encoding-type"))
        max_keys = int_param(query, "max-keys", MAX_KEYS)
        token = query.get("continuation-token") if v2 else None
        start_after = query.get("start-after") if v2 else None
        marker = query.get("marker") if not v2 else None
        resume = decode_token(token) if token else (start_after or marker or None)
        if max_keys == 0:
            await self._objects.get_bucket(req.bucket)
            entries: tuple[Any, ...] = ()
            prefixes: tuple[str, ...] = ()
            truncated, next_marker = False, None
        else:
            page = await self._objects.list_objects(
                req.bucket, prefix=prefix, delimiter=delimiter, start_after=resume, limit=max_keys
            )
            entries, prefixes = page.entries, page.common_prefixes
            truncated, next_marker = page.truncated, page.next_marker
        owner = s3xml.Owner(req.credential.access_key, req.credential.access_key)
        listing = s3xml.ListObjectsPage(
            bucket=req.bucket,
            max_keys=max_keys,
            is_truncated=truncated,
            contents=[
                s3xml.ObjectInfo(e.key, e.last_modified, e.etag, e.size, owner=owner)
                for e in entries
            ],
            common_prefixes=prefixes,
            prefix=prefix,
            delimiter=delimiter,
            encoding_type=encoding,
            marker=marker or "" if not v2 else None,
            next_marker=next_marker if (not v2 and truncated and delimiter) else None,
            continuation_token=token if v2 else None,
            next_continuation_token=encode_token(next_marker)
            if (v2 and truncated and next_marker)
            else None,
            start_after=start_after if v2 else None,
            fetch_owner=query.get("fetch-owner") == "true",
        )
        body = (
            s3xml.render_list_objects_v2(listing) if v2 else s3xml.render_list_objects_v1(listing)
        )
        return web.Response(body=body, content_type="application/xml")

    async def _delete_objects(self, req: _Request) -> web.Response:
        raw = await s3xml.read_xml_body(self._body(req.http))
        request = s3xml.parse_delete(raw)
        await self._objects.get_bucket(req.bucket)
        failed: list[s3xml.DeleteErrorInfo] = []
        valid: list[str] = []
        for item in request.objects:
            try:
                check_key(item.key)
            except Exception as exc:  # reported per key, as S3 does
                error = to_s3_error(exc) or S3Error("InternalError")
                failed.append(s3xml.DeleteErrorInfo(item.key, error.code, error.message))
                continue
            valid.append(item.key)
        try:
            if valid:
                await self._objects.delete_objects(req.bucket, valid)  # one transaction
        except Exception as exc:  # the whole batch failed: every key says why
            error = to_s3_error(exc) or S3Error("InternalError")
            failed += [s3xml.DeleteErrorInfo(k, error.code, error.message) for k in valid]
            valid = []
        deleted = [] if request.quiet else [s3xml.DeletedInfo(k) for k in valid]
        return web.Response(
            body=s3xml.render_delete_result(deleted, failed), content_type="application/xml"
        )

    async def _list_uploads(self, req: _Request) -> web.Response:
        query = req.query
        prefix = query.get("prefix", "")
        max_uploads = int_param(query, "max-uploads", MAX_KEYS)
        key_marker = query.get("key-marker") or None
        id_marker = query.get("upload-id-marker") or None
        uploads = await self._multipart.list_uploads(
            req.bucket,
            prefix=prefix,
            key_marker=key_marker,
            upload_id_marker=id_marker,
            limit=max_uploads + 1,
        )
        truncated = len(uploads) > max_uploads
        uploads = uploads[:max_uploads]
        page = s3xml.ListUploadsPage(
            bucket=req.bucket,
            max_uploads=max_uploads,
            is_truncated=truncated,
            uploads=[s3xml.UploadInfo(u.key, u.upload_id, u.created_at) for u in uploads],
            key_marker=key_marker or "",
            upload_id_marker=id_marker or "",
            next_key_marker=uploads[-1].key if truncated and uploads else None,
            next_upload_id_marker=uploads[-1].upload_id if truncated and uploads else None,
            prefix=prefix,
            encoding_type=s3xml.check_encoding_type(query.get("encoding-type")),
        )
        return web.Response(
            body=s3xml.render_list_multipart_uploads(page), content_type="application/xml"
        )

    # -- object calls ----------------------------------------------------------------
    async def _object_call(self, req: _Request) -> web.StreamResponse:
        method, query = req.http.method, req.query
        if method in ("GET", "HEAD"):
            self._require(req, Permission.READ)
            if "uploadId" in query and method == "GET":
                return await self._list_parts(req)
            if "attributes" in query and method == "GET":
                return await self._object_attributes(req)
            return await self._get_object(req, head=method == "HEAD")
        if method == "PUT":
            self._require(req, Permission.WRITE)
            if "x-amz-copy-source" in req.http.headers:
                if "uploadId" in query or "partNumber" in query:
                    refuse_unsupported_writes(req.http, conditional=False, object_level=False)
                    return await self._upload_part_copy(req)
                refuse_unsupported_writes(req.http, conditional=True, object_level=True)
                return await self._copy_object(req)
            if "uploadId" in query or "partNumber" in query:
                refuse_unsupported_writes(req.http, conditional=False, object_level=False)
                return await self._upload_part(req)
            refuse_unsupported_writes(req.http, conditional=False, object_level=True)
            return await self._put_object(req)
        if method == "DELETE":
            self._require(req, Permission.DELETE if "uploadId" not in query else Permission.WRITE)
            if "uploadId" in query:
                upload = await self._multipart.get(query["uploadId"], req.bucket, req.key)
                await self._multipart.abort(upload)
                return web.Response(status=204)
            await self._objects.delete_object(req.bucket, req.key)
            return web.Response(status=204)
        if method == "POST":
            self._require(req, Permission.WRITE)
            if "uploads" in query:
                refuse_unsupported_writes(req.http, conditional=False, object_level=True)
                headers, meta = stored_headers(req.http)
                wanted = requested_checksum(req.http)
                headers.update(wanted)
                upload = await self._multipart.create(
                    req.bucket, req.key, headers=headers, user_metadata=meta
                )
                body = s3xml.render_initiate_multipart_upload(req.bucket, req.key, upload.upload_id)
                answer = web.Response(body=body, content_type="application/xml")
                if WANTED_ALGORITHM in wanted:
                    answer.headers["x-amz-checksum-algorithm"] = wanted[WANTED_ALGORITHM]
                    answer.headers["x-amz-checksum-type"] = wanted[WANTED_TYPE]
                return answer
            if "uploadId" in query:
                refuse_unsupported_writes(req.http, conditional=False, object_level=False)
                return await self._complete(req)
        raise S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )

    async def _object_tagging(self, req: _Request) -> web.Response:
        """Get/Put/DeleteObjectTagging: tags change in place (no new version, same ETag)."""
        method = req.http.method
        if method == "GET":
            self._require(req, Permission.READ)
            version = (await self._objects.open_object(req.bucket, req.key)).version
            tags = decode_tags(version.headers.get(TAGGING_HEADER))
            return web.Response(body=s3xml.render_tagging(tags), content_type="application/xml")
        if method == "PUT":
            self._require(req, Permission.WRITE)
            raw = await s3xml.read_xml_body(self._body(req.http))
            tags = check_tags(s3xml.parse_tagging(raw))
            await self._objects.set_stored_header(
                req.bucket, req.key, TAGGING_HEADER, encode_tags(tags) if tags else None
            )
            return web.Response()
        if method == "DELETE":
            self._require(req, Permission.WRITE)
            await self._objects.set_stored_header(req.bucket, req.key, TAGGING_HEADER, None)
            return web.Response(status=204)
        raise S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )

    def _body(self, request: web.Request, *, md5_by_writer: bool = False) -> RequestBody:
        """The request's decoded, verified body. With ``md5_by_writer`` the Content-MD5
        check is left to the chunk writer, which computes the body's MD5 anyway (for the
        ETag): hashing the body twice would cost a whole MD5 pass."""
        auth: AuthContext = request["cairn.auth"]

        async def offload(step: Callable[[], None]) -> None:
            await self._cpu.run(step)

        headers: Mapping[str, str] = request.headers
        if md5_by_writer and "Content-MD5" in headers:
            headers = CIMultiDict(headers)
            del headers["Content-MD5"]
        return RequestBody(request.content.read, headers, auth, offload=offload)

    def _declared_size(self, request: web.Request) -> int | None:
        decoded = request.headers.get("x-amz-decoded-content-length")
        raw = decoded if decoded is not None else request.headers.get("Content-Length")
        if raw is None:
            if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return None
            raise S3Error(
                "MissingContentLength", "You must provide the Content-Length HTTP header."
            )
        try:
            size = int(raw)
        except ValueError as exc:
            raise S3Error("InvalidArgument", "Content-Length is not a number") from exc
        if size < 0:
            raise S3Error("InvalidArgument", "Content-Length must not be negative")
        return size

    async def _put_object(self, req: _Request) -> web.Response:
        size = self._declared_size(req.http)
        content_md5 = parse_content_md5(req.http)
        body = self._body(req.http, md5_by_writer=True)
        headers, meta = stored_headers(req.http)
        result = await self._objects.put_object(
            req.bucket,
            req.key,
            body,
            size=size,
            headers=headers,
            user_metadata=meta,
            content_md5=content_md5,
            late_headers=lambda: {alg.header: value for alg, value in body.checksums.items()},
            precondition=write_precondition(req.http),
        )
        response = web.Response(headers={"ETag": s3xml.quote_etag(result.etag)})
        for algorithm, value in body.checksums.items():
            response.headers[algorithm.header] = value
        return response

    async def _copy_object(self, req: _Request) -> web.Response:
        """CopyObject by reference (no bytes move), with the metadata directive and the
        copy-source conditions."""
        src_bucket, src_key = self._copy_source(req)
        directive = req.http.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown metadata directive.")
        source = await self._objects.open_object(src_bucket, src_key)
        check_conditions(
            req.http, source.version, prefix="x-amz-copy-source-", not_modified="PreconditionFailed"
        )
        tag_directive = req.http.headers.get("x-amz-tagging-directive", "COPY").upper()
        if tag_directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown tagging directive.")
        headers: dict[str, str] | None = None
        meta: dict[str, str] | None = None
        source_tags = source.version.headers.get(TAGGING_HEADER)
        if directive == "REPLACE":
            headers, meta = stored_headers(req.http)
            headers.pop(TAGGING_HEADER, None)
            if tag_directive == "COPY" and source_tags:
                headers[TAGGING_HEADER] = source_tags
        elif tag_directive == "REPLACE":
            headers = {k: v for k, v in source.version.headers.items() if k != TAGGING_HEADER}
            meta = dict(source.version.user_metadata)
        if tag_directive == "REPLACE":
            assert headers is not None
            tags = parse_tag_header(req.http.headers.get(TAGGING_HEADER, ""))
            if tags:
                headers[TAGGING_HEADER] = encode_tags(tags)
        elif directive == "COPY" and (src_bucket, src_key) == (req.bucket, req.key):
            raise S3Error(
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to itself "
                "without changing the object's metadata, storage class, website redirect "
                "location or encryption attributes.",
            )
        copy = await self._objects.copy_object(
            source, req.bucket, req.key, headers=headers, user_metadata=meta
        )
        body = s3xml.render_copy_object_result(copy.etag, copy.created_at)
        return web.Response(body=body, content_type="application/xml")

    def _copy_source(self, req: _Request) -> tuple[str, str]:
        """(bucket, key) of ``x-amz-copy-source``, which the key may read.

        Raises ``InvalidArgument`` (malformed or not UTF-8 percent-encoding, no key),
        ``NotImplemented`` (a versionId) or ``AccessDenied``."""
        raw = req.http.headers["x-amz-copy-source"]
        raw_path, _, version_query = raw.partition("?")
        if _BAD_PERCENT.search(raw_path):
            raise S3Error("InvalidArgument", "Invalid copy source encoding.")
        try:
            path = unquote(raw_path, errors="strict").lstrip("/")
        except UnicodeDecodeError as exc:
            raise S3Error("InvalidArgument", "Invalid copy source encoding.") from exc
        src_bucket, _, src_key = path.partition("/")
        if not src_bucket or not src_key:
            raise S3Error(
                "InvalidArgument",
                "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            )
        if version_query:
            raise S3Error(
                "NotImplemented", "Cairn keeps no object versions: copy without versionId."
            )
        check_key(src_key)
        if not self._access.allows(req.credential, src_bucket, Permission.READ):
            raise S3Error("AccessDenied", "Access Denied")
        return src_bucket, src_key

    async def _upload_part_copy(self, req: _Request) -> web.Response:
        """UploadPartCopy by reference, with ``x-amz-copy-source-range`` and the
        copy-source conditions."""
        part_number = _part_number_param(req)
        if part_number is None:
            raise S3Error("InvalidArgument", "UploadPartCopy needs partNumber")
        upload = await self._multipart.get(req.query.get("uploadId", ""), req.bucket, req.key)
        src_bucket, src_key = self._copy_source(req)
        source = await self._objects.open_object(src_bucket, src_key)
        check_conditions(
            req.http, source.version, prefix="x-amz-copy-source-", not_modified="PreconditionFailed"
        )
        size = source.version.size
        start, end = 0, size
        wanted = req.http.headers.get("x-amz-copy-source-range")
        if wanted is not None:
            match = _COPY_RANGE.fullmatch(wanted.strip())
            if match is None:
                raise S3Error(
                    "InvalidArgument",
                    "The x-amz-copy-source-range value must be of the form bytes=first-last "
                    "where first and last are the zero-based offsets of the first and last "
                    "bytes to copy",
                )
            start, last = int(match[1]), int(match[2])
            if last < start or last >= size:
                raise S3Error(
                    "InvalidArgument",
                    f"Range specified is not valid for source object of size: {size}",
                )
            end = last + 1
        result = await self._multipart.upload_part_copy(upload, part_number, source, start, end)
        body = s3xml.render_copy_part_result(result.etag, self._clock())
        return web.Response(body=body, content_type="application/xml")

    async def _upload_part(self, req: _Request) -> web.Response:
        query = req.query
        try:
            part_number = int(query.get("partNumber", ""))
        except ValueError as exc:
            raise S3Error(
                "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
            ) from exc
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise S3Error(
                "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
            )
        upload = await self._multipart.get(query.get("uploadId", ""), req.bucket, req.key)
        size = self._declared_size(req.http)
        content_md5 = parse_content_md5(req.http)
        body = self._body(req.http, md5_by_writer=True)
        result = await self._multipart.upload_part(
            upload,
            part_number,
            body,
            size=size,
            content_md5=content_md5,
            late_headers=lambda: {alg.header: value for alg, value in body.checksums.items()},
        )
        response = web.Response(headers={"ETag": s3xml.quote_etag(result.etag)})
        for algorithm, value in body.checksums.items():
            response.headers[algorithm.header] = value
        return response

    async def _complete(self, req: _Request) -> web.StreamResponse:
        upload = await self._multipart.get(req.query["uploadId"], req.bucket, req.key)
        raw = await s3xml.read_xml_body(self._body(req.http))
        parts = s3xml.parse_complete_multipart_upload(raw)
        checksum: dict[str, str] = {}

        def object_checksum(stored: Mapping[int, Part]) -> dict[str, str]:
            checksum.update(completed_checksum(req.http.headers, upload, parts, stored))
            return checksum

        done = await self._multipart.complete(
            upload,
            [(p.part_number, p.etag) for p in parts],
            precondition=write_precondition(req.http),
            headers_from_parts=object_checksum,
        )
        location = f"/{req.bucket}/{req.key}"
        shown = {
            alg.display_name: value
            for name, value in checksum.items()
            if (alg := ChecksumAlgorithm.from_header(name)) is not None
        }
        body = s3xml.render_complete_multipart_upload(
            location,
            done.bucket,
            done.key,
            done.etag,
            checksums=shown,
            checksum_type=checksum.get(CHECKSUM_TYPE_HEADER),
        )
        return web.Response(body=body, content_type="application/xml")

    async def _list_parts(self, req: _Request) -> web.Response:
        upload = await self._multipart.get(req.query["uploadId"], req.bucket, req.key)
        max_parts = int_param(req.query, "max-parts", MAX_KEYS)
        marker = int_param(req.query, "part-number-marker", 0, high=MAX_PART_NUMBER)
        parts = await self._multipart.list_parts(upload, marker=marker, limit=max_parts + 1)
        truncated = len(parts) > max_parts
        parts = parts[:max_parts]
        page = s3xml.ListPartsPage(
            bucket=req.bucket,
            key=req.key,
            upload_id=upload.upload_id,
            max_parts=max_parts,
            is_truncated=truncated,
            parts=[
                s3xml.PartInfo(
                    p.part_number,
                    p.created_at,
                    p.etag,
                    p.size,
                    {a.display_name: v for a, v in stored_checksums(p.headers).items()},
                )
                for p in parts
            ],
            part_number_marker=marker,
            next_part_number_marker=parts[-1].part_number if parts else None,
        )
        return web.Response(body=s3xml.render_list_parts(page), content_type="application/xml")

    async def _get_object(self, req: _Request, *, head: bool) -> web.StreamResponse:
        part_number = _part_number_param(req)
        range_header = req.http.headers.get("Range")
        if part_number is not None and range_header:
            raise S3Error(
                "InvalidRequest", "Cannot specify both Range header and partNumber query parameter"
            )
        handle = await self._objects.open_object(req.bucket, req.key)
        version = handle.version
        check_conditions(req.http, version)
        headers = self._object_headers(req, version)
        start, end, status = 0, version.size, 200
        if part_number is not None:
            try:
                start, end, count = part_range(version.headers, version.size, part_number)
            except InvalidRange as exc:
                raise S3Error("InvalidPartNumber") from exc
            headers["x-amz-mp-parts-count"] = str(count)
            if PART_SIZES_HEADER in version.headers:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{max(end - 1, start)}/{version.size}"
        elif range_header:
            try:
                chosen = parse_range(range_header, version.size)
            except InvalidRange as exc:
                raise S3Error(
                    "InvalidRange",
                    "The requested range is not satisfiable",
                    ActualObjectSize=str(version.size),
                    RangeRequested=range_header,
                    size=str(version.size),
                ) from exc
            if chosen is not None:
                start, end = chosen
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{version.size}"
        headers["Content-Length"] = str(end - start)
        if head:
            return web.Response(status=status, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        stream: AsyncIterator[bytes | bytearray] = self._objects.read(handle, start, end)
        try:
            first = await anext(stream, None) if end > start else None
            await response.prepare(req.http)
            if first is not None:
                await send_piece(response, first)
                self._buffers.give_if_unshared(first, holders=1)  # sent or copied: reuse
                first = None
                async for piece in stream:
                    await send_piece(response, piece)
                    self._buffers.give_if_unshared(piece, holders=1)
            await response.write_eof()
        except Exception as exc:
            if not response.prepared:
                raise  # nothing sent yet: answered with an S3 error document
            # Headers (and a Content-Length) are out: the only honest signal left is to cut
            # the connection, so the client sees a short body instead of wrong bytes.
            if client_gone(req.http, exc):
                log.info("GET %s/%s: the client went away: %r", req.bucket, req.key, exc)
            else:
                log.exception(
                    "read of %s/%s failed after the response started", req.bucket, req.key
                )
            if req.http.transport is not None:
                req.http.transport.close()
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return response

    async def _object_attributes(self, req: _Request) -> web.Response:
        """GetObjectAttributes: ``x-amz-object-attributes`` names what to return (ETag,
        Checksum, ObjectParts, StorageClass, ObjectSize); parts page with
        ``x-amz-max-parts`` and ``x-amz-part-number-marker``."""
        headers = req.http.headers
        asked = {a.strip() for a in headers.get("x-amz-object-attributes", "").split(",")}
        asked.discard("")
        unknown = asked - {"ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"}
        if not asked or unknown:
            raise S3Error(
                "InvalidArgument",
                "Invalid attribute name specified."
                if unknown
                else "x-amz-object-attributes must name at least one attribute",
            )
        max_parts = int_param(headers, "x-amz-max-parts", MAX_KEYS)
        marker = int_param(headers, "x-amz-part-number-marker", 0, high=MAX_PART_NUMBER)
        version = (await self._objects.open_object(req.bucket, req.key)).version
        check_conditions(req.http, version)
        checksums = {a.display_name: v for a, v in stored_checksums(version.headers).items()}
        attributes = s3xml.ObjectAttributes(
            etag=version.etag if "ETag" in asked else None,
            checksums=checksums if "Checksum" in asked else None,
            checksum_type=version.headers.get(CHECKSUM_TYPE_HEADER) if checksums else None,
            storage_class="STANDARD" if "StorageClass" in asked else None,
            size=version.size if "ObjectSize" in asked else None,
        )
        raw_sizes = version.headers.get(PART_SIZES_HEADER)
        if "ObjectParts" in asked and raw_sizes:
            sizes = [int(s) for s in raw_sizes.split(",")]
            page = [(n, sizes[n - 1]) for n in range(marker + 1, len(sizes) + 1)][:max_parts]
            truncated = bool(page) and page[-1][0] < len(sizes)
            attributes = dataclasses.replace(
                attributes,
                parts_total=len(sizes),
                parts=page,
                part_marker=marker,
                next_part_marker=page[-1][0] if page else None,
                max_parts=max_parts,
                parts_truncated=truncated,
            )
        return web.Response(
            body=s3xml.render_object_attributes(attributes),
            content_type="application/xml",
            headers={"Last-Modified": http_date(version.created_at)},
        )

    def _object_headers(self, req: _Request, version: ObjectVersion) -> dict[str, str]:
        headers: dict[str, str] = {
            "ETag": s3xml.quote_etag(version.etag),
            "Last-Modified": http_date(version.created_at),
            "Accept-Ranges": "bytes",
            "Content-Type": DEFAULT_CONTENT_TYPE,
        }
        checksum_mode = req.http.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
        for name, value in version.headers.items():
            if name.startswith(INTERNAL_HEADER_PREFIX):
                continue
            if name == TAGGING_HEADER:
                headers[TAG_COUNT_HEADER] = str(len(decode_tags(value)))
                continue
            if name.lower().startswith(CHECKSUM_HEADER_PREFIX):
                if checksum_mode and "Range" not in req.http.headers:
                    headers[name] = value
                continue
            headers[name] = value
        for name, value in version.user_metadata.items():
            headers[f"{META_PREFIX}{name}"] = value
        for param, header in RESPONSE_OVERRIDES.items():
            if param in req.query:
                headers[header] = req.query[param]
        return headers


class _HttpLogger(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's per-connection logger: a 4xx protocol error is the client's doing."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            self.logger.info("%s: %r", str(msg) % args if args else msg, exc)
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kwargs)
