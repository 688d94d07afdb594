"""Request and response bodies of the admin API (pydantic: validation and the OpenAPI
schemas come from the same classes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PermissionName = Literal["read", "write", "list", "delete", "admin"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(BaseModel):
    code: str
    message: str


class BucketOut(BaseModel):
    name: str
    created_at: datetime
    objects: int
    bytes: int


class BucketIn(_Strict):
    name: str


class KeyOut(BaseModel):
    access_key: str
    description: str
    created_at: datetime
    grants: dict[str, list[PermissionName]] = Field(
        description="Permissions per bucket name; '*' stands for every bucket."
    )


class KeyIn(_Strict):
    access_key: str | None = Field(default=None, description="Generated when absent.")
    secret_key: str | None = Field(default=None, description="Generated when absent.")
    description: str = ""
    grants: dict[str, list[PermissionName]]


class RotateIn(_Strict):
    secret_key: str | None = Field(default=None, description="Generated when absent.")


class GrantsIn(_Strict):
    grants: dict[str, list[PermissionName]]


class SecretOut(BaseModel):
    """The only answer that carries a secret: keep it, it is not shown again."""

    access_key: str
    secret_key: str


class BackendOut(BaseModel):
    name: str
    state: str
    quota_bytes: int | None
    used_bytes: int
    reserved_bytes: int
    free_bytes: int | None
    requests_left: int | None
    ingress_left: int | None
    egress_left: int | None
    group: str | None = None
    circuit: str = "closed"
    """The circuit breaker: ``closed``, ``open`` (writes go elsewhere, reads try it last)
    or ``half_open`` (the next call decides)."""
    consecutive_failures: int = 0
    last_error: str | None = None


class FsckOut(BaseModel):
    """The store checked against the backends (read-only). ``problems`` is 0 when they
    agree; ``examples`` names up to 100 missing/orphan blobs."""

    problems: int
    chunks: int
    locations: int
    blobs: int
    missing: int
    orphans: int
    below: int
    above: int
    ledger: list[str]
    unreachable: list[str]
    examples: list[str]


class QueueItemOut(BaseModel):
    item_id: int
    key: str | None
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    state: str
    last_error: str | None
    created_at: datetime


class QueueOut(BaseModel):
    """A background queue: items per state, and the dead-lettered items (kept, never
    dropped; ``POST .../dead/{item_id}`` retries one)."""

    name: str
    depth: dict[str, int]
    dead: list[QueueItemOut]


class JobOut(BaseModel):
    """A key job's saved progress (``total``/``done``: chunks for rotate, objects scanned
    for encrypt/decrypt; ``changed``: chunks re-wrapped or objects rewritten)."""

    job: str
    state: str
    target: str
    total: int
    done: int
    changed: int
    bytes_rewritten: int
    error: str | None
    started_at: str
    updated_at: str


class JobIn(_Strict):
    new_vault_version: bool = Field(
        default=False, description="rotate only: make Vault create a new key version first"
    )


class EncryptionOut(BaseModel):
    current_key_id: str | None
    configured_key_ids: list[str]
    chunks_by_key: dict[str, int] = Field(description="'none' counts unencrypted chunks")
    jobs: dict[str, JobOut]
