"""Service-layer fixtures: the moto server shared with the contract suite."""

from tests.fixtures_moto import moto_s3

__all__ = ["moto_s3"]
