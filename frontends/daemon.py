"""The daemon: opens the core and serves its HTTP endpoints until SIGTERM/SIGINT.

It serves the S3 API, ``/health`` (the process is up) and ``/health/ready`` (the
metadata store answers and every backend can be listed), and runs the background
workers (GC, janitor, replication) in ``worker`` and ``all`` modes; health checks and
usage flushing in every mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from appliance.build import Pool, make_file_service, open_pool
from appliance.config import CairnConfig
from appliance.errors import KeyUnavailable
from appliance.meta.errors import MetaError
from appliance.services.files import FileService
from backends.errors import BackendError
from frontends.admin.server import AdminApi
from frontends.s3.server import S3Frontend

log = logging.getLogger("cairn.daemon")


class MountFailed(Exception):
    """The FUSE mount could not be made or failed."""


@dataclass(frozen=True, slots=True)
class MountRequest:
    path: Path
    bucket: str | None


POOL_KEY = web.AppKey("pool", Pool)
SHUTDOWN_GRACE = 30
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]
    problems: dict[str, str] = {}
    try:
        await pool.store.schema_version()
    except MetaError as exc:
        problems["metadata"] = str(exc)
    for name, backend in pool.backends.items():
        try:
            async for _ in backend.list("", page_size=1):
                break
        except BackendError as exc:
            problems[f"backend:{name}"] = str(exc)
    status = 200 if not problems else 503
    return web.json_response({"ready": not problems, "problems": problems}, status=status)


class InFlight:
    """Counts requests being served, so shutdown can wait until none is left."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.count += 1
        self.idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if self.count == 0:
                self.idle.set()


INFLIGHT_KEY = web.AppKey("inflight", InFlight)


class AfterMountCommits:
    """Holds each request until the mount's commits behind (write-back) of files
    closed before it came have landed: a file closed in the mount is readable here at
    once (close-to-open across the frontends of one instance)."""

    def __init__(self, files: FileService) -> None:
        self._files = files

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._files.commits_behind:
            await self._files.settle()
        return await handler(request)


def build_app(pool: Pool, files: FileService | None = None) -> web.Application:
    """The HTTP application of the daemon: health endpoints, then the S3 API; with
    ``files`` (the mount's), requests wait for its commits behind."""
    inflight = InFlight()
    middlewares = [inflight.middleware]
    if files is not None:
        middlewares.append(AfterMountCommits(files).middleware)
    app = web.Application(
        client_max_size=1024**2,
        middlewares=middlewares,
        handler_args=S3Frontend.handler_args(),
    )
    app[POOL_KEY] = pool
    app[INFLIGHT_KEY] = inflight
    app.router.add_get("/health", _health)
    app.router.add_get("/health/ready", _ready)
    S3Frontend(
        pool.objects,
        pool.multipart,
        pool.access,
        pool.admin,
        pool.bucket_config,
        pool.cpu,
        buffers=pool.buffers,
        region=pool.config.server.region,
        domain=pool.config.server.domain,
    ).install(app)
    return app


def build_admin_app(pool: Pool, files: FileService | None = None) -> web.Application:
    """The admin API's application (its own listener, ``server.admin_host:admin_port``);
    with ``files``, requests wait for the mount's commits behind like S3's."""
    middlewares = [AfterMountCommits(files).middleware] if files is not None else []
    app = web.Application(client_max_size=1024**2, middlewares=middlewares)
    app[POOL_KEY] = pool
    app.router.add_get("/health", _health)
    app.router.add_get("/health/ready", _ready)
    token = pool.config.server.admin_token
    AdminApi(pool.admin, pool.keys, token=token.get_secret_value() if token else None).install(app)
    return app


def _start_workers(
    pool: Pool, stop: asyncio.Event, *, background: bool = True
) -> list[asyncio.Task[None]]:
    """Workers stopped by ``stop``: the health check and usage flushing in every mode
    (circuit breakers and usage counts are per process), and with ``background``
    (``worker``/``all`` mode) GC, the janitor, replication and the replication scan."""
    from appliance.services.workers import UsageFlusher, run_forever

    health = pool.config.pool.health
    specs: list[tuple[str, Callable[[], Awaitable[int]], float]] = [
        ("health", pool.health.run_once, health.check_interval),
        ("usage", UsageFlusher(pool.meter).run_once, 10.0),
    ]
    if background:
        specs += [
            ("gc", pool.gc.run_once, 5.0),
            ("janitor", pool.janitor.run_once, 60.0),
            ("replication", pool.replication.run_once, 2.0),
            ("replication-scan", pool.scanner.run_once, pool.config.pool.replication.scan_interval),
        ]
        if pool.sweeper is not None:
            sweep = min(300.0, max(5.0, pool.config.pool.gc_delay_seconds / 4))
            specs.append(("tombstones", pool.sweeper.run_once, sweep))
    return [
        asyncio.create_task(run_forever(name, step, interval=interval, stop=stop), name=name)
        for name, step, interval in specs
    ]


