"""AdminService: buckets and access keys, as the admin API and ``cairn admin`` see them.

Secrets are generated here (``secrets`` module), sealed before they reach the store and
returned in plaintext only by the call that made them (create, rotate). Every change
drops the AccessService's cached entry, so it takes effect on this instance at once and
on other instances within the access cache's TTL.
"""

from __future__ import annotations

import dataclasses
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from appliance.clock import utcnow
from appliance.errors import (
    AccessKeyExists,
    BucketExists,
    BucketNotEmpty,
    InvalidArgument,
    InvalidBucketName,
    NoSuchAccessKey,
    NoSuchBucket,
)
from appliance.meta import errors as meta_errors
from appliance.meta.models import Bucket, Credential, Permission, QueueItem
from appliance.meta.store import GC_QUEUE, REPLICATE_QUEUE, MetadataStore
from appliance.names import BUCKET_NAME_RULE, is_valid_bucket_name
from appliance.placement.health import BreakerStatus
from appliance.placement.pool import PoolState
from appliance.placement.router import BackendView
from appliance.services.access import WILDCARD, AccessService
from appliance.services.bucketconfig import BucketConfigService
from appliance.services.fsck import Fsck, FsckReport
from appliance.services.sealing import SealBroken, SecretSealer

ACCESS_KEY_ALPHABET = string.ascii_uppercase + string.digits
SECRET_ALPHABET = string.ascii_letters + string.digits
ACCESS_KEY_LENGTH = 20
SECRET_LENGTH = 40
MIN_ACCESS_KEY, MAX_ACCESS_KEY = 16, 128
MIN_SECRET = 16

Grants = Mapping[str, frozenset[Permission]]

QUEUES = (GC_QUEUE, REPLICATE_QUEUE)
"""The background queues the admin API shows: blob deletes (GC) and replication/repair."""


@dataclass(frozen=True, slots=True)
class BucketInfo:
    name: str
    created_at: datetime
    objects: int
    bytes: int


@dataclass(frozen=True, slots=True)
class AccessKeyInfo:
    """An access key as listed: never its secret."""

    access_key: str
    description: str
    created_at: datetime
    grants: Grants


@dataclass(frozen=True, slots=True)
class NewSecret:
    """The plaintext secret of a key just made or rotated: shown once, never stored plain."""

    access_key: str
    secret_key: str


