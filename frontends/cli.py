"""The ``cairn`` command line.

Contracts:

- ``cairn validate --config F``: prints a summary (never a secret) and exits 0, or prints
  ``config error in F:`` and one problem per line to stderr and exits 1.
- ``cairn init [--output F] [--force]``: writes a commented starter config that validates,
  with freshly generated S3 credentials; refuses to overwrite a file without ``--force``.
- ``cairn mount DIR --config F [--bucket B]``: the core and the FUSE mount, no HTTP
  (``frontends.daemon.serve`` in ``mount`` mode; exit 2 when the mount cannot be made).
- ``cairn serve --config F [--mode all|api|worker] [--mount DIR]``: validates, refuses
  modes SQLite cannot support, then hands over to ``frontends.daemon.serve`` and exits
  with its return code (2 when the daemon is not available).
- ``cairn admin keys status|rotate|encrypt-existing|decrypt-existing|generate``: see
  ``frontends.cli_keys``.
"""

from __future__ import annotations

import importlib
import os
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import yaml

from appliance.config import (
    BackendConfig,
    CairnConfig,
    ConfigError,
    KeySourceConfig,
    S3BackendConfig,
    format_size,
    load_config,
    parse_config,
)
from frontends.admin.cli import admin
from frontends.cli_keys import keys as keys_group
from frontends.cli_options import DEFAULT_CONFIG, config_option

F = TypeVar("F", bound=Callable[..., object])

_DEFAULT_CONFIG = DEFAULT_CONFIG


_config_option = config_option()


