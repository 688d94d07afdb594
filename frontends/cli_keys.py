"""``cairn admin keys ...``: master key rotation and encryption conversion.

The commands open the core directly (``appliance.build.open_pool``) and call
``KeyService`` — the same methods the admin API calls. With SQLite, stop the daemon first
(one instance only); with PostgreSQL they can run beside running daemons.

Exit codes: 0 done, 1 error (the job is resumable: run the command again), 3 paused for
want of room (let GC free space or add capacity, then run it again).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import click

from appliance.build import Pool, open_pool
from appliance.config import ConfigError, load_config
from appliance.errors import CairnError
from appliance.meta.errors import MetaError
from appliance.services.keys import JobProgress, JobState, KeyStatus
from frontends.cli_options import config_option

EXIT_PAUSED = 3


_config_option = config_option()


def _describe(progress: JobProgress) -> str:
    share = f" ({100 * progress.done // progress.total}%)" if progress.total else ""
    line = (
        f"{progress.job.value}: {progress.state.value}, {progress.done}/{progress.total}{share}"
        f", {progress.changed} changed"
    )
    if progress.bytes_rewritten:
        line += f", {progress.bytes_rewritten} bytes rewritten"
    if progress.error:
        line += f" - {progress.error}"
    return line


class _Reporter:
    """Prints progress at most once a second, and the final state."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, progress: JobProgress) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0 or progress.state is not JobState.RUNNING:
            self._last = now
            click.echo(_describe(progress))


def _run(ctx: click.Context, config_path: Path, work: Callable[[Pool], Awaitable[int]]) -> None:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(1)

    async def main() -> int:
        pool = await open_pool(config)
        try:
            return await work(pool)
        finally:
            await pool.close()

    try:
        code = asyncio.run(main())
    except (CairnError, MetaError) as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(1)
    ctx.exit(code)


def _code(progress: JobProgress) -> int:
    return EXIT_PAUSED if progress.state is JobState.PAUSED else 0


@click.group()
def keys() -> None:
    """Master keys: status, rotation, encrypting or decrypting existing data."""


@keys.command()
@_config_option
@click.pass_context
def status(ctx: click.Context, config_path: Path) -> None:
    """Current master key, chunks per key id, and the jobs' progress."""

    async def work(pool: Pool) -> int:
        found: KeyStatus = await pool.keys.status()
        click.echo(f"current key:    {found.current_key_id or '(none configured)'}")
        click.echo(f"configured:     {', '.join(found.configured_key_ids) or '(none)'}")
        for key_id, count in sorted(found.chunks_by_key.items()):
            label = "unencrypted" if key_id == "none" else key_id
            click.echo(f"chunks {label}: {count}")
        for progress in found.jobs.values():
            click.echo(_describe(progress))
        return 0

    _run(ctx, config_path, work)


@keys.command()
@_config_option
@click.option(
    "--new-vault-version",
    is_flag=True,
    help="With a Vault Transit key: ask Vault for a new key version first.",
)
@click.pass_context
def rotate(ctx: click.Context, config_path: Path, new_vault_version: bool) -> None:
    """Re-wrap every data key under the current master key (rows only; resumable).

    Put the new key in encryption.key and the old one under encryption.previous_keys,
    run this, and remove the old key only after it reports done.
    """

    async def work(pool: Pool) -> int:
        return _code(
            await pool.keys.rotate(new_vault_version=new_vault_version, on_progress=_Reporter())
        )

    _run(ctx, config_path, work)


@keys.command("encrypt-existing")
@_config_option
@click.pass_context
def encrypt_existing(ctx: click.Context, config_path: Path) -> None:
    """Rewrite unencrypted objects of encrypted buckets (resumable, quota-aware)."""

    async def work(pool: Pool) -> int:
        return _code(await pool.keys.encrypt_existing(on_progress=_Reporter()))

    _run(ctx, config_path, work)


@keys.command("decrypt-existing")
@_config_option
@click.pass_context
def decrypt_existing(ctx: click.Context, config_path: Path) -> None:
    """Rewrite encrypted objects of unencrypted buckets (resumable, quota-aware)."""

    async def work(pool: Pool) -> int:
        return _code(await pool.keys.decrypt_existing(on_progress=_Reporter()))

    _run(ctx, config_path, work)


@keys.command()
def generate() -> None:
    """Print a new random master key (base64 of 32 bytes) for encryption.key.inline."""
    click.echo(base64.b64encode(os.urandom(32)).decode())
