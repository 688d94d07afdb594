"""Errors every backend raises, and the one transient-failure classifier.

Backends translate their native failures (botocore, aiohttp, OSError) into these
classes at the edge; nothing above ``backends`` ever sees a native exception.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class: a backend call failed. ``backend`` names the backend."""

    def __init__(self, message: str, *, backend: str = "") -> None:
        super().__init__(f"{backend}: {message}" if backend else message)
        self.backend = backend


class TransientBackendError(BackendError):
    """May succeed if retried: timeouts, resets, 5xx, throttling, a stream cut mid-way."""


class PermanentBackendError(BackendError):
    """Will fail again if retried as is: auth refused, bad request, missing bucket."""


class BlobNotFound(PermanentBackendError):
    """The blob key does not exist on this backend."""


class InvalidBlobKey(PermanentBackendError, ValueError):
    """The key is not acceptable: empty, too long, ``..`` segments, NUL, absolute path."""


class BackendFull(PermanentBackendError):
    """The provider refused the write for lack of space or an account cap."""


def is_transient(exc: BaseException) -> bool:
    """Return True when retrying the same call may succeed.

    The single classifier used by the retry wrapper: only ``TransientBackendError``
    counts, so each adapter decides once, at its edge, what is transient.
    """
    return isinstance(exc, TransientBackendError)
