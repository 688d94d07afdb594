"""What a delete's tombstone costs: DeleteObject latency with and without tombstones.

In process (no HTTP): a pool on SQLite with one backend — a local directory, then moto
S3 on 127.0.0.1 — PUTs ``--count`` small objects and deletes them one after another,
once with tombstones (the default) and once without (``ObjectService.tombstones`` set
to None), and prints the latency percentiles of each pass and of one DeleteObjects of
``--batch`` keys.

    .venv/bin/python bench/delete_tombstones.py [--count 300] [--batch 500] [--skip-moto]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s3_throughput import free_port, process, s3_client

from appliance.build import Pool, open_pool
from appliance.config import parse_config


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def config(root: Path, backend: dict[str, Any]) -> Any:
    raw = {
        "database": {"sqlite": {"path": "cairn.db"}},
        "pool": {"gc_delay_seconds": 3600},
        "backends": [backend],
        "buckets": [{"name": "bench"}],
        "cache": {"max_size": 0},
    }
    return parse_config(raw, env={}, base_dir=root)


async def deletes(pool: Pool, count: int, tag: str) -> list[float]:
    for i in range(count):
        await pool.objects.put_object("bench", f"{tag}/{i}", body(b"x" * 1024), size=1024)
    out = []
    for i in range(count):
        start = time.perf_counter()
        await pool.objects.delete_object("bench", f"{tag}/{i}")
        out.append(time.perf_counter() - start)
    return out


async def batch(pool: Pool, count: int, tag: str) -> float:
    keys = [f"{tag}/{i}" for i in range(count)]
    for key in keys:
        await pool.objects.put_object("bench", key, body(b"x" * 1024), size=1024)
    start = time.perf_counter()
    await pool.objects.delete_objects("bench", keys)
    return time.perf_counter() - start


def ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100)
    return f"p50 {q[49] * 1000:6.2f} ms  p95 {q[94] * 1000:6.2f} ms"


async def measure(name: str, backend: dict[str, Any], count: int, size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pool = await open_pool(config(Path(tmp), backend))
        try:
            kept = pool.objects.tombstones
            with_t = await deletes(pool, count, "with")
            with_b = await batch(pool, size, "with-batch")
            pool.objects.tombstones = None
            without_t = await deletes(pool, count, "without")
            without_b = await batch(pool, size, "without-batch")
            pool.objects.tombstones = kept
        finally:
            await pool.close()
    print(f"{name}: DeleteObject with tombstone    {ms(with_t)}")
    print(f"{name}: DeleteObject without tombstone {ms(without_t)}")
    print(
        f"{name}: DeleteObjects of {size}: {with_b * 1000:.0f} ms with, "
        f"{without_b * 1000:.0f} ms without"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--skip-moto", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as disk:
        local = {"name": "d0", "type": "local", "path": disk}
        asyncio.run(measure("local dir", local, args.count, args.batch))
    if args.skip_moto:
        return
    port = free_port()
    moto_args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with process(moto_args, f"http://127.0.0.1:{port}/"):
        s3_client(f"http://127.0.0.1:{port}", "x", "y").create_bucket(Bucket="pool")  # type: ignore[attr-defined]
        s3 = {
            "name": "s3",
            "type": "s3",
            "endpoint": f"http://127.0.0.1:{port}",
            "bucket": "pool",
            "access_key": "x",
            "secret_key": "y",
            "path_style": True,
        }
        asyncio.run(measure("moto S3", s3, args.count, args.batch))


if __name__ == "__main__":
    main()
