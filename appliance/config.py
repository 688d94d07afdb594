"""Cairn's configuration: typed, validated, loaded from one YAML file.

Contracts:

- ``load_config(path)`` reads YAML with ``yaml.safe_load`` (duplicate keys are an error),
  expands ``${VAR}`` / ``${VAR:-default}`` inside string *values* after parsing (never
  textually, so an environment value cannot inject YAML), resolves relative filesystem
  paths against the config file's directory and validates everything.
- Every failure is a ``ConfigError`` whose ``problems`` hold one line per problem, in the
  form ``key.path[index].sub: what is wrong``. All problems are collected, not just the
  first one.
- The models are immutable (``frozen``) and reject unknown keys (``extra="forbid"``).
  Secrets are ``SecretStr`` and never appear in ``repr`` or in error messages.
"""

from __future__ import annotations

import base64
import difflib
import os
import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from appliance.names import BUCKET_NAME_RULE, is_valid_bucket_name

__all__ = [
    "AccessKeyConfig",
    "BackendConfig",
    "BucketConfig",
    "ByteSize",
    "CacheConfig",
    "CairnConfig",
    "ConfigError",
    "CredentialConfig",
    "DatabaseConfig",
    "EncryptionConfig",
    "HealthConfig",
    "KeySourceConfig",
    "LocalBackendConfig",
    "PoolConfig",
    "PostgresConfig",
    "ReplicationConfig",
    "S3BackendConfig",
    "ServerConfig",
    "SqliteConfig",
    "VaultTransitConfig",
    "format_size",
    "load_config",
    "parse_config",
    "parse_size",
]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_Loc = tuple[str | int, ...]


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """The configuration is unusable. ``problems`` holds one human-readable line each."""

    def __init__(self, problems: Sequence[str], *, source: Path | None = None) -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        header = f"config error in {source}:" if source is not None else "config error:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))


def _raise_problems(problems: Sequence[tuple[_Loc, str]]) -> None:
    """Raise the problems found by a cross-field check as one pydantic error.

    pydantic gives a model validator a single location; the individual locations
    (relative to the model) travel in the error's context and ``_format_errors`` expands
    them back into one line each.
    """
    if problems:
        summary = "; ".join(f"{_format_loc(loc)}: {msg}" for loc, msg in problems)
        raise PydanticCustomError(
            "cairn_config", "{summary}", {"summary": summary, "problems": list(problems)}
        )


def _find_duplicates(entries: Iterable[tuple[_Loc, object]], what: str) -> list[tuple[_Loc, str]]:
    """Report each string value seen before as ``duplicate <what> '<value>'`` at its loc."""
    seen: set[str] = set()
    found: list[tuple[_Loc, str]] = []
    for loc, value in entries:
        if isinstance(value, str):
            if value in seen:
                found.append((loc, f"duplicate {what} {value!r}"))
            seen.add(value)
    return found


# --------------------------------------------------------------------------- sizes

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
    "pib": 1024**5,
}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+) ?([A-Za-z]*)")
_SIZE_HELP = "use a number with an optional unit (B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB)"


def parse_size(value: int | str) -> int:
    """Return a byte count from an int (>= 0) or a string such as ``10GB``, ``1.5 TiB``.

    Decimal units (KB, MB, GB, TB, PB) are powers of 1000, binary units (KiB ... PiB)
    powers of 1024; the unit is case-insensitive and may follow one space. Fractions are
    rounded down to whole bytes. Anything else raises ``ValueError``.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid size {value!r}: {_SIZE_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value}: a size cannot be negative")
        return value
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: {_SIZE_HELP}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:  # pragma: no cover - the regex only lets decimals through
        raise ValueError(f"invalid size {value!r}: {_SIZE_HELP}") from None
    return int(number * _SIZE_UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """Format a byte count for humans in binary units: ``512 B``, ``8.0 MiB``, ``10.0 GiB``."""
    if n < KiB:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if size < 1024 or unit == "PiB":
            break
    return f"{size:.1f} {unit}"


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""A size in bytes; accepts whatever ``parse_size`` accepts."""


# --------------------------------------------------------------------------- helpers


def _path_not_empty(value: object) -> object:
    """Reject ``""``, which ``Path`` would silently turn into ``.``."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against ``context["base_dir"]`` when validation has one."""
    context = info.context
    if isinstance(context, Mapping):
        base_dir = context.get("base_dir")
        if isinstance(base_dir, Path) and not value.is_absolute():
            return Path(os.path.normpath(base_dir / value))
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# --------------------------------------------------------------------------- server


