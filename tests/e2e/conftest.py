"""The daemon as a user runs it, for end-to-end tests with real S3 clients.

``start_daemon(spec, root)`` writes a config (three local-directory backends with small,
different quotas; the bucket ``e2e`` with its credential, and a bucket ``other`` that the
``e2e`` credential has no grant on; 1 MiB chunks; ``gc_delay_seconds: 0``), runs
``python -m frontends.cli serve --config F`` on a free 127.0.0.1 port and waits for
``/health/ready``. The returned ``Daemon`` knows the endpoint, the credentials and the
backend directories, makes clients (boto3, and the environments/config files for the aws
cli, rclone and s3cmd), and stops the process with SIGTERM, asserting a clean exit (code 0)
and no ``Traceback`` / `` ERROR `` line in its output unless errors are expected.

Fixtures:

- ``cairn``: one daemon per test module, SQLite + ``pack`` (the full client matrix runs here).
- ``cairn_matrix``: one daemon per test module and combination of database (SQLite,
  PostgreSQL) and placement (``pack``, ``spread``), for the boto3 core suite.
- ``daemon_factory``: daemons of a test's own (custom quotas, restarts), stopped at its end;
  the test's ``allow_error_logs`` marker allows ERROR lines in their output.

Each PostgreSQL daemon gets a fresh schema, created and dropped here. Data directories live
on ``/dev/shm`` when it is there (the tests measure protocol behaviour, not the disk), else
under pytest's temporary directory; set ``CAIRN_E2E_TMP`` to choose another place.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from tests.conftest import pg_dsn

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
AWS = str(VENV_BIN / "aws")
S3CMD = str(VENV_BIN / "s3cmd")
RCLONE = shutil.which("rclone") or "/usr/bin/rclone"

BUCKET = "e2e"
ACCESS_KEY = "E2EKEY0000000001"
SECRET_KEY = "e2e-secret-000001"
OTHER_BUCKET = "other"
OTHER_ACCESS_KEY = "OTHERKEY00000001"
OTHER_SECRET_KEY = "other-secret-0001"
ADMIN_ACCESS_KEY = "ADMINKEY00000001"
ADMIN_SECRET_KEY = "admin-secret-0001"
"""A key with every permission on every bucket (``*``): may create and delete buckets."""
ADMIN_TOKEN = "e2e-admin-token-0000000001"
REGION = "us-east-1"
DOMAIN = "s3.cairn.test"
"""``server.domain`` of every test daemon: ``<bucket>.s3.cairn.test`` is virtual-hosted."""
CHUNK_SIZE = MiB
SECRET_BUCKET = "cairn-secret-e2e-bucket"
"""With encryption on: a bucket whose distinctive name must never reach a backend."""
E2E_MASTER_KEY = base64.b64encode(bytes(range(32))).decode()
DEFAULT_QUOTAS = (96 * MiB, 128 * MiB, 160 * MiB)
TEMP_MARK = ".cairn-tmp\\"
"""Local backends write blobs to temporary files with this prefix, then rename them."""
BAD_LOG_LINE = re.compile(r"Traceback|\sERROR\s")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0  # the daemon waits up to 30 s for in-flight requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _data_root() -> Path | None:
    chosen = os.environ.get("CAIRN_E2E_TMP")
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return None


@dataclass(frozen=True)
class DaemonSpec:
    """What kind of daemon to start."""

    db: str = "sqlite"
    placement: str = "pack"
    quotas: tuple[int, ...] = DEFAULT_QUOTAS
    encryption: str | None = None
    """None, ``"inline"`` or ``"file"``: the pool encrypts with a master key from there."""
    memory_cache: bool = True
    """False sets ``cache.max_size: 0``: every read reaches the backends (tamper tests)."""
    db_dsn: str | None = None
    """The daemon's PostgreSQL DSN when not ``CAIRN_TEST_PG_DSN`` (e.g. through a relay)."""

    @property
    def name(self) -> str:
        suffix = f"-enc-{self.encryption}" if self.encryption else ""
        return f"{self.db}-{self.placement}{suffix}"


MATRIX = [
    DaemonSpec("sqlite", "pack"),
    DaemonSpec("sqlite", "spread"),
    DaemonSpec("postgres", "pack"),
    DaemonSpec("postgres", "spread"),
]


