"""Pooled space end to end: objects larger than any backend, and the quota ledger's truth.

Backends here are small (a few MiB) so that the pool fills up: writes that do not fit are
refused with ``InsufficientStorage`` (507), and what the metadata store records per backend
must equal the bytes in the backend's directory, with no backend ever over its quota.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tests.e2e.conftest import CHUNK_SIZE, Daemon, DaemonFactory, DaemonSpec, MiB

pytestmark = pytest.mark.e2e

NO_ROOM = "InsufficientStorage"


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class DiskSampler:
    """Samples each backend directory's bytes (temporary files included) in a thread."""

    def __init__(self, daemon: Daemon, interval: float = 0.02, limit: float = 300.0) -> None:
        self._daemon = daemon
        self._interval = interval
        self._limit = limit
        self._stop = threading.Event()
        self.peak: dict[str, int] = dict.fromkeys(daemon.backends, 0)
        self.samples = 0
        self._thread = threading.Thread(target=self._run, name="disk-sampler", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self._limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            for name, size in self._daemon.disk_bytes().items():
                self.peak[name] = max(self.peak[name], size)
            self.samples += 1
            self._stop.wait(self._interval)

    @contextmanager
    def running(self) -> Iterator[DiskSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)


def space_rows(daemon: Daemon) -> dict[str, dict[str, Any]]:
    rows = daemon.query("SELECT name, quota_bytes, used_bytes, reserved_bytes FROM backend_space")
    return {row["name"]: row for row in rows}


def assert_ledger_is_true(daemon: Daemon) -> None:
    """With the daemon stopped (or idle): the store's view equals the disks."""
    files = daemon.blob_files()
    space = space_rows(daemon)
    for name, blobs in files.items():
        row = space[name]
        assert row["used_bytes"] == sum(blobs.values()), (name, row, len(blobs))
        assert row["reserved_bytes"] == 0, (name, row)
        assert row["used_bytes"] <= row["quota_bytes"] == daemon.quotas[name]
    assert daemon.query("SELECT COUNT(*) AS n FROM reservations")[0]["n"] == 0
    locations = daemon.query(
        "SELECT l.backend, l.blob_key, l.stored_size, c.refcount "
        "FROM locations l JOIN chunks c ON c.chunk_id = l.chunk_id"
    )
    recorded = {(row["backend"], row["blob_key"]): row for row in locations}
    present = {(b, key) for b, blobs in files.items() for key in blobs}
    assert set(recorded) == present, (
        f"unrecorded blobs: {sorted(present - set(recorded))[:5]}, "
        f"recorded but missing: {sorted(set(recorded) - present)[:5]}"
    )
    for (backend, key), row in recorded.items():
        assert files[backend][key] == row["stored_size"], (backend, key)
        assert row["refcount"] > 0, f"garbage left after GC: {backend}/{key}"


# -- one object over several backends --------------------------------------------------------


@pytest.mark.parametrize("placement", ["pack", "spread"])
def test_object_larger_than_any_backend_is_spread_over_them(
    daemon_factory: DaemonFactory, placement: str
) -> None:
    quotas = (6 * MiB, 8 * MiB, 10 * MiB)
    daemon = daemon_factory(DaemonSpec("sqlite", placement, quotas))
    s3 = daemon.client()
    size = 16 * MiB + 5  # more than any single backend holds
    body = data_of(size, 1)
    s3.upload_fileobj(
        io.BytesIO(body),
        "e2e",
        "span/big.bin",
        Config=TransferConfig(multipart_threshold=64 * MiB),  # one PutObject
    )
    per_backend = {name: len(files) for name, files in daemon.blob_files().items()}
    assert all(count > 0 for count in per_backend.values()), per_backend
    assert sum(per_backend.values()) == -(-size // CHUNK_SIZE)
    got = s3.get_object(Bucket="e2e", Key="span/big.bin")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    for start in range(CHUNK_SIZE - 3, size, 3 * CHUNK_SIZE):  # ranges across chunk edges
        ranged = s3.get_object(Bucket="e2e", Key="span/big.bin", Range=f"bytes={start}-{start + 9}")
        assert ranged["Body"].read() == body[start : start + 10]

    # the pool has room for about 7 more chunks: a larger write is refused, and cleaned up
    kept = daemon.blob_set()
    with pytest.raises(ClientError) as full:
        s3.put_object(Bucket="e2e", Key="span/too-much.bin", Body=data_of(12 * MiB, 2))
    assert full.value.response["Error"]["Code"] == NO_ROOM
    assert full.value.response["ResponseMetadata"]["HTTPStatusCode"] == 507
    daemon.wait_no_new_blobs(kept)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="e2e")["Contents"]] == ["span/big.bin"]
    daemon.stop_and_check()
    assert_ledger_is_true(daemon)


# -- the ledger after a random workload ------------------------------------------------------


