"""The FUSE frontend's one table from domain errors to errno values."""

from __future__ import annotations

import errno

from appliance import errors

ERRNO: dict[type[errors.CairnError], int] = {
    errors.NoSuchPath: errno.ENOENT,
    errors.NoSuchKey: errno.ENOENT,
    errors.NoSuchBucket: errno.ENOENT,
    errors.PathExists: errno.EEXIST,
    errors.NotADirectory: errno.ENOTDIR,
    errors.IsADirectory: errno.EISDIR,
    errors.DirectoryNotEmpty: errno.ENOTEMPTY,
    errors.NotSupported: errno.EOPNOTSUPP,
    errors.InvalidArgument: errno.EINVAL,
    errors.NotPermitted: errno.EPERM,
    errors.InvalidObjectName: errno.ENAMETOOLONG,
    errors.NoCapacity: errno.ENOSPC,
    errors.BackendsUnavailable: errno.EIO,
    errors.MetadataUnavailable: errno.EIO,
    errors.DataCorrupted: errno.EIO,
    errors.PreconditionFailed: errno.EIO,
    errors.IncompleteBody: errno.EIO,
    errors.BadDigest: errno.EIO,
}


def errno_of(exc: BaseException) -> int | None:
    """The errno for a domain error or an ``OSError``; None for anything else."""
    if isinstance(exc, errors.CairnError):
        for kind in type(exc).__mro__:
            if kind in ERRNO:
                return ERRNO[kind]
        return errno.EIO
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    return None
