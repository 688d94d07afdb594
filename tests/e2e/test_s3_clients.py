"""The aws cli, rclone and s3cmd against the real daemon (SQLite + pack).

botocore sends ``aws-chunked`` bodies with trailing checksums only over https, so the aws
cli and boto3 also run once through a TLS relay in front of the daemon: that is the path
current SDKs take against a real S3 endpoint.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from tests.e2e.conftest import RCLONE, Daemon, MiB, TlsRelay

pytestmark = pytest.mark.e2e


def write_random(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with path.open("wb") as out:
        left = size
        while left:
            step = min(left, 4 * MiB)
            out.write(rng.randbytes(step))
            left -= step
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def make_tree(root: Path, seed: int) -> dict[str, int]:
    """A folder tree: nested directories, empty, small and multipart-sized files."""
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    names = [
        "readme.txt",
        "empty.dat",
        "docs/a.md",
        "docs/b.md",
        "docs/deep/er/c.bin",
        "photos/2024/img 001.jpg",
        "photos/2024/img+002.jpg",
        "photos/2025/ümlaut.jpg",
        "big/nine-mib.bin",
    ]
    names += [f"many/file-{i:02d}.txt" for i in range(12)]
    for i, name in enumerate(names):
        size = 0 if name == "empty.dat" else rng.randrange(1, 300_000)
        if name == "docs/deep/er/c.bin":
            size = 2 * MiB + 5
        if name.startswith("big/"):
            size = 9 * MiB + 3
        write_random(root / name, size, seed * 1000 + i)
        sizes[name] = size
    return sizes


def tree_files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def remote_keys(s3: Any, prefix: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="e2e", Prefix=prefix):
        found.update((o["Key"], o["Size"]) for o in page.get("Contents", []))
    return found


@pytest.fixture(scope="module")
def s3(cairn: Daemon) -> Any:
    return cairn.client()


@pytest.fixture
def clean_prefix(s3: Any) -> Iterator[str]:
    """A prefix of the test's own, emptied afterwards so space returns for later tests."""
    prefix = f"t{random.randrange(10**8):08d}/"
    yield prefix
    keys = list(remote_keys(s3, prefix))
    for start in range(0, len(keys), 1000):
        s3.delete_objects(
            Bucket="e2e",
            Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True},
        )


# -- aws cli ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_aws_cli_cp_100mib_up_and_down(
    cairn: Daemon, s3: Any, tmp_path: Path, clean_prefix: str
) -> None:
    source = write_random(tmp_path / "hundred.bin", 100 * MiB, 1)
    target = f"s3://e2e/{clean_prefix}hundred.bin"
    cairn.aws("s3", "cp", "--only-show-errors", str(source), target)
    head = s3.head_object(Bucket="e2e", Key=f"{clean_prefix}hundred.bin")
    assert head["ContentLength"] == 100 * MiB
    assert head["ETag"].endswith('-13"')  # the cli's default 8 MiB parts
    back = tmp_path / "back.bin"
    cairn.aws("s3", "cp", "--only-show-errors", target, str(back))
    assert filecmp.cmp(source, back, shallow=False)
    listing = cairn.aws("s3", "ls", f"s3://e2e/{clean_prefix}")
    assert f"{100 * MiB} hundred.bin" in listing


