"""Sealing of credential secrets: round trip, binding to the key, wrong pool secret."""

from __future__ import annotations

import pytest

from appliance.services.sealing import SealBroken, SecretSealer

pytestmark = pytest.mark.unit


def test_round_trip_with_a_fresh_nonce_each_time() -> None:
    sealer = SecretSealer("pool-secret")
    one, two = sealer.seal("AKIA1", "s3cret-value-123"), sealer.seal("AKIA1", "s3cret-value-123")
    assert one != two and "s3cret" not in one
    assert sealer.open("AKIA1", one) == sealer.open("AKIA1", two) == "s3cret-value-123"
    assert SecretSealer.is_sealed(one)


def test_a_sealed_secret_moved_to_another_key_does_not_open() -> None:
    sealer = SecretSealer("pool-secret")
    with pytest.raises(SealBroken, match="AKIA2"):
        sealer.open("AKIA2", sealer.seal("AKIA1", "secret"))


def test_another_pool_secret_or_a_damaged_value_does_not_open() -> None:
    sealed = SecretSealer("pool-secret").seal("AKIA1", "secret")
    with pytest.raises(SealBroken):
        SecretSealer("another").open("AKIA1", sealed)
    with pytest.raises(SealBroken):
        SecretSealer("pool-secret").open("AKIA1", sealed[:-4] + "AAAA")
    with pytest.raises(SealBroken):
        SecretSealer("pool-secret").open("AKIA1", "sealed:v1:not base64!")


def test_a_secret_stored_before_sealing_is_read_as_is() -> None:
    assert SecretSealer("pool-secret").open("AKIA1", "plain-old-secret") == "plain-old-secret"
    with pytest.raises(ValueError, match="empty"):
        SecretSealer("")
