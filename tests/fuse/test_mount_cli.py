"""``cairn mount``: mounts without an HTTP listener, unmounts cleanly on SIGTERM/SIGINT
and on an unmount from outside, keeps what was written, and refuses clearly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, DaemonSpec
from tests.fuse.conftest import MountFactory, fuse_available

pytestmark = [pytest.mark.fuse, pytest.mark.e2e]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_mount_without_http_stops_cleanly_and_keeps_data(
    mount_factory: MountFactory, sig: int
) -> None:
    daemon = mount_factory(http=False, mount_bucket=None)
    mnt = daemon.mnt
    assert sorted(os.listdir(mnt)) == ["e2e", "other"]  # every bucket is a directory
    (mnt / "e2e" / "kept.txt").write_bytes(b"kept")
    fd = os.open(mnt / "e2e" / "open.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"written, still open at stop")
    assert daemon.proc is not None
    daemon.proc.send_signal(sig)
    deadline = time.monotonic() + 30
    while daemon.proc.poll() is None:
        assert time.monotonic() < deadline, "did not stop"
        time.sleep(0.1)
    with contextlib.suppress(OSError):  # the mount is gone under the open file
        os.close(fd)
    assert daemon.proc.returncode == 0, daemon.output()
    daemon.proc = None
    assert not os.path.ismount(mnt)
    daemon.start()  # again, and the open file was committed at the stop
    assert (mnt / "e2e" / "kept.txt").read_bytes() == b"kept"
    assert (mnt / "e2e" / "open.txt").read_bytes() == b"written, still open at stop"


def test_unmount_from_outside_stops_the_process(mount_factory: MountFactory) -> None:
    daemon = mount_factory(http=False)
    subprocess.run(["fusermount3", "-u", str(daemon.mnt)], check=True, timeout=30)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=30) == 0
    daemon.proc = None


def test_clear_error_when_the_mount_cannot_be_made(tmp_path: Path) -> None:
    if fuse_available():
        pytest.skip(fuse_available() or "")
    config = tmp_path / "c.yaml"
    config.write_text("backends:\n  - {name: d, type: local, path: d}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "frontends.cli",
            "mount",
            str(tmp_path / "missing"),
            "--config",
            str(config),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot mount" in result.stderr and "not a directory" in result.stderr


def test_mount_on_postgresql(mount_factory: MountFactory) -> None:
    """The same mount over a PostgreSQL metadata store (with S3 in the same process)."""
    daemon = mount_factory(DaemonSpec(db="postgres"))
    mnt = daemon.mnt
    (mnt / "dir" / "sub").mkdir(parents=True)
    data = os.urandom(3 * 1024 * 1024 + 5)
    (mnt / "dir" / "sub" / "f.bin").write_bytes(data)
    with (mnt / "dir" / "sub" / "f.bin").open("r+b") as f:
        f.seek(1024 * 1024 + 3)
        f.write(b"patch")
    expected = bytearray(data)
    expected[1024 * 1024 + 3 : 1024 * 1024 + 8] = b"patch"
    os.rename(mnt / "dir", mnt / "moved")
    s3 = daemon.client()
    body = s3.get_object(Bucket="e2e", Key="moved/sub/f.bin")["Body"].read()
    assert body == bytes(expected)
    s3.put_object(Bucket="e2e", Key="moved/from-s3.txt", Body=b"s3")
    assert sorted(os.listdir(mnt / "moved")) == ["from-s3.txt", "sub"]
    os.setxattr(mnt / "moved" / "from-s3.txt", "user.k", b"v")
    assert s3.head_object(Bucket="e2e", Key="moved/from-s3.txt")["Metadata"]["k"] == "v"
