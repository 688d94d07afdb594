"""Consistency check of the metadata store against the backends (``cairn admin fsck``).

Read-only. For every backend it compares the replicas the store records with the blobs
the backend lists, and the quota ledger with the recorded replicas; for every live chunk
it checks the replication factor. Run it when the pool is quiet: a write in flight has
blobs not recorded yet (they show as orphans until it commits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.meta.store import MetadataStore
from appliance.placement.pool import PoolState
from appliance.placement.replication import ReplicationPolicy
from appliance.services.replication import assess
from backends.errors import BackendError

LISTED = 100
"""At most this many missing or orphan blobs are named in a report (all are counted)."""


@dataclass
class FsckReport:
    chunks: int = 0
    locations: int = 0
    blobs: int = 0
    missing: int = 0
    """Replicas recorded whose blob the backend does not list."""
    orphans: int = 0
    """Blobs no replica record names."""
    below: int = 0
    above: int = 0
    ledger: list[str] = field(default_factory=list)
    """Backends whose used bytes differ from the sum of their recorded replicas."""
    unreachable: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    """Up to ``LISTED`` missing/orphan blobs, as ``missing d0:<key>`` / ``orphan d0:<key>``."""

    @property
    def problems(self) -> int:
        return (
            self.missing
            + self.orphans
            + self.below
            + self.above
            + len(self.ledger)
            + len(self.unreachable)
        )


class Fsck:
    """Runs the check (see the module docstring)."""

    def __init__(self, store: MetadataStore, pool: PoolState, policy: ReplicationPolicy) -> None:
        self._store = store
        self._pool = pool
        self._policy = policy

    async def run(self) -> FsckReport:
        report = FsckReport()
        space = {s.name: s.used_bytes for s in await self._store.get_space()}
        for name in self._pool.names():
            recorded: dict[str, int] = {}
            after = ""
            while page := await self._store.list_locations(name, after=after):
                recorded.update((loc.blob_key, loc.stored_size) for loc in page)
                after = page[-1].blob_key
            report.locations += len(recorded)
            if space.get(name, 0) != sum(recorded.values()):
                report.ledger.append(
                    f"{name}: ledger says {space.get(name, 0)} bytes used, "
                    f"recorded replicas hold {sum(recorded.values())}"
                )
            try:
                listed = {info.key async for info in self._pool.backend(name).list()}
            except BackendError as exc:
                report.unreachable.append(f"{name}: cannot list: {exc}")
                continue
            report.blobs += len(listed)
            for kind, keys in (
                ("missing", recorded.keys() - listed),
                ("orphan", listed - recorded.keys()),
            ):
                if kind == "missing":
                    report.missing += len(keys)
                else:
                    report.orphans += len(keys)
                for key in sorted(keys):
                    if len(report.examples) < LISTED:
                        report.examples.append(f"{kind} {name}:{key}")
        self._pool.invalidate()
        view = await self._pool.view()
        after = ""
        while chunks := await self._store.scan_chunks(after=after):
            for info in chunks:
                report.chunks += 1
                health = assess(info, self._policy, self._pool, view)
                report.below += health.below
                report.above += health.above and not health.below
            after = chunks[-1].chunk.chunk_id
        return report
