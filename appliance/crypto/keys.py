"""Master keys that wrap data keys: local (inline base64 or a file) and Vault Transit.

A ``KeyRing`` holds the current master key (new data keys are wrapped by it) and the
retired ones listed under ``previous_keys`` (still able to unwrap). Every wrapped data
key is stored with the id of the master key that wrapped it:

- local keys: ``local:<16 hex>``, the first 64 bits of HMAC-SHA256(key, "cairn key id"),
  so the id names the key without revealing it; wrapping is AES-256-GCM with a random
  nonce and the key id as AAD (``nonce || ciphertext || tag``).
- Vault Transit: ``vault:<mount>/<key>:v<N>``; the wrapped bytes are Vault's
  ``vault:vN:...`` ciphertext. Vault keeps its old key versions, so one source covers
  every version of its key; ``rewrap`` keeps the data key inside Vault.

Errors: ``KeyUnavailable`` (no configured key has that id, or Vault cannot be reached or
refuses) and ``aead.AuthenticationFailed`` (a wrapped key is damaged).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.crypto.aead import NONCE_SIZE, AuthenticationFailed
from appliance.errors import KeyUnavailable

__all__ = ["KeyRing", "KeySource", "KeyUnavailable", "LocalKey", "VaultTransitKey"]


class KeySource(Protocol):
    """One master key (for Vault: every version of one Transit key)."""

    @property
    def current_id(self) -> str:
        """Key id that ``wrap`` uses now."""
        ...

    def owns(self, key_id: str) -> bool:
        """True when this source can unwrap data keys wrapped under ``key_id``."""
        ...

    async def open(self) -> None:
        """Prepare (Vault: learn the current key version). Raises ``KeyUnavailable``."""
        ...

    async def close(self) -> None: ...

    async def wrap(self, plaintext: bytes) -> tuple[bytes, str]:
        """Wrap ``plaintext``; returns the wrapped bytes and the key id used."""
        ...

    async def unwrap(self, wrapped: bytes, key_id: str) -> bytes: ...

    async def rewrap(self, wrapped: bytes, key_id: str) -> tuple[bytes, str]:
        """Wrap again under ``current_id`` (for a key id this source owns)."""
        ...


# --------------------------------------------------------------------------- local


def local_key_id(key: bytes) -> str:
    return "local:" + hmac.new(key, b"cairn key id", hashlib.sha256).hexdigest()[:16]


def decode_key(text: str, *, what: str) -> bytes:
    """A 32-byte key from base64 text (whitespace ignored); ``ValueError`` otherwise."""
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid base64") from exc
    if len(raw) != 32:
        raise ValueError(f"{what} must be 32 bytes (base64 of 256 bits), got {len(raw)} bytes")
    return raw


def read_key_file(path: Path) -> bytes:
    """A key file holds 32 raw bytes or their base64. Raises ``ValueError``/``OSError``."""
    raw = path.read_bytes()
    if len(raw) == 32:
        return raw
    return decode_key(raw.decode("ascii", "replace"), what=f"key file {path}")


class LocalKey:
    """A 256-bit master key held in memory (from inline base64 or a key file)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a master key is 32 bytes")
        self._aead = AESGCM(key)
        self._id = local_key_id(key)

    @property
    def current_id(self) -> str:
        return self._id

    def owns(self, key_id: str) -> bool:
        return key_id == self._id

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def wrap(self, plaintext: bytes) -> tuple[bytes, str]:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, self._id.encode()), self._id

    async def unwrap(self, wrapped: bytes, key_id: str) -> bytes:
        if key_id != self._id:
            raise KeyUnavailable(f"master key {key_id} is not this key")
        try:
            return self._aead.decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], key_id.encode())
        except InvalidTag as exc:
            raise AuthenticationFailed(f"wrapped data key under {key_id} is damaged") from exc

    async def rewrap(self, wrapped: bytes, key_id: str) -> tuple[bytes, str]:
        return await self.wrap(await self.unwrap(wrapped, key_id))

    def __repr__(self) -> str:
        return f"LocalKey({self._id})"


