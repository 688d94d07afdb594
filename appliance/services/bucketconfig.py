"""Per-bucket settings that protocols attach to a bucket (today: the S3 CORS rules).

Each is an opaque text (the frontend owns its format) kept in the metadata store's
settings under ``bucket:<name>:<what>``, cached for ``ttl`` seconds so a request costs no
database round trip; a change made here is seen at once by this instance and within
``ttl`` by others. Deleting a bucket through ``AdminService`` drops them.
"""

from __future__ import annotations

from cachetools import TTLCache

from appliance.errors import NoSuchBucket
from appliance.meta.store import MetadataStore

CORS = "cors"
KINDS = (CORS,)


def setting_name(bucket: str, what: str) -> str:
    return f"bucket:{bucket}:{what}"


class BucketConfigService:
    """Reads and writes per-bucket settings (idempotent writes; "" means none)."""

    def __init__(self, store: MetadataStore, *, ttl: float = 5.0, max_entries: int = 10_000):
        self._store = store
        self._cache: TTLCache[str, str] = TTLCache(maxsize=max_entries, ttl=ttl)

    async def get(self, bucket: str, what: str) -> str:
        """The setting's text, "" when unset (no check that the bucket exists)."""
        name = setting_name(bucket, what)
        if name in self._cache:
            return self._cache[name]
        value = await self._store.get_setting(name) or ""
        self._cache[name] = value
        return value

    async def set(self, bucket: str, what: str, value: str) -> None:
        """Set (or with "" clear) a setting of an existing bucket. Raises ``NoSuchBucket``."""
        if await self._store.get_bucket(bucket) is None:
            raise NoSuchBucket(bucket)
        name = setting_name(bucket, what)
        await self._store.set_setting(name, value)
        self._cache[name] = value

    async def forget_bucket(self, bucket: str) -> None:
        """Clear every setting of a bucket (after it was deleted)."""
        for what in KINDS:
            name = setting_name(bucket, what)
            await self._store.set_setting(name, "")
            self._cache.pop(name, None)
