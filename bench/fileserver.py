"""A plain aiohttp file server: the "direct to a local directory" baseline of the benches.

PUT /<key> streams the body into <root>/<key>; GET /<key> streams the file back. No auth,
no checksums: the least work an HTTP front to a directory can do.

    python bench/fileserver.py ROOT PORT
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from aiohttp import web

PIECE = 1024 * 1024


def make_app(root: Path) -> web.Application:
    async def put(request: web.Request) -> web.Response:
        path = root / request.match_info["key"].replace("/", "_")
        with path.open("wb") as out:
            async for piece in request.content.iter_chunked(PIECE):
                await asyncio.to_thread(out.write, piece)
        return web.Response(status=200)

    async def get(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["key"].replace("/", "_")
        if not path.exists():
            return web.Response(status=404)
        response = web.StreamResponse(headers={"Content-Length": str(path.stat().st_size)})
        await response.prepare(request)
        with path.open("rb") as src:
            while piece := await asyncio.to_thread(src.read, PIECE):
                await response.write(piece)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=1 << 40)
    app.router.add_put("/{key:.*}", put)
    app.router.add_get("/{key:.*}", get)
    return app


if __name__ == "__main__":
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    os.nice(0)
    web.run_app(make_app(root), host="127.0.0.1", port=int(sys.argv[2]), access_log=None)