class AdminService:
    """Creates, lists, changes and deletes buckets and access keys."""

    def __init__(
        self,
        store: MetadataStore,
        access: AccessService,
        sealer: SecretSealer,
        pool: PoolState | None = None,
        bucket_config: BucketConfigService | None = None,
        fsck: Fsck | None = None,
    ) -> None:
        self._store = store
        self._access = access
        self._sealer = sealer
        self._pool = pool
        self._bucket_config = bucket_config
        self._fsck = fsck

    async def fsck(self) -> FsckReport:
        """Check the store against the backends (read-only; see ``services.fsck``).
        Raises ``InvalidArgument`` when this instance has no pool to check."""
        if self._fsck is None:
            raise InvalidArgument("no pool to check on this instance")
        return await self._fsck.run()

    # -- backends --------------------------------------------------------------------
    async def backends(self) -> list[BackendView]:
        """Each backend's state, space and what is left of its monthly caps."""
        if self._pool is None:
            return []
        self._pool.invalidate()
        return list((await self._pool.view()).backends)

    def circuit(self, name: str) -> BreakerStatus | None:
        """The circuit breaker of backend ``name`` (None without a pool or backend)."""
        if self._pool is None or name not in self._pool.names():
            return None
        return self._pool.breakers[name].status()

    # -- queues ----------------------------------------------------------------------
    async def queue(self, name: str, *, limit: int = 100) -> tuple[dict[str, int], list[QueueItem]]:
        """Items per state of a background queue and its dead-lettered items (oldest
        first). Raises ``InvalidArgument`` for an unknown queue."""
        if name not in QUEUES:
            raise InvalidArgument(f"unknown queue {name!r}: use one of {', '.join(QUEUES)}")
        return await self._store.queue_depth(name), await self._store.list_dead(name, limit)

    async def retry_dead(self, name: str, item_id: int) -> None:
        """Put a dead-lettered item of queue ``name`` back to work (attempts reset).
        Raises ``InvalidArgument`` for an unknown queue or item."""
        if name not in QUEUES:
            raise InvalidArgument(f"unknown queue {name!r}: use one of {', '.join(QUEUES)}")
        try:
            await self._store.revive(item_id)
        except meta_errors.NotFound as exc:
            raise InvalidArgument(f"no dead item {item_id} in queue {name!r}") from exc

    # -- buckets ---------------------------------------------------------------------
    async def list_buckets(self) -> list[BucketInfo]:
        usage = await self._store.all_bucket_usage()
        return [
            BucketInfo(b.name, b.created_at, *usage.get(b.name, (0, 0)))
            for b in await self._store.list_buckets()
        ]

    async def bucket(self, name: str) -> BucketInfo:
        """Raises ``NoSuchBucket``."""
        found = await self._store.get_bucket(name)
        if found is None:
            raise NoSuchBucket(name)
        return await self._info(found)

    async def create_bucket(self, name: str) -> Bucket:
        """Raises ``InvalidBucketName`` or ``BucketExists`` (not idempotent: the caller
        decides whether an existing bucket is an error)."""
        if not is_valid_bucket_name(name):
            raise InvalidBucketName(f"invalid bucket name {name!r}: use {BUCKET_NAME_RULE}")
        try:
            return await self._store.create_bucket(name)
        except meta_errors.AlreadyExists as exc:
            raise BucketExists(name) from exc

    async def delete_bucket(self, name: str) -> None:
        """Delete an empty bucket and the grants that name it.

        Raises ``NoSuchBucket`` or ``BucketNotEmpty`` (objects or multipart uploads left)."""
        try:
            await self._store.delete_bucket(name)
        except meta_errors.BucketNotEmpty as exc:
            raise BucketNotEmpty(f"bucket {name!r} still holds objects or uploads") from exc
        except meta_errors.NotFound as exc:
            raise NoSuchBucket(name) from exc
        self._access.forget()
        if self._bucket_config is not None:
            await self._bucket_config.forget_bucket(name)

    async def _info(self, bucket: Bucket) -> BucketInfo:
        count, size = await self._store.bucket_usage(bucket.name)
        return BucketInfo(bucket.name, bucket.created_at, count, size)

    # -- access keys -----------------------------------------------------------------
    async def list_keys(self) -> list[AccessKeyInfo]:
        return [_info(c) for c in await self._store.list_credentials()]

    async def key(self, access_key: str) -> AccessKeyInfo:
        """Raises ``NoSuchAccessKey``."""
        return _info(await self._get(access_key))

    async def create_key(
        self,
        grants: Grants,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        description: str = "",
    ) -> NewSecret:
        """Make a key (generated unless given). Raises ``AccessKeyExists`` or
        ``InvalidArgument`` (malformed key, short secret, bad bucket name in grants)."""
        access_key = access_key or _random(ACCESS_KEY_ALPHABET, ACCESS_KEY_LENGTH)
        secret_key = secret_key or _random(SECRET_ALPHABET, SECRET_LENGTH)
        _check_key(access_key, secret_key)
        _check_grants(grants)
        if await self._store.get_credential(access_key) is not None:
            raise AccessKeyExists(access_key)
        await self._store.put_credential(
            Credential(
                access_key=access_key,
                secret=self._sealer.seal(access_key, secret_key),
                created_at=utcnow(),
                description=description,
                grants=dict(grants),
            )
        )
        self._access.forget(access_key)
        return NewSecret(access_key, secret_key)

    async def rotate_secret(self, access_key: str, *, secret_key: str | None = None) -> NewSecret:
        """Give the key a new secret; the old one stops working. Raises ``NoSuchAccessKey``."""
        current = await self._get(access_key)
        secret_key = secret_key or _random(SECRET_ALPHABET, SECRET_LENGTH)
        _check_key(access_key, secret_key)
        await self._store.put_credential(
            dataclasses.replace(current, secret=self._sealer.seal(access_key, secret_key))
        )
        self._access.forget(access_key)
        return NewSecret(access_key, secret_key)

    async def set_grants(self, access_key: str, grants: Grants) -> AccessKeyInfo:
        """Replace the key's grants. Raises ``NoSuchAccessKey`` or ``InvalidArgument``."""
        _check_grants(grants)
        current = await self._get(access_key)
        updated = dataclasses.replace(current, grants=dict(grants))
        await self._store.put_credential(updated)
        self._access.forget(access_key)
        return _info(updated)

    async def delete_key(self, access_key: str) -> None:
        """Raises ``NoSuchAccessKey``."""
        await self._get(access_key)
        await self._store.delete_credential(access_key)
        self._access.forget(access_key)

    async def ensure_key(
        self, access_key: str, secret_key: str, grants: Grants, description: str
    ) -> None:
        """Create or update a key from the configuration (idempotent): the secret and the
        buckets named here are set, grants on other buckets are kept."""
        _check_key(access_key, secret_key)
        _check_grants(grants)
        existing = await self._store.get_credential(access_key)
        merged = dict(existing.grants) if existing else {}
        merged.update(grants)
        secret = self._sealer.seal(access_key, secret_key)
        if existing is not None:
            try:
                if self._sealer.open(access_key, existing.secret) == secret_key:
                    secret = existing.secret  # unchanged: keep the row as it is
            except SealBroken:
                pass  # replaced by the configured secret
        await self._store.put_credential(
            Credential(
                access_key=access_key,
                secret=secret,
                created_at=existing.created_at if existing else utcnow(),
                description=description,
                grants=merged,
            )
        )
        self._access.forget(access_key)

    async def _get(self, access_key: str) -> Credential:
        found = await self._store.get_credential(access_key)
        if found is None:
            raise NoSuchAccessKey(access_key)
        return found


def _random(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _check_key(access_key: str, secret_key: str) -> None:
    if not (
        MIN_ACCESS_KEY <= len(access_key) <= MAX_ACCESS_KEY
        and access_key.isascii()
        and access_key.isalnum()
    ):
        raise InvalidArgument(
            f"access key must be {MIN_ACCESS_KEY}-{MAX_ACCESS_KEY} letters and digits"
        )
    if len(secret_key) < MIN_SECRET or not secret_key.isascii() or not secret_key.isprintable():
        raise InvalidArgument(
            f"secret key must be at least {MIN_SECRET} printable ASCII characters"
        )


def _check_grants(grants: Grants) -> None:
    for bucket, permissions in grants.items():
        if bucket != WILDCARD and not is_valid_bucket_name(bucket):
            raise InvalidArgument(f"grant on invalid bucket name {bucket!r} (a bucket or '*')")
        if not permissions:
            raise InvalidArgument(f"grant on {bucket!r} lists no permission")


def _info(credential: Credential) -> AccessKeyInfo:
    return AccessKeyInfo(
        credential.access_key, credential.description, credential.created_at, credential.grants
    )