class ServerConfig(BaseModel):
    """Where the S3 endpoint and the admin API listen."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(default=9000, ge=1, le=65535)
    admin_port: int = Field(default=9001, ge=1, le=65535)
    region: str = "us-east-1"
    domain: str | None = None
    """Base domain for virtual-hosted-style requests (``bucket.domain``); None = path-style."""
    max_request_body: ByteSize = Field(default=5 * TiB, gt=0)
    admin_host: str = "127.0.0.1"
    """Where the admin API listens (loopback by default: put it behind TLS to expose it)."""
    admin_token: SecretStr | None = None
    """Bearer token of the admin API; without one the admin API answers 401 to everything."""

    _check_host = field_validator("host", "region", "admin_host")(_non_empty)

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters long")
        return value

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        label = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
        if not re.fullmatch(rf"{label}(\.{label})*", value.lower()) or len(value) > 253:
            raise ValueError(f"invalid domain name {value!r}")
        return value.lower()

    @model_validator(mode="after")
    def _check_ports(self) -> ServerConfig:
        if self.port == self.admin_port:
            _raise_problems([(("admin_port",), f"must differ from server.port ({self.port})")])
        return self


# --------------------------------------------------------------------------- database


class SqliteConfig(BaseModel):
    """The embedded metadata store (single instance). Relative paths follow the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    path: Path = Field(default=Path("cairn.db"), validate_default=True)

    _not_empty = field_validator("path", mode="before")(_path_not_empty)
    _resolve = field_validator("path")(_resolve_path)


