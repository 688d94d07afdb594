"""Domain errors raised by the core's services; each frontend maps them once.

The S3 frontend maps them to S3 error codes, the FUSE frontend to errno values.
"""

from __future__ import annotations


class CairnError(Exception):
    """Base class of domain errors."""


class NoSuchBucket(CairnError):
    pass


class NoSuchKey(CairnError):
    pass


class NoSuchUpload(CairnError):
    pass


class InvalidPart(CairnError):
    """A completion names a part that is missing or whose ETag differs."""


class InvalidPartOrder(CairnError):
    """Parts of a completion are not in ascending order."""


class EntityTooSmall(CairnError):
    """A part other than the last is smaller than the minimum part size."""


class EntityTooLarge(CairnError):
    pass


class IncompleteBody(CairnError):
    """The body ended before the declared length (client disconnect), or ran past it."""


class BadDigest(CairnError):
    """Content did not match a digest the client declared (Content-MD5, checksums)."""


class InvalidRange(CairnError):
    """The requested range does not overlap the object."""


class PreconditionFailed(CairnError):
    pass


class NoCapacity(CairnError):
    """No backend can take the write: every eligible one is full or past a monthly cap."""


class BackendsUnavailable(CairnError):
    """Every replica or candidate backend failed for this operation."""


class DataCorrupted(CairnError):
    """Every replica of a chunk failed verification; no wrong byte is returned."""


class MetadataUnavailable(CairnError):
    """The metadata store cannot be reached right now."""


class InvalidObjectName(CairnError):
    """The key is empty, too long or holds characters Cairn refuses."""


class InvalidBucketName(CairnError):
    pass


class BucketExists(CairnError):
    """A bucket of that name exists already."""


class BucketNotEmpty(CairnError):
    """The bucket still holds objects or multipart uploads."""


class NoSuchAccessKey(CairnError):
    pass


class AccessKeyExists(CairnError):
    pass


class InvalidArgument(CairnError):
    """A parameter is malformed or out of range (an admin or S3 call; in the file
    namespace, a reserved attribute name or a value it cannot hold)."""


class KeyUnavailable(CairnError):
    """The master key that wraps a data key is not configured or cannot be reached
    (Vault down, key missing from ``previous_keys``). No data is returned or written."""


# -- file namespace (FileService; the FUSE frontend maps these to errno) -------------


class NoSuchPath(CairnError):
    """No file or directory at this path."""


class PathExists(CairnError):
    """Something already exists where a new entry was to be made."""


class NotADirectory(CairnError):
    """A directory operation named a file (or a path through one)."""


class IsADirectory(CairnError):
    """A file operation named a directory."""


class DirectoryNotEmpty(CairnError):
    pass


class NotSupported(CairnError):
    """The operation has no meaning in Cairn's namespace (e.g. hard links)."""


class NotPermitted(CairnError):
    """The operation is refused whatever the caller's rights (e.g. chmod of a bucket)."""
