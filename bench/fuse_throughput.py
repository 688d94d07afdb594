"""Throughput of Cairn's FUSE mount against ``rclone mount`` and Cairn's own S3 path.

Two sets of backends, each measured in the same run:

- local: Cairn over two local directories versus ``rclone mount`` of a union of two
  local directories;
- moto: Cairn with a moto S3 bucket as its backend versus ``rclone mount`` of a bucket
  on the same moto server.

Rclone runs with ``--vfs-cache-mode writes --vfs-write-back 0s``: its ``close`` returns
before the upload, so its write rows are timed until the bytes are in the backend (the
point where Cairn's ``close`` returns), and the time ``close`` took is shown as well.
The large read starts on a fresh mount with the kernel's caches dropped (root only) and
rclone's cache directory emptied, so both read from the backend. The small files are
created, stat'ed and read in one session: rclone may serve them from its write cache.

Rows: sequential write and read of one large file (1 MiB blocks), and create + stat +
read of many small files, one process, one file at a time. The Cairn S3 row does the same
with boto3 against the daemon that serves the mount (one PUT/HEAD/GET per file).

    .venv/bin/python bench/fuse_throughput.py [--large-mib 1024] [--small-count 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_throughput import ACCESS, BUCKET, SECRET, free_port, process, s3_client

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BLOCK = MiB


@dataclass
class Row:
    write_mbs: float
    write_close_mbs: float
    read_mbs: float
    small_ops: float
    small_detail: str


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def unmount(path: Path) -> None:
    for args in (["-u"], ["-u", "-z"]):
        if not os.path.ismount(path):
            return
        subprocess.run(["fusermount3", *args, str(path)], capture_output=True, check=False)
        time.sleep(0.2)


@contextlib.contextmanager
def mounted(args: list[str], mnt: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    mnt.mkdir(parents=True, exist_ok=True)
    log = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(args, stdout=log, stderr=log, env=env)
    try:
        wait_until(lambda: os.path.ismount(mnt) or proc.poll() is not None, 60, f"{mnt}")
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"mount failed: {log.read().decode(errors='replace')[-2000:]}")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        unmount(mnt)
        log.close()


# -- the measurements -------------------------------------------------------------------


def write_large(src: Path, dst: Path, in_backend: Callable[[], bool]) -> tuple[float, float]:
    """(seconds until close returned, seconds until the bytes are in the backend)."""
    start = time.perf_counter()
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, BLOCK)
    closed = time.perf_counter() - start
    wait_until(in_backend, 600, "the upload")
    return closed, time.perf_counter() - start


def read_large(path: Path) -> float:
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.read(BLOCK):
            pass
    return time.perf_counter() - start


def small_files(
    where: Path, payload: bytes, count: int, in_backend: Callable[[], bool]
) -> tuple[float, float, float]:
    """Seconds to create (until in the backend), stat, and read ``count`` files."""
    start = time.perf_counter()
    for i in range(count):
        (where / f"s{i:05d}").write_bytes(payload)
    wait_until(in_backend, 600, "the small uploads")
    created = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(count):
        os.stat(where / f"s{i:05d}")
    stated = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(count):
        (where / f"s{i:05d}").read_bytes()
    return created, stated, time.perf_counter() - start


def measure_mount(
    remount: Callable[[], contextlib.AbstractContextManager[Path]],
    big: Path,
    payload: bytes,
    count: int,
    large_in_backend: Callable[[], bool],
    small_in_backend: Callable[[], bool],
    local_cache: Path | None = None,
) -> Row:
    size_mb = big.stat().st_size / MiB
    with remount() as mnt:
        closed, durable = write_large(big, mnt / "big.bin", large_in_backend)
    if local_cache is not None:  # the read must come from the backend, not a local copy
        shutil.rmtree(local_cache, ignore_errors=True)
    drop_caches()
    with remount() as mnt:
        read = read_large(mnt / "big.bin")
        (mnt / "small").mkdir()
        created, stated, reread = small_files(mnt / "small", payload, count, small_in_backend)
    total = created + stated + reread
    detail = (
        f"create {count / created:.0f}/s, stat {count / stated:.0f}/s, read {count / reread:.0f}/s"
    )
    return Row(size_mb / durable, size_mb / closed, size_mb / read, count / total, detail)


def measure_s3(endpoint: str, big: Path, payload: bytes, count: int) -> Row:
    s3: Any = s3_client(endpoint)
    size_mb = big.stat().st_size / MiB
    start = time.perf_counter()
    with big.open("rb") as body:
        s3.put_object(Bucket=BUCKET, Key="s3big.bin", Body=body)
    put = time.perf_counter() - start
    start = time.perf_counter()
    for _ in s3.get_object(Bucket=BUCKET, Key="s3big.bin")["Body"].iter_chunks(BLOCK):
        pass
    get = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(count):
        s3.put_object(Bucket=BUCKET, Key=f"s3small/{i:05d}", Body=payload)
    created = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(count):
        s3.head_object(Bucket=BUCKET, Key=f"s3small/{i:05d}")
    stated = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(count):
        s3.get_object(Bucket=BUCKET, Key=f"s3small/{i:05d}")["Body"].read()
    reread = time.perf_counter() - start
    total = created + stated + reread
    detail = f"PUT {count / created:.0f}/s, HEAD {count / stated:.0f}/s, GET {count / reread:.0f}/s"
    return Row(size_mb / put, size_mb / put, size_mb / get, count / total, detail)


def report(title: str, rows: dict[str, Row], count: int, kib: int) -> None:
    print(f"\n== {title}")
    print(f"{'':22}{'write MB/s':>12}{'(close)':>10}{'read MB/s':>11}{'small files/s':>15}")
    for name, row in rows.items():
        print(
            f"{name:22}{row.write_mbs:12.0f}{row.write_close_mbs:10.0f}{row.read_mbs:11.0f}"
            f"{row.small_ops:15.0f}   {row.small_detail}"
        )
    print(f"(small: {count} x {kib} KiB files, create+stat+read, one at a time)")


# -- the two set-ups ----------------------------------------------------------------------


def cairn_config(tmp: Path, name: str, backends: list[dict[str, object]]) -> tuple[Path, int]:
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "admin_port": free_port()},
        "database": {"sqlite": {"path": str(tmp / f"{name}.db")}},
        "pool": {"gc_delay_seconds": 3600},
        "mount": {"spool_dir": str(tmp / f"{name}-spool")},
        "backends": backends,
        "buckets": [
            {"name": BUCKET, "credentials": [{"access_key": ACCESS, "secret_key": SECRET}]}
        ],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def run_cairn(
    tmp: Path, name: str, backends: list[dict[str, object]], big: Path, payload: bytes, count: int
) -> tuple[Row, Row]:
    config, port = cairn_config(tmp, name, backends)
    mnt = tmp / f"{name}-mnt"
    args = [
        sys.executable,
        "-m",
        "frontends.cli",
        "serve",
        "--config",
        str(config),
        "--mount",
        str(mnt),
        "--bucket",
        BUCKET,
    ]

    @contextlib.contextmanager
    def remount() -> Iterator[Path]:
        with mounted(args, mnt):
            wait_until(lambda: _ready(port), 60, "cairn")
            yield mnt

    endpoint = f"http://127.0.0.1:{port}"
    client: Any = s3_client(endpoint)  # made once: making one takes longer than a check

    def large_committed() -> bool:
        # close waits for a large file's commit: this only confirms it
        head = client.head_object(Bucket=BUCKET, Key="big.bin")
        return bool(head["ContentLength"] == big.stat().st_size)

    def small_committed() -> bool:
        # small files commit behind their close (write-back): S3 answers once the
        # commits of files closed before the request have landed
        pages = client.get_paginator("list_objects_v2")
        found = sum(p.get("KeyCount", 0) for p in pages.paginate(Bucket=BUCKET, Prefix="small/s"))
        return bool(found >= count)

    row = measure_mount(remount, big, payload, count, large_committed, small_committed)
    with remount():
        s3 = measure_s3(f"http://127.0.0.1:{port}", big, payload, count)
    return row, s3


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2):
            return True
    except OSError:
        return False


def run_rclone(
    tmp: Path,
    remote: str,
    conf: Path,
    big: Path,
    payload: bytes,
    count: int,
    large_in_backend: Callable[[], bool],
    small_in_backend: Callable[[], bool],
) -> Row:
    label = remote.split(":")[0]
    mnt = tmp / f"rclone-{label}-mnt"
    args = [
        "rclone",
        "mount",
        remote,
        str(mnt),
        "--config",
        str(conf),
        "--vfs-cache-mode",
        "writes",
        "--vfs-write-back",
        "0s",
        "--cache-dir",
        str(tmp / f"rclone-{label}-cache"),
    ]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}

    @contextlib.contextmanager
    def remount() -> Iterator[Path]:
        with mounted(args, mnt, env):
            yield mnt

    return measure_mount(
        remount,
        big,
        payload,
        count,
        large_in_backend,
        small_in_backend,
        local_cache=tmp / f"rclone-{label}-cache",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--small-count", type=int, default=5000)
    parser.add_argument("--small-kib", type=int, default=16)
    parser.add_argument("--skip-moto", action="store_true")
    parser.add_argument("--dir", default=None, help="where to put the data (default: a tmp dir)")
    args = parser.parse_args()
    if shutil.which("rclone") is None or shutil.which("fusermount3") is None:
        sys.exit("rclone and fusermount3 are needed")
    payload = os.urandom(args.small_kib * 1024)
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="cairn-fuse-bench-", dir=args.dir) as tmpdir:
        tmp = Path(tmpdir)
        big = tmp / "source.bin"
        with big.open("wb") as out:
            for _ in range(args.large_mib):
                out.write(os.urandom(MiB))
        size = big.stat().st_size
        print(
            f"large file {args.large_mib} MiB, {args.small_count} x {args.small_kib} KiB small "
            f"files, {os.cpu_count()} cores, data under {tmp}"
        )

        # -- local directories
        dirs = [tmp / "u1", tmp / "u2"]
        for d in dirs:
            d.mkdir()
        conf = tmp / "rclone.conf"
        conf.write_text(f"[union]\ntype = union\nupstreams = {dirs[0]} {dirs[1]}\n")

        def local_big() -> bool:
            return any(
                (d / "big.bin").exists() and (d / "big.bin").stat().st_size == size for d in dirs
            )

        def local_small() -> bool:
            return sum(len(os.listdir(d / "small")) for d in dirs if (d / "small").is_dir()) >= (
                args.small_count
            )

        rows = {
            "rclone mount": run_rclone(
                tmp, "union:", conf, big, payload, args.small_count, local_big, local_small
            )
        }
        backends: list[dict[str, object]] = [
            {"name": "l1", "type": "local", "path": str(tmp / "c1")},
            {"name": "l2", "type": "local", "path": str(tmp / "c2")},
        ]
        rows["cairn mount"], rows["cairn S3 (boto3)"] = run_cairn(
            tmp, "local", backends, big, payload, args.small_count
        )
        report("two local directories", rows, args.small_count, args.small_kib)

        if args.skip_moto:
            return
        mport = free_port()
        moto_args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(mport)]
        with process(moto_args, f"http://127.0.0.1:{mport}/"):
            endpoint = f"http://127.0.0.1:{mport}"
            moto: Any = s3_client(endpoint, "x", "y")
            moto.create_bucket(Bucket="rclone")
            moto.create_bucket(Bucket="cairn")
            conf.write_text(
                "[moto]\ntype = s3\nprovider = Other\n"
                f"endpoint = {endpoint}\naccess_key_id = x\nsecret_access_key = y\n"
                "region = us-east-1\nforce_path_style = true\n"
            )

            def moto_big() -> bool:
                try:
                    head = moto.head_object(Bucket="rclone", Key="big.bin")
                except Exception:
                    return False
                return int(head["ContentLength"]) == size

            def moto_small() -> bool:
                listed = 0
                for page in moto.get_paginator("list_objects_v2").paginate(
                    Bucket="rclone", Prefix="small/"
                ):
                    listed += page.get("KeyCount", 0)
                return listed >= args.small_count

            rows = {
                "rclone mount": run_rclone(
                    tmp, "moto:rclone", conf, big, payload, args.small_count, moto_big, moto_small
                )
            }
            backend: dict[str, object] = {
                "name": "moto",
                "type": "s3",
                "endpoint": endpoint,
                "bucket": "cairn",
                "access_key": "x",
                "secret_key": "y",
                "path_style": True,
            }
            rows["cairn mount"], rows["cairn S3 (boto3)"] = run_cairn(
                tmp, "moto", [backend], big, payload, args.small_count
            )
            report("one moto S3 bucket", rows, args.small_count, args.small_kib)


if __name__ == "__main__":
    main()
