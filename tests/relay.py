"""A TCP relay tests can switch off and on: a provider or database that goes away
(connections refused and cut) and comes back with its data."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.fixtures_moto import free_port


class Switch:
    """A TCP relay on a fixed 127.0.0.1 port to ``target``; ``off`` closes the listener
    and cuts every connection (connections are refused), ``on`` listens again."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self._target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> Switch:
        self._thread.start()
        self.on()
        return self

    def __exit__(self, *exc: object) -> None:
        self.off()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def on(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        self._call(start())

    def off(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._conns):
                writer.transport.abort()
            self._conns.clear()

        self._call(stop())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self._conns |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(256 * 1024):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._conns -= {writer, up_writer}


@contextlib.contextmanager
def relayed_dsn(dsn: str) -> Iterator[tuple[Switch, str]]:
    """A relay to the PostgreSQL server of ``dsn``, and a DSN that goes through it."""
    parts = urlsplit(dsn)
    with Switch(parts.port or 5432) as switch:
        userinfo, at, _ = parts.netloc.rpartition("@")
        host = f"127.0.0.1:{switch.port}"
        yield switch, urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}"))
