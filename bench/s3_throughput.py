"""S3 throughput of Cairn against going straight to the same backend, in one run.

Two baselines, each measured with the same client as Cairn:
- local: a plain aiohttp file server over a directory (bench/fileserver.py) versus Cairn
  with one local-directory backend; client: http.client streaming (Cairn through
  presigned URLs, so both sides move bytes the same way).
- moto: boto3 straight to a moto S3 server versus boto3 to Cairn with that moto bucket
  as its backend.
Each prints PUT/GET MB/s of one large object and ops/s of many small objects, and the
ratio Cairn/direct; both sides are up at once and measured in alternation, best of
``--rounds``. Finally the daemon's peak RSS (VmHWM) across a large upload and
download.

    .venv/bin/python bench/s3_throughput.py [--large-mib 512] [--small-count 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
import yaml
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
ACCESS, SECRET, BUCKET = "BENCHKEY00000001", "bench-secret-000000001", "bench"
PIECE = 1 << 20
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(args: list[str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 - a pipe nobody reads would block a server
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    try:
        wait_http(ready_url)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def cairn(
    tmp: Path,
    backend: dict[str, object],
    *,
    sections: dict[str, object] | None = None,
    db: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Cairn daemon over one backend; ``sections`` adds config sections (e.g. cache),
    ``db`` keeps the SQLite file at a given path (to restart on the same data)."""
    port = free_port()
    config = {
        **(sections or {}),
        "server": {"host": "127.0.0.1", "port": port, "admin_port": free_port()},
        "database": {"sqlite": {"path": str(db or tmp / f"cairn-{port}.db")}},
        "backends": [backend],
        "buckets": [
            {"name": BUCKET, "credentials": [{"access_key": ACCESS, "secret_key": SECRET}]}
        ],
    }
    path = tmp / f"cairn-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "frontends.cli", "serve", "--config", str(path)]
    endpoint = f"http://127.0.0.1:{port}"
    with process(args, endpoint + "/health/ready") as proc:
        yield endpoint, proc


def s3_client(endpoint: str, access: str = ACCESS, secret: str = SECRET) -> object:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            max_pool_connections=32,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


# -- the http.client side (local comparison) ---------------------------------------------


def http_put(url: str, path: Path | None = None, data: bytes | None = None) -> None:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    target = parts.path + ("?" + parts.query if parts.query else "")
    if path is not None:
        size = path.stat().st_size
        with path.open("rb") as body:
            conn.request("PUT", target, body=body, headers={"Content-Length": str(size)})
    else:
        assert data is not None
        conn.request("PUT", target, body=data, headers={"Content-Length": str(len(data))})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"PUT {url}: {resp.status}")


def http_get(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""))
    resp = conn.getresponse()
    total = 0
    while piece := resp.read(PIECE):
        total += len(piece)
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {url}: {resp.status}")
    return total


@dataclass
class Result:
    put_mbs: float
    get_mbs: float
    small_put_ops: float
    small_get_ops: float


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_many(count: int, fn: Callable[[int], object], workers: int) -> float:
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        list(pool.map(fn, range(count)))
        return time.perf_counter() - start


def measure_http(
    url_for: Callable[[str, str], str], big: Path, small: bytes, count: int, workers: int
) -> Result:
    size_mb = big.stat().st_size / MiB
    put = timed(lambda: http_put(url_for("PUT", "big.bin"), path=big))
    get = timed(lambda: http_get(url_for("GET", "big.bin")))
    sput = run_many(count, lambda i: http_put(url_for("PUT", f"s/{i}"), data=small), workers)
    sget = run_many(count, lambda i: http_get(url_for("GET", f"s/{i}")), workers)
    return Result(size_mb / put, size_mb / get, count / sput, count / sget)


def measure_boto3(
    client: object, bucket: str, big: Path, small: bytes, count: int, workers: int
) -> Result:
    s3: object = client
    size_mb = big.stat().st_size / MiB

    def put_big() -> None:
        with big.open("rb") as body:
            s3.put_object(Bucket=bucket, Key="big.bin", Body=body)  # type: ignore[attr-defined]

    def get_big() -> None:
        resp = s3.get_object(Bucket=bucket, Key="big.bin")  # type: ignore[attr-defined]
        for _ in resp["Body"].iter_chunks(PIECE):
            pass

    put = timed(put_big)
    get = timed(get_big)
    sput = run_many(
        count, lambda i: s3.put_object(Bucket=bucket, Key=f"s/{i}", Body=small), workers
    )  # type: ignore[attr-defined]
    sget = run_many(
        count, lambda i: s3.get_object(Bucket=bucket, Key=f"s/{i}")["Body"].read(), workers
    )  # type: ignore[attr-defined]
    return Result(size_mb / put, size_mb / get, count / sput, count / sget)


def best(results: list[Result]) -> Result:
    """The best figure of each metric over rounds (the machine is shared: the best is the
    least disturbed)."""
    return Result(
        *(
            max(getattr(r, f) for r in results)
            for f in ("put_mbs", "get_mbs", "small_put_ops", "small_get_ops")
        )
    )


def report(name: str, direct: Result, via: Result) -> None:
    print(f"\n== {name}")
    print(f"{'':28}{'direct':>12}{'cairn':>12}{'ratio':>8}")
    for label, attr, unit in [
        ("PUT large", "put_mbs", "MB/s"),
        ("GET large", "get_mbs", "MB/s"),
        ("PUT small", "small_put_ops", "ops/s"),
        ("GET small", "small_get_ops", "ops/s"),
    ]:
        d, c = getattr(direct, attr), getattr(via, attr)
        print(f"{label + ' (' + unit + ')':28}{d:12.1f}{c:12.1f}{c / d:8.2f}")


