"""Pure parts of replication: the policy, the Router's failure domains and circuits,
the circuit breaker, and the configuration keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, parse_config
from appliance.placement.health import CircuitBreaker, counts_as_failure
from appliance.placement.replication import ReplicationPolicy
from appliance.placement.router import BackendView, Placement, PoolView, Router, cap_problem
from backends.errors import BackendFull, BlobNotFound, TransientBackendError

pytestmark = pytest.mark.unit


def test_policy_factors_and_quorum() -> None:
    policy = ReplicationPolicy(factor=2, write_quorum=2, buckets={"one": 1, "three": 3})
    assert policy.factor_for(None) == 2
    assert policy.factor_for("one") == 1
    assert policy.quorum_for("one") == 1  # never more than the bucket's factor
    assert policy.quorum_for("three") == 2
    assert policy.wanted(["one", "three"]) == 3  # a chunk shared by copies: the largest
    assert policy.wanted([]) == 2
    with pytest.raises(ValueError, match="at least 1"):
        ReplicationPolicy(factor=0)


def view(*backends: BackendView) -> PoolView:
    return PoolView(backends)


def test_router_keeps_replicas_in_distinct_domains_and_skips_open_circuits() -> None:
    pool = view(
        BackendView("a1", 0, group="aws"),
        BackendView("a2", 1, group="aws"),
        BackendView("b", 2, group="b2"),
        BackendView("c", 3, circuit="open"),
        BackendView("d", 4),
    )
    router = Router(Placement.PACK)
    assert router.write_candidates(pool, 10) == ["a1", "a2", "b", "d"]
    assert router.write_candidates(pool, 10, exclude=["a1"], exclude_domains=["aws"]) == [
        "b",
        "d",
    ]
    assert router.read_order(pool, ["c", "d", "a2"], 10) == ["a2", "d", "c"]


def test_read_order_puts_a_much_slower_replica_last() -> None:
    router = Router(Placement.PACK)
    pool = view(
        BackendView("slow", 0, latency=0.25),
        BackendView("fast", 1, latency=0.01),
        BackendView("new", 2, latency=0.02),
        BackendView("close", 3, latency=0.04),  # within 50 ms of the fastest: by order
    )
    assert router.read_order(pool, ["slow", "fast", "new", "close"], 10) == [
        "fast",
        "new",
        "close",
        "slow",
    ]


def test_cap_problem_names_the_cap() -> None:
    spent = BackendView("b", 0, requests_left=0)
    assert cap_problem(spent, 1, write=True) == "b: monthly request cap reached"
    egress = BackendView("e", 0, egress_left=5)
    assert cap_problem(egress, 10, write=False) == "e: monthly egress cap reached (5 bytes left)"
    assert cap_problem(egress, 10, write=True) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown=10, monotonic=clock)
    assert not breaker.failure("x")
    breaker.success()  # consecutive failures only
    assert not breaker.failure("x")
    assert not breaker.failure("x")
    assert breaker.failure("boom")
    assert breaker.state == "open"
    assert breaker.status().last_error == "boom"
    clock.now += 10
    assert breaker.state == "half_open"
    assert breaker.failure("still down")  # the probe failed: open for another cooldown
    assert breaker.state == "open"
    clock.now += 10
    breaker.success()
    assert breaker.state == "closed"


def test_only_health_failures_count() -> None:
    assert counts_as_failure(TransientBackendError("reset"))
    assert counts_as_failure(TimeoutError())
    assert not counts_as_failure(BlobNotFound("gone"))
    assert not counts_as_failure(BackendFull("full"))


def parse(pool: dict[str, Any], backends: int = 2) -> Any:
    raw = {
        "pool": pool,
        "backends": [{"name": f"d{i}", "type": "local", "path": f"/d{i}"} for i in range(backends)],
    }
    return parse_config(raw, env={}, base_dir=Path("/"))


def test_config_replication_section_and_the_old_spelling() -> None:
    assert parse({"replication": {"factor": 2, "write_quorum": 2}}).pool.replication.factor == 2
    old = parse({"replication_factor": 2}).pool
    assert (old.replication.factor, old.replication.write_quorum, old.replication_factor) == (
        2,
        1,
        2,
    )
    with pytest.raises(ConfigError, match="old spelling"):
        parse({"replication_factor": 2, "replication": {"factor": 2}})
    with pytest.raises(ConfigError, match=r"write_quorum: must not exceed factor \(1\)"):
        parse({"replication": {"write_quorum": 2}})
    with pytest.raises(ConfigError, match="3 replicas need 3 writable backends"):
        parse({"replication": {"factor": 3}})


def test_an_untimed_replica_counts_as_fast_so_a_slow_one_is_demoted() -> None:
    router = Router(Placement.PACK)
    pool = view(BackendView("slow", 0, latency=0.2), BackendView("untimed", 1))
    assert router.read_order(pool, ["slow", "untimed"], 10) == ["untimed", "slow"]
