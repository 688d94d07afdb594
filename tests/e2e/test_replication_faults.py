"""Replication through the daemon while a backend goes away and comes back.

The pool has a local directory and an S3 backend (a moto server behind a TCP relay the
test can switch off and on: the provider is unreachable, its data survives). With
factor 2 every acknowledged object must stay readable while the S3 backend is away,
and once it is back the replication worker brings every chunk to two replicas again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import pg_dsn
from tests.e2e.conftest import (
    ACCESS_KEY,
    ADMIN_TOKEN,
    BUCKET,
    REGION,
    SECRET_KEY,
    Daemon,
    DaemonSpec,
    _cleanup,
    _new_root,
    _pg_exec,
    free_port,
)
from tests.fixtures_moto import MotoS3, run_moto_server
from tests.relay import Switch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MiB = 1024 * 1024
CHUNK = 256 * 1024


@contextlib.contextmanager
def replicated_daemon(
    root: Path, moto: MotoS3, switch: Switch, *, db: str, quorum: int
) -> Iterator[Daemon]:
    root.mkdir(parents=True, exist_ok=True)
    bucket = moto.new_bucket("repl")
    schema = None
    if db == "postgres":
        schema = f"e2e_{uuid.uuid4().hex[:16]}"
        asyncio.run(_pg_exec(pg_dsn(), f"CREATE SCHEMA {schema}"))
        database: dict[str, Any] = {"postgres": {"dsn": pg_dsn(), "schema": schema}}
    else:
        database = {"sqlite": {"path": "cairn.db"}}
    port, admin_port = free_port(), free_port()
    config = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "admin_port": admin_port,
            "admin_token": ADMIN_TOKEN,
            "region": REGION,
        },
        "database": database,
        "pool": {
            "chunk_size": CHUNK,
            "gc_delay_seconds": 0,
            "replication": {"factor": 2, "write_quorum": quorum, "retry_seconds": 0.5},
            "health": {"failure_threshold": 3, "open_seconds": 1, "check_interval": 0.5},
        },
        "cache": {"max_size": 0},
        "backends": [
            {"name": "disk0", "type": "local", "path": "disk0", "replica_timeout": 2},
            {
                "name": "s3",
                "type": "s3",
                "endpoint": f"http://127.0.0.1:{switch.port}",
                "region": moto.region,
                "bucket": bucket,
                "access_key": moto.access_key,
                "secret_key": moto.secret_key,
                "path_style": True,
                "connect_timeout": 1,
                "read_timeout": 5,
                "replica_timeout": 2,
            },
        ],
        "buckets": [
            {"name": BUCKET, "credentials": [{"access_key": ACCESS_KEY, "secret_key": SECRET_KEY}]}
        ],
    }
    path = root / "cairn.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = Daemon(
        spec=DaemonSpec(db=db),
        root=root,
        port=port,
        admin_port=admin_port,
        config_path=path,
        backends={"disk0": root / "disk0"},
        quotas={},
        pg_schema=schema,
        expect_errors=True,  # a stopped provider is logged at WARNING, reads may log more
    )
    try:
        daemon.start()
        yield daemon
        assert daemon.stop() == 0
    finally:
        _cleanup(daemon)


def replica_counts(daemon: Daemon) -> dict[str, set[str]]:
    """Backends of every live chunk, from the admin-visible store (PostgreSQL) or the
    SQLite file (read-only while the daemon runs: WAL allows a reader)."""
    if daemon.spec.db == "sqlite":
        import sqlite3

        conn = sqlite3.connect(f"file:{daemon.root / 'cairn.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT c.chunk_id, l.backend FROM chunks c "
                "LEFT JOIN locations l ON l.chunk_id = c.chunk_id WHERE c.refcount > 0"
            ).fetchall()
        finally:
            conn.close()
    else:
        rows = [
            (r["chunk_id"], r["backend"])
            for r in daemon.query(
                "SELECT c.chunk_id, l.backend FROM chunks c "
                "LEFT JOIN locations l ON l.chunk_id = c.chunk_id WHERE c.refcount > 0"
            )
        ]
    found: dict[str, set[str]] = {}
    for chunk_id, backend in rows:
        found.setdefault(chunk_id, set())
        if backend is not None:
            found[chunk_id].add(backend)
    return found


def wait_for_circuit(daemon: Daemon, name: str, states: tuple[str, ...]) -> None:
    """Wait (bounded) until backend ``name``'s circuit is in one of ``states``."""
    deadline = time.monotonic() + 20
    while True:
        status, backends = daemon.admin("GET", "/backends")
        assert status == 200, backends
        found = {b["name"]: b for b in backends}[name]
        if found["circuit"] in states:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: {found}\n{daemon.output()[-3000:]}")
        time.sleep(0.2)