# --------------------------------------------------------------------------- vault

_VAULT_CIPHERTEXT = re.compile(r"vault:v([0-9]+):")


class VaultTransitKey:
    """A Vault Transit key used through its HTTP API (``encrypt``, ``decrypt``,
    ``rewrap``, ``keys/<key>/rotate``) with a token, or a token file read again when
    Vault answers 403 (so a rotated token is picked up)."""

    def __init__(
        self,
        address: str,
        key_name: str,
        *,
        mount: str = "transit",
        token: str | None = None,
        token_file: Path | None = None,
        namespace: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if (token is None) == (token_file is None):
            raise ValueError("give exactly one of token and token_file")
        self._base = f"{address.rstrip('/')}/v1/{mount.strip('/')}"
        self._key = key_name
        self._prefix = f"vault:{mount.strip('/')}/{key_name}:v"
        self._token = token
        self._token_file = token_file
        self._namespace = namespace
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._version = 0

    @property
    def current_id(self) -> str:
        if not self._version:
            raise KeyUnavailable("the Vault key source is not open")
        return f"{self._prefix}{self._version}"

    def owns(self, key_id: str) -> bool:
        return key_id.startswith(self._prefix)

    async def open(self) -> None:
        """Learn the key's current version by wrapping a probe."""
        await self.wrap(b"cairn-probe")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _read_token(self) -> str:
        if self._token is not None:
            return self._token
        assert self._token_file is not None
        try:
            return self._token_file.read_text().strip()
        except OSError as exc:
            raise KeyUnavailable(f"cannot read the Vault token file: {exc}") from exc

    async def _call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        for attempt in (1, 2):
            headers = {"X-Vault-Token": self._read_token()}
            if self._namespace:
                headers["X-Vault-Namespace"] = self._namespace
            try:
                async with self._session.post(
                    f"{self._base}/{path}", json=payload, headers=headers
                ) as resp:
                    if resp.status == 403 and attempt == 1 and self._token_file is not None:
                        continue  # the token may have been renewed on disk
                    if resp.status >= 400:
                        text = (await resp.text())[:300]
                        raise KeyUnavailable(f"Vault {path}: HTTP {resp.status}: {text}")
                    if resp.status == 204:
                        return {}
                    body = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise KeyUnavailable(f"Vault {path}: {exc}") from exc
            data = body.get("data") if isinstance(body, dict) else None
            return data if isinstance(data, dict) else {}
        raise KeyUnavailable(f"Vault {path}: HTTP 403 (permission denied)")

    def _note(self, ciphertext: str) -> tuple[bytes, str]:
        match = _VAULT_CIPHERTEXT.match(ciphertext)
        if match is None:
            raise KeyUnavailable("Vault returned a ciphertext in an unknown form")
        self._version = max(self._version, int(match.group(1)))
        return ciphertext.encode(), f"{self._prefix}{match.group(1)}"

    async def wrap(self, plaintext: bytes) -> tuple[bytes, str]:
        data = await self._call(
            f"encrypt/{self._key}", {"plaintext": base64.b64encode(plaintext).decode()}
        )
        return self._note(str(data.get("ciphertext", "")))

    async def unwrap(self, wrapped: bytes, key_id: str) -> bytes:
        if not self.owns(key_id):
            raise KeyUnavailable(f"master key {key_id} is not this Vault key")
        try:
            data = await self._call(f"decrypt/{self._key}", {"ciphertext": wrapped.decode()})
            return base64.b64decode(str(data["plaintext"]))
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise AuthenticationFailed(f"Vault could not unwrap a data key: {exc}") from exc

    async def rewrap(self, wrapped: bytes, key_id: str) -> tuple[bytes, str]:
        if not self.owns(key_id):
            raise KeyUnavailable(f"master key {key_id} is not this Vault key")
        data = await self._call(f"rewrap/{self._key}", {"ciphertext": wrapped.decode()})
        return self._note(str(data.get("ciphertext", "")))

    async def rewrap_batch(self, items: Sequence[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
        """Rewrap many data keys in one Transit call (``batch_input``); results in order.
        Raises ``KeyUnavailable`` when Vault refuses the call or any item."""
        for _wrapped, key_id in items:
            if not self.owns(key_id):
                raise KeyUnavailable(f"master key {key_id} is not this Vault key")
        data = await self._call(
            f"rewrap/{self._key}",
            {"batch_input": [{"ciphertext": wrapped.decode()} for wrapped, _ in items]},
        )
        results = data.get("batch_results")
        if not isinstance(results, list) or len(results) != len(items):
            raise KeyUnavailable("Vault rewrap: batch answer does not match the request")
        out = []
        for result in results:
            if not isinstance(result, dict) or result.get("error"):
                error = result.get("error") if isinstance(result, dict) else result
                raise KeyUnavailable(f"Vault rewrap: {error}")
            out.append(self._note(str(result.get("ciphertext", ""))))
        return out

    async def rotate(self) -> str:
        """Ask Vault for a new key version; returns the new current key id."""
        await self._call(f"keys/{self._key}/rotate", {})
        await self.open()
        return self.current_id

    def __repr__(self) -> str:
        return f"VaultTransitKey({self._prefix}*)"


# --------------------------------------------------------------------------- ring


class KeyRing:
    """The current master key and the retired ones that can still unwrap."""

    def __init__(self, current: KeySource, previous: Sequence[KeySource] = ()) -> None:
        self.current = current
        self._all = [current, *previous]

    @property
    def current_id(self) -> str:
        return self.current.current_id

    def key_ids(self) -> list[str]:
        """Ids of the configured keys (Vault: its current version)."""
        return [source.current_id for source in self._all]

    async def open(self) -> None:
        """Open every source; raises ``KeyUnavailable`` (after closing them)."""
        try:
            for source in self._all:
                await source.open()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for source in self._all:
            await source.close()

    def _source(self, key_id: str) -> KeySource:
        for source in self._all:
            if source.owns(key_id):
                return source
        raise KeyUnavailable(
            f"no configured master key has id {key_id} (is it missing from previous_keys?)"
        )

    async def wrap(self, plaintext: bytes) -> tuple[bytes, str]:
        return await self.current.wrap(plaintext)

    async def unwrap(self, wrapped: bytes, key_id: str) -> bytes:
        return await self._source(key_id).unwrap(wrapped, key_id)

    async def rewrap(self, wrapped: bytes, key_id: str) -> tuple[bytes, str]:
        """Wrap under the current key: inside Vault when the same Vault key holds it,
        otherwise unwrap with the old source and wrap with the current one."""
        if self.current.owns(key_id):
            return await self.current.rewrap(wrapped, key_id)
        return await self.current.wrap(await self.unwrap(wrapped, key_id))

    async def rewrap_many(
        self, items: Sequence[tuple[bytes, str]], *, concurrency: int = 8
    ) -> list[tuple[bytes, str]]:
        """``rewrap`` for many keys, in order: one Transit batch call when the current
        key is a Vault key holding them all, else ``concurrency`` at a time."""
        if not items:
            return []
        current = self.current
        if isinstance(current, VaultTransitKey) and all(current.owns(k) for _, k in items):
            return await current.rewrap_batch(items)
        slots = asyncio.Semaphore(max(1, concurrency))

        async def one(wrapped: bytes, key_id: str) -> tuple[bytes, str]:
            async with slots:
                return await self.rewrap(wrapped, key_id)

        return list(await asyncio.gather(*(one(w, k) for w, k in items)))

    async def rotate_current(self) -> str:
        """For a Vault current key, ask Vault for a new version; returns the current
        key id (local keys cannot rotate themselves: change the config instead)."""
        if isinstance(self.current, VaultTransitKey):
            return await self.current.rotate()
        return self.current_id
