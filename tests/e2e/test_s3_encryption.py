"""Encryption through the S3 daemon: inline and file master keys, and what the backends
hold afterwards (no bucket name, key, metadata or plaintext in any blob key or body)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tests.e2e.conftest import SECRET_BUCKET, SECRET_KEY, DaemonFactory, DaemonSpec, free_port

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
SPECS = [
    DaemonSpec("sqlite", encryption="inline"),
    DaemonSpec("sqlite", encryption="file"),
    DaemonSpec("postgres", "spread", encryption="inline"),
]


def windows(data: bytes, width: int = 24, count: int = 60) -> list[bytes]:
    step = max(1, (len(data) - width) // count)
    return [data[i : i + width] for i in range(0, len(data) - width + 1, step)]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_encrypted_pool_serves_s3_and_leaks_nothing(
    daemon_factory: DaemonFactory, spec: DaemonSpec
) -> None:
    daemon = daemon_factory(spec)
    s3 = daemon.client(access_key="E2ESECRETKEY0001", secret_key=SECRET_KEY)
    text = b"Cairn e2e plaintext: the treasure lies under the old oak tree. " * 60_000
    small = b"small distinctive e2e payload 0123456789"
    s3.put_object(
        Bucket=SECRET_BUCKET,
        Key="private/treasure-map.txt",
        Body=text,
        Metadata={"owner": "distinctive-owner-name"},
        ContentType="application/x-distinctive-type",
    )
    s3.put_object(Bucket=SECRET_BUCKET, Key="private/small-note.txt", Body=small)
    big = text + text[::-1]
    s3.upload_fileobj(
        io.BytesIO(big),
        SECRET_BUCKET,
        "uploads/multipart-secret.bin",
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    s3.copy_object(
        Bucket=SECRET_BUCKET,
        Key="copies/copied-secret.txt",
        CopySource={"Bucket": SECRET_BUCKET, "Key": "private/treasure-map.txt"},
    )

    got = s3.get_object(Bucket=SECRET_BUCKET, Key="private/treasure-map.txt")
    assert got["Body"].read() == text
    assert got["Metadata"] == {"owner": "distinctive-owner-name"}
    assert got["ContentType"] == "application/x-distinctive-type"
    ranged = s3.get_object(
        Bucket=SECRET_BUCKET, Key="private/treasure-map.txt", Range="bytes=1000000-2100000"
    )
    assert ranged["Body"].read() == text[1_000_000:2_100_001]
    assert s3.get_object(Bucket=SECRET_BUCKET, Key="private/small-note.txt")["Body"].read() == small
    multipart = s3.get_object(Bucket=SECRET_BUCKET, Key="uploads/multipart-secret.bin")
    assert multipart["Body"].read() == big
    copied = s3.get_object(Bucket=SECRET_BUCKET, Key="copies/copied-secret.txt")
    assert copied["Body"].read() == text
    listed = s3.list_objects_v2(Bucket=SECRET_BUCKET)
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "copies/copied-secret.txt",
        "private/small-note.txt",
        "private/treasure-map.txt",
        "uploads/multipart-secret.bin",
    ]

    needles = [
        SECRET_BUCKET.encode(),
        b"treasure-map",
        b"small-note",
        b"multipart-secret",
        b"copied-secret",
        b"private/",
        b"distinctive-owner-name",
        b"x-distinctive-type",
        *windows(text),
        *windows(big[len(text) :]),
        *windows(small, width=16, count=10),
    ]
    files = 0
    for name, blobs in daemon.blob_files().items():
        for key in blobs:
            path = Path(daemon.backends[name]) / key
            data = path.read_bytes()
            files += 1
            for needle in needles:
                assert needle not in key.encode(), (key, needle)
                assert needle not in data, (name, key, needle[:30])
    assert files >= 8


def test_daemon_refuses_to_start_with_an_unusable_key_file(tmp_path: Path) -> None:
    (tmp_path / "master.key").write_text("not a key\n")
    config = {
        "server": {"host": "127.0.0.1", "port": free_port(), "admin_port": free_port()},
        "database": {"sqlite": {"path": "cairn.db"}},
        "encryption": {"enabled": True, "key": {"file": "master.key"}},
        "backends": [{"name": "disk0", "type": "local", "path": "disk0"}],
    }
    path = tmp_path / "cairn.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "frontends.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "master key: cannot use master key file" in output and "Traceback" not in output


@pytest.mark.allow_error_logs
def test_tampered_blobs_give_errors_never_wrong_bytes(daemon_factory: DaemonFactory) -> None:
    # no memory cache: a cached chunk would (rightly) be served without reading the blob
    daemon = daemon_factory(DaemonSpec("sqlite", encryption="inline", memory_cache=False))
    s3 = daemon.client(access_key="E2ESECRETKEY0001", secret_key=SECRET_KEY)
    data = bytes(range(256)) * (3 * MiB // 256)  # three 1 MiB chunks
    s3.put_object(Bucket=SECRET_BUCKET, Key="t.bin", Body=data)
    blobs = {
        key.rsplit("/", 1)[1]: Path(daemon.backends[name]) / key
        for name, files in daemon.blob_files().items()
        for key in files
    }
    assert set(blobs) == {"000000", "000001", "000002"}

    def flip(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        raw[-1000] ^= 0x10
        path.write_bytes(bytes(raw))

    flip(blobs["000002"])  # the last chunk: the body is cut short, never wrong
    with pytest.raises(Exception) as cut:  # noqa: PT011 - botocore raises several kinds
        s3.get_object(Bucket=SECRET_BUCKET, Key="t.bin")["Body"].read()
    assert "IncompleteRead" in repr(cut.value) or "Connection" in repr(cut.value)
    ok = s3.get_object(Bucket=SECRET_BUCKET, Key="t.bin", Range=f"bytes=0-{2 * MiB - 1}")
    assert ok["Body"].read() == data[: 2 * MiB]  # undamaged chunks still read
    flip(blobs["000000"])  # the first chunk: an S3 error before any byte is sent
    with pytest.raises(ClientError) as failed:
        s3.get_object(Bucket=SECRET_BUCKET, Key="t.bin")
    assert failed.value.response["Error"]["Code"] == "InternalError"
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500


def test_key_jobs_through_the_admin_api(daemon_factory: DaemonFactory) -> None:
    import time

    daemon = daemon_factory(DaemonSpec("sqlite", encryption="inline"))
    s3 = daemon.client(access_key="E2ESECRETKEY0001", secret_key=SECRET_KEY)
    for i in range(5):
        s3.put_object(Bucket=SECRET_BUCKET, Key=f"k{i}", Body=os.urandom(1000 + i))
    status, state = daemon.admin("GET", "/encryption")
    assert status == 200
    current = state["current_key_id"]
    assert current.startswith("local:") and state["chunks_by_key"].get(current, 0) >= 5
    status, started = daemon.admin("POST", "/encryption/jobs/rotate")
    assert status == 202 and started["job"] == "rotate"
    deadline = time.monotonic() + 30
    while True:
        status, progress = daemon.admin("GET", "/encryption/jobs/rotate")
        if progress["state"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert progress["state"] == "done", progress
    assert daemon.admin("GET", "/encryption")[1]["jobs"]["rotate"]["state"] == "done"
    assert daemon.admin("POST", "/encryption/jobs/shuffle")[0] == 404
    bad = daemon.admin("POST", "/encryption/jobs/encrypt", {"new_vault_version": True})
    assert bad[0] == 400
    assert daemon.admin("GET", "/encryption/jobs/decrypt")[0] == 404  # never ran


def test_cairn_admin_encryption_cli(daemon_factory: DaemonFactory) -> None:
    from tests.e2e.conftest import ADMIN_TOKEN

    daemon = daemon_factory(DaemonSpec("sqlite", encryption="inline"))
    env = {
        **daemon.client_env(),
        "CAIRN_ADMIN_URL": f"http://127.0.0.1:{daemon.admin_port}",
        "CAIRN_ADMIN_TOKEN": ADMIN_TOKEN,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "frontends.cli", "admin", *args],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip

    status = run("encryption", "status")
    assert status.returncode == 0 and "current key: local:" in status.stdout
    started = run("encryption", "start", "rotate")
    assert started.returncode == 0 and started.stdout.startswith("rotate")
    assert run("encryption", "start", "shuffle").returncode == 2


def test_concurrent_reads_and_overwrites_of_encrypted_objects_return_exact_bytes(
    daemon_factory: DaemonFactory,
) -> None:
    """Chunk buffers are reused across requests (written chunks once stored, decrypted
    ones once sent): many clients reading the same encrypted objects while others
    overwrite them must each get exactly one version's bytes."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    # no memory cache: every decrypted chunk goes to the frontend in a pooled buffer
    daemon = daemon_factory(DaemonSpec("sqlite", encryption="inline", memory_cache=False))
    s3 = daemon.client(access_key="E2ESECRETKEY0001", secret_key=SECRET_KEY)
    versions = {k: [os.urandom(5 * MiB + 333 * k) for _ in range(3)] for k in range(4)}
    digests = {k: {hashlib.sha256(v).hexdigest() for v in vs} for k, vs in versions.items()}
    for k, vs in versions.items():
        s3.put_object(Bucket=SECRET_BUCKET, Key=f"race/{k}", Body=vs[0])

    def read(k: int) -> tuple[int, str]:
        body = s3.get_object(Bucket=SECRET_BUCKET, Key=f"race/{k}")["Body"].read()
        return k, hashlib.sha256(body).hexdigest()

    def write(k: int) -> None:
        for body in versions[k][1:]:  # in order: the last one must win
            s3.put_object(Bucket=SECRET_BUCKET, Key=f"race/{k}", Body=body)

    with ThreadPoolExecutor(10) as pool:
        reads = [pool.submit(read, k % 4) for k in range(48)]
        writes = [pool.submit(write, k) for k in range(4)]
        for w in writes:
            w.result()
        for r in reads:
            k, digest = r.result()
            assert digest in digests[k], f"race/{k} returned bytes of no version"
    for k in range(4):
        assert read(k)[1] == hashlib.sha256(versions[k][2]).hexdigest()
