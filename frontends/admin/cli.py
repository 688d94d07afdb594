"""``cairn admin``: the admin API from the command line.

The CLI talks HTTP to a running daemon, like the web console: it never opens the core.
Where to reach it comes from ``--url``/``--token`` (or ``CAIRN_ADMIN_URL`` and
``CAIRN_ADMIN_TOKEN``), else from the config file (``server.admin_host``,
``admin_port`` and ``admin_token``). Output is a readable table, or the API's JSON with
``--json``. An API error prints ``error: <code>: <message>`` and exits 1; an unreachable
daemon exits 2.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from appliance.config import ConfigError, load_config
from frontends.cli_options import config_option

PERMISSIONS = ("read", "write", "list", "delete", "admin")


class Unreachable(click.ClickException):
    exit_code = 2


@dataclass(frozen=True)
class AdminClient:
    url: str
    token: str | None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer (None for 204). Raises ``click.ClickException``."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url.rstrip('/')}/admin/api{path}", data=data, method=method
        )
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())
                message = f"{error['code']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            raise click.ClickException(message) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(f"cannot reach the admin API at {self.url}: {exc}") from exc
        return json.loads(raw) if raw else None


@dataclass(frozen=True)
class _Target:
    """Where the admin API is, resolved only when a command calls it (so commands of the
    group that work on the core directly, like ``keys``, need no reachable API)."""

    url: str | None
    token: str | None
    config_path: Path


def _client(ctx: click.Context) -> AdminClient:
    target = ctx.find_object(_Target)
    assert target is not None
    url, token = target.url, target.token
    if url is None or token is None:
        try:
            server = load_config(target.config_path).server
        except (ConfigError, OSError) as exc:
            if url is None:
                raise click.UsageError(
                    f"give --url and --token, or a readable --config ({exc})"
                ) from exc
        else:
            url = url or f"http://{server.admin_host}:{server.admin_port}"
            if token is None and server.admin_token is not None:
                token = server.admin_token.get_secret_value()
    assert url is not None
    return AdminClient(url, token)


def _print(ctx: click.Context, value: Any, rows: list[str]) -> None:
    if ctx.meta.get("cairn.json"):
        click.echo(json.dumps(value, indent=2))
    else:
        for row in rows:
            click.echo(row)


def _parse_grants(values: tuple[str, ...]) -> dict[str, list[str]]:
    """``BUCKET=perm,perm`` options to a grants object. Raises ``click.BadParameter``."""
    grants: dict[str, list[str]] = {}
    for value in values:
        bucket, sep, perms = value.partition("=")
        chosen = [p.strip() for p in perms.split(",") if p.strip()]
        if not sep or not bucket or not chosen or set(chosen) - set(PERMISSIONS):
            raise click.BadParameter(
                f"{value!r}: use BUCKET=PERM[,PERM...] with PERM one of {', '.join(PERMISSIONS)} "
                "(BUCKET may be '*')",
                param_hint="--grant",
            )
        grants[bucket] = chosen
    return grants


def _grants_text(grants: dict[str, list[str]]) -> str:
    return " ".join(f"{b}={','.join(p)}" for b, p in sorted(grants.items())) or "-"


@click.group()
@click.option("--url", envvar="CAIRN_ADMIN_URL", help="The admin API, e.g. http://127.0.0.1:9001")
@click.option("--token", envvar="CAIRN_ADMIN_TOKEN", help="The admin API's bearer token.")
@config_option("Where to read the admin API's address and token when --url/--token are not given.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def admin(
    ctx: click.Context, url: str | None, token: str | None, config_path: Path, as_json: bool
) -> None:
    """Manage buckets and access keys of a running Cairn (over its admin API)."""
    ctx.meta["cairn.json"] = as_json
    ctx.obj = _Target(url, token, config_path)


# -- buckets -------------------------------------------------------------------------
@admin.group()
def buckets() -> None:
    """List, create and delete buckets."""


def _bucket_row(b: dict[str, Any]) -> str:
    return f"{b['name']:<40} {b['objects']:>10} objects {b['bytes']:>16} bytes  {b['created_at']}"


@buckets.command("list")
@click.pass_context
def buckets_list(ctx: click.Context) -> None:
    found = _client(ctx).call("GET", "/buckets")
    _print(ctx, found, [_bucket_row(b) for b in found])


@buckets.command("create")
@click.argument("name")
@click.pass_context
def buckets_create(ctx: click.Context, name: str) -> None:
    made = _client(ctx).call("POST", "/buckets", {"name": name})
    _print(ctx, made, [f"created bucket {made['name']}"])


@buckets.command("delete")
@click.argument("name")
@click.pass_context
def buckets_delete(ctx: click.Context, name: str) -> None:
    """Delete an empty bucket (and every grant naming it)."""
    _client(ctx).call("DELETE", f"/buckets/{name}")
    _print(ctx, {"deleted": name}, [f"deleted bucket {name}"])


# -- credentials ---------------------------------------------------------------------
@admin.group()
def credentials() -> None:
    """Access keys: create, list, rotate, grant, delete."""


_GRANT = click.option(
    "--grant",
    "grant",
    multiple=True,
    required=True,
    help="BUCKET=PERM[,PERM...]; PERM: read, write, list, delete, admin; BUCKET may be '*'.",
)


def _key_row(k: dict[str, Any]) -> str:
    return f"{k['access_key']:<24} {_grants_text(k['grants']):<50} {k['description']}"


def _secret_rows(made: dict[str, Any]) -> list[str]:
    return [
        f"access_key: {made['access_key']}",
        f"secret_key: {made['secret_key']}",
        "(the secret is not shown again)",
    ]


@credentials.command("list")
@click.pass_context
def credentials_list(ctx: click.Context) -> None:
    found = _client(ctx).call("GET", "/keys")
    _print(ctx, found, [_key_row(k) for k in found])


@credentials.command("create")
@_GRANT
@click.option("--description", default="", help="A note: who or what uses the key.")
@click.option("--access-key", default=None, help="Choose the access key (else generated).")
@click.pass_context
def credentials_create(
    ctx: click.Context, grant: tuple[str, ...], description: str, access_key: str | None
) -> None:
    """Make a key; prints its secret once."""
    body: dict[str, Any] = {"grants": _parse_grants(grant), "description": description}
    if access_key:
        body["access_key"] = access_key
    made = _client(ctx).call("POST", "/keys", body)
    _print(ctx, made, _secret_rows(made))


@credentials.command("rotate")
@click.argument("access_key")
@click.pass_context
def credentials_rotate(ctx: click.Context, access_key: str) -> None:
    """Give a key a new secret; the old one stops working."""
    made = _client(ctx).call("POST", f"/keys/{access_key}/rotate")
    _print(ctx, made, _secret_rows(made))


@credentials.command("grant")
@click.argument("access_key")
@_GRANT
@click.pass_context
def credentials_grant(ctx: click.Context, access_key: str, grant: tuple[str, ...]) -> None:
    """Replace a key's grants."""
    info = _client(ctx).call("PUT", f"/keys/{access_key}/grants", {"grants": _parse_grants(grant)})
    _print(ctx, info, [_key_row(info)])


