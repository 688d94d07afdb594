"""The admin API: JSON over HTTP under ``/admin/api``, bearer-token authenticated.

Every route is declared once in ``AdminApi.routes`` with its request and response
models; the OpenAPI document (``GET /admin/api/openapi.json``, the only route that needs
no token) is generated from the same table, so it cannot drift from what is served.

Errors are JSON ``{"code": ..., "message": ...}`` with the status from
``frontends.admin.errormap``; a request body that does not validate gets 400 with one
line per problem.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from appliance.meta.models import Permission
from appliance.services.admin import AccessKeyInfo, AdminService, BucketInfo, Grants
from appliance.services.keys import Job, JobProgress, KeyService
from frontends.admin import schemas
from frontends.admin.errormap import to_http_error

log = logging.getLogger("cairn.admin")

PREFIX = "/admin/api"
MAX_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    many: bool = False
    status: int = 200


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class AdminApi:
    """Serves the admin API over ``AdminService``."""

    def __init__(
        self, admin: AdminService, keys: KeyService | None = None, *, token: str | None
    ) -> None:
        self._admin = admin
        self._keys = keys
        self._token = token

    # -- wiring ----------------------------------------------------------------------
    def routes(self) -> list[Route]:
        m = schemas
        return [
            Route(
                "GET", "/buckets", self._list_buckets, "List buckets", answer=m.BucketOut, many=True
            ),
            Route(
                "POST",
                "/buckets",
                self._create_bucket,
                "Create a bucket",
                m.BucketIn,
                m.BucketOut,
                status=201,
            ),
            Route("GET", "/buckets/{name}", self._get_bucket, "Show a bucket", answer=m.BucketOut),
            Route(
                "DELETE",
                "/buckets/{name}",
                self._delete_bucket,
                "Delete an empty bucket",
                status=204,
            ),
            Route(
                "GET",
                "/keys",
                self._list_keys,
                "List access keys (never their secrets)",
                answer=m.KeyOut,
                many=True,
            ),
            Route(
                "POST",
                "/keys",
                self._create_key,
                "Create an access key",
                m.KeyIn,
                m.SecretOut,
                status=201,
            ),
            Route(
                "GET", "/keys/{access_key}", self._get_key, "Show an access key", answer=m.KeyOut
            ),
            Route(
                "PUT",
                "/keys/{access_key}/grants",
                self._set_grants,
                "Replace a key's grants",
                m.GrantsIn,
                m.KeyOut,
            ),
            Route(
                "POST",
                "/keys/{access_key}/rotate",
                self._rotate,
                "Give a key a new secret",
                m.RotateIn,
                m.SecretOut,
            ),
            Route(
                "DELETE", "/keys/{access_key}", self._delete_key, "Delete an access key", status=204
            ),
            Route(
                "GET",
                "/encryption",
                self._encryption,
                "Master keys, chunks per key, key jobs",
                answer=m.EncryptionOut,
            ),
            Route(
                "POST",
                "/encryption/jobs/{job}",
                self._start_job,
                "Start or resume a key job: rotate, encrypt, decrypt (runs in the background)",
                m.JobIn,
                m.JobOut,
                status=202,
            ),
            Route(
                "GET", "/encryption/jobs/{job}", self._job, "A key job's progress", answer=m.JobOut
            ),
            Route(
                "DELETE",
                "/encryption/jobs/{job}",
                self._stop_job,
                "Stop a key job started by this instance (resumable)",
                answer=m.JobOut,
            ),
            Route(
                "GET",
                "/backends",
                self._backends,
                "Backends: state, space, caps left",
                answer=m.BackendOut,
                many=True,
            ),
            Route(
                "GET",
                "/fsck",
                self._fsck,
                "Check the metadata store against the backends (read-only; lists every "
                "backend, so it takes a while on large pools)",
                answer=m.FsckOut,
            ),
            Route(
                "GET",
                "/queues/{queue}",
                self._queue,
                "A background queue (gc, replicate): items per state and dead-lettered items",
                answer=m.QueueOut,
            ),
            Route(
                "POST",
                "/queues/{queue}/dead/{item_id}",
                self._retry_dead,
                "Retry a dead-lettered item (its attempts start again)",
                status=204,
            ),
        ]

    def install(self, app: web.Application) -> None:
        app.router.add_get(f"{PREFIX}/openapi.json", self._openapi)
        for route in self.routes():
            app.router.add_route(route.method, PREFIX + route.path, self._wrap(route))

    def _wrap(self, route: Route) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                self._authenticate(request)
                return await route.handler(request)
            except ApiError as exc:
                return _error(exc.status, exc.code, exc.message)
            except Exception as exc:
                mapped = to_http_error(exc)
                if mapped is None:
                    log.exception(
                        "admin API: internal error on %s %s", request.method, request.path
                    )
                    return _error(500, "InternalError", "internal error; see the server log")
                return _error(*mapped, str(exc) or mapped[1])

        return handle

    def _authenticate(self, request: web.Request) -> None:
        if self._token is None:
            raise ApiError(401, "AdminDisabled", "set server.admin_token to use the admin API")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token.encode()
        ):
            raise ApiError(401, "Unauthorized", "a valid 'Authorization: Bearer <token>' is needed")

    # -- buckets ---------------------------------------------------------------------
    async def _list_buckets(self, _: web.Request) -> web.Response:
        return _json([_bucket(b) for b in await self._admin.list_buckets()])

    async def _create_bucket(self, request: web.Request) -> web.Response:
        body = await _parse(request, schemas.BucketIn)
        await self._admin.create_bucket(body.name)
        return _json(_bucket(await self._admin.bucket(body.name)), status=201)

    async def _get_bucket(self, request: web.Request) -> web.Response:
        return _json(_bucket(await self._admin.bucket(request.match_info["name"])))

    async def _delete_bucket(self, request: web.Request) -> web.Response:
        await self._admin.delete_bucket(request.match_info["name"])
        return web.Response(status=204)

    # -- keys ------------------------------------------------------------------------
    async def _list_keys(self, _: web.Request) -> web.Response:
        return _json([_key(k) for k in await self._admin.list_keys()])

    async def _create_key(self, request: web.Request) -> web.Response:
        body = await _parse(request, schemas.KeyIn)
        made = await self._admin.create_key(
            _grants(body.grants),
            access_key=body.access_key,
            secret_key=body.secret_key,
            description=body.description,
        )
        return _json(schemas.SecretOut(access_key=made.access_key, secret_key=made.secret_key), 201)

    async def _get_key(self, request: web.Request) -> web.Response:
        return _json(_key(await self._admin.key(request.match_info["access_key"])))

    async def _set_grants(self, request: web.Request) -> web.Response:
        body = await _parse(request, schemas.GrantsIn)
        info = await self._admin.set_grants(request.match_info["access_key"], _grants(body.grants))
        return _json(_key(info))

    async def _rotate(self, request: web.Request) -> web.Response:
        body = await _parse(request, schemas.RotateIn, empty_ok=True)
        made = await self._admin.rotate_secret(
            request.match_info["access_key"], secret_key=body.secret_key
        )
        return _json(schemas.SecretOut(access_key=made.access_key, secret_key=made.secret_key))

    async def _delete_key(self, request: web.Request) -> web.Response:
        await self._admin.delete_key(request.match_info["access_key"])
        return web.Response(status=204)

    # -- backends --------------------------------------------------------------------
    async def _backends(self, _: web.Request) -> web.Response:
        views = await self._admin.backends()
        return _json(
            [
                schemas.BackendOut(
                    name=v.name,
                    state=str(v.state),
                    quota_bytes=v.quota_bytes,
                    used_bytes=v.used_bytes,
                    reserved_bytes=v.reserved_bytes,
                    free_bytes=v.free_bytes,
                    requests_left=v.requests_left,
                    ingress_left=v.ingress_left,
                    egress_left=v.egress_left,
                    group=v.group,
                    circuit=v.circuit,
                    consecutive_failures=c.consecutive_failures if c else 0,
                    last_error=c.last_error if c else None,
                )
                for v in views
                for c in [self._admin.circuit(v.name)]
            ]
        )

    async def _fsck(self, _: web.Request) -> web.Response:
        r = await self._admin.fsck()
        return _json(
            schemas.FsckOut(
                problems=r.problems,
                chunks=r.chunks,
                locations=r.locations,
                blobs=r.blobs,
                missing=r.missing,
                orphans=r.orphans,
                below=r.below,
                above=r.above,
                ledger=r.ledger,
                unreachable=r.unreachable,
                examples=r.examples,
            )
        )

    # -- queues ----------------------------------------------------------------------
    async def _queue(self, request: web.Request) -> web.Response:
        name = request.match_info["queue"]
        depth, dead = await self._admin.queue(name)
        return _json(
            schemas.QueueOut(
                name=name,
                depth=depth,
                dead=[
                    schemas.QueueItemOut(
                        item_id=d.item_id,
                        key=d.key,
                        payload=dict(d.payload),
                        attempts=d.attempts,
                        max_attempts=d.max_attempts,
                        state=str(d.state),
                        last_error=d.last_error,
                        created_at=d.created_at,
                    )
                    for d in dead
                ],
            )
        )

    async def _retry_dead(self, request: web.Request) -> web.Response:
        try:
            item_id = int(request.match_info["item_id"])
        except ValueError:
            raise ApiError(400, "InvalidRequest", "item_id must be a number") from None
        await self._admin.retry_dead(request.match_info["queue"], item_id)
        return web.Response(status=204)

    # -- encryption --------------------------------------------------------------------
    def _key_service(self) -> KeyService:
        if self._keys is None:
            raise ApiError(404, "NotAvailable", "key jobs are not available on this instance")
        return self._keys

    async def _encryption(self, _: web.Request) -> web.Response:
        status = await self._key_service().status()
        return _json(
            schemas.EncryptionOut(
                current_key_id=status.current_key_id,
                configured_key_ids=list(status.configured_key_ids),
                chunks_by_key=status.chunks_by_key,
                jobs={name: _job(p) for name, p in status.jobs.items()},
            )
        )

    async def _start_job(self, request: web.Request) -> web.Response:
        job = _job_name(request)
        body = await _parse(request, schemas.JobIn, empty_ok=True)
        if body.new_vault_version and job is not Job.ROTATE:
            raise ApiError(400, "InvalidRequest", "new_vault_version applies to rotate only")
        progress = await self._key_service().start(job, new_vault_version=body.new_vault_version)
        return _json(_job(progress), 202)

    async def _job(self, request: web.Request) -> web.Response:
        progress = await self._key_service().progress(_job_name(request))
        if progress is None:
            raise ApiError(404, "NoSuchJob", "this job never ran")
        return _json(_job(progress))

    async def _stop_job(self, request: web.Request) -> web.Response:
        progress = await self._key_service().stop(_job_name(request))
        if progress is None:
            raise ApiError(404, "NoSuchJob", "this job never ran")
        return _json(_job(progress))

    # -- OpenAPI ---------------------------------------------------------------------
    async def _openapi(self, _: web.Request) -> web.Response:
        return web.json_response(self.openapi())

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of every route in ``routes``."""
        components: dict[str, Any] = {"Error": schemas.Error.model_json_schema()}
        paths: dict[str, dict[str, Any]] = {}
        for route in self.routes():
            operation: dict[str, Any] = {
                "summary": route.summary,
                "operationId": route.handler.__name__.strip("_"),
                "responses": {
                    "default": {"description": "An error", "content": _ref_content("Error")}
                },
            }
            params = [p.strip("{}") for p in route.path.split("/") if p.startswith("{")]
            if params:
                operation["parameters"] = [
                    {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                    for p in params
                ]
            if route.body is not None:
                components[route.body.__name__] = route.body.model_json_schema()
                operation["requestBody"] = {
                    "required": route.body is not schemas.RotateIn,
                    "content": _ref_content(route.body.__name__),
                }
            answer: dict[str, Any] = {"description": "OK"}
            if route.answer is not None:
                components[route.answer.__name__] = route.answer.model_json_schema()
                answer["content"] = _ref_content(route.answer.__name__, many=route.many)
            operation["responses"][str(route.status)] = answer
            paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = operation
        return {
            "openapi": "3.1.0",
            "info": {"title": "Cairn admin API", "version": "1"},
            "components": {
                "schemas": components,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
            "security": [{"bearer": []}],
            "paths": paths,
        }


def _ref_content(name: str, *, many: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"$ref": f"#/components/schemas/{name}"}
    return {"application/json": {"schema": {"type": "array", "items": ref} if many else ref}}


M = TypeVar("M", bound=BaseModel)


async def _parse(request: web.Request, model: type[M], *, empty_ok: bool = False) -> M:
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, "TooLarge", f"the body is larger than {MAX_BODY} bytes")
    if not raw.strip() and empty_ok:
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(400, "InvalidRequest", problems) from exc


def _json(value: BaseModel | list[Any], status: int = 200) -> web.Response:
    if isinstance(value, BaseModel):
        text = value.model_dump_json()
    else:
        text = json.dumps([v.model_dump(mode="json") for v in value])
    return web.Response(text=text, status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json(schemas.Error(code=code, message=message), status)


def _bucket(info: BucketInfo) -> schemas.BucketOut:
    return schemas.BucketOut(
        name=info.name, created_at=info.created_at, objects=info.objects, bytes=info.bytes
    )


def _key(info: AccessKeyInfo) -> schemas.KeyOut:
    return schemas.KeyOut(
        access_key=info.access_key,
        description=info.description,
        created_at=info.created_at,
        grants={b: sorted(str(p) for p in perms) for b, perms in info.grants.items()},
    )


def _job_name(request: web.Request) -> Job:
    try:
        return Job(request.match_info["job"])
    except ValueError as exc:
        names = ", ".join(j.value for j in Job)
        raise ApiError(404, "NoSuchJob", f"key jobs are {names}") from exc


def _job(progress: JobProgress) -> schemas.JobOut:
    return schemas.JobOut(
        job=progress.job.value,
        state=progress.state.value,
        target=progress.target,
        total=progress.total,
        done=progress.done,
        changed=progress.changed,
        bytes_rewritten=progress.bytes_rewritten,
        error=progress.error,
        started_at=progress.started_at,
        updated_at=progress.updated_at,
    )


def _grants(raw: dict[str, list[schemas.PermissionName]]) -> Grants:
    return {bucket: frozenset(Permission(p) for p in perms) for bucket, perms in raw.items()}
