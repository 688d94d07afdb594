"""More real S3 tools against the daemon: restic, the MinIO Python SDK, rclone sync both
ways and across buckets, and s3cmd's bucket and copy commands."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    ADMIN_ACCESS_KEY,
    ADMIN_SECRET_KEY,
    BUCKET,
    RCLONE,
    Daemon,
    MiB,
)

pytestmark = pytest.mark.e2e

RESTIC = shutil.which("restic") or "/usr/bin/restic"


def make_tree(root: Path, seed: int, count: int = 30) -> dict[str, str]:
    rng = random.Random(seed)
    digests: dict[str, str] = {}
    for i in range(count):
        name = f"dir{i % 4}/sub{i % 3}/file-{i:03d}.bin"
        size = rng.choice([0, 17, 4096, 100_000, 3 * MiB + 1])
        data = rng.randbytes(size)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def tree_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def prefix(cairn: Daemon) -> Iterator[str]:
    chosen = f"tools{random.randrange(10**8):08d}"
    yield chosen
    s3 = cairn.client()
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=chosen)
        for o in page.get("Contents", [])
    ]
    for start in range(0, len(keys), 1000):
        s3.delete_objects(
            Bucket=BUCKET,
            Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True},
        )


# -- restic ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_restic_init_backup_check_restore(cairn: Daemon, tmp_path: Path, prefix: str) -> None:
    source = tmp_path / "data"
    digests = make_tree(source, 1)
    env = {
        **cairn.client_env(),
        "AWS_ACCESS_KEY_ID": cairn.access_key,
        "AWS_SECRET_ACCESS_KEY": cairn.secret_key,
        "RESTIC_REPOSITORY": f"s3:{cairn.endpoint}/{BUCKET}/{prefix}",
        "RESTIC_PASSWORD": "correct horse battery staple",
        "RESTIC_CACHE_DIR": str(tmp_path / "cache"),
    }

    def restic(*args: str) -> str:
        result = subprocess.run(
            [RESTIC, "--no-lock", *args] if args[0] == "check" else [RESTIC, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"restic {args[0]}: {result.stdout}\n{result.stderr}"
        return result.stdout

    restic("init")
    restic("backup", "--host", "e2e", str(source))
    (source / "dir0/new.txt").write_text("second snapshot")
    restic("backup", "--host", "e2e", str(source))
    assert "no errors were found" in restic("check", "--read-data")
    target = tmp_path / "restored"
    restic("restore", "latest", "--target", str(target))
    restored = tree_digests(target / source.relative_to("/"))
    digests["dir0/new.txt"] = hashlib.sha256(b"second snapshot").hexdigest()
    assert restored == digests
    assert len(restic("snapshots", "--json").strip()) > 2


# -- the MinIO Python SDK --------------------------------------------------------------------


def test_minio_python_sdk(cairn: Daemon, prefix: str) -> None:
    from minio import Minio
    from minio.commonconfig import CopySource, Tags
    from minio.deleteobjects import DeleteObject

    host = cairn.endpoint.removeprefix("http://")
    client = Minio(host, cairn.access_key, cairn.secret_key, secure=False, region="us-east-1")
    admin = Minio(host, ADMIN_ACCESS_KEY, ADMIN_SECRET_KEY, secure=False, region="us-east-1")
    assert client.bucket_exists(BUCKET)
    small = b"hello from minio"
    client.put_object(BUCKET, f"{prefix}/small.txt", io.BytesIO(small), len(small),
                      metadata={"x-amz-meta-app": "minio"})  # fmt: skip
    big = random.Random(2).randbytes(12 * MiB + 5)
    client.put_object(BUCKET, f"{prefix}/big.bin", io.BytesIO(big), -1, part_size=5 * MiB)
    stat = client.stat_object(BUCKET, f"{prefix}/big.bin")
    assert stat.size == len(big) and stat.etag.endswith("-3")
    with client.get_object(BUCKET, f"{prefix}/big.bin", offset=5 * MiB - 3, length=10) as got:
        assert got.read() == big[5 * MiB - 3 : 5 * MiB + 7]
    client.copy_object(BUCKET, f"{prefix}/copy.bin", CopySource(BUCKET, f"{prefix}/big.bin"))
    with client.get_object(BUCKET, f"{prefix}/copy.bin") as got:
        assert hashlib.sha256(got.read()).digest() == hashlib.sha256(big).digest()
    tags = Tags.new_object_tags()
    tags["team"] = "blue"
    client.set_object_tags(BUCKET, f"{prefix}/small.txt", tags)
    assert dict(client.get_object_tags(BUCKET, f"{prefix}/small.txt") or {}) == {"team": "blue"}
    names = sorted(o.object_name for o in client.list_objects(BUCKET, f"{prefix}/"))
    assert names == [f"{prefix}/big.bin", f"{prefix}/copy.bin", f"{prefix}/small.txt"]
    url = client.presigned_get_object(BUCKET, f"{prefix}/small.txt", expires=timedelta(minutes=5))
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == small
    errors = list(
        client.remove_objects(
            BUCKET,
            [DeleteObject(n) for n in names],
        )
    )
    assert errors == []
    admin.make_bucket("minio-made")
    assert admin.bucket_exists("minio-made")
    admin.remove_bucket("minio-made")
    assert not admin.bucket_exists("minio-made")


# -- rclone ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_rclone_sync_both_ways_and_across_buckets(
    cairn: Daemon, tmp_path: Path, prefix: str
) -> None:
    local = tmp_path / "local"
    make_tree(local, 3, count=20)
    remote = f"cairn:{BUCKET}/{prefix}/sync"
    cairn.rclone("sync", "--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M", str(local), remote)
    cairn.rclone("check", str(local), remote)
    # change, add and delete locally; sync makes the remote equal again
    victim = sorted(p for p in local.rglob("*") if p.is_file())[0]
    victim.unlink()
    (local / "dir1/added.txt").write_text("added")
    (local / "dir2").mkdir(exist_ok=True)
    (local / "dir2/changed.txt").write_text("v2")
    cairn.rclone("sync", str(local), remote)
    cairn.rclone("check", str(local), remote)
    # and back down into an empty folder
    down = tmp_path / "down"
    cairn.rclone("sync", remote, str(down))
    assert tree_digests(down) == tree_digests(local)
    # server-side copy into another bucket with the admin key
    env = cairn.rclone_env()
    env.update(
        RCLONE_CONFIG_CAIRN_ACCESS_KEY_ID=ADMIN_ACCESS_KEY,
        RCLONE_CONFIG_CAIRN_SECRET_ACCESS_KEY=ADMIN_SECRET_KEY,
    )
    rclone = [RCLONE, "--retries", "1"]
    for args in (
        ("mkdir", "cairn:rclone-made"),
        ("copyto", f"{remote}/dir1/added.txt", "cairn:rclone-made/added.txt"),
        ("cat", "cairn:rclone-made/added.txt"),
        ("purge", "cairn:rclone-made"),
    ):
        result = subprocess.run(
            [*rclone, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr
        if args[0] == "cat":
            assert result.stdout == "added"
    assert cairn.admin("GET", "/buckets/rclone-made")[0] == 404


# -- s3cmd -----------------------------------------------------------------------------------


def test_s3cmd_cp_mv_and_info(cairn: Daemon, tmp_path: Path, prefix: str) -> None:
    source = tmp_path / "s.txt"
    source.write_bytes(os.urandom(3000))
    base = f"s3://{BUCKET}/{prefix}/"
    cairn.s3cmd("put", str(source), base + "s.txt")
    cairn.s3cmd("cp", base + "s.txt", base + "copy.txt")  # server-side CopyObject
    cairn.s3cmd("mv", base + "copy.txt", base + "moved.txt")
    info = cairn.s3cmd("info", base + "moved.txt")
    assert "3000" in info
    back = tmp_path / "back.txt"
    cairn.s3cmd("get", base + "moved.txt", str(back))
    assert back.read_bytes() == source.read_bytes()
    listing = cairn.s3cmd("ls", base)
    assert "moved.txt" in listing and "copy.txt" not in listing