def _load_or_exit(ctx: click.Context, path: Path) -> CairnConfig:
    """Load the config, or print every problem to stderr and exit 1."""
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"config error in {path}:", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        ctx.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Cairn: many S3 buckets and local disks pooled into one store, served over S3 and FUSE."""


# --------------------------------------------------------------------------- validate


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _backend_limits(backend: BackendConfig) -> str:
    parts = [
        "quota "
        + (format_size(backend.quota_bytes) if backend.quota_bytes is not None else "unlimited")
    ]
    if backend.api_request_limit is not None:
        parts.append(f"{backend.api_request_limit:,} requests/month")
    if backend.egress_byte_limit is not None:
        parts.append(f"egress {format_size(backend.egress_byte_limit)}/month")
    if backend.ingress_byte_limit is not None:
        parts.append(f"ingress {format_size(backend.ingress_byte_limit)}/month")
    if backend.read_only:
        parts.append("read-only")
    return ", ".join(parts)


def _backend_target(backend: BackendConfig) -> str:
    if isinstance(backend, S3BackendConfig):
        endpoint = backend.endpoint or f"AWS {backend.region}"
        target = f"{endpoint} bucket {backend.bucket}"
        if backend.prefix:
            target += f" prefix {backend.prefix}"
        return target + (" (path-style)" if backend.path_style else "")
    return str(backend.path)


def _capacity(config: CairnConfig) -> str:
    quotas = [b.quota_bytes for b in config.backends if b.quota_bytes is not None]
    unlimited = len(config.backends) - len(quotas)
    total = format_size(sum(quotas))
    if unlimited:
        text = f"unlimited: {_plural(unlimited, 'backend')} without a quota"
        text += f" (limited only by the disk or provider); the others add up to {total}"
    else:
        text = total
    read_only = sum(b.quota_bytes or 0 for b in config.backends if b.read_only)
    if read_only:
        text += f", of which {format_size(read_only)} is read-only"
    return text


def _key_source(source: KeySourceConfig) -> str:
    if source.inline is not None:
        return "inline"
    if source.file is not None:
        return f"file {source.file}"
    assert source.vault is not None
    return f"vault {source.vault.address} key {source.vault.key_name}"


def _encryption(config: CairnConfig) -> str:
    """One line about encryption: default, key sources (never key material), overrides."""
    enc = config.encryption
    parts = [f"{'on' if enc.enabled else 'off'} by default"]
    if enc.key is not None:
        parts.append(f"key {_key_source(enc.key)}")
    if enc.previous_keys:
        parts.append(_plural(len(enc.previous_keys), "previous key"))
    on = [b.name for b in config.buckets if b.encryption is True]
    off = [b.name for b in config.buckets if b.encryption is False]
    if on:
        parts.append(f"on for {', '.join(on)}")
    if off:
        parts.append(f"off for {', '.join(off)}")
    return ", ".join(parts)


def summarize(config: CairnConfig) -> list[str]:
    """Describe a configuration for humans, one line each. Never includes a secret."""
    server, pool, db = config.server, config.pool, config.database
    lines = [
        f"server:    S3 on {server.host}:{server.port}, admin API on {server.host}:"
        f"{server.admin_port}, region {server.region}"
        + (f", domain {server.domain}" if server.domain else ""),
    ]
    if db.postgres is not None:
        where = db.postgres.redacted_dsn()
        lines.append(
            f"database:  postgres at {where} "
            f"({db.postgres.min_connections}-{db.postgres.max_connections} connections)"
        )
    else:
        assert db.sqlite is not None
        lines.append(f"database:  sqlite at {db.sqlite.path} (single instance)")
    lines.append(
        f"pool:      chunk size {format_size(pool.chunk_size)}, placement {pool.placement}, "
        f"replication {pool.replication.factor} (write quorum {pool.replication.write_quorum}), "
        f"gc delay {pool.gc_delay_seconds} s"
    )
    lines.append(f"cache:     {_cache_summary(config)}")
    if config.encryption.key is not None or config.encryption.enabled:
        lines.append(f"encryption: {_encryption(config)}")
    lines.append(f"backends:  {len(config.backends)}")
    width = max(len(b.name) for b in config.backends)
    for b in config.backends:
        lines.append(
            f"  {b.name.ljust(width)}  {b.type.ljust(5)}  {_backend_target(b)}  "
            f"[{_backend_limits(b)}]"
        )
    lines.append(f"capacity:  {_capacity(config)}")
    lines.append(f"buckets:   {len(config.buckets)}")
    if config.buckets:
        width = max(len(b.name) for b in config.buckets)
        for bucket in config.buckets:
            count = len(bucket.credentials)
            creds = _plural(count, "credential") if count else "no credentials"
            lines.append(f"  {bucket.name.ljust(width)}  {creds}")
    return lines


def _cache_summary(config: CairnConfig) -> str:
    cache = config.cache
    if cache.max_size:
        ttl = f"ttl {cache.ttl:g} s" if cache.ttl else "no ttl"
        largest = format_size(min(cache.max_object_size, cache.max_size))
        memory = f"memory {format_size(cache.max_size)} (chunks up to {largest}, {ttl})"
    else:
        memory = "memory off"
    if cache.disk_dir is None:
        return f"{memory}, disk off"
    return f"{memory}, disk {format_size(cache.disk_max_size)} at {cache.disk_dir}"


@cli.command()
@_config_option
@click.pass_context
def validate(ctx: click.Context, config_path: Path) -> None:
    """Check a configuration file and summarise it."""
    config = _load_or_exit(ctx, config_path)
    click.echo(f"{config_path}: configuration is valid")
    for line in summarize(config):
        click.echo(line)


# --------------------------------------------------------------------------- init

_STARTER = """\
# Cairn configuration. Check it with:  cairn validate --config {filename}
# Every key is described in docs/configuration.md. Sizes take units (8MiB, 10GB, 1.5TiB);
# ${{VAR}} and ${{VAR:-default}} in a value are replaced from the environment; relative
# paths are relative to this file's directory.

server:
  host: 127.0.0.1            # address the S3 API listens on (0.0.0.0 = all)
  port: 9000                 # S3 API port
  admin_host: 127.0.0.1      # address of the admin API (keep it private)
  admin_port: 9001           # admin API port (used by `cairn web` and `cairn admin`)
  admin_token: "{admin_token}"   # bearer token of the admin API
  region: us-east-1          # region name clients sign requests for
  # domain: s3.example.com   # enables virtual-hosted-style requests (bucket.s3.example.com)
  max_request_body: 5TiB     # largest request body accepted

