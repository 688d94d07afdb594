"""Sealing of S3 secret keys at rest (issue 4).

SigV4 needs the plaintext secret to check a signature, so secrets cannot be hashed;
they are encrypted instead: AES-256-GCM under a key derived (HKDF-SHA256) from the pool
secret, with the access key as associated data so a sealed secret copied onto another
key's row does not open. Sealed values look like ``sealed:v1:<base64(nonce|ciphertext)>``;
a value without that prefix is a secret written before sealing existed and is read as
is (and sealed again the next time it is written).
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEALED_PREFIX = "sealed:v1:"
_NONCE = 12


class SealBroken(Exception):
    """A sealed secret does not open: wrong pool secret, or the row was tampered with."""


class SecretSealer:
    """Seals and opens credential secrets with a key derived from the pool secret."""

    def __init__(self, pool_secret: str) -> None:
        if not pool_secret:
            raise ValueError("the pool secret is empty")
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"cairn credential seal v1"
        ).derive(pool_secret.encode())
        self._aead = AESGCM(key)

    def seal(self, access_key: str, secret: str) -> str:
        """The stored form of ``secret`` (a fresh nonce each time)."""
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, secret.encode(), _aad(access_key))
        return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode()

    def open(self, access_key: str, stored: str) -> str:
        """The plaintext secret. Raises ``SealBroken`` when it does not open."""
        if not stored.startswith(SEALED_PREFIX):
            return stored
        try:
            raw = base64.b64decode(stored[len(SEALED_PREFIX) :], validate=True)
            plain = self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], _aad(access_key))
        except (ValueError, InvalidTag) as exc:
            raise SealBroken(f"the secret of access key {access_key!r} does not open") from exc
        return plain.decode()

    @staticmethod
    def is_sealed(stored: str) -> bool:
        return stored.startswith(SEALED_PREFIX)


def _aad(access_key: str) -> bytes:
    return b"cairn-credential:" + access_key.encode()
