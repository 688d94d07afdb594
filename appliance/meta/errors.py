"""Errors raised by every MetadataStore implementation."""

from __future__ import annotations


class MetaError(Exception):
    """Base class for metadata store errors."""


class StoreUnavailable(MetaError):
    """The database cannot be reached or used right now (may pass).

    ``uncommitted`` is True when the failed call surely changed nothing (it failed
    before its transaction was asked to commit); False when that is unknown."""

    def __init__(self, *args: object, uncommitted: bool = False) -> None:
        super().__init__(*args)
        self.uncommitted = uncommitted


class SchemaTooNew(MetaError):
    """The database was migrated by a newer Cairn than this one; refuse to touch it."""


class NotFound(MetaError):
    """The named record does not exist."""


class AlreadyExists(MetaError):
    """A record with that identity already exists."""


class Conflict(MetaError):
    """The record is not in a state that allows the change (e.g. version not UPLOADING)."""


class PreconditionFailed(Conflict):
    """A conditional write's condition did not hold when it committed; nothing changed."""


class BucketNotEmpty(Conflict):
    """The bucket still holds objects or multipart uploads."""


class StoreLocked(MetaError):
    """Another process holds this embedded database (SQLite allows one instance)."""


class InvalidPart(Conflict):
    """A multipart completion named a part that is missing or has another etag."""

    def __init__(self, part_number: int, reason: str) -> None:
        super().__init__(f"part {part_number}: {reason}")
        self.part_number = part_number
