"""A small HashiCorp Vault Transit server for tests (Vault itself is not installable here).

Implements the endpoints Cairn uses, with Vault's request and answer shapes:
``POST /v1/<mount>/encrypt/<key>``, ``decrypt/<key>``, ``rewrap/<key>`` and
``keys/<key>/rotate``; versioned keys (ciphertexts ``vault:v<N>:<base64>``), the
``X-Vault-Token`` header (403 ``permission denied`` otherwise) and ``min_decryption_version``.
``rewrap`` also takes ``batch_input`` (answering ``batch_results``, an ``error`` per failed
item). Keys are created on first encrypt. It counts calls per endpoint (and rewrapped
items) and can be told to fail (``down``).
"""

from __future__ import annotations

import base64
import os
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_CIPHERTEXT = re.compile(r"vault:v([0-9]+):(.+)")


@dataclass
class VaultTransitServer:
    """State of the fake server: tokens accepted, keys by name (versions from 1)."""

    tokens: set[str] = field(default_factory=lambda: {"root-token"})
    mount: str = "transit"
    keys: dict[str, list[bytes]] = field(default_factory=dict)
    min_decryption_version: dict[str, int] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    down: bool = False
    address: str = ""

    def rotate(self, name: str) -> int:
        self.keys.setdefault(name, []).append(AESGCM.generate_key(bit_length=256))
        return len(self.keys[name])

    def _encrypt(self, name: str, plaintext: bytes) -> tuple[str, int]:
        versions = self.keys.setdefault(name, [])
        if not versions:
            self.rotate(name)
        version = len(versions)
        nonce = os.urandom(12)
        ct = AESGCM(versions[-1]).encrypt(nonce, plaintext, None)
        return f"vault:v{version}:{base64.b64encode(nonce + ct).decode()}", version

    def _decrypt(self, name: str, ciphertext: str) -> bytes:
        match = _CIPHERTEXT.fullmatch(ciphertext)
        versions = self.keys.get(name, [])
        if match is None:
            raise web.HTTPBadRequest(text='{"errors":["invalid ciphertext"]}')
        version = int(match.group(1))
        if not 1 <= version <= len(versions) or version < self.min_decryption_version.get(name, 1):
            raise web.HTTPBadRequest(text='{"errors":["invalid key version"]}')
        try:
            raw = base64.b64decode(match.group(2))
            return AESGCM(versions[version - 1]).decrypt(raw[:12], raw[12:], None)
        except (InvalidTag, ValueError):
            raise web.HTTPBadRequest(
                text='{"errors":["cipher: message authentication failed"]}'
            ) from None

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            if self.down:
                return web.json_response({"errors": ["Vault is sealed"]}, status=503)
            if request.headers.get("X-Vault-Token") not in self.tokens:
                return web.json_response({"errors": ["permission denied"]}, status=403)
            if request.match_info["mount"] != self.mount:
                return web.json_response({"errors": ["no handler for route"]}, status=404)
            op, name = request.match_info["op"], request.match_info["name"]
            body = await request.json() if request.can_read_body else {}
            self.calls[op] += 1
            if op == "encrypt":
                ciphertext, version = self._encrypt(name, base64.b64decode(body["plaintext"]))
                return web.json_response(
                    {"data": {"ciphertext": ciphertext, "key_version": version}}
                )
            if op == "decrypt":
                plaintext = self._decrypt(name, body["ciphertext"])
                return web.json_response(
                    {"data": {"plaintext": base64.b64encode(plaintext).decode()}}
                )
            if op == "rewrap" and "batch_input" in body:
                self.calls["rewrap_items"] += len(body["batch_input"])
                results = []
                for item in body["batch_input"]:
                    try:
                        ciphertext, version = self._encrypt(
                            name, self._decrypt(name, item["ciphertext"])
                        )
                        results.append({"ciphertext": ciphertext, "key_version": version})
                    except web.HTTPBadRequest as exc:
                        results.append({"error": exc.text or "bad ciphertext"})
                return web.json_response({"data": {"batch_results": results}})
            if op == "rewrap":
                self.calls["rewrap_items"] += 1
                plaintext = self._decrypt(name, body["ciphertext"])
                ciphertext, version = self._encrypt(name, plaintext)
                return web.json_response(
                    {"data": {"ciphertext": ciphertext, "key_version": version}}
                )
            return web.json_response({"errors": ["unsupported path"]}, status=405)

        async def rotate(request: web.Request) -> web.Response:
            if request.headers.get("X-Vault-Token") not in self.tokens:
                return web.json_response({"errors": ["permission denied"]}, status=403)
            self.calls["rotate"] += 1
            self.rotate(request.match_info["name"])
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/v1/{mount}/keys/{name}/rotate", rotate)
        app.router.add_post("/v1/{mount}/{op:encrypt|decrypt|rewrap}/{name}", handle)
        return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def vault() -> AsyncIterator[VaultTransitServer]:
    """A running fake Vault Transit on 127.0.0.1, stopped after the test."""
    server = VaultTransitServer()
    runner = web.AppRunner(server.app())
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server.address = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()
