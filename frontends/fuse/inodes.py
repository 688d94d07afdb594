"""Inode numbers for paths, as long as the kernel remembers them.

Inode 1 is the root: every bucket (``/<bucket>/<key>``) or one bucket's root. The
kernel's lookup count decides when an inode is forgotten; a path keeps its inode while
known, and renames move inodes (and their descendants) to the new paths.
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT = 1


@dataclass
class Inode:
    ino: int
    bucket: str | None
    """None only for the root of the multi-bucket layout."""
    path: str
    lookups: int = 0
    version_id: str | None = None
    """The version whose bytes the kernel may cache (keep_cache)."""


class InodeTable:
    def __init__(self, bucket: str | None) -> None:
        self._next = ROOT + 1
        self._by_ino: dict[int, Inode] = {ROOT: Inode(ROOT, bucket, "", lookups=1)}
        self._by_path: dict[tuple[str | None, str], int] = {(bucket, ""): ROOT}

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode:
        """Raises ``KeyError`` for an unknown inode."""
        return self._by_ino[ino]

    def child(self, parent: Inode, name: str) -> tuple[str, str]:
        """(bucket, path) of ``name`` in directory ``parent``."""
        if parent.bucket is None:
            return name, ""
        return parent.bucket, f"{parent.path}/{name}" if parent.path else name

    def ensure(self, bucket: str, path: str) -> Inode:
        """The inode of a path, made on first sight."""
        ino = self._by_path.get((bucket, path))
        if ino is not None:
            return self._by_ino[ino]
        node = Inode(self._next, bucket, path)
        self._next += 1
        self._by_ino[node.ino] = node
        self._by_path[(bucket, path)] = node.ino
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self._by_ino.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self._by_ino[ino]
            if self._by_path.get((node.bucket, node.path)) == ino:
                del self._by_path[(node.bucket, node.path)]

    def removed(self, bucket: str, path: str) -> None:
        """The path is gone; its inode lives on until forgotten."""
        self._by_path.pop((bucket, path), None)

    def moved(self, bucket: str, old: str, new_bucket: str, new: str, *, tree: bool) -> None:
        """A rename: the entry (and with ``tree`` everything below it) takes the new path."""
        self.removed(new_bucket, new)
        if not tree:
            ino = self._by_path.pop((bucket, old), None)
            if ino is not None:
                node = self._by_ino[ino]
                node.bucket, node.path = new_bucket, new
                self._by_path[(new_bucket, new)] = ino
            return
        below = old + "/"
        for node in list(self._by_ino.values()):
            if node.bucket != bucket or not (node.path == old or node.path.startswith(below)):
                continue
            if self._by_path.get((node.bucket, node.path)) == node.ino:
                del self._by_path[(node.bucket, node.path)]
            node.bucket, node.path = new_bucket, new + node.path[len(old) :]
            self._by_path[(new_bucket, node.path)] = node.ino