@credentials.command("delete")
@click.argument("access_key")
@click.pass_context
def credentials_delete(ctx: click.Context, access_key: str) -> None:
    _client(ctx).call("DELETE", f"/keys/{access_key}")
    _print(ctx, {"deleted": access_key}, [f"deleted access key {access_key}"])


# -- backends ------------------------------------------------------------------------
@admin.command("backends")
@click.pass_context
def backends_list(ctx: click.Context) -> None:
    """Each backend's state, space and monthly caps left."""
    found = _client(ctx).call("GET", "/backends")

    def row(b: dict[str, Any]) -> str:
        quota = "unlimited" if b["quota_bytes"] is None else f"{b['quota_bytes']} quota"
        circuit = b.get("circuit", "closed")
        line = f"{b['name']:<20} {b['state']:<10} {b['used_bytes']:>16} used  {quota}"
        line += f"  circuit {circuit}"
        if b.get("group"):
            line += f"  group {b['group']}"
        if circuit != "closed" and b.get("last_error"):
            line += f"  ({b['last_error']})"
        return line

    _print(ctx, found, [row(b) for b in found])


@admin.command("fsck")
@click.pass_context
def fsck(ctx: click.Context) -> None:
    """Check the metadata store against the backends; exit 1 when they disagree."""
    r = _client(ctx).call("GET", "/fsck")
    lines = [
        f"{r['chunks']} live chunks, {r['locations']} replicas recorded, {r['blobs']} blobs listed",
        f"missing blobs: {r['missing']}, orphan blobs: {r['orphans']}, "
        f"chunks below their factor: {r['below']}, above: {r['above']}",
        *r["ledger"],
        *r["unreachable"],
        *r["examples"],
        f"{r['problems']} problems",
    ]
    _print(ctx, r, lines)
    if r["problems"]:
        ctx.exit(1)


