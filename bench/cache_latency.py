"""GET latency of small objects: cache off, cache miss, disk-cache hit, memory-cache hit.

For each backend kind (a local directory, and moto S3 on 127.0.0.1) it PUTs ``--count``
objects of ``--kib`` KiB through Cairn, then GETs every object one after another with
one boto3 client and reports the latency percentiles of each pass:

- ``cache off``: a daemon with ``cache.max_size: 0`` and no disk cache: its first pass
  (``off, 1st pass``, comparable to ``miss``) and its second (OS page cache as warm as
  for the hits);
- ``miss``: the first GET of each object with both caches on and empty;
- ``memory hit``: a later GET of each object (the third);
- ``disk hit``: after a restart (memory empty, the disk cache kept), the first GET;
  ``memory hit 2`` is the next pass in that restarted daemon.

    .venv/bin/python bench/cache_latency.py [--count 300] [--kib 64] [--skip-moto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from s3_throughput import BUCKET, cairn, free_port, process, s3_client


def gets(client: object, count: int) -> list[float]:
    """Latency (s) of one GET (body read) of each object, in order."""
    out = []
    for i in range(count):
        start = time.perf_counter()
        client.get_object(Bucket=BUCKET, Key=f"o/{i}")["Body"].read()  # type: ignore[attr-defined]
        out.append(time.perf_counter() - start)
    return out


def row(label: str, lat: list[float]) -> str:
    ms = sorted(x * 1000 for x in lat)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return (
        f"{label:14}{statistics.mean(ms):9.2f}{p(0.5):9.2f}{p(0.9):9.2f}{p(0.99):9.2f}"
        f"{len(ms) / (sum(ms) / 1000):10.0f}"
    )


def run(name: str, tmp: Path, backend: dict[str, object], count: int, kib: int) -> None:
    body = os.urandom(kib * 1024)
    db = tmp / f"{name}.db"
    on = {"cache": {"max_size": "256MiB", "disk_dir": str(tmp / f"{name}-disk"), "ttl": 0}}
    off = {"cache": {"max_size": 0}}
    lines = []
    with cairn(tmp, backend, sections=on, db=db) as (endpoint, _):
        client = s3_client(endpoint)
        for i in range(count):
            client.put_object(Bucket=BUCKET, Key=f"o/{i}", Body=body)  # type: ignore[attr-defined]
        miss = gets(client, count)
        time.sleep(1)  # let disk-cache writes finish
        gets(client, count)
        memory = gets(client, count)  # the second pass of hits, like "cache off"
    with cairn(tmp, backend, sections=on, db=db) as (endpoint, _):
        client = s3_client(endpoint)
        disk = gets(client, count)
        after_restart = gets(client, count)
    with cairn(tmp, backend, sections=off, db=db) as (endpoint, _):
        client = s3_client(endpoint)
        plain_first = gets(client, count)
        plain = gets(client, count)
    lines += [
        row("off, 1st pass", plain_first),
        row("cache off", plain),
        row("miss", miss),
        row("disk hit", disk),
        row("memory hit", memory),
        row("memory hit 2", after_restart),
    ]
    print(f"\n== {name}: {count} sequential GETs of {kib} KiB objects, one boto3 client")
    print(f"{'':14}{'mean ms':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'GET/s':>10}")
    for line in lines:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--kib", type=int, default=64)
    parser.add_argument("--skip-moto", action="store_true")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; client, daemon (and moto) share them")
    with tempfile.TemporaryDirectory(prefix="cairn-cache-bench-") as tmpdir:
        tmp = Path(tmpdir)
        local = {"name": "disk", "type": "local", "path": str(tmp / "local-disk")}
        run("local directory", tmp, local, args.count, args.kib)
        if args.skip_moto:
            return
        mport = free_port()
        moto_args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(mport)]
        with process(moto_args, f"http://127.0.0.1:{mport}/"):
            moto = s3_client(f"http://127.0.0.1:{mport}", "x", "y")
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
            run("moto S3", tmp, backend, args.count, args.kib)


if __name__ == "__main__":
    main()