def test_aws_cli_sync_ls_and_rm(cairn: Daemon, s3: Any, tmp_path: Path, clean_prefix: str) -> None:
    tree = tmp_path / "tree"
    sizes = make_tree(tree, 2)
    url = f"s3://e2e/{clean_prefix}tree"
    cairn.aws("s3", "sync", "--only-show-errors", str(tree), url)
    assert remote_keys(s3, f"{clean_prefix}tree/") == {
        f"{clean_prefix}tree/{name}": size for name, size in sizes.items()
    }

    listing = cairn.aws("s3", "ls", "--recursive", url + "/")
    listed = {}
    for line in listing.splitlines():
        _, _, size, key = line.split(maxsplit=3)
        listed[key] = int(size)
    assert listed == {f"{clean_prefix}tree/{name}": size for name, size in sizes.items()}

    down = tmp_path / "down"
    cairn.aws("s3", "sync", "--only-show-errors", url, str(down))
    assert tree_files(down) == tree_files(tree)

    # change one file, add one, remove one: a second sync moves exactly those
    write_random(tree / "docs/a.md", 1234, 99)
    write_random(tree / "docs/new.md", 77, 98)
    (tree / "many/file-03.txt").unlink()
    out = cairn.aws("s3", "sync", "--delete", "--no-progress", str(tree), url)
    actions = sorted(
        line.split(":", 1)[0] + ":" + line.rsplit("/", 1)[-1] for line in out.splitlines()
    )
    assert actions == ["delete:file-03.txt", "upload:a.md", "upload:new.md"], out
    down2 = tmp_path / "down2"
    cairn.aws("s3", "sync", "--only-show-errors", url, str(down2))
    assert tree_files(down2) == tree_files(tree)

    cairn.aws("s3", "rm", "--recursive", "--only-show-errors", url)
    assert remote_keys(s3, clean_prefix) == {}
    assert cairn.aws("s3", "ls", "--recursive", url + "/", ok_codes=(0, 1)).strip() == ""


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_aws_cli_and_boto3_over_tls_send_aws_chunked_with_trailing_checksums(
    cairn: Daemon, s3: Any, tmp_path: Path, clean_prefix: str
) -> None:
    with TlsRelay(cairn.port, tmp_path, b"STREAMING-UNSIGNED-PAYLOAD-TRAILER") as relay:
        small = write_random(tmp_path / "small.bin", 300_000, 3)
        large = write_random(tmp_path / "large.bin", 20 * MiB + 17, 4)
        for source in (small, large):
            cairn.aws(
                "s3",
                "cp",
                "--only-show-errors",
                str(source),
                f"s3://e2e/{clean_prefix}{source.name}",
                endpoint=relay.endpoint,
            )
        cli_streams = relay.seen
        assert cli_streams >= 4, "the aws cli did not send aws-chunked bodies over https"

        tls_client = cairn.client(endpoint=relay.endpoint)
        body = random.Random(5).randbytes(3 * MiB + 1)
        put = tls_client.put_object(Bucket="e2e", Key=f"{clean_prefix}boto3.bin", Body=body)
        assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
        assert "ChecksumCRC32" in put or "ChecksumCRC64NVME" in put or "ChecksumCRC32C" in put
        tls_client.upload_file(
            str(large),
            "e2e",
            f"{clean_prefix}boto3-mpu.bin",
            Config=TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB),
        )
        assert relay.seen >= cli_streams + 4
        got = tls_client.get_object(Bucket="e2e", Key=f"{clean_prefix}boto3.bin")
        assert got["Body"].read() == body

    # read back over plain http: byte-identical
    for source in (small, large):
        back = tmp_path / f"back-{source.name}"
        cairn.aws(
            "s3", "cp", "--only-show-errors", f"s3://e2e/{clean_prefix}{source.name}", str(back)
        )
        assert filecmp.cmp(source, back, shallow=False)
    mpu = s3.get_object(Bucket="e2e", Key=f"{clean_prefix}boto3-mpu.bin")["Body"].read()
    assert hashlib.sha256(mpu).hexdigest() == sha256_file(large)
    checked = s3.head_object(Bucket="e2e", Key=f"{clean_prefix}boto3.bin", ChecksumMode="ENABLED")
    sent = {k: v for k, v in put.items() if k.startswith("Checksum") and k != "ChecksumType"}
    assert sent and all(checked.get(k) == v for k, v in sent.items())


# -- rclone ----------------------------------------------------------------------------------


@pytest.mark.skipif(not Path(RCLONE).exists(), reason="rclone is not installed")
def test_rclone_copy_check_lsjson(
    cairn: Daemon, s3: Any, tmp_path: Path, clean_prefix: str
) -> None:
    tree = tmp_path / "tree"
    sizes = make_tree(tree, 6)
    remote = f"cairn:e2e/{clean_prefix}rc"
    # 5 MiB parts from 5 MiB on: the 9 MiB and 2 MiB files go up as multipart uploads
    cairn.rclone("copy", "--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M", str(tree), remote)
    assert s3.head_object(Bucket="e2e", Key=f"{clean_prefix}rc/big/nine-mib.bin")["ETag"].endswith(
        '-2"'
    )
    cairn.rclone("check", str(tree), remote)  # sizes and MD5s, one by one
    entries = json.loads(cairn.rclone("lsjson", "-R", "--files-only", "--hash", remote))
    assert {e["Path"]: e["Size"] for e in entries} == sizes
    for entry in entries:
        local = (tree / entry["Path"]).read_bytes()
        if "md5" in entry.get("Hashes", {}):
            assert entry["Hashes"]["md5"] == hashlib.md5(local).hexdigest(), entry["Path"]
    down = tmp_path / "down"
    cairn.rclone("copy", remote, str(down))
    assert tree_files(down) == tree_files(tree)
    (tree / "docs/b.md").write_bytes(b"changed")
    with pytest.raises(AssertionError):
        cairn.rclone("check", str(tree), remote)  # a difference is found and reported
    cairn.rclone("purge", remote)
    assert remote_keys(s3, clean_prefix) == {}


# -- s3cmd -----------------------------------------------------------------------------------


def test_s3cmd_put_get_ls_del(cairn: Daemon, s3: Any, tmp_path: Path, clean_prefix: str) -> None:
    small = write_random(tmp_path / "small file.txt", 5000, 7)
    large = write_random(tmp_path / "large.bin", 20 * MiB + 3, 8)  # s3cmd: 15 MiB parts
    base = f"s3://e2e/{clean_prefix}"
    cairn.s3cmd("put", str(small), base + "small file.txt")
    cairn.s3cmd("put", str(large), base + "large.bin")
    assert s3.head_object(Bucket="e2e", Key=f"{clean_prefix}large.bin")["ETag"].endswith('-2"')

    listing = cairn.s3cmd("ls", base)
    lines = {line.split(maxsplit=3)[3]: int(line.split()[2]) for line in listing.splitlines()}
    assert lines == {base + "small file.txt": 5000, base + "large.bin": 20 * MiB + 3}

    for name, source in (("small file.txt", small), ("large.bin", large)):
        back = tmp_path / f"back-{source.name}"
        cairn.s3cmd("get", "--force", base + name, str(back))
        assert filecmp.cmp(source, back, shallow=False)

    cairn.s3cmd("del", base + "small file.txt")
    cairn.s3cmd("del", base + "large.bin")
    assert cairn.s3cmd("ls", base).strip() == ""
    assert remote_keys(s3, clean_prefix) == {}
    os.remove(small)