@admin.command("queue")
@click.argument("name", type=click.Choice(["gc", "replicate"]))
@click.pass_context
def queue_show(ctx: click.Context, name: str) -> None:
    """A background queue's items per state and its dead-lettered items."""
    found = _client(ctx).call("GET", f"/queues/{name}")
    depth = ", ".join(f"{n} {s}" for s, n in sorted(found["depth"].items())) or "empty"
    lines = [f"{name}: {depth}"]
    lines += [
        f"  dead #{d['item_id']} {d['key']}: {d['attempts']} attempts, {d['last_error']}"
        for d in found["dead"]
    ]
    _print(ctx, found, lines)


# -- encryption jobs (in the running daemon) -----------------------------------------
@admin.group()
def encryption() -> None:
    """Key jobs run by the daemon (rotate, encrypt, decrypt); see also ``cairn admin keys``,
    which runs them in this process against a stopped daemon's store."""


def _job_row(p: dict[str, Any]) -> str:
    error = f"  error: {p['error']}" if p.get("error") else ""
    counts = f"{p['done']}/{p['total']} done, {p['changed']} changed"
    return f"{p['job']:<8} {p['state']:<8} {counts}{error}"


@encryption.command("status")
@click.pass_context
def encryption_status(ctx: click.Context) -> None:
    found = _client(ctx).call("GET", "/encryption")
    rows = [f"current key: {found['current_key_id'] or '(none: encryption off)'}"]
    rows += [f"  {key}: {n} chunks" for key, n in sorted(found["chunks_by_key"].items())]
    rows += [_job_row(p) for p in found["jobs"].values()]
    _print(ctx, found, rows)


@encryption.command("start")
@click.argument("job", type=click.Choice(["rotate", "encrypt", "decrypt"]))
@click.option("--new-vault-version", is_flag=True, help="rotate: make Vault add a key version.")
@click.pass_context
def encryption_start(ctx: click.Context, job: str, new_vault_version: bool) -> None:
    """Start or resume a job in the daemon; follow it with ``status``."""
    body = {"new_vault_version": True} if new_vault_version else {}
    progress = _client(ctx).call("POST", f"/encryption/jobs/{job}", body)
    _print(ctx, progress, [_job_row(progress)])


@encryption.command("stop")
@click.argument("job", type=click.Choice(["rotate", "encrypt", "decrypt"]))
@click.pass_context
def encryption_stop(ctx: click.Context, job: str) -> None:
    progress = _client(ctx).call("DELETE", f"/encryption/jobs/{job}")
    _print(ctx, progress, [_job_row(progress)])