database:                    # where metadata lives: exactly one of sqlite or postgres
  sqlite:
    path: cairn.db           # single instance only
  # postgres:                # several `cairn serve` instances can share one PostgreSQL
  #   dsn: ${{CAIRN_PG_DSN}}   # postgresql://user:password@host:5432/cairn
  #   # ...or instead of dsn: host, port, user, password, database, sslmode
  #   min_connections: 1
  #   max_connections: 10

pool:
  chunk_size: 8MiB           # objects are stored as chunks of this size (64KiB-512MiB)
  placement: pack            # pack: fill backends in the order below; spread: least used first
  replication:
    factor: 1                # copies of every chunk, each on a different backend (and group)
    write_quorum: 1          # copies written before a write is acknowledged; the rest follow
  gc_delay_seconds: 3600     # how long unreferenced chunks are kept before deletion

cache:                       # repeated reads without spending the providers' egress
  max_size: 256MiB           # memory for cached chunks (plaintext); 0 turns it off
  max_object_size: 8MiB      # larger chunks are not kept in memory (keep >= chunk_size)
  ttl: 3600                  # seconds a chunk stays cached at most; 0 = until evicted
  # disk_dir: ./cache        # a local disk cache of what the providers returned (off if unset)
  # disk_max_size: 10GiB     # bytes the disk cache may use

# encryption:                # envelope encryption (docs/configuration.md#encryption)
#   enabled: true            # encrypt new writes of buckets without their own setting
#   key:                     # the master key: exactly one of inline, file, vault
#     file: ./master.key     # 32 bytes; make one with `cairn admin keys generate`
#     # inline: ${{CAIRN_MASTER_KEY}}
#     # vault: {{address: https://vault:8200, key_name: cairn, token_file: /run/vault/token}}
#   previous_keys: []        # retired keys, until `cairn admin keys rotate` says done

backends:                    # at least one; names are lowercase, unique and never change
  - name: disk1
    type: local
    path: ./data/disk1       # the directory that holds this backend's blobs
    quota_bytes: 10GiB       # stored bytes allowed here; omit for unlimited
    read_only: false         # true: keep serving reads, place no new data here

  # - name: b2
  #   type: s3
  #   endpoint: https://s3.us-west-004.backblazeb2.com   # omit for AWS
  #   region: us-west-004
  #   bucket: my-cairn-bucket
  #   prefix: cairn/                # optional: keep Cairn's blobs under this prefix
  #   access_key: ${{B2_ACCESS_KEY}}
  #   secret_key: ${{B2_SECRET_KEY}}
  #   path_style: false             # true for MinIO and services without virtual-hosted buckets
  #   quota_bytes: 10GB             # e.g. the provider's free tier; omit for unlimited
  #   api_request_limit: 75000      # requests per month (UTC); omit for unlimited
  #   egress_byte_limit: 30GB       # bytes read per month; omit for unlimited
  #   ingress_byte_limit: null      # bytes written per month; null = unlimited
  #   max_connections: 32
  #   connect_timeout: 10           # seconds
  #   read_timeout: 60              # seconds

buckets:                     # the buckets Cairn serves over S3, and their access keys
  - name: {bucket}
    credentials:
      - access_key: {access_key}
        secret_key: "{secret_key}"   # keep this file private (it is written mode 0600)
    # encryption: true         # this bucket on/off; omit for encryption.enabled
        # permissions: [read, write, list, delete]   # the default; add admin to delete the bucket