async def _pg_exec(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _pg_fetch(dsn: str, schema: str, query: str) -> list[dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10, server_settings={"search_path": schema})
    try:
        return [dict(r) for r in await conn.fetch(query)]
    finally:
        await conn.close()


@dataclass
class Daemon:
    """One ``cairn serve`` subprocess and everything a test needs to talk to it."""

    spec: DaemonSpec
    root: Path
    port: int
    admin_port: int
    config_path: Path
    backends: dict[str, Path]
    quotas: dict[str, int]
    pg_schema: str | None = None
    expect_errors: bool = False
    bucket: str = BUCKET
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    proc: subprocess.Popen[bytes] | None = None
    missing_request_ids: list[str] = field(default_factory=list)
    _logs: list[Path] = field(default_factory=list)
    _stopping: bool = False

    # -- process -----------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._logs[-1]

    def start(self) -> None:
        """Start the process (again) and wait until ``/health/ready`` answers 200."""
        assert self.proc is None, "already running"
        log_path = self.root / f"daemon-{len(self._logs)}.log"
        self._logs.append(log_path)
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "frontends.cli", "serve", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=_daemon_env(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        # PYTHONFAULTHANDLER is on: SIGABRT makes the daemon print where every thread is
        self.proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.kill()
        raise AssertionError(f"daemon not ready after {START_TIMEOUT} s:\n{self.output()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to end on its own; its exit code."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not stop within {timeout} s") from None
        self.proc = None
        self._stopping = False
        return code

    def stop(self) -> int:
        """SIGTERM (unless already sent: a second one would kill), wait, return the exit code."""
        if not self._stopping:
            self.signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
            self._stopping = False

    def output(self) -> str:
        """Everything every run of this daemon printed so far."""
        return "\n".join(p.read_text(errors="replace") for p in self._logs if p.exists())

    def bad_lines(self) -> list[str]:
        return [line for line in self.output().splitlines() if BAD_LOG_LINE.search(line)]

    def stop_and_check(self) -> None:
        """Stop with SIGTERM: exit code 0, and no error lines unless expected."""
        code = self.stop()
        assert code == 0, f"daemon exited with {code}:\n{self.output()[-5000:]}"
        if not self.expect_errors:
            bad = self.bad_lines()
            assert not bad, "daemon logged errors:\n" + "\n".join(bad[:20])
        assert not self.missing_request_ids, (
            f"responses without x-amz-request-id: {self.missing_request_ids[:10]}"
        )

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> None:
        """Wait until the current run's output contains ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not logged within {timeout} s")

    # -- clients -----------------------------------------------------------------
    def client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        endpoint: str | None = None,
        **config: Any,
    ) -> Any:
        """A boto3 S3 client: SigV4, path style, no retries; checks every response's id."""
        options: dict[str, Any] = {
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            # one attempt, no retry ("max_attempts" counts retries in botocore's legacy mode)
            "retries": {"mode": "standard", "max_attempts": 1},
            "connect_timeout": 10,
            "read_timeout": 120,
        }
        options.update(config)
        session = boto3.session.Session()
        client = session.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(**options),
            verify=False,
        )

        def check_request_id(http_response: Any, model: Any, **_: Any) -> None:
            if http_response is not None and not http_response.headers.get("x-amz-request-id"):
                self.missing_request_ids.append(f"{model.name} -> {http_response.status_code}")

        client.meta.events.register("after-call.s3", check_request_id)
        return client

    def admin_client(self, **config: Any) -> Any:
        """A boto3 client with the key that holds ``admin`` on every bucket."""
        return self.client(access_key=ADMIN_ACCESS_KEY, secret_key=ADMIN_SECRET_KEY, **config)

    def admin(
        self, method: str, path: str, body: Any = None, *, token: str | None = ADMIN_TOKEN
    ) -> tuple[int, Any]:
        """Call the admin API (``path`` below ``/admin/api``): (status, decoded JSON or None)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/admin/api{path}", data=data, method=method
        )
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        return status, (json.loads(raw) if raw else None)

    def presign(
        self,
        method: str,
        path: str,
        expires: int = 300,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> str:
        """A SigV4 presigned URL (botocore's signer) for ``path`` (with its query string)."""
        request = AWSRequest(method=method, url=f"{self.endpoint}{path}")
        credentials = Credentials(access_key or self.access_key, secret_key or self.secret_key)
        S3SigV4QueryAuth(credentials, "s3", self.region, expires=expires).add_auth(request)
        return str(request.prepare().url)

    def client_env(self) -> dict[str, str]:
        """The test's environment without any AWS_* setting (e.g. a CA bundle)."""
        return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}

    def aws_env(self) -> dict[str, str]:
        env = self.client_env()
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION=self.region,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_MAX_ATTEMPTS="1",
            AWS_RETRY_MODE="standard",
        )
        return env

    def aws(
        self,
        *args: str,
        endpoint: str | None = None,
        timeout: float = 180,
        ok_codes: tuple[int, ...] = (0,),
        keys: tuple[str, str] | None = None,
    ) -> str:
        """Run ``aws --endpoint-url E <args>`` (with ``keys``, another access key and
        secret); its stdout. Fails the test on another exit code than ``ok_codes``
        (``aws s3 ls`` exits 1 when it finds nothing)."""
        command = [AWS, "--endpoint-url", endpoint or self.endpoint, *args]
        if endpoint and endpoint.startswith("https:"):
            command.insert(1, "--no-verify-ssl")
        env = self.aws_env()
        if keys is not None:
            env.update(AWS_ACCESS_KEY_ID=keys[0], AWS_SECRET_ACCESS_KEY=keys[1])
        return _run(command, env, timeout, ok_codes)

    def rclone_env(self) -> dict[str, str]:
        env = self.client_env()
        env.update(
            RCLONE_CONFIG=os.devnull,
            RCLONE_CONFIG_CAIRN_TYPE="s3",
            RCLONE_CONFIG_CAIRN_PROVIDER="Other",
            RCLONE_CONFIG_CAIRN_ENDPOINT=self.endpoint,
            RCLONE_CONFIG_CAIRN_ACCESS_KEY_ID=self.access_key,
            RCLONE_CONFIG_CAIRN_SECRET_ACCESS_KEY=self.secret_key,
            RCLONE_CONFIG_CAIRN_REGION=self.region,
            RCLONE_CONFIG_CAIRN_FORCE_PATH_STYLE="true",
        )
        return env

    def rclone(self, *args: str, timeout: float = 180) -> str:
        return _run(
            [RCLONE, "--retries", "1", "--low-level-retries", "1", *args],
            self.rclone_env(),
            timeout,
        )

    def s3cmd_config(self) -> Path:
        path = self.root / "s3cfg"
        path.write_text(
            "[default]\n"
            f"access_key = {self.access_key}\n"
            f"secret_key = {self.secret_key}\n"
            f"host_base = 127.0.0.1:{self.port}\n"
            f"host_bucket = 127.0.0.1:{self.port}\n"
            f"bucket_location = {self.region}\n"
            "use_https = False\n"
            "signature_v2 = False\n"
            "check_ssl_certificate = False\n"
            "max_retries = 1\n"
            "progress_meter = False\n"
        )
        return path

    def s3cmd(self, *args: str, timeout: float = 180) -> str:
        return _run([S3CMD, "-c", str(self.s3cmd_config()), *args], self.client_env(), timeout)

    # -- what is on the backends ---------------------------------------------------
    def blob_files(self) -> dict[str, dict[str, int]]:
        """Per backend: blob key -> file size, for every blob file (temporary files aside)."""
        found: dict[str, dict[str, int]] = {}
        for name, root in self.backends.items():
            files: dict[str, int] = {}
            for dirpath, _, names in os.walk(root):
                for fname in names:
                    if fname.startswith(TEMP_MARK):
                        continue
                    full = Path(dirpath, fname)
                    with contextlib.suppress(FileNotFoundError):
                        files[full.relative_to(root).as_posix()] = full.stat().st_size
            found[name] = files
        return found

    def blob_set(self) -> set[tuple[str, str]]:
        return {(b, key) for b, files in self.blob_files().items() for key in files}

    def disk_bytes(self) -> dict[str, int]:
        """Per backend: bytes of every file, temporary files included."""
        totals: dict[str, int] = {}
        for name, root in self.backends.items():
            total = 0
            for dirpath, _, names in os.walk(root):
                for fname in names:
                    with contextlib.suppress(FileNotFoundError):
                        total += Path(dirpath, fname).stat().st_size
            totals[name] = total
        return totals

    def wait_no_new_blobs(self, before: set[tuple[str, str]], timeout: float = 20.0) -> None:
        """Wait (GC runs every few seconds) until no blob exists that was not in ``before``."""
        deadline = time.monotonic() + timeout
        extra = self.blob_set() - before
        while extra and time.monotonic() < deadline:
            time.sleep(0.25)
            extra = self.blob_set() - before
        assert not extra, f"blobs left behind after GC: {sorted(extra)[:10]}"

    def wait_blobs_settled(self, quiet: float = 6.0, timeout: float = 45.0) -> None:
        """Wait until the blob files stop changing for ``quiet`` seconds (a GC pass)."""
        deadline = time.monotonic() + timeout
        last = self.blob_set()
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.blob_set()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
        raise AssertionError(f"blob files still changing after {timeout} s")

    # -- the metadata store --------------------------------------------------------
    def query(self, sql: str) -> list[dict[str, Any]]:
        """Rows of ``sql`` from the daemon's store (SQLite: only once it is stopped)."""
        if self.spec.db == "postgres":
            assert self.pg_schema is not None
            return asyncio.run(_pg_fetch(pg_dsn(), self.pg_schema, sql))
        assert self.proc is None, "stop the daemon before reading its SQLite file"
        conn = sqlite3.connect(f"file:{self.root / 'cairn.db'}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute(sql)]
        finally:
            conn.close()


def _daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def _run(
    command: list[str], env: dict[str, str], timeout: float, ok_codes: tuple[int, ...] = (0,)
) -> str:
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode in ok_codes, (
        f"{' '.join(command[:4])}... exited {result.returncode}\n"
        f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
    )
    return result.stdout


def write_config(
    daemon_root: Path, port: int, admin_port: int, spec: DaemonSpec, schema: str | None
) -> Path:
    backends = [
        {"name": f"disk{i}", "type": "local", "path": f"disk{i}", "quota_bytes": quota}
        for i, quota in enumerate(spec.quotas)
    ]
    database: dict[str, Any]
    if spec.db == "postgres":
        database = {"postgres": {"dsn": spec.db_dsn or pg_dsn(), "schema": schema}}
    else:
        database = {"sqlite": {"path": "cairn.db"}}
    config = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "admin_port": admin_port,
            "admin_token": ADMIN_TOKEN,
            "region": REGION,
            "domain": DOMAIN,
        },
        "database": database,
        "pool": {
            "chunk_size": CHUNK_SIZE,
            "placement": spec.placement,
            "replication_factor": 1,
            "gc_delay_seconds": 0,
        },
        "backends": backends,
        "buckets": [
            {
                "name": BUCKET,
                "credentials": [{"access_key": ACCESS_KEY, "secret_key": SECRET_KEY}],
            },
            {
                "name": OTHER_BUCKET,
                "credentials": [{"access_key": OTHER_ACCESS_KEY, "secret_key": OTHER_SECRET_KEY}],
            },
        ],
        "credentials": [
            {
                "access_key": ADMIN_ACCESS_KEY,
                "secret_key": ADMIN_SECRET_KEY,
                "grants": {"*": ["read", "write", "list", "delete", "admin"]},
            }
        ],
    }
    if not spec.memory_cache:
        config["cache"] = {"max_size": 0}
    if spec.encryption is not None:
        if spec.encryption == "file":
            (daemon_root / "master.key").write_bytes(base64.b64decode(E2E_MASTER_KEY))
            key: dict[str, Any] = {"file": "master.key"}
        else:
            key = {"inline": E2E_MASTER_KEY}
        config["encryption"] = {"enabled": True, "key": key}
        config["buckets"].append(  # type: ignore[attr-defined]
            {
                "name": SECRET_BUCKET,
                "credentials": [{"access_key": "E2ESECRETKEY0001", "secret_key": SECRET_KEY}],
            }
        )
    path = daemon_root / "cairn.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_daemon(spec: DaemonSpec, root: Path, *, expect_errors: bool = False) -> Daemon:
    """Create the config (and PG schema) under ``root`` and start the daemon."""
    root.mkdir(parents=True, exist_ok=True)
    schema = None
    if spec.db == "postgres":
        dsn = pg_dsn()
        schema = f"e2e_{uuid.uuid4().hex[:16]}"
        try:
            asyncio.run(_pg_exec(dsn, f"CREATE SCHEMA {schema}"))
        except Exception as exc:  # a configured but dead server is a failure, not a skip
            pytest.fail(f"cannot reach PostgreSQL at CAIRN_TEST_PG_DSN: {exc}")
    port, admin_port = free_port(), free_port()
    daemon = Daemon(
        spec=spec,
        root=root,
        port=port,
        admin_port=admin_port,
        config_path=write_config(root, port, admin_port, spec, schema),
        backends={f"disk{i}": root / f"disk{i}" for i in range(len(spec.quotas))},
        quotas={f"disk{i}": q for i, q in enumerate(spec.quotas)},
        pg_schema=schema,
        expect_errors=expect_errors,
    )
    try:
        daemon.start()
    except BaseException:
        _cleanup(daemon)
        raise
    return daemon