class PostgresConfig(BaseModel):
    """A shared PostgreSQL metadata store: either ``dsn`` or ``host`` + ``database``."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    dsn: SecretStr | None = None
    """``postgresql://user:password@host:port/database?...``; secret since it holds a password."""
    host: str | None = None
    port: int = Field(default=5432, ge=1, le=65535)
    user: str | None = None
    password: SecretStr | None = None
    database: str | None = None
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    min_connections: int = Field(default=1, ge=0)
    max_connections: int = Field(default=10, ge=1)
    schema_name: str | None = Field(
        default=None, alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$"
    )
    """Schema holding Cairn's tables (``search_path``); None uses the server's default."""

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = value.get_secret_value().partition("://")[0]
            if scheme not in ("postgres", "postgresql"):
                raise ValueError("must be a URL starting with postgresql:// or postgres://")
        return value

    @model_validator(mode="after")
    def _check_shape(self) -> PostgresConfig:
        problems: list[tuple[_Loc, str]] = []
        fields = [f for f in ("host", "user", "password", "database") if getattr(self, f)]
        if self.dsn is not None:
            if fields:
                problems.append(((), f"set either dsn or {', '.join(fields)}, not both"))
        else:
            if not self.host:
                problems.append((("host",), "required when dsn is not set"))
            if not self.database:
                problems.append((("database",), "required when dsn is not set"))
            if self.password is not None and not self.user:
                problems.append((("user",), "required when password is set"))
        if self.min_connections > self.max_connections:
            problems.append(
                (
                    ("min_connections",),
                    f"must not exceed max_connections ({self.max_connections})",
                )
            )
        _raise_problems(problems)
        return self

    def to_dsn(self) -> str:
        """Return a libpq/asyncpg URL with user and password URL-quoted."""
        if self.dsn is not None:
            return self.dsn.get_secret_value()
        userinfo = ""
        if self.user:
            userinfo = quote(self.user, safe="")
            if self.password is not None:
                userinfo += ":" + quote(self.password.get_secret_value(), safe="")
            userinfo += "@"
        host = self.host or ""
        query = f"sslmode={self.sslmode}"
        if host.startswith("/"):  # a Unix socket directory goes in the query string
            query = f"host={quote(host, safe='/')}&{query}"
            netloc = userinfo
        else:
            netloc = f"{userinfo}[{host}]" if ":" in host else f"{userinfo}{host}"
            netloc += f":{self.port}"
        return f"postgresql://{netloc}/{quote(self.database or '', safe='')}?{query}"

    def redacted_dsn(self) -> str:
        """The DSN with any password replaced by ``***``: safe to print or log."""
        parts = urlsplit(self.to_dsn())
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _password = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if sep else f"{user}@{hostport}"
        query = "&".join(
            "password=***" if item.lower().startswith("password=") else item
            for item in parts.query.split("&")
            if item
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class DatabaseConfig(BaseModel):
    """Exactly one metadata store: ``sqlite`` (the default) or ``postgres``."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    sqlite: SqliteConfig | None = None
    postgres: PostgresConfig | None = None
    read_cache_entries: int = Field(default=10_000, ge=0)
    """Recent metadata reads kept to serve GETs while the store is unreachable; 0 = off."""
    retry_seconds: float = Field(default=2.0, gt=0)
    """After the store failed, calls fail at once for this long before it is tried again."""

    @model_validator(mode="before")
    @classmethod
    def _empty_section_means_defaults(cls, data: Any) -> Any:
        # ``sqlite:`` with nothing under it (YAML null) means "SQLite with defaults".
        if isinstance(data, Mapping):
            data = dict(data)
            for kind, other in (("sqlite", "postgres"), ("postgres", "sqlite")):
                if kind in data and data[kind] is None and data.get(other) is None:
                    data[kind] = {}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> DatabaseConfig:
        if self.sqlite is not None and self.postgres is not None:
            _raise_problems([((), "set only one of sqlite or postgres, not both")])
        if self.sqlite is None and self.postgres is None:
            _raise_problems([((), "set one of sqlite or postgres")])
        return self

    @property
    def kind(self) -> Literal["sqlite", "postgres"]:
        """Which store is configured."""
        return "postgres" if self.postgres is not None else "sqlite"


# --------------------------------------------------------------------------- pool

_MIN_CHUNK = 64 * KiB
_MAX_CHUNK = 512 * MiB


class ReplicationConfig(BaseModel):
    """Copies of every chunk (``factor``, each on a different backend and group) and how
    many are written before a write is acknowledged (``write_quorum``); the rest are
    made by the replication worker. See docs/replication.md."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    factor: int = Field(default=1, ge=1)
    write_quorum: int = Field(default=1, ge=1)
    scan_interval: float = Field(default=3600.0, gt=0)
    """Seconds between full scans for chunks below (or above) their factor."""
    hedged_reads: bool = False
    """Ask a second replica when the first is slower than its recent p95."""
    retry_seconds: float = Field(default=5.0, gt=0)
    """First delay before a replica that could not be made is tried again (doubling,
    at most an hour)."""

    @model_validator(mode="after")
    def _check_quorum(self) -> ReplicationConfig:
        if self.write_quorum > self.factor:
            _raise_problems([(("write_quorum",), f"must not exceed factor ({self.factor})")])
        return self


class HealthConfig(BaseModel):
    """Backend circuit breakers and the active health check (docs/replication.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    failure_threshold: int = Field(default=5, ge=1)
    """Consecutive failed calls that open a backend's circuit."""
    open_seconds: float = Field(default=30.0, gt=0)
    """Seconds a circuit stays open before a probe may close it (half-open)."""
    check_interval: float = Field(default=30.0, gt=0)
    """Seconds between active health checks of every backend."""


class PoolConfig(BaseModel):
    """How objects are cut into chunks and placed on backends."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    chunk_size: ByteSize = 8 * MiB
    placement: Literal["pack", "spread"] = "pack"
    replication: ReplicationConfig = ReplicationConfig()
    health: HealthConfig = HealthConfig()
    gc_delay_seconds: int = Field(default=3600, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _old_replication_factor(cls, data: Any) -> Any:
        # ``replication_factor: N`` (the first spelling) still means replication.factor.
        if isinstance(data, Mapping) and "replication_factor" in data:
            if data.get("replication") is not None:
                raise ValueError(
                    "replication_factor is the old spelling of replication.factor: "
                    "set only replication.factor"
                )
            old = data["replication_factor"]
            data = {k: v for k, v in data.items() if k != "replication_factor"}
            data["replication"] = {"factor": old}
        return data

    @property
    def replication_factor(self) -> int:
        """The pool's default replication factor (``replication.factor``)."""
        return self.replication.factor

    @field_validator("chunk_size")
    @classmethod
    def _check_chunk_size(cls, value: int) -> int:
        if not _MIN_CHUNK <= value <= _MAX_CHUNK:
            raise ValueError(
                f"must be between {format_size(_MIN_CHUNK)} and {format_size(_MAX_CHUNK)}, "
                f"got {format_size(value)}"
            )
        return value


# --------------------------------------------------------------------------- cache


class CacheConfig(BaseModel):
    """The object cache: plaintext chunks in memory, and optionally blobs on a local disk.

    ``max_size: 0`` turns the memory cache off; the disk cache is on only when
    ``disk_dir`` is set. See docs/cache.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    max_size: ByteSize = 256 * MiB
    """Bytes of chunk data held in memory; 0 = no memory cache."""
    max_object_size: ByteSize = 8 * MiB
    """The largest chunk the memory cache keeps; larger chunks are read straight through.
    Left unset, it is 8 MiB or ``max_size`` if that is smaller."""
    ttl: float = Field(default=3600.0, ge=0)
    """Seconds a cached chunk is kept after it was stored; 0 = until evicted."""
    disk_dir: Path | None = None
    """Directory of the disk cache (blobs as the backends returned them); None = off."""
    disk_max_size: ByteSize = 10 * GiB
    """Bytes the disk cache may use under ``disk_dir``."""

    _not_empty = field_validator("disk_dir", mode="before")(_path_not_empty)
    _resolve = field_validator("disk_dir")(_resolve_path)

    @field_validator("ttl", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("expected a number of seconds, got " + str(value).lower())
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> CacheConfig:
        problems: list[tuple[_Loc, str]] = []
        explicit = "max_object_size" in self.model_fields_set  # else capped silently
        if explicit and self.max_size and self.max_object_size > self.max_size:
            problems.append(
                (
                    ("max_object_size",),
                    f"must not exceed cache.max_size ({format_size(self.max_size)})",
                )
            )
        if self.disk_dir is not None and self.disk_max_size <= 0:
            problems.append((("disk_max_size",), "must be greater than 0 when disk_dir is set"))
        _raise_problems(problems)
        return self


# --------------------------------------------------------------------------- mount


class MountConfig(BaseModel):
    """The FUSE mount (``cairn mount``, ``cairn serve --mount``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    spool_dir: Path = Field(default=Path("cairn-spool"), validate_default=True)
    """Where files being written are staged until they are committed; relative paths
    follow the config file. Must survive a restart (uncommitted files are recovered)."""
    attr_timeout: float = Field(default=1.0, ge=0, le=3600)
    """Seconds the kernel may cache a file's attributes."""
    entry_timeout: float = Field(default=1.0, ge=0, le=3600)
    """Seconds the kernel may cache a name lookup."""
    allow_other: bool = True
    """Let every local user use the mount (the kernel checks modes and owners)."""
    write_back: bool = True
    """A file of one chunk at most (a small file) is committed after ``close``
    returned, from its spool; ``fsync`` waits for the commit, and this instance's S3
    endpoint waits for the commits of files closed before a request came. False:
    every ``close`` waits for its commit (docs/fuse.md, consistency)."""
    read_ahead_kb: int = Field(default=1024, ge=0, le=65536)
    """Kernel read-ahead of the mount (its bdi ``read_ahead_kb``; needs root; 0 keeps
    the kernel's default of 128). Larger read-ahead means fewer, larger reads."""

    _not_empty = field_validator("spool_dir", mode="before")(_path_not_empty)
    _resolve = field_validator("spool_dir")(_resolve_path)


# --------------------------------------------------------------------------- backends

_BACKEND_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class _BackendBase(BaseModel):
    """What every backend has: a name, optional caps, and a read-only switch."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    quota_bytes: ByteSize | None = None
    """Stored bytes allowed on this backend; None = unlimited."""
    api_request_limit: int | None = Field(default=None, ge=0)
    """Requests allowed per calendar month (UTC); None = unlimited."""
    egress_byte_limit: ByteSize | None = None
    """Bytes read per calendar month (UTC); None = unlimited."""
    ingress_byte_limit: ByteSize | None = None
    """Bytes written per calendar month (UTC); None = unlimited."""
    read_only: bool = False
    group: str | None = None
    """Failure domain (e.g. the provider: ``aws``); replicas of a chunk go to distinct
    groups. None = a group of its own."""
    replica_timeout: float = Field(default=30.0, gt=0)
    """Seconds a chunk read from this backend may take before the read moves on to the
    next replica (the last replica gets no limit)."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _BACKEND_NAME.fullmatch(value):
            raise ValueError(
                f"invalid backend name {value!r}: use 1-63 lowercase letters, digits, "
                "'-' or '_', starting with a letter or digit"
            )
        return value


class S3BackendConfig(_BackendBase):
    """A bucket (optionally a prefix in it) on any S3-compatible service."""

    type: Literal["s3"]
    endpoint: str | None = None
    """Service URL, e.g. ``https://s3.us-west-004.backblazeb2.com``; None = AWS."""
    region: str = "us-east-1"
    bucket: str
    prefix: str = ""
    access_key: str
    secret_key: SecretStr
    path_style: bool = False
    max_connections: int = Field(default=32, ge=1, le=1024)
    connect_timeout: float = Field(default=10, gt=0)
    read_timeout: float = Field(default=60, gt=0)

    _check_strings = field_validator("region", "access_key")(_non_empty)

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return value.rstrip("/")

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if not value or len(value) > 255 or "/" in value or value != value.strip():
            raise ValueError(f"invalid bucket name {value!r}")
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError("must not start with '/'")
        if "//" in value:
            raise ValueError("must not contain '//'")
        return value if not value or value.endswith("/") else value + "/"

    @field_validator("secret_key")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    def location(self) -> str:
        """Where the blobs go, for humans: ``endpoint/bucket/prefix`` (no secrets)."""
        host = self.endpoint or f"aws:{self.region}"
        return f"{host}/{self.bucket}/{self.prefix}"


class LocalBackendConfig(_BackendBase):
    """A directory on a local disk. A relative ``path`` follows the config file."""

    type: Literal["local"]
    path: Path

    _not_empty = field_validator("path", mode="before")(_path_not_empty)
    _resolve = field_validator("path")(_resolve_path)

    def location(self) -> str:
        """Where the blobs go, for humans."""
        return str(self.path)


BackendConfig = Annotated[S3BackendConfig | LocalBackendConfig, Field(discriminator="type")]
"""One backend; the ``type`` key selects the model."""


# --------------------------------------------------------------------------- buckets

_ACCESS_KEY = re.compile(r"[A-Za-z0-9]{16,128}")


PermissionName = Literal["read", "write", "list", "delete", "admin"]
OWNER_PERMISSIONS: tuple[PermissionName, ...] = ("read", "write", "list", "delete")
"""What a key listed under a bucket may do there unless ``permissions`` says otherwise."""


class CredentialConfig(BaseModel):
    """One S3 access key pair that may use a bucket."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    access_key: str
    secret_key: SecretStr
    permissions: tuple[PermissionName, ...] = OWNER_PERMISSIONS

    @field_validator("access_key")
    @classmethod
    def _check_access_key(cls, value: str) -> str:
        if not _ACCESS_KEY.fullmatch(value):
            raise ValueError("must be 16-128 characters, letters A-Z/a-z and digits only")
        return value

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters long")
        return value


class AccessKeyConfig(CredentialConfig):
    """A key with permissions on several buckets; ``"*"`` grants apply to every bucket
    (``{"*": [admin]}`` may create and delete buckets through S3)."""

    permissions: tuple[PermissionName, ...] = ()
    description: str = ""
    grants: dict[str, tuple[PermissionName, ...]]

    @field_validator("grants")
    @classmethod
    def _check_grants(
        cls, value: dict[str, tuple[PermissionName, ...]]
    ) -> dict[str, tuple[PermissionName, ...]]:
        if not value:
            raise ValueError("grant at least one bucket (or '*')")
        for bucket in value:
            if bucket != "*" and not is_valid_bucket_name(bucket):
                raise ValueError(f"invalid bucket name {bucket!r} (use a bucket name or '*')")
        return value

    @model_validator(mode="after")
    def _no_plain_permissions(self) -> AccessKeyConfig:
        if self.permissions:
            _raise_problems([(("permissions",), "use 'grants' for a top-level credential")])
        return self


class BucketConfig(BaseModel):
    """A bucket served by Cairn's S3 endpoint, and who may use it."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    credentials: list[CredentialConfig] = []
    encryption: bool | None = None
    """Encrypt this bucket's new writes; None = the pool default (``encryption.enabled``)."""
    replication_factor: int | None = Field(default=None, ge=1)
    """Copies of this bucket's chunks; None = ``pool.replication.factor``."""

    @model_validator(mode="before")
    @classmethod
    def _null_credentials(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "credentials" in data and data["credentials"] is None:
            data = {k: v for k, v in data.items() if k != "credentials"}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not is_valid_bucket_name(value):
            raise ValueError(f"invalid bucket name {value!r}: use {BUCKET_NAME_RULE}")
        return value


# --------------------------------------------------------------------------- encryption


class VaultTransitConfig(BaseModel):
    """A HashiCorp Vault Transit key that wraps data keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    address: str
    key_name: str
    mount: str = "transit"
    token: SecretStr | None = None
    token_file: Path | None = None
    namespace: str | None = None
    timeout: float = Field(default=10, gt=0)

    _check_strings = field_validator("key_name", "mount")(_non_empty)
    _not_empty = field_validator("token_file", mode="before")(_path_not_empty)
    _resolve = field_validator("token_file")(_resolve_path)

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_token(self) -> VaultTransitConfig:
        if (self.token is None) == (self.token_file is None):
            _raise_problems([((), "give exactly one of 'token' and 'token_file'")])
        return self


class KeySourceConfig(BaseModel):
    """Where a master key comes from: exactly one of ``inline`` (base64 of 32 bytes),
    ``file`` (32 raw bytes or their base64) and ``vault`` (Transit)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    inline: SecretStr | None = None
    file: Path | None = None
    vault: VaultTransitConfig | None = None

    _not_empty = field_validator("file", mode="before")(_path_not_empty)
    _resolve = field_validator("file")(_resolve_path)

    @field_validator("inline")
    @classmethod
    def _check_inline(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = "".join(value.get_secret_value().split())
            try:
                raw = base64.b64decode(text, validate=True)
            except ValueError:
                raise ValueError("is not valid base64") from None
            if len(raw) != 32:
                raise ValueError(
                    f"must be base64 of 32 bytes (e.g. `openssl rand -base64 32`), "
                    f"got {len(raw)} bytes"
                )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> KeySourceConfig:
        given = [n for n in ("inline", "file", "vault") if getattr(self, n) is not None]
        if len(given) != 1:
            _raise_problems(
                [
                    (
                        (),
                        "give exactly one of 'inline', 'file' and 'vault'"
                        + (f" (found {', '.join(given)})" if given else ""),
                    )
                ]
            )
        return self


class EncryptionConfig(BaseModel):
    """Envelope encryption: the pool default, the master key and retired keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    enabled: bool = False
    """Encrypt new writes of buckets without their own ``encryption`` setting."""
    key: KeySourceConfig | None = None
    """The current master key: new data keys are wrapped by it."""
    previous_keys: list[KeySourceConfig] = []
    """Retired master keys, still used to unwrap data keys until rotation finished."""
    key_cache_size: int = Field(default=4096, ge=1)
    """Unwrapped data keys kept in memory (saves a Vault call per chunk read)."""

    @model_validator(mode="before")
    @classmethod
    def _null_lists(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("previous_keys", ()) is None:
            data = {k: v for k, v in data.items() if k != "previous_keys"}
        return data

    @model_validator(mode="after")
    def _key_when_enabled(self) -> EncryptionConfig:
        if self.enabled and self.key is None:
            _raise_problems([(("key",), "required when encryption is enabled")])
        return self


# --------------------------------------------------------------------------- root

_SECTIONS = (
    "server",
    "database",
    "pool",
    "cache",
    "mount",
    "encryption",
    "backends",
    "buckets",
    "credentials",
)


class CairnConfig(BaseModel):
    """The whole configuration. At least one backend is required."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = Field(default_factory=lambda: DatabaseConfig(sqlite=SqliteConfig()))
    pool: PoolConfig = PoolConfig()
    cache: CacheConfig = CacheConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    mount: MountConfig = Field(default_factory=MountConfig)
    backends: list[BackendConfig]
    buckets: list[BucketConfig] = []
    credentials: list[AccessKeyConfig] = []

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        # A section whose keys are all commented out is YAML null: treat it as absent.
        # An absent database section means SQLite with defaults (validated, so its
        # relative path is resolved like any other).
        if isinstance(data, Mapping):
            optional = (
                "server",
                "database",
                "pool",
                "cache",
                "mount",
                "encryption",
                "buckets",
                "credentials",
            )
            data = {k: v for k, v in data.items() if not (k in optional and v is None)}
            data.setdefault("database", {"sqlite": {}})
            data.setdefault("mount", {})
        return data

    @field_validator("backends")
    @classmethod
    def _check_backends(cls, value: list[BackendConfig]) -> list[BackendConfig]:
        if not value:
            raise ValueError("at least one backend is required")
        problems = _find_duplicates(
            (((i, "name"), b.name) for i, b in enumerate(value)), "backend name"
        )
        places: dict[str, str] = {}
        for i, backend in enumerate(value):
            place = f"{backend.type}:{backend.location()}"
            if place in places:
                problems.append(((i,), f"stores in the same place as backend {places[place]!r}"))
            places.setdefault(place, backend.name)
        _raise_problems(problems)
        return value

    @field_validator("buckets")
    @classmethod
    def _check_buckets(cls, value: list[BucketConfig]) -> list[BucketConfig]:
        problems = _find_duplicates(
            (((i, "name"), b.name) for i, b in enumerate(value)), "bucket name"
        )
        problems += _find_duplicates(
            (
                ((i, "credentials", j, "access_key"), c.access_key)
                for i, b in enumerate(value)
                for j, c in enumerate(b.credentials)
            ),
            "access key",
        )
        _raise_problems(problems)
        return value

    @model_validator(mode="after")
    def _check_key_uniqueness(self) -> CairnConfig:
        in_buckets = {c.access_key for b in self.buckets for c in b.credentials}
        problems: list[tuple[_Loc, str]] = _find_duplicates(
            (
                (("credentials", i, "access_key"), c.access_key)
                for i, c in enumerate(self.credentials)
            ),
            "access key",
        )
        for i, cred in enumerate(self.credentials):
            if cred.access_key in in_buckets:
                problems.append(
                    (
                        ("credentials", i, "access_key"),
                        f"{cred.access_key!r} is also listed under a bucket; list it once "
                        "(here, with grants for each bucket)",
                    )
                )
        _raise_problems(problems)
        return self

    @model_validator(mode="after")
    def _check_encryption_key(self) -> CairnConfig:
        if self.encryption.key is None:
            problems: list[tuple[_Loc, str]] = [
                (("buckets", i, "encryption"), "needs a master key: set encryption.key")
                for i, b in enumerate(self.buckets)
                if b.encryption
            ]
            _raise_problems(problems)
        return self

    @model_validator(mode="after")
    def _check_replication(self) -> CairnConfig:
        writable = [b for b in self.backends if not b.read_only]
        domains = len({b.group or f"\0{b.name}" for b in writable})
        wanted: list[tuple[_Loc, int]] = [
            (("pool", "replication", "factor"), self.pool.replication.factor)
        ]
        wanted += [
            (("buckets", i, "replication_factor"), b.replication_factor)
            for i, b in enumerate(self.buckets)
            if b.replication_factor is not None
        ]
        problems: list[tuple[_Loc, str]] = []
        for loc, factor in wanted:
            if factor <= domains:
                continue
            if any(b.group for b in writable):
                need = f"{factor} writable backends in distinct groups"
                have = f"{domains} {'group is' if domains == 1 else 'groups are'}"
            else:
                need = f"{factor} writable backends"
                have = f"{domains} {'backend is' if domains == 1 else 'backends are'}"
            problems.append(
                (loc, f"{factor} replicas need {need}, but only {have} writable (not read_only)")
            )
        _raise_problems(problems)
        return self


# --------------------------------------------------------------------------- loading

_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}|\$\{")


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}``; ``$$`` is a literal ``$``.

    Raises ``ValueError`` naming the first unset variable or malformed reference.
    """

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$$":
            return "$"
        name = match.group(1)
        if name is None:
            raise ValueError(
                "invalid variable reference: use ${NAME} or ${NAME:-default} ($$ for a '$')"
            )
        current = env.get(name)
        if match.group(2) is not None:  # ${NAME:-default}: default when unset or empty
            return current if current else match.group(3)
        if current is None:
            raise ValueError(f"environment variable {name} is not set")
        return current

    return _VAR_RE.sub(replace, value)


def _expand_tree(
    node: object, env: Mapping[str, str], loc: _Loc, problems: list[tuple[_Loc, str]]
) -> object:
    """Copy a loaded YAML tree with variables expanded in every string value."""
    if isinstance(node, str):
        if "$" not in node:
            return node
        try:
            return _expand(node, env)
        except ValueError as exc:
            problems.append((loc, str(exc)))
            return node
    if isinstance(node, Mapping):
        # Config keys are strings; YAML may produce others (``1:``, ``on:``) - name them as text.
        return {str(k): _expand_tree(v, env, (*loc, str(k)), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, env, (*loc, i), problems) for i, v in enumerate(node)]
    return node


def _format_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "top level"


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``None`` from a type annotation."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(raw: Sequence[str | int]) -> tuple[_Loc, type[BaseModel] | None]:
    """Turn a pydantic error location into a user-facing one.

    Drops the tags pydantic inserts for discriminated unions (``backends.0.s3.bucket`` ->
    ``backends[0].bucket``) and returns the model that owns the last key, if known.
    """
    tp: Any = CairnConfig
    out: list[str | int] = []
    parent: type[BaseModel] | None = None
    for part in raw:
        tp = _unwrap(tp)
        parent = tp if _is_model(tp) else None
        if isinstance(part, int) and get_origin(tp) is list:
            tp = get_args(tp)[0]
        elif isinstance(part, str) and _is_model(tp):
            field = tp.model_fields.get(part)
            tp = field.annotation if field is not None else None
        elif isinstance(part, str) and get_origin(tp) in (Union, types.UnionType):
            chosen = [m for m in get_args(tp) if _is_model(m) and part in _tags_of(m)]
            if chosen:
                tp = chosen[0]
                continue  # the tag is pydantic's, not the user's
            tp = None
        else:
            tp = None
        out.append(part)
    return tuple(out), parent


def _tags_of(model: type[BaseModel]) -> tuple[object, ...]:
    field = model.model_fields.get("type")
    return get_args(field.annotation) if field is not None else ()


_SECRET_KEYS = frozenset({"secret_key", "password", "dsn"})
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
    "path_type": "a filesystem path (a string)",
}


def _describe(value: object, key: str | int | None) -> str:
    """Describe an input value for an error message, hiding secrets."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if key in _SECRET_KEYS:
        kind = "number" if isinstance(value, int | float) else type(value).__name__
        return f"a {'string' if kind == 'str' else kind} (value hidden)"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _message(err: Mapping[str, Any], owner: type[BaseModel] | None, key: str | int | None) -> str:
    kind = err["type"]
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    given = err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        msg = "unknown key"
        if owner is not None and isinstance(key, str):
            close = difflib.get_close_matches(key, list(owner.model_fields), n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
        return msg
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        msg = "must be one of s3, local"
        if kind == "union_tag_not_found" or (isinstance(given, Mapping) and "type" not in given):
            return msg + " (the key is missing)"
        tag = given.get("type") if isinstance(given, Mapping) else None
        return f"{msg}, not {_describe(tag, None)}"
    if kind in _EXPECTED:
        msg = f"expected {_EXPECTED[kind]}, got {_describe(given, key)}"
        if kind == "string_type" and isinstance(given, int | float) and key not in _SECRET_KEYS:
            msg += " (put quotes around it to make it a string)"
        return msg
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {_describe(given, key)}"
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("greater than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, name = bounds[kind]
        bound = ctx[name]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {words} {bound}, got {_describe(given, key)}"
    if kind == "too_short":
        return f"needs at least {ctx['min_length']} item(s)"
    if kind == "string_too_short":
        return f"must be at least {ctx['min_length']} characters long"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters long"
    return str(err["msg"])


def _format_errors(exc: ValidationError) -> Iterator[tuple[_Loc, str]]:
    for err in exc.errors(include_url=False):
        loc, owner = _walk(err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "type")
        if err["type"] == "cairn_config":
            for sub_loc, msg in err["ctx"]["problems"]:
                yield (*loc, *sub_loc), msg
            continue
        yield loc, _message(err, owner, loc[-1] if loc else None)


def _raw_duplicates(data: Mapping[str, Any]) -> list[tuple[_Loc, str]]:
    """Duplicate names/keys in unvalidated data.

    The validators check these only when every entry of a list is valid; this finds
    them anyway so that one bad entry does not hide a duplicate elsewhere.
    """

    def entries(section: str) -> list[tuple[int, Mapping[str, Any]]]:
        items = data.get(section)
        if not isinstance(items, list):
            return []
        return [(i, item) for i, item in enumerate(items) if isinstance(item, Mapping)]

    found = _find_duplicates(
        ((("backends", i, "name"), b.get("name")) for i, b in entries("backends")),
        "backend name",
    )
    found += _find_duplicates(
        ((("buckets", i, "name"), b.get("name")) for i, b in entries("buckets")), "bucket name"
    )
    creds: list[tuple[_Loc, object]] = []
    for i, bucket in entries("buckets"):
        listed = bucket.get("credentials")
        for j, cred in enumerate(listed if isinstance(listed, list) else []):
            if isinstance(cred, Mapping):
                creds.append(
                    (("buckets", i, "credentials", j, "access_key"), cred.get("access_key"))
                )
    return found + _find_duplicates(creds, "access key")


def parse_config(data: object, *, env: Mapping[str, str], base_dir: Path) -> CairnConfig:
    """Validate already-loaded YAML data; see the module docstring for the rules.

    Raises ``ConfigError`` listing every problem found.
    """
    if data is None:
        raise ConfigError(["top level: the configuration is empty; at least backends is needed"])
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                "top level: expected a mapping of sections "
                f"({', '.join(_SECTIONS)}), got {_describe(data, None)}"
            ]
        )
    env_problems: list[tuple[_Loc, str]] = []
    expanded = _expand_tree(data, env, (), env_problems)
    problems = [f"{_format_loc(loc)}: {msg}" for loc, msg in env_problems]
    try:
        config = CairnConfig.model_validate(
            expanded, context={"base_dir": Path(os.path.abspath(base_dir))}
        )
    except ValidationError as exc:
        for loc, msg in _format_errors(exc):
            # A value that failed expansion would only add a confusing second line.
            if any(loc[: len(bad)] == bad for bad, _ in env_problems):
                continue
            problems.append(f"{_format_loc(loc)}: {msg}")
        if isinstance(expanded, Mapping):
            for loc, msg in _raw_duplicates(expanded):
                line = f"{_format_loc(loc)}: {msg}"
                if line not in problems:
                    problems.append(line)
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a mapping with the same key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable keys are reported by SafeLoader itself
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: Path, *, env: Mapping[str, str] | None = None) -> CairnConfig:
    """Read, expand, resolve and validate the YAML config at ``path``.

    ``env`` defaults to ``os.environ``. Raises ``ConfigError`` (with ``source=path``)
    for a missing/unreadable file, invalid YAML (with line and column), a top level
    that is not a mapping, and every validation problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file does not exist"], source=path) from None
    except IsADirectoryError:
        raise ConfigError(["is a directory, not a file"], source=path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"file is not UTF-8 text ({exc.reason})"], source=path) from None
    except OSError as exc:
        raise ConfigError([f"cannot read file: {exc.strerror or exc}"], source=path) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "syntax error"
        raise ConfigError([f"invalid YAML{where}: {what}"], source=path) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source=path) from None
    try:
        return parse_config(
            data,
            env=os.environ if env is None else env,
            base_dir=Path(os.path.abspath(path)).parent,
        )
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=path) from None