# credentials:               # keys for several buckets; '*' means every bucket, and
#   - access_key: ...        # admin on '*' may create and delete buckets through S3
#     secret_key: ...
#     grants: {{"*": [read, write, list, delete, admin]}}
"""


def _random_string(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def render_starter(filename: str = _DEFAULT_CONFIG, bucket: str = "cairn") -> str:
    """Return a commented starter configuration with freshly generated credentials."""
    return _STARTER.format(
        filename=filename,
        bucket=bucket,
        access_key=_random_string(string.ascii_uppercase + string.digits, 20),
        secret_key=_random_string(string.ascii_letters + string.digits, 40),
        admin_token=secrets.token_urlsafe(32),
    )


def _write_private(path: Path, text: str, *, force: bool) -> None:
    """Write ``text`` with mode 0600; without ``force``, fail if ``path`` exists."""
    if not force:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@cli.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=_DEFAULT_CONFIG,
    show_default=True,
    help="Where to write the configuration.",
)
@click.option("--force", is_flag=True, help="Overwrite the file if it exists.")
@click.pass_context
def init(ctx: click.Context, output: Path, force: bool) -> None:
    """Write a commented starter configuration with generated S3 credentials."""
    text = render_starter(output.name)
    data = yaml.safe_load(text)
    config = parse_config(data, env={}, base_dir=output.parent)  # guards the template itself
    if output.is_dir():
        click.echo(f"error: {output} is a directory", err=True)
        ctx.exit(1)
    if (output.exists() or output.is_symlink()) and not force:
        click.echo(f"error: {output} already exists; use --force to overwrite it", err=True)
        ctx.exit(1)
    try:
        _write_private(output, text, force=force)
    except FileExistsError:
        click.echo(f"error: {output} already exists; use --force to overwrite it", err=True)
        ctx.exit(1)
    except OSError as exc:
        click.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
        ctx.exit(1)
    bucket = config.buckets[0]
    click.echo(
        f"Wrote {output}: one local backend (./data/disk1) and bucket {bucket.name!r} "
        f"with access key {bucket.credentials[0].access_key} (the secret key is in the file)."
    )
    click.echo(f"Next: edit it, then run `cairn validate --config {output}`.")


# --------------------------------------------------------------------------- serve


@cli.command()
@_config_option
@click.option(
    "--mode",
    type=click.Choice(["all", "api", "worker"]),
    default="all",
    show_default=True,
    help="api: S3 + admin API (+ mount); worker: background workers only; all: both.",
)
@click.option(
    "--mount",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also mount the pool with FUSE at this directory.",
)
@click.option(
    "--bucket",
    default=None,
    help="With --mount: mount this one bucket at the mount point instead of all buckets.",
)
@click.pass_context
def serve(
    ctx: click.Context, config_path: Path, mode: str, mount: Path | None, bucket: str | None
) -> None:
    """Run the daemon."""
    config = _load_or_exit(ctx, config_path)
    if config.database.kind == "sqlite" and mode != "all":
        click.echo(
            f"error: SQLite allows a single instance: --mode {mode} needs database.postgres "
            "(or run with --mode all)",
            err=True,
        )
        ctx.exit(1)
    if mount is not None and mode == "worker":
        click.echo("error: --mount needs --mode all or api (a worker serves no clients)", err=True)
        ctx.exit(1)
    try:
        daemon = importlib.import_module("frontends.daemon")
    except ImportError as exc:
        click.echo(f"serve is not available yet ({exc})", err=True)
        ctx.exit(2)
    code = daemon.serve(config, mode=mode, mount=mount, bucket=bucket)
    ctx.exit(int(code))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_config_option
@click.option(
    "--bucket",
    default=None,
    help="Mount this one bucket at DIRECTORY (default: every bucket as a subdirectory).",
)
@click.pass_context
def mount(ctx: click.Context, directory: Path, config_path: Path, bucket: str | None) -> None:
    """Mount the pool at DIRECTORY with FUSE until SIGTERM/SIGINT (no HTTP listener)."""
    config = _load_or_exit(ctx, config_path)
    daemon = importlib.import_module("frontends.daemon")
    code = daemon.serve(config, mode="mount", mount=directory, bucket=bucket)
    ctx.exit(int(code))


admin.add_command(keys_group)
cli.add_command(admin)


def main() -> None:
    """Console entry point (``cairn``)."""
    cli(prog_name="cairn")


if __name__ == "__main__":
    main()
