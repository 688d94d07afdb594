"""Through the mount: a full pool gives ENOSPC and keeps committed data; a mount process
killed with files open loses no acknowledged byte (the spool is recovered)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.e2e.conftest import DaemonSpec
from tests.fuse.conftest import MountFactory

pytestmark = [pytest.mark.fuse, pytest.mark.e2e]
MiB = 1024 * 1024


@pytest.mark.allow_error_logs
def test_full_pool_gives_enospc_and_keeps_committed_data(mount_factory: MountFactory) -> None:
    daemon = mount_factory(DaemonSpec(quotas=(4 * MiB, 4 * MiB)))
    mnt = daemon.mnt
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 8 * MiB
    df = subprocess.run(
        ["df", "-B1", "--output=size", str(mnt)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(df[1]) == 8 * MiB
    keep = os.urandom(2 * MiB)
    (mnt / "keep.bin").write_bytes(keep)
    free_before = os.statvfs(mnt).f_bavail * st.f_frsize
    assert free_before < 6 * MiB + 4096
    written = 0
    refused: OSError | None = None
    fd = os.open(mnt / "big.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(20):
            written += os.write(fd, b"x" * MiB)
    except OSError as exc:
        refused = exc
    finally:
        with contextlib.suppress(OSError):  # the close may be refused too
            os.close(fd)
    assert refused is not None and refused.errno == errno.ENOSPC
    assert 3 * MiB <= written <= 6 * MiB  # refused at the write that no longer fits
    assert (mnt / "keep.bin").read_bytes() == keep
    body = daemon.client().get_object(Bucket="e2e", Key="keep.bin")["Body"].read()
    assert body == keep
    (mnt / "big.bin").unlink(missing_ok=True)
    deadline = time.monotonic() + 30  # the GC worker gives the space back
    while os.statvfs(mnt).f_bavail * st.f_frsize < free_before - MiB:
        assert time.monotonic() < deadline, "space not given back"
        time.sleep(0.5)
    (mnt / "after.bin").write_bytes(b"a" * MiB)
    assert (mnt / "after.bin").stat().st_size == MiB


WRITER = textwrap.dedent(
    """
    import os, sys, time
    mnt = sys.argv[1]
    big = os.open(os.path.join(mnt, "crash/big.bin"), os.O_WRONLY | os.O_CREAT, 0o640)
    for i in range(5):
        os.write(big, bytes([65 + i]) * (1024 * 1024))
    edit = os.open(os.path.join(mnt, "crash/existing.bin"), os.O_WRONLY)
    os.pwrite(edit, b"EDITED", 3 * 1024 * 1024 + 10)
    small = os.open(os.path.join(mnt, "crash/small.txt"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(small, b"small and dirty")
    print("ready", flush=True)
    time.sleep(300)
    """
)


def test_kill_9_with_dirty_files_open_loses_nothing(mount_factory: MountFactory) -> None:
    daemon = mount_factory()
    mnt = daemon.mnt
    (mnt / "crash").mkdir()
    existing = bytearray(os.urandom(5 * MiB))
    (mnt / "crash" / "existing.bin").write_bytes(existing)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(mnt)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=10)
    finally:
        writer.kill()
        writer.wait(timeout=10)
    daemon.kill()  # unmounts what the dead process left
    daemon.proc = None
    client = daemon.client
    daemon.start()
    assert "spool recovery" in daemon.output()
    expected_big = b"".join(bytes([65 + i]) * MiB for i in range(5))
    existing[3 * MiB + 10 : 3 * MiB + 16] = b"EDITED"
    s3 = client()
    for key, data in (
        ("crash/big.bin", expected_big),
        ("crash/existing.bin", bytes(existing)),
        ("crash/small.txt", b"small and dirty"),
    ):
        assert s3.get_object(Bucket="e2e", Key=key)["Body"].read() == data, key
        assert (mnt / key).read_bytes() == data
    assert oct((mnt / "crash" / "small.txt").stat().st_mode & 0o777) == "0o600"
    assert not any(daemon.root.joinpath("cairn-spool").iterdir())


CLOSER = textwrap.dedent(
    """
    import os, signal, sys
    where = os.path.join(sys.argv[1], "behind")
    for i in range(int(sys.argv[2])):
        with open(os.path.join(where, f"f{i:04d}"), "wb") as f:
            f.write(f"file {i} ".encode() * 1000)
    os.kill(int(sys.argv[3]), signal.SIGKILL)  # at once: the last commits are behind
    print("closed", flush=True)
    """
)


def test_kill_9_with_commits_behind_closed_files_loses_nothing(
    mount_factory: MountFactory,
) -> None:
    """Write-back: ``close`` returned for every file, most commits had not run when the
    process died; the next mount commits each from its spool, once."""
    count = 600
    daemon = mount_factory()
    (daemon.mnt / "behind").mkdir()
    assert daemon.proc is not None
    writer = subprocess.run(
        [sys.executable, "-c", CLOSER, str(daemon.mnt), str(count), str(daemon.proc.pid)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert writer.stdout.strip() == "closed"
    daemon.proc.wait(timeout=10)
    daemon.kill()
    daemon.proc = None
    daemon.start()
    recovered = daemon.output().count("spool recovery:")
    names = sorted(os.listdir(daemon.mnt / "behind"))
    assert names == [f"f{i:04d}" for i in range(count)]  # nothing lost, nothing twice
    s3 = daemon.client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="e2e", Prefix="behind/")
    keys = sorted(o["Key"] for p in pages for o in p.get("Contents", ()))
    assert keys == ["behind/", *(f"behind/f{i:04d}" for i in range(count))]  # the marker too
    for i in range(count):
        want = f"file {i} ".encode() * 1000
        assert (daemon.mnt / "behind" / f"f{i:04d}").read_bytes() == want, i
    assert not any(daemon.root.joinpath("cairn-spool").iterdir())
    assert recovered >= 1, "every commit had landed: the test did not cut one short"
