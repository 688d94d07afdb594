"""The daemon: opens the core and serves its HTTP endpoints until SIGTERM/SIGINT.

Today it serves ``/health`` (the process is up) and ``/health/ready`` (the metadata
store answers and every backend can be listed); the S3 API, admin API, workers and
the FUSE mount are wired here as they land.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from appliance.build import Pool, open_pool
from appliance.config import CairnConfig
from appliance.meta.errors import MetaError
from backends.errors import BackendError

log = logging.getLogger("cairn.daemon")
POOL_KEY = web.AppKey("pool", Pool)


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


def build_app(pool: Pool) -> web.Application:
    """The HTTP application of the daemon."""
    app = web.Application()
    app[POOL_KEY] = pool
    app.router.add_get("/health", _health)
    app.router.add_get("/health/ready", _ready)
    return app


async def _run(config: CairnConfig, mode: str) -> int:
    pool = await open_pool(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build_app(pool), handle_signals=False)
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        log.info(
            "cairn %s mode listening on http://%s:%d (health endpoints; S3 API not yet served)",
            mode,
            config.server.host,
            config.server.port,
        )
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
        await pool.close()
    return 0


def serve(config: CairnConfig, *, mode: str, mount: Path | None) -> int:
    """Run the daemon until a stop signal; return the process exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if mount is not None:
        log.error("the FUSE mount is not available in this version")
        return 2
    try:
        return asyncio.run(_run(config, mode))
    except MetaError as exc:
        log.error("metadata store: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