def _cleanup(daemon: Daemon) -> None:
    daemon.kill()
    if daemon.pg_schema is not None:
        with contextlib.suppress(Exception):
            asyncio.run(_pg_exec(pg_dsn(), f"DROP SCHEMA {daemon.pg_schema} CASCADE"))
    if os.environ.get("CAIRN_E2E_KEEP") != "1":
        shutil.rmtree(daemon.root, ignore_errors=True)


@contextlib.contextmanager
def running_daemon(
    spec: DaemonSpec, root: Path, *, expect_errors: bool = False
) -> Iterator[Daemon]:
    """A started daemon, stopped and checked (clean exit, no error lines) at the end."""
    daemon = start_daemon(spec, root, expect_errors=expect_errors)
    try:
        yield daemon
        if daemon.proc is not None:
            daemon.stop_and_check()
        elif not daemon.expect_errors:
            bad = daemon.bad_lines()
            assert not bad, "daemon logged errors:\n" + "\n".join(bad[:20])
    finally:
        _cleanup(daemon)


def _new_root(tmp_path_factory: pytest.TempPathFactory, label: str) -> Path:
    base = _data_root()
    if base is None:
        return tmp_path_factory.mktemp(label)
    return Path(tempfile.mkdtemp(prefix=f"cairn-e2e-{label}-", dir=base))