class Workload:
    """Random puts, overwrites, multipart uploads, aborts and deletes; keeps the truth."""

    def __init__(self, daemon: Daemon, seed: int) -> None:
        self.daemon = daemon
        self.s3 = daemon.client(max_pool_connections=32)
        self.rng = random.Random(seed)
        self.objects: dict[str, str] = {}  # key -> sha256 of what must be there
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def put(self, s3: Any, key: str, size: int, seed: int) -> None:
        body = data_of(size, seed)
        error: Any = None
        try:
            s3.put_object(Bucket="e2e", Key=key, Body=body)
        except ClientError as exc:
            error = exc.response["Error"]
        if error is not None:
            assert error["Code"] == NO_ROOM, error
            self.count("put refused")
            return
        with self.lock:
            self.objects[key] = hashlib.sha256(body).hexdigest()
        self.count("put")

    def multipart(self, key: str, sizes: list[int], *, complete: bool) -> None:
        upload_id = self.s3.create_multipart_upload(Bucket="e2e", Key=key)["UploadId"]
        parts, blobs = [], []
        error: Any = None
        aborted = True
        try:
            if self.rng.random() < 0.5:  # a part sent twice: the first copy must be freed
                self.s3.upload_part(
                    Bucket="e2e",
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=1,
                    Body=data_of(sizes[0] // 2, self.rng.randrange(1 << 30)),
                )
                self.count("part replaced")
            for number, size in enumerate(sizes, 1):
                body = data_of(size, self.rng.randrange(1 << 30))
                etag = self.s3.upload_part(
                    Bucket="e2e", Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
                blobs.append(body)
            if not complete:
                raise _Abort
            self.s3.complete_multipart_upload(
                Bucket="e2e", Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            aborted = False
        except ClientError as exc:
            error = exc.response["Error"]
        except _Abort:
            pass
        if aborted:
            if error is not None:
                assert error["Code"] == NO_ROOM, error
                self.count("part refused")
            self.s3.abort_multipart_upload(Bucket="e2e", Key=key, UploadId=upload_id)
            self.count("abort")
            return
        self.objects[key] = hashlib.sha256(b"".join(blobs)).hexdigest()
        self.count("multipart")

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket="e2e", Key=key)
        with self.lock:
            self.objects.pop(key, None)
        self.count("delete")

    def random_phase(self, steps: int) -> None:
        for step in range(steps):
            roll = self.rng.random()
            existing = sorted(self.objects)
            if roll < 0.4 or not existing:
                key = f"rand/{step:03d}"
                self.put(self.s3, key, self.rng.randrange(0, 2 * MiB), step)
            elif roll < 0.6:
                key = self.rng.choice(existing)
                self.put(self.s3, key, self.rng.randrange(0, 2 * MiB), 1000 + step)
                self.count("overwrite")
            elif roll < 0.7:
                sizes = [5 * MiB, self.rng.randrange(1, MiB)]
                self.multipart(f"rand/mpu-{step:03d}", sizes, complete=True)
            elif roll < 0.8:
                self.multipart(f"rand/aborted-{step:03d}", [5 * MiB, 1000], complete=False)
            else:
                self.delete(self.rng.choice(existing))

    def make_room(self, free_bytes: int) -> None:
        """Delete objects until, once GC has run, the pool has ``free_bytes`` free.

        The random phase may leave the pool full; the concurrent phase must start with
        room, or it only measures refusals (this depended on GC timing before).
        """
        while True:
            self.daemon.wait_blobs_settled(quiet=2.0)
            used = self.daemon.disk_bytes()
            free = sum(quota - used[name] for name, quota in self.daemon.quotas.items())
            if free >= free_bytes or not self.objects:
                return
            for key in sorted(self.objects)[: max(1, len(self.objects) // 4)]:
                self.delete(key)

    def concurrent_phase(self, writers: int, puts_each: int) -> None:
        def writer(index: int) -> None:
            client = self.daemon.client()
            rng = random.Random(index)
            for n in range(puts_each):
                key = f"conc/{index:02d}/{rng.randrange(3)}"  # some overwrite their own keys
                self.put(client, key, rng.randrange(MiB // 2, 5 * MiB // 2), index * 100 + n)

        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(writer, range(writers)))

    def verify(self) -> None:
        listed: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket="e2e"):
            listed.update((o["Key"], o["Size"]) for o in page.get("Contents", []))
        assert sorted(listed) == sorted(self.objects)
        for key, digest in self.objects.items():
            body = self.s3.get_object(Bucket="e2e", Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == digest, key
        assert not self.s3.list_multipart_uploads(Bucket="e2e").get("Uploads")


class _Abort(Exception):
    pass


QUOTA_SPECS = [
    DaemonSpec("sqlite", "pack", (12 * MiB, 20 * MiB, 28 * MiB)),
    DaemonSpec("postgres", "spread", (12 * MiB, 20 * MiB, 28 * MiB)),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", QUOTA_SPECS, ids=[s.name for s in QUOTA_SPECS])
def test_recorded_space_equals_the_disks_and_quotas_hold(
    daemon_factory: DaemonFactory, spec: DaemonSpec
) -> None:
    daemon = daemon_factory(spec)
    work = Workload(daemon, seed=20260115)
    with DiskSampler(daemon).running() as sampler:
        work.random_phase(40)
        work.make_room(8 * MiB)
        before = dict(work.counts)
        work.concurrent_phase(writers=20, puts_each=4)
        concurrent = {k: v - before.get(k, 0) for k, v in work.counts.items()}
        for key in sorted(work.objects)[::2]:
            work.delete(key)
        work.verify()
        daemon.wait_blobs_settled()
    assert sampler.samples > 10
    for name, peak in sampler.peak.items():
        assert peak <= daemon.quotas[name], f"{name} held {peak} bytes over its quota"
    # both phases stored data, and the writers in parallel filled the pool up
    assert before.get("put", 0) > 0 and concurrent.get("put", 0) > 0, (before, concurrent)
    assert concurrent.get("put refused", 0) > 0, concurrent
    assert work.counts.get("abort", 0) > 0 and work.counts.get("multipart", 0) > 0, work.counts
    daemon.stop_and_check()
    assert_ledger_is_true(daemon)
