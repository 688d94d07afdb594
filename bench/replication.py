"""Replication throughput: PUT at write_quorum 1 vs 2, GET with a slow replica.

In-process (the core over ``open_pool``, no HTTP), two local-directory backends in a
temporary directory (``/dev/shm`` when available) and SQLite, the memory cache off, so
the numbers show the data path: chunking, SHA-256, placement, replica reads and
verification. Backend latency is injected with the fault-injection wrapper (every call to
the backend waits ``--slow-ms`` first).

- PUT of one ``--mib`` MiB object, factor 2, write quorum 1 (the second replica is left
  to the worker, not run here) and 2 (both written in parallel before the ack).
- GET of that object (factor 2, both replicas present): both backends fast; the first
  backend ``--slow-ms`` slow from the start (reads learn to prefer the fast replica after
  a few chunks, hedging has no p95 yet), and slow only after one GET at full speed (its
  usual time is known: hedged reads ask the other replica at once, unhedged reads wait
  until the median moves), each with hedged reads off and on.

    .venv/bin/python bench/replication.py [--mib 512] [--slow-ms 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.build import Pool, open_pool
from appliance.config import parse_config
from backends.base import Backend
from backends.faults import FaultyBackend

PIECE = 1024 * 1024


def config(root: Path, *, quorum: int, hedged: bool = False) -> Any:
    raw = {
        "database": {"sqlite": {"path": str(root / "cairn.db")}},
        "pool": {
            "replication": {"factor": 2, "write_quorum": quorum, "hedged_reads": hedged},
        },
        "backends": [
            {"name": "d0", "type": "local", "path": str(root / "d0"), "replica_timeout": 60},
            {"name": "d1", "type": "local", "path": str(root / "d1"), "replica_timeout": 60},
        ],
        "buckets": [{"name": "bench"}],
        "cache": {"max_size": 0},
    }
    return parse_config(raw, env={}, base_dir=root)


async def opened(cfg: Any) -> tuple[Pool, dict[str, FaultyBackend]]:
    faults: dict[str, FaultyBackend] = {}

    def wrap(backend: Backend) -> Backend:
        faults[backend.name] = FaultyBackend(backend)
        return faults[backend.name]

    return await open_pool(cfg, wrap_backend=wrap), faults


async def body(size: int) -> AsyncIterator[bytes]:
    block = os.urandom(PIECE)
    for _ in range(size // PIECE):
        yield block


async def put(root: Path, size: int, quorum: int) -> float:
    pool, _ = await opened(config(root, quorum=quorum))
    try:
        started = time.perf_counter()
        await pool.objects.put_object("bench", "big", body(size), size=size)
        return time.perf_counter() - started
    finally:
        await pool.close()


async def get(root: Path, size: int, *, slow: float, hedged: bool, warm: bool = False) -> float:
    """Seconds for one GET; with ``warm``, after a first GET while d0 was still fast
    (so its usual read time is known when it turns slow)."""
    pool, faults = await opened(config(root, quorum=2, hedged=hedged))
    try:
        handle = await pool.objects.open_object("bench", "big")
        if warm:
            await read_all(pool, handle, size)
        if slow:
            faults["d0"].latency(slow)
        started = time.perf_counter()
        await read_all(pool, handle, size)
        return time.perf_counter() - started
    finally:
        await pool.close()


async def read_all(pool: Pool, handle: Any, size: int) -> None:
    got = 0
    async for piece in pool.objects.read(handle):
        got += len(piece)
    assert got == size


def rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 2**20:8.1f} MiB/s  ({seconds:6.2f} s)"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--slow-ms", type=int, default=200)
    args = parser.parse_args()
    size = args.mib * PIECE
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="cairn-bench-repl-", dir=base))
    try:
        print(f"object {args.mib} MiB, chunks 8 MiB, factor 2, two local backends in {root}")
        q1 = await put(root / "q1", size, 1)
        print(f"PUT  {'write_quorum 1':<42} {rate(size, q1)}")
        q2 = await put(root / "q2", size, 2)
        print(f"PUT  {'write_quorum 2':<42} {rate(size, q2)}")
        shutil.rmtree(root / "q1")
        slow = args.slow_ms / 1000
        fast = await get(root / "q2", size, slow=0, hedged=False)
        print(f"GET  {'both replicas fast':<42} {rate(size, fast)}")
        ms = args.slow_ms
        for warm in (False, True):
            when = "turns slow" if warm else "slow from the start"
            for hedged in (False, True):
                took = await get(root / "q2", size, slow=slow, hedged=hedged, warm=warm)
                label = f"d0 {ms} ms {when}, hedging {'on' if hedged else 'off'}"
                print(f"GET  {label:<42} {rate(size, took)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
