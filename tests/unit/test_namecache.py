"""NameCache: spans of directory listings answering the mount's lookups."""

from __future__ import annotations

import pytest

from appliance.services.fileattrs import FileAttr
from appliance.services.namecache import ABSENT, MAX_SPAN, MIN_SPAN, NameCache, NameChange

pytestmark = pytest.mark.unit
B = "bkt"


def attr(size: int) -> FileAttr:
    return FileAttr(0o100644, 0, 0, size, 1, 1, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def span(
    cache: NameCache, names: dict[str, int], after: str, last: str | None, size: int = MIN_SPAN
) -> None:
    cache.put_span(
        B, "d", after, {n: attr(s) for n, s in names.items()}, last, size, epoch=cache.epoch
    )


def test_a_span_answers_names_in_its_range_present_or_absent() -> None:
    cache = NameCache(1.0, clock=Clock())
    span(cache, {"b": 2, "c": 3}, after="d/a", last="d/c")
    assert cache.get(B, "d/b") == attr(2)
    assert cache.get(B, "d/bb") is ABSENT  # between listed names: known absent
    assert cache.get(B, "d/a") is None  # the lower bound is exclusive
    # the last name is not covered: a directory "c/" would sort after the key "d/c"
    assert cache.get(B, "d/c") is None
    assert cache.get(B, "d/d") is None  # past the span
    assert cache.get(B, "e/b") is None  # another directory
    assert cache.get("other", "d/b") is None


def test_a_name_is_covered_only_when_its_directory_prefix_is_too() -> None:
    cache = NameCache(1.0, clock=Clock())
    # the span ends at key "d/x": "d/x/" (a directory named x) sorts after it
    span(cache, {"x": 1}, after="d/a", last="d/x")
    assert cache.get(B, "d/x") is None
    span(cache, {"y": 1}, after="d/a", last="d/y/")
    assert cache.get(B, "d/y") == attr(1)


def test_a_span_to_the_end_covers_every_later_name() -> None:
    cache = NameCache(1.0, clock=Clock())
    span(cache, {}, after="d/m", last=None)
    assert cache.get(B, "d/zzzz") is ABSENT
    assert cache.get(B, "d/m") is None


def test_spans_expire_with_the_ttl() -> None:
    clock = Clock()
    cache = NameCache(1.0, clock=clock)
    span(cache, {"b": 2}, after="d/a", last=None)
    clock.now += 0.9
    assert cache.get(B, "d/b") == attr(2)
    clock.now += 0.2
    assert cache.get(B, "d/b") is None


def test_a_zero_ttl_caches_nothing() -> None:
    cache = NameCache(0.0, clock=Clock())
    span(cache, {"b": 2}, after="d/a", last=None)
    assert cache.get(B, "d/b") is None
    assert cache.wants_span(B, "d/b") == 0
    assert cache.wants_span(B, "d/c") == 0


def test_changes_made_here_apply_to_covering_spans() -> None:
    cache = NameCache(1.0, clock=Clock())
    span(cache, {"b": 2, "c": 3}, after="d/a", last=None)
    for path, change in [
        ("d/bb", NameChange(attr=attr(7))),
        ("d/c", NameChange(attr=ABSENT)),
    ]:
        cache.begin()
        cache.end(B, path, change)
    assert cache.get(B, "d/bb") == attr(7)
    assert cache.get(B, "d/c") is ABSENT
    cache.begin()
    cache.end(B, "d/b", NameChange())  # outcome unknown (it failed): forgotten
    assert cache.get(B, "d/b") is None
    assert cache.get(B, "d/bb") is None  # the whole covering span went


def test_a_directory_change_drops_everything() -> None:
    cache = NameCache(1.0, clock=Clock())
    span(cache, {"b": 2}, after="d/a", last=None)
    cache.begin()
    cache.end(B, "d/b", NameChange(tree=True))
    assert cache.get(B, "d/b") is None


def test_forgetting_a_directory_drops_its_own_listing() -> None:
    cache = NameCache(1.0, clock=Clock())
    span(cache, {"b": 2}, after="d/a", last=None)
    cache.forget(B, "d")
    assert cache.get(B, "d/b") is None


def test_a_span_read_across_the_end_of_a_change_is_not_recorded() -> None:
    cache = NameCache(1.0, clock=Clock())
    before = cache.epoch
    cache.begin()
    cache.end(B, "d/x", NameChange())
    cache.put_span(B, "d", "d/a", {"b": attr(1)}, None, 1, epoch=before)
    assert cache.get(B, "d/b") is None  # read before the change ended
    cache.put_span(B, "d", "d/a", {"b": attr(1)}, None, 1, epoch=cache.epoch)
    assert cache.get(B, "d/b") == attr(1)


def test_a_span_read_while_a_change_runs_is_corrected_by_its_end() -> None:
    cache = NameCache(1.0, clock=Clock())
    cache.begin()  # e.g. a commit behind a close, of d/c
    cache.put_span(B, "d", "d/a", {"b": attr(1)}, None, 1, epoch=cache.epoch)
    assert cache.get(B, "d/b") == attr(1)
    assert cache.get(B, "d/c") is ABSENT  # read before the commit landed
    cache.end(B, "d/c", NameChange(attr=attr(5)))
    assert cache.get(B, "d/c") == attr(5)
    cache.begin()
    cache.put_span(B, "d", "d/a", {"b": attr(1)}, None, 1, epoch=cache.epoch)
    cache.end(B, "d/b", NameChange())  # outcome unknown: the covering spans go
    assert cache.get(B, "d/b") is None


def test_spans_are_read_ahead_only_for_a_walk_and_grow_while_used() -> None:
    cache = NameCache(1.0, clock=Clock())
    assert cache.wants_span(B, "d/f0000") == 0  # a lone lookup stays a point query
    size = cache.wants_span(B, "d/f0001")
    assert size == MIN_SPAN
    pos = 1
    sizes = []
    for _ in range(8):
        names = {f"f{pos + i:04d}": 1 for i in range(1, size + 1)}
        span(cache, names, after=f"d/f{pos:04d}", last=f"d/f{pos + size:04d}", size=size)
        for i in range(1, size):  # the walk uses the span's names
            assert cache.get(B, f"d/f{pos + i:04d}") == attr(1)
        pos += size
        assert cache.get(B, f"d/f{pos:04d}") is None  # its last one is a point query
        size = cache.wants_span(B, f"d/f{pos:04d}")
        sizes.append(size)
    assert sizes[:5] == [MIN_SPAN * 2, MIN_SPAN * 4, MIN_SPAN * 8, MIN_SPAN * 16, MAX_SPAN]
    assert sizes[-1] == MAX_SPAN


def test_random_lookups_keep_spans_small() -> None:
    cache = NameCache(1.0, clock=Clock())
    cache.wants_span(B, "d/k5000")
    assert cache.wants_span(B, "d/k1000") == MIN_SPAN
    span(cache, {}, after="d/k1000", last="d/k1040")
    # the next lookup lands elsewhere: the unused span does not grow the next one
    assert cache.wants_span(B, "d/k7000") == MIN_SPAN