def hash_rates() -> dict[str, float]:
    """MB/s of one core hashing 8 MiB buffers: the bound on a single stream's PUT (every
    byte is MD5-hashed for the ETag and SHA-256-hashed per chunk) and GET (SHA-256
    verified), whatever else the daemon does."""
    data = os.urandom(8 * MiB)
    rates = {}
    for name in ("md5", "sha256"):
        start = time.perf_counter()
        for _ in range(16):
            hashlib.new(name, data).digest()
        rates[name] = 128 / (time.perf_counter() - start)
    return rates


def report_ceiling(direct: Result, rates: dict[str, float]) -> None:
    """How close Cairn could get at best: the hashing alone, against the direct path."""
    md5, sha = rates["md5"], rates["sha256"]
    both = 1 / (1 / md5 + 1 / sha)  # on one core; two hashes in parallel need two cores
    print(
        f"hashing on one core here: MD5 {md5:.0f} MB/s, SHA-256 {sha:.0f} MB/s. "
        f"A single-stream PUT cannot pass {md5:.0f} MB/s ({md5 / direct.put_mbs:.2f} of "
        f"direct; {both:.0f} MB/s = {both / direct.put_mbs:.2f} with both hashes on one "
        f"core), a GET {sha:.0f} MB/s ({sha / direct.get_mbs:.2f} of direct)"
    )


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_file(path: Path, mib: int) -> None:
    with path.open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(MiB))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large-mib", type=int, default=512)
    parser.add_argument("--small-count", type=int, default=1000)
    parser.add_argument("--small-kib", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rss-mib", type=int, default=1024)
    parser.add_argument("--skip-moto", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many, alternating")
    args = parser.parse_args()
    small = os.urandom(args.small_kib * 1024)
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmpdir:
        tmp = Path(tmpdir)
        big = tmp / "big.bin"
        make_file(big, args.large_mib)
        print(
            f"large object {args.large_mib} MiB, {args.small_count} x {args.small_kib} KiB "
            f"small objects with {args.workers} client threads, {os.cpu_count()} cores"
        )

        # local directory: plain file server vs Cairn with a local backend, both up at
        # once and measured in alternation, best of --rounds (the machine is shared)
        port = free_port()
        fs_args = [
            sys.executable,
            str(ROOT / "bench" / "fileserver.py"),
            str(tmp / "plain"),
            str(port),
        ]
        local = {"name": "disk", "type": "local", "path": str(tmp / "cairn-disk")}
        with (
            process(fs_args, f"http://127.0.0.1:{port}/probe"),
            cairn(tmp, local) as (
                endpoint,
                proc,
            ),
        ):
            signer = s3_client(endpoint)

            def presign(method: str, key: str) -> str:
                op = "put_object" if method == "PUT" else "get_object"
                return str(
                    signer.generate_presigned_url(
                        op, Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=3600
                    )
                )  # type: ignore[attr-defined]

            directs, vias, rates = [], [], []
            for _ in range(args.rounds):
                directs.append(
                    measure_http(
                        lambda _m, key: f"http://127.0.0.1:{port}/{key}",
                        big,
                        small,
                        args.small_count,
                        args.workers,
                    )
                )
                vias.append(measure_http(presign, big, small, args.small_count, args.workers))
                rates.append(hash_rates())
            direct = best(directs)
            report("local directory (http.client: plain file server vs Cairn)", direct, best(vias))
            report_ceiling(direct, {k: max(r[k] for r in rates) for k in rates[0]})
            print(
                f"daemon peak RSS after the runs above: {peak_rss_mib(proc.pid):.0f} MiB "
                "(the memory cache holds the small objects read)"
            )

        # peak RSS of the streaming path: a fresh daemon (default config, so the memory
        # cache is on but empty: a large stream read once is not kept) moving 1 GiB
        with cairn(tmp, {**local, "path": str(tmp / "cairn-rss")}) as (endpoint, proc):
            signer = s3_client(endpoint)
            idle = peak_rss_mib(proc.pid)
            rss_file = tmp / "rss.bin"
            make_file(rss_file, args.rss_mib)
            http_put(presign("PUT", "rss.bin"), path=rss_file)
            after_put = peak_rss_mib(proc.pid)
            http_get(presign("GET", "rss.bin"))
            print(
                f"\nfresh daemon, peak RSS over a {args.rss_mib} MiB upload and download: "
                f"{peak_rss_mib(proc.pid):.0f} MiB (at start {idle:.0f} MiB, after the "
                f"upload {after_put:.0f} MiB)"
            )

        if args.skip_moto:
            return
        mport = free_port()
        moto_args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(mport)]
        with process(moto_args, f"http://127.0.0.1:{mport}/"):
            moto = s3_client(f"http://127.0.0.1:{mport}", "x", "y")
            moto.create_bucket(Bucket="direct")  # type: ignore[attr-defined]
            moto.create_bucket(Bucket="pool")  # type: ignore[attr-defined]
            backend = {
                "name": "moto",
                "type": "s3",
                "endpoint": f"http://127.0.0.1:{mport}",
                "bucket": "pool",
                "access_key": "x",
                "secret_key": "y",
                "path_style": True,
            }
            with cairn(tmp, backend) as (endpoint, _proc):
                client = s3_client(endpoint)
                directs, vias = [], []
                for _ in range(args.rounds):
                    directs.append(
                        measure_boto3(moto, "direct", big, small, args.small_count, args.workers)
                    )
                    vias.append(
                        measure_boto3(client, BUCKET, big, small, args.small_count, args.workers)
                    )
            report(
                "moto S3 (boto3: straight to moto vs Cairn over moto)", best(directs), best(vias)
            )


if __name__ == "__main__":
    main()
