"""How many replicas each chunk wants, and how many a write waits for (pure).

The factor is the pool's ``replication.factor`` unless the bucket overrides it; a
chunk referenced from several buckets (copies) wants the largest of their factors.
The write quorum is never more than the factor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ReplicationPolicy:
    factor: int = 1
    write_quorum: int = 1
    buckets: Mapping[str, int] = field(default_factory=dict)
    """Per-bucket factors that differ from ``factor``."""

    def __post_init__(self) -> None:
        if self.factor < 1 or self.write_quorum < 1:
            raise ValueError("factor and write_quorum must be at least 1")
        if any(n < 1 for n in self.buckets.values()):
            raise ValueError("a bucket's replication factor must be at least 1")

    def factor_for(self, bucket: str | None) -> int:
        """Replicas wanted for a chunk written for ``bucket`` (None = the pool default)."""
        if bucket is None:
            return self.factor
        return self.buckets.get(bucket, self.factor)

    def wanted(self, buckets: Iterable[str]) -> int:
        """Replicas wanted for a chunk referenced from ``buckets`` (the pool default when
        it is referenced from none)."""
        factors = [self.factor_for(b) for b in buckets]
        return max(factors) if factors else self.factor

    def quorum_for(self, bucket: str | None) -> int:
        """Replicas a write of ``bucket`` waits for before it is acknowledged."""
        return min(self.write_quorum, self.factor_for(bucket))
