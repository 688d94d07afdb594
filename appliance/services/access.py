"""AccessService: who may do what in which bucket (credentials and grants).

Secrets and grants are read from the metadata store and cached for ``ttl`` seconds, so
an authenticated request costs no database round trip; a credential changed through
the admin API takes effect within ``ttl``.
"""

from __future__ import annotations

import dataclasses
import logging

from cachetools import TTLCache

from appliance.meta.models import Credential, Permission
from appliance.meta.store import MetadataStore
from appliance.services.sealing import SealBroken, SecretSealer

log = logging.getLogger("cairn.access")

WILDCARD = "*"


class AccessService:
    """Looks up credentials and checks per-bucket permissions."""

    def __init__(
        self,
        store: MetadataStore,
        sealer: SecretSealer,
        *,
        ttl: float = 5.0,
        max_entries: int = 10_000,
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._cache: TTLCache[str, Credential | None] = TTLCache(maxsize=max_entries, ttl=ttl)

    async def credential(self, access_key: str) -> Credential | None:
        """The credential for ``access_key`` with its secret opened, or None when there is
        none (or its sealed secret does not open, which is logged)."""
        if access_key in self._cache:
            return self._cache[access_key]
        found = await self._store.get_credential(access_key)
        if found is not None:
            try:
                found = dataclasses.replace(
                    found, secret=self._sealer.open(access_key, found.secret)
                )
            except SealBroken as exc:
                log.error("%s; requests with this key are refused", exc)
                found = None
        self._cache[access_key] = found
        return found

    async def secret_for(self, access_key: str) -> str | None:
        found = await self.credential(access_key)
        return None if found is None else found.secret

    @staticmethod
    def allows(credential: Credential, bucket: str, permission: Permission) -> bool:
        """True when ``credential`` holds ``permission`` (or ``admin``) on ``bucket``."""
        for scope in (bucket, WILDCARD):
            granted = credential.grants.get(scope, frozenset())
            if permission in granted or Permission.ADMIN in granted:
                return True
        return False

    @staticmethod
    def visible_buckets(credential: Credential, names: list[str]) -> list[str]:
        """The bucket names a credential may see in ListBuckets."""
        if WILDCARD in credential.grants:
            return names
        return [name for name in names if name in credential.grants]

    def forget(self, access_key: str | None = None) -> None:
        """Drop cached entries (one, or all) after credentials change."""
        if access_key is None:
            self._cache.clear()
        else:
            self._cache.pop(access_key, None)
