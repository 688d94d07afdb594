"""Names of directory pages read within the attribute timeout (the mount's lookups).

A lookup the kernel sends for a name it no longer caches costs a metadata query; a
program that walks a directory (``stat`` of every file, ``rsync``, ``git status``)
sends one per name. ``NameCache`` keeps *spans* of directory listings, each a range of
keys read in one query with every name in it, present or absent, so such lookups are
answered from memory. A span lives ``ttl`` seconds, the same bound as the kernel's own
attribute cache: a change made elsewhere (through S3, another instance) shows within
it. Changes made by this mount are applied to the spans by the file service (``note``,
``forget``, ``clear``), so they show at once.

Spans are read ahead only while lookups walk a directory in order (``wants_span``):
each span that was used up doubles the next one, up to ``MAX_SPAN`` names; a random
lookup in a large directory costs at most one small page more than its point query.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from appliance.services.fileattrs import FileAttr

SEP = "/"
MIN_SPAN = 32
MAX_SPAN = 1024
MAX_DIRS = 256
MAX_SPANS_PER_DIR = 8


class _Absent:
    """The name is known not to exist (a span covers it and does not list it)."""


ABSENT = _Absent()


@dataclass
class _Span:
    after: str
    """Exclusive lower bound of the keys this span covers (a full key)."""
    last: str | None
    """Inclusive upper bound; None when the listing reached the directory's end."""
    names: dict[str, FileAttr]
    expires: float
    size: int
    hits: int = 0

    def covers(self, key: str) -> bool:
        # a name is covered when both its file key and its directory prefix are
        return self.after < key and (self.last is None or key + SEP <= self.last)


@dataclass
class _Dir:
    spans: list[_Span] = field(default_factory=list)
    next_size: int = MIN_SPAN
    misses: int = 0
    miss_window: float = 0.0


@dataclass
class NameChange:
    """What a change made by this mount did to one name, told to ``NameCache.end``;
    left unset (the change failed, or its outcome is unknown) the name is forgotten."""

    attr: FileAttr | _Absent | None = None
    tree: bool = False
    """A directory and everything under it changed: every span is dropped."""

    def exists(self, attr: FileAttr) -> None:
        self.attr = attr

    def removed(self) -> None:
        self.attr = ABSENT


class NameCache:
    """Directory spans per ``(bucket, directory path)``; see the module docstring.

    Not thread-safe (the event loop's thread only). Bounded: ``MAX_DIRS`` directories,
    least recently used dropped first, ``MAX_SPANS_PER_DIR`` spans each.

    Every change this mount makes runs between ``begin`` and ``end``; a span read across
    the end of one is not recorded (``epoch``, taken before the read, moves at every
    ``end``), so a listing never brings back what a change just made untrue. A span
    read while a change runs is recorded: that change's ``end`` corrects it (a span is
    read while commits run behind closes all the time, with write-back).
    """

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._dirs: OrderedDict[tuple[str, str], _Dir] = OrderedDict()
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """Taken before a listing query and handed to ``put_span``."""
        return self._epoch

    def begin(self) -> None:
        """A change starts; its ``end`` applies it to every span recorded by then
        (nothing to do now: kept so that every change is bracketed)."""

    def end(self, bucket: str, path: str, change: NameChange) -> None:
        """A change of ``path`` ended: apply what it did (see ``NameChange``)."""
        self._epoch += 1
        if change.tree:
            self.clear()
        elif change.attr is None:
            self.forget(bucket, path)
        elif isinstance(change.attr, _Absent):
            self.note(bucket, path, None)
        else:
            self.note(bucket, path, change.attr)

    def _live(self, bucket: str, directory: str) -> _Dir | None:
        found = self._dirs.get((bucket, directory))
        if found is None:
            return None
        now = self._clock()
        found.spans = [s for s in found.spans if s.expires > now]
        self._dirs.move_to_end((bucket, directory))
        return found

    def get(self, bucket: str, path: str) -> FileAttr | _Absent | None:
        """The attributes of ``path``, ``ABSENT``, or None when no live span covers it."""
        if self._ttl <= 0 or not path:
            return None
        directory = path.rpartition(SEP)[0]
        found = self._live(bucket, directory)
        if found is None:
            return None
        for span in found.spans:
            if span.covers(path):
                span.hits += 1
                return span.names.get(path.rpartition(SEP)[2], ABSENT)
        return None

    def wants_span(self, bucket: str, path: str) -> int:
        """After a lookup of ``path`` that no span answered: how many names to read
        after it (0: none; a lone lookup stays a point query)."""
        if self._ttl <= 0:
            return 0
        directory = path.rpartition(SEP)[0]
        state = self._live(bucket, directory)
        now = self._clock()
        if state is None:
            state = self._dirs[(bucket, directory)] = _Dir()
            while len(self._dirs) > MAX_DIRS:
                self._dirs.popitem(last=False)
        if now > state.miss_window:
            state.misses, state.miss_window = 0, now + self._ttl
        state.misses += 1
        # a span's last name is a miss too (a directory of that name would sort after)
        behind = [s for s in state.spans if s.last is not None and s.last <= path]
        latest = max(behind, key=lambda s: s.last or "") if behind else None
        if latest is not None and latest.hits * 2 >= latest.size:
            state.next_size = min(MAX_SPAN, state.next_size * 2)  # a walk in order
        elif state.spans:
            state.next_size = MIN_SPAN
        return state.next_size if state.misses >= 2 else 0

    def put_span(
        self,
        bucket: str,
        directory: str,
        after: str,
        names: Mapping[str, FileAttr],
        last: str | None,
        size: int,
        *,
        epoch: int,
    ) -> None:
        """Record a listing of ``directory``: every name with a key in ``(after, last]``
        (``last`` None: to the end) is in ``names``, and none other exists. Ignored when
        a change ran since ``epoch`` was taken, or still runs."""
        if self._ttl <= 0 or epoch != self._epoch:
            return
        state = self._live(bucket, directory)
        if state is None:
            state = self._dirs[(bucket, directory)] = _Dir()
            while len(self._dirs) > MAX_DIRS:
                self._dirs.popitem(last=False)
        state.spans.append(_Span(after, last, dict(names), self._clock() + self._ttl, size))
        del state.spans[:-MAX_SPANS_PER_DIR]

    def note(self, bucket: str, path: str, attr: FileAttr | None) -> None:
        """This mount made ``path`` exist with ``attr`` (or, with None, removed it)."""
        found = self._dirs.get((bucket, path.rpartition(SEP)[0]))
        if found is None:
            return
        name = path.rpartition(SEP)[2]
        for span in found.spans:
            if span.covers(path):
                if attr is None:
                    span.names.pop(name, None)
                else:
                    span.names[name] = attr

    def forget(self, bucket: str, path: str) -> None:
        """Drop what is known of ``path``: the spans covering it, and its own listing
        when it is a directory."""
        found = self._dirs.get((bucket, path.rpartition(SEP)[0]))
        if found is not None:
            found.spans = [s for s in found.spans if not s.covers(path)]
        self._dirs.pop((bucket, path), None)

    def clear(self) -> None:
        """Forget everything (a directory was renamed or removed)."""
        self._dirs.clear()