def disk_blobs(daemon: Daemon) -> dict[str, bytes]:
    root = daemon.root / "disk0"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def provider_blobs(moto: MotoS3, daemon: Daemon) -> dict[str, bytes]:
    config = yaml.safe_load(daemon.config_path.read_text())
    bucket = config["backends"][1]["bucket"]
    return {
        key: moto.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for key in moto.keys(bucket)
    }


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with run_moto_server() as server:
        yield server


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_n2_keeps_every_acknowledged_object_while_a_provider_is_away(
    moto: MotoS3, tmp_path_factory: pytest.TempPathFactory, db: str
) -> None:
    target = int(moto.endpoint_url.rsplit(":", 1)[1])
    with (
        Switch(target) as switch,
        replicated_daemon(
            _new_root(tmp_path_factory, f"repl-{db}"), moto, switch, db=db, quorum=1
        ) as daemon,
    ):
        s3 = daemon.client()
        stored: dict[str, bytes] = {}

        def put(i: int) -> None:
            data = os.urandom(int.from_bytes(os.urandom(3), "big") % (3 * CHUNK) + 1)
            s3.put_object(Bucket=BUCKET, Key=f"obj-{i}", Body=data)
            stored[f"obj-{i}"] = data  # acknowledged

        def read_all() -> None:
            for key, data in stored.items():
                got = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                assert got == data, key

        for i in range(10):
            put(i)
        read_all()
        switch.off()  # the provider is gone mid-stream
        for i in range(10, 25):
            put(i)
            if i % 5 == 0:
                read_all()
        read_all()
        # while it is away, new chunks have one replica (on disk0) and wait in the queue
        status, queue = daemon.admin("GET", "/queues/replicate")
        assert status == 200 and queue["depth"].get("ready", 0) > 0, queue
        wait_for_circuit(daemon, "s3", ("open", "half_open"))
        switch.on()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = replica_counts(daemon)
            if counts and all(b == {"disk0", "s3"} for b in counts.values()):
                break
            time.sleep(0.5)
        counts = replica_counts(daemon)
        assert all(b == {"disk0", "s3"} for b in counts.values()), counts
        # the provider now holds the same blobs, byte for byte, as the disk
        assert provider_blobs(moto, daemon) == disk_blobs(daemon)
        read_all()
        wait_for_circuit(daemon, "s3", ("closed",))
        status, report = daemon.admin("GET", "/fsck")
        assert status == 200 and report["problems"] == 0, report


def test_quorum_2_acknowledged_put_survives_the_loss_of_either_backend(
    moto: MotoS3, tmp_path_factory: pytest.TempPathFactory
) -> None:
    target = int(moto.endpoint_url.rsplit(":", 1)[1])
    with (
        Switch(target) as switch,
        replicated_daemon(
            _new_root(tmp_path_factory, "repl-q2"), moto, switch, db="sqlite", quorum=2
        ) as daemon,
    ):
        s3 = daemon.client()
        data = os.urandom(2 * CHUNK + 3)
        s3.put_object(Bucket=BUCKET, Key="k", Body=data)
        # at the acknowledgement both backends hold every blob (nothing left to queue)
        assert daemon.admin("GET", "/queues/replicate")[1]["depth"] == {}
        blobs = disk_blobs(daemon)
        assert len(blobs) == 3  # 3 chunks (a plain PUT has no manifest)
        assert provider_blobs(moto, daemon) == blobs
        switch.off()  # the provider dies: the disk serves
        assert s3.get_object(Bucket=BUCKET, Key="k")["Body"].read() == data
        switch.on()
        # with the provider away, quorum 2 cannot be met: the PUT fails, nothing is kept
        switch.off()
        with pytest.raises(Exception, match=r"ServiceUnavailable|InsufficientStorage"):
            s3.put_object(Bucket=BUCKET, Key="k2", Body=b"x" * 100)
        switch.on()
        assert disk_blobs(daemon) == blobs
