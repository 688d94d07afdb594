"""FileService: the pool as a tree of directories and files (DESIGN section 7).

Paths are ``(bucket, path)`` with ``/`` as separator and no leading or trailing slash;
``""`` is the bucket's root. A file is the object at its path; a directory is a key
prefix (``path/``), made explicit by a zero-byte marker object ``path/`` when it is
empty or has attributes of its own. POSIX attributes live in user metadata
(``appliance.services.fileattrs``). This module knows nothing of FUSE: the frontend
maps its errors (``appliance.errors``) to errno values.

Consistency is close-to-open: ``open`` reads the key's current version and keeps it
while the file stays open anywhere; writes go to a local spool (``Spool``) and become a
new version, visible through S3, when the file is flushed, fsynced or closed (with
``write_back``, a small file's commit runs behind its close: ``settle`` waits for it,
``fsync`` too). Renames,
``chmod`` and the like are metadata-only copies (no data byte moves).

``FileService`` is assembled from one module per job, each class extending the last:
``filecore`` (state, attribute caches, ``stat``, capacity), ``filewrites`` (open files,
the spool, commits, write-behind), ``filedirs`` (listings, names, renames), ``filemeta``
(``setattr``, extended attributes), ``filerecovery`` (what a dead process left);
``filetypes`` holds the values they share, ``filereader`` the chunk-piece reader.
"""

from __future__ import annotations

from appliance.services.filerecovery import FileRecovery
from appliance.services.filetypes import (
    LIST_PAGE,
    SEP,
    AttrChanges,
    Capacity,
    DirEntry,
    DirPage,
    OpenFile,
    Recovered,
)

__all__ = [
    "LIST_PAGE",
    "SEP",
    "AttrChanges",
    "Capacity",
    "DirEntry",
    "DirPage",
    "FileService",
    "OpenFile",
    "Recovered",
]


class FileService(FileRecovery):
    """Namespace and file operations over ``ObjectService``; see the module doc.

    Errors: ``NoSuchPath``, ``PathExists``, ``NotADirectory``, ``IsADirectory``,
    ``DirectoryNotEmpty``, ``NotSupported``, ``InvalidArgument``, ``NotPermitted``,
    ``InvalidObjectName``, ``NoCapacity``, ``BackendsUnavailable``,
    ``MetadataUnavailable``, ``DataCorrupted``, and ``OSError`` from the spool.
    """