@pytest.fixture(scope="module")
def cairn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One SQLite + pack daemon for the test module."""
    with running_daemon(DaemonSpec(), _new_root(tmp_path_factory, "sqlite-pack")) as daemon:
        yield daemon


@pytest.fixture(scope="module", params=MATRIX, ids=[s.name for s in MATRIX])
def cairn_matrix(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """One daemon per module and database/placement combination."""
    spec: DaemonSpec = request.param
    with running_daemon(spec, _new_root(tmp_path_factory, spec.name)) as daemon:
        yield daemon


DaemonFactory = Callable[..., Daemon]


# -- TLS in front of the daemon ---------------------------------------------------------------


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (certificate file, key file)."""
    pytest.importorskip("cryptography")  # comes with moto[server]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "relay.crt", directory / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class TlsRelay:
    """A TLS terminator on 127.0.0.1 that relays bytes to the daemon's plain HTTP port.

    botocore (and so boto3 and the aws cli) sends ``aws-chunked`` bodies with a trailing
    checksum only over https; this lets the real clients do that against the daemon. The
    relay forwards bytes unchanged (the signed Host header names the relay's port, which
    is what the client signed), and counts how often it saw ``needle`` in requests.
    """

    def __init__(self, target_port: int, directory: Path, needle: bytes) -> None:
        self._target = target_port
        self._cert, self._key = self_signed_cert(directory)
        self._needle = needle.lower()
        self.seen = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="tls-relay", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> TlsRelay:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("TLS relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._cert, self._key)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
                await asyncio.gather(
                    self._pump(reader, up_writer, count=True),
                    self._pump(up_reader, writer, count=False),
                )
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool
    ) -> None:
        tail = b""
        try:
            while data := await reader.read(256 * 1024):
                if count:
                    window = (tail + data).lower()
                    self.seen += window.count(self._needle) - tail.lower().count(self._needle)
                    tail = data[-len(self._needle) :]
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


@pytest.fixture
def daemon_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonFactory]:
    """Start daemons of the test's own; each is stopped and checked when the test ends."""
    stack = contextlib.ExitStack()
    expect_errors = request.node.get_closest_marker("allow_error_logs") is not None

    def make(spec: DaemonSpec | None = None, **kwargs: Any) -> Daemon:
        chosen = spec or DaemonSpec(**kwargs)
        root = _new_root(tmp_path_factory, chosen.name)
        return stack.enter_context(running_daemon(chosen, root, expect_errors=expect_errors))

    with stack:
        yield make