async def _start_mount(
    pool: Pool, files: FileService, mount: MountRequest, stop: asyncio.Event
) -> asyncio.Task[None]:
    """Recover the spool, then mount; the task ends when unmounted (and sets ``stop``)."""
    from frontends.fuse.mount import MountOptions, run_mount

    files.prepare()
    for item in await files.recover():
        if item.committed_as is None:
            log.error("spool recovery: %s/%s: %s", item.bucket, item.key, item.detail)
    options = MountOptions(
        bucket=mount.bucket,
        attr_timeout=pool.config.mount.attr_timeout,
        entry_timeout=pool.config.mount.entry_timeout,
        allow_other=pool.config.mount.allow_other,
        read_ahead_kb=pool.config.mount.read_ahead_kb,
    )

    async def serve_mount() -> None:
        try:
            await run_mount(files, mount.path, options, stop)
        finally:
            stop.set()

    if mount.bucket is not None and await pool.store.get_bucket(mount.bucket) is None:
        raise MountFailed(f"bucket {mount.bucket!r} does not exist")
    task = asyncio.create_task(serve_mount(), name="fuse")
    await asyncio.sleep(0)
    return task


async def _run(config: CairnConfig, mode: str, mount: MountRequest | None = None) -> int:
    pool = await open_pool(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    files = (
        make_file_service(pool, write_back=config.mount.write_back) if mount is not None else None
    )
    app = build_app(pool, files)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=30)
    admin_runner = web.AppRunner(build_admin_app(pool, files), handle_signals=False)
    workers: list[asyncio.Task[None]] = []
    fuse: asyncio.Task[None] | None = None
    try:
        workers = _start_workers(pool, stop, background=mode in ("worker", "all", "mount"))
        if mount is not None and files is not None:
            fuse = await _start_mount(pool, files, mount, stop)
        if mode == "mount":
            log.info("cairn: the pool is mounted at %s", mount.path if mount else "?")
        elif mode in ("api", "all"):
            await runner.setup()
            site = web.TCPSite(runner, config.server.host, config.server.port)
            await site.start()
            await admin_runner.setup()
            server = config.server
            await web.TCPSite(admin_runner, server.admin_host, server.admin_port).start()
            log.info(
                "cairn (%s mode) serving S3 on http://%s:%d, the admin API on http://%s:%d",
                mode,
                server.host,
                server.port,
                server.admin_host,
                server.admin_port,
            )
        else:
            log.info("cairn (worker mode) running background workers")
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
        # Stop accepting first, then let requests in flight finish (bodies included):
        # aiohttp's cleanup alone would stop reading the bodies of uploads in progress.
        for listener in list(runner.sites):
            await listener.stop()
        try:
            await asyncio.wait_for(app[INFLIGHT_KEY].idle.wait(), SHUTDOWN_GRACE)
        except TimeoutError:
            log.warning(
                "%d requests still running after %d s; closing them",
                app[INFLIGHT_KEY].count,
                SHUTDOWN_GRACE,
            )
    finally:
        stop.set()
        if fuse is not None:
            await asyncio.gather(fuse, return_exceptions=True)
        await runner.cleanup()
        await admin_runner.cleanup()
        await asyncio.gather(*workers, return_exceptions=True)
        await pool.close()
    if fuse is not None and fuse.done() and not fuse.cancelled() and fuse.exception():
        raise MountFailed(str(fuse.exception()))
    return 0


def _return_big_buffers_to_the_os() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap.

    Chunk buffers are megabytes each; glibc's default raises its mmap threshold after
    the first such buffer is freed and then keeps later ones in per-thread heaps that
    never shrink, so the daemon's RSS ratchets up with every transfer (measured: peak
    RSS 270-345 MiB over a 1 GiB upload and download, 143-156 MiB with this).
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def serve(config: CairnConfig, *, mode: str, mount: Path | None, bucket: str | None = None) -> int:
    """Run the daemon until a stop signal; return the process exit code.

    ``mode`` ``mount`` (``cairn mount``) runs the core, the workers and the FUSE mount
    without an HTTP listener. A mount that cannot be made exits with code 2."""
    _return_big_buffers_to_the_os()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    request = None
    if mount is not None:
        from frontends.fuse.mount import FuseUnavailable, check_available

        try:
            check_available(mount)
        except FuseUnavailable as exc:
            log.error("cannot mount: %s", exc)
            return 2
        request = MountRequest(mount, bucket)
    try:
        return asyncio.run(_run(config, mode, request))
    except MountFailed as exc:
        log.error("cannot mount: %s", exc)
        return 2
    except MetaError as exc:
        log.error("metadata store: %s", exc)
        return 1
    except KeyUnavailable as exc:
        log.error("master key: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
