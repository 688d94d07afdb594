"""POSIX behaviour through a real mount (``cairn serve --mount``), and the same files
seen through S3."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.fuse.conftest import MountDaemon

pytestmark = [pytest.mark.fuse, pytest.mark.e2e]
MiB = 1024 * 1024
NOBODY = 65534
RENAME_NOREPLACE = 1
AT_FDCWD = -100


@pytest.fixture
def d(mounted: MountDaemon) -> Path:
    """A fresh directory on the mount for one test."""
    path = mounted.mnt / f"t-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def key_of(mounted: MountDaemon, path: Path) -> str:
    return str(path.relative_to(mounted.mnt))


def s3_get(mounted: MountDaemon, path: Path) -> bytes:
    body: bytes = (
        mounted.client().get_object(Bucket="e2e", Key=key_of(mounted, path))["Body"].read()
    )
    return body


def s3_meta(mounted: MountDaemon, path: Path) -> dict[str, str]:
    head = mounted.client().head_object(Bucket="e2e", Key=key_of(mounted, path))
    meta: dict[str, str] = head["Metadata"]
    return meta


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_create_read_at_offsets_hole_truncate_append(mounted: MountDaemon, d: Path) -> None:
    path = d / "f.bin"
    data = os.urandom(3 * MiB + 123)
    path.write_bytes(data)
    with path.open("rb") as f:
        f.seek(MiB - 7)
        assert f.read(100) == data[MiB - 7 : MiB + 93]
        f.seek(3 * MiB)
        assert f.read() == data[3 * MiB :]
    # write past EOF leaves a hole of zeros
    with path.open("r+b") as f:
        f.seek(len(data) + 1000)
        f.write(b"tail")
    expected = data + bytes(1000) + b"tail"
    assert path.read_bytes() == expected
    assert s3_get(mounted, path) == expected
    # truncate down, then up
    os.truncate(path, 10)
    assert path.read_bytes() == data[:10]
    os.truncate(path, 5000)
    assert path.stat().st_size == 5000
    assert path.read_bytes() == data[:10] + bytes(4990)
    # append
    with path.open("ab") as f:
        f.write(b"more")
    assert path.read_bytes()[-4:] == b"more"
    assert s3_get(mounted, path) == data[:10] + bytes(4990) + b"more"


def test_closed_file_is_readable_through_s3_with_same_metadata(
    mounted: MountDaemon, d: Path
) -> None:
    path = d / "photo.jpg"
    data = os.urandom(MiB + 17)
    path.write_bytes(data)
    os.chmod(path, 0o640)
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    head = mounted.client().head_object(Bucket="e2e", Key=key_of(mounted, path))
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "image/jpeg"
    assert s3_get(mounted, path) == data
    meta = head["Metadata"]
    assert meta["mode"] == str(stat.S_IFREG | 0o640)
    assert meta["mtime"] == "1600000000.123456789"
    assert meta["uid"] == "0"
    st = path.stat()
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert stat.S_IMODE(st.st_mode) == 0o640


def test_s3_put_appears_in_the_mount(mounted: MountDaemon, d: Path) -> None:
    client = mounted.client()
    key = key_of(mounted, d) + "/from-s3/x.txt"
    client.put_object(Bucket="e2e", Key=key, Body=b"one", Metadata={"color": "red"})
    path = mounted.mnt / key
    assert path.read_bytes() == b"one"
    assert os.getxattr(path, "user.color") == b"red"
    client.put_object(Bucket="e2e", Key=key, Body=b"second version")
    deadline = time.monotonic() + 5
    while path.read_bytes() != b"second version":  # after the attribute timeout (1 s)
        assert time.monotonic() < deadline, "the S3 write did not show up"
        time.sleep(0.2)
    client.delete_object(Bucket="e2e", Key=key)
    deadline = time.monotonic() + 5
    while path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_rename_over_existing_and_noreplace(mounted: MountDaemon, d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    os.rename(d / "a", d / "b")
    assert (d / "b").read_bytes() == b"A"
    assert not (d / "a").exists()
    assert s3_get(mounted, d / "b") == b"A"
    (d / "c").write_bytes(b"C")
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(AT_FDCWD, bytes(d / "c"), AT_FDCWD, bytes(d / "b"), RENAME_NOREPLACE)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert (d / "b").read_bytes() == b"A"


NOT_DATA = ("manifest", "tombstone")
"""Blobs a rename writes: the copies' manifests, the moved keys' tombstones."""


def test_rename_directory_of_1000_files_moves_no_data(mounted: MountDaemon, d: Path) -> None:
    src = d / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(1000):
        (src / "sub" / f"f{i:04d}").write_bytes(f"content {i}".encode())
    mounted.settle()  # the last files' commits may still run behind their close
    blobs_before = {b for b in mounted.blob_set() if not b[1].endswith(NOT_DATA)}
    started = time.monotonic()
    os.rename(src, d / "dst")
    took = time.monotonic() - started
    names = os.listdir(d / "dst" / "sub")
    assert len(names) == 1000
    assert (d / "dst" / "sub" / "f0999").read_bytes() == b"content 999"
    assert not src.exists()
    blobs_after = {b for b in mounted.blob_set() if not b[1].endswith(NOT_DATA)}
    assert blobs_after <= blobs_before  # only manifests and tombstones were written
    listed = mounted.client().list_objects_v2(Bucket="e2e", Prefix=key_of(mounted, d) + "/dst/sub/")
    assert listed["KeyCount"] == 1000
    print(f"renamed a directory of 1000 files in {took:.2f} s")


def test_unlink_of_an_open_file(mounted: MountDaemon, d: Path) -> None:
    path = d / "open.bin"
    data = os.urandom(2 * MiB)
    path.write_bytes(data)
    with path.open("rb") as f:
        os.unlink(path)
        assert not path.exists()
        assert f.read() == data
    with pytest.raises(ClientError, match="NoSuchKey"):
        s3_get(mounted, path)


def test_mkdir_p_rmdir_and_empty_directories_persist(mounted: MountDaemon, d: Path) -> None:
    deep = d / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert deep.is_dir()
    keys = mounted.client().list_objects_v2(Bucket="e2e", Prefix=key_of(mounted, d) + "/")
    assert key_of(mounted, deep) + "/" in [o["Key"] for o in keys["Contents"]]
    with pytest.raises(OSError, match="not empty") as info:
        os.rmdir(d / "a")
    assert info.value.errno == errno.ENOTEMPTY
    os.rmdir(deep)
    os.rmdir(d / "a" / "b")
    os.rmdir(d / "a")
    assert os.listdir(d) == []
    (d / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        os.mkdir(d / "f" / "x")
    with pytest.raises(FileExistsError):
        os.mkdir(d / "f")


def test_symlink_fifo_and_hard_link(mounted: MountDaemon, d: Path) -> None:
    (d / "target").write_bytes(b"T")
    os.symlink("target", d / "link")
    assert os.readlink(d / "link") == "target"
    assert (d / "link").read_bytes() == b"T"
    assert (d / "link").is_symlink()
    os.mkfifo(d / "fifo", 0o600)
    assert stat.S_ISFIFO(os.lstat(d / "fifo").st_mode)
    with pytest.raises(OSError, match="not supported") as info:
        os.link(d / "target", d / "hard")
    assert info.value.errno == errno.EOPNOTSUPP


def test_exclusive_create(mounted: MountDaemon, d: Path) -> None:
    fd = os.open(d / "x", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(d / "x", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)


def test_chmod_chown_utimes_persist_and_show_in_s3(mounted: MountDaemon, d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"x")
    os.chmod(path, 0o600)
    os.chown(path, 1234, 5678)
    os.utime(path, (1_000_000_000, 1_100_000_000))
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    assert st.st_mtime == 1_100_000_000
    meta = s3_meta(mounted, path)
    assert (meta["uid"], meta["gid"], meta["mtime"]) == ("1234", "5678", "1100000000.000000000")
    os.chmod(d, 0o700)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(d, 0o755)


def test_kernel_enforces_modes_and_posix_rules_for_other_users(
    mounted: MountDaemon, d: Path
) -> None:
    os.chmod(mounted.root, 0o755)  # let nobody reach the mount point
    os.chmod(d, 0o777)
    secret = d / "secret"
    secret.write_bytes(b"root only")
    os.chmod(secret, 0o600)
    result = as_nobody("cat", str(secret))
    assert result.returncode != 0 and "Permission denied" in result.stderr
    # a file nobody creates is owned by nobody
    assert as_nobody("sh", "-c", f"echo hi > {d}/mine").returncode == 0
    st = (d / "mine").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    # sticky directory: nobody cannot remove root's file
    os.chmod(d, 0o1777)
    (d / "roots").write_bytes(b"r")
    os.chmod(d / "roots", 0o666)
    result = as_nobody("rm", "-f", str(d / "roots"))
    assert result.returncode != 0 and (d / "roots").exists()
    # writing to a setuid file clears the setuid bit
    os.chown(d / "mine", NOBODY, NOBODY)
    os.chmod(d / "mine", 0o4777)
    (d / "setuid").write_bytes(b"s")
    os.chmod(d / "setuid", 0o4777)
    assert as_nobody("sh", "-c", f"echo more >> {d}/setuid").returncode == 0
    assert not (d / "setuid").stat().st_mode & stat.S_ISUID


def test_xattrs_map_to_s3_metadata(mounted: MountDaemon, d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"x")
    os.setxattr(path, "user.project", b"cairn")
    assert os.getxattr(path, "user.project") == b"cairn"
    assert "user.project" in os.listxattr(path)
    assert s3_meta(mounted, path)["project"] == "cairn"
    os.removexattr(path, "user.project")
    assert os.listxattr(path) == []
    with pytest.raises(OSError, match="No data") as info:
        os.getxattr(path, "user.project")
    assert info.value.errno == errno.ENODATA
    with pytest.raises(OSError, match="Invalid argument") as info:
        os.setxattr(path, "user.mode", b"1")
    assert info.value.errno == errno.EINVAL


def test_statfs_and_df_show_the_pool(mounted: MountDaemon) -> None:
    st = os.statvfs(mounted.mnt)
    total = sum(mounted.quotas.values())
    assert st.f_blocks * st.f_frsize == total
    assert 0 < st.f_bavail * st.f_frsize <= total
    out = subprocess.run(
        ["df", "-B1", "--output=size,avail", str(mounted.mnt)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert int(out[2]) == total


def test_concurrent_writers_to_different_files(mounted: MountDaemon, d: Path) -> None:
    blobs = {i: os.urandom(512 * 1024 + i) for i in range(8)}
    procs = [
        subprocess.Popen(
            ["dd", f"of={d / f'w{i}'}", "bs=64k", "status=none"], stdin=subprocess.PIPE
        )
        for i in blobs
    ]
    for i, proc in enumerate(procs):
        assert proc.stdin is not None
        proc.stdin.write(blobs[i])
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    for i, data in blobs.items():
        assert (d / f"w{i}").read_bytes() == data
        assert s3_get(mounted, d / f"w{i}") == data


def test_large_listing_is_paged(mounted: MountDaemon, d: Path) -> None:
    client = mounted.client()
    prefix = key_of(mounted, d) + "/many/"
    for i in range(2500):
        client.put_object(Bucket="e2e", Key=f"{prefix}{i:05d}", Body=b"")
    names = os.listdir(d / "many")
    assert sorted(names) == [f"{i:05d}" for i in range(2500)]


def test_mmap_read_and_shared_write(mounted: MountDaemon, d: Path) -> None:
    path = d / "mapped.bin"
    path.write_bytes(b"a" * 10000)
    with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as view:
        assert view[5000:5004] == b"aaaa"
        view[100:105] = b"HELLO"
        view.flush()
    assert path.read_bytes()[100:105] == b"HELLO"
    assert s3_get(mounted, path)[95:110] == b"aaaaaHELLOaaaaa"
