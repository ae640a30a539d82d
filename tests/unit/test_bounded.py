"""core.bounded: the least-recently-used map bounded by entries and bytes that the manager's recent
tasks and a proplet's remembered results live in."""

from __future__ import annotations

from core.bounded import BoundedLru, payload_bytes


def test_the_least_recently_used_go_first_when_the_bytes_run_out() -> None:
    kept: BoundedLru[str, str] = BoundedLru(max_entries=100, max_bytes=10, weigh=len)
    assert kept.put("a", "xxxx") == [] and kept.put("b", "xxxx") == []
    assert kept.get("a") == "xxxx"  # a read does not count as a use: `a` stays the oldest
    assert kept.put("c", "xxxx") == ["a"]
    assert (len(kept), kept.bytes, "a" in kept) == (2, 8, False)
    assert kept.put("b", "xx") == []  # put again: the newest, weighed again
    assert kept.put("d", "xxxxxx") == ["c"]
    assert [kept.get(k) for k in "bd"] == ["xx", "xxxxxx"] and kept.bytes == 8


def test_a_use_makes_an_entry_the_newest_and_clear_empties_the_map() -> None:
    kept: BoundedLru[str, str] = BoundedLru(max_entries=2, max_bytes=100, weigh=len)
    kept.put("a", "x")
    kept.put("b", "yy")
    assert kept.use("a") == "x" and kept.use("missing") is None
    assert kept.put("c", "z") == ["b"]  # `a` was used after `b` was put
    kept.clear()
    assert (len(kept), kept.bytes, kept.get("a")) == (0, 0, None)


def test_the_entry_count_bounds_too_and_one_heavy_entry_is_kept_alone() -> None:
    kept: BoundedLru[int, bytes] = BoundedLru(max_entries=3, max_bytes=1000, weigh=len)
    evicted = [k for i in range(5) for k in kept.put(i, b"x")]
    assert evicted == [0, 1] and len(kept) == 3
    assert kept.put(9, b"x" * 5000) == [2, 3, 4]
    assert (len(kept), kept.bytes, kept.get(9) == b"x" * 5000) == (1, 5000, True)
    assert kept.pop(9) == b"x" * 5000 and kept.bytes == 0 and kept.pop(9) is None


def test_payload_bytes_is_about_the_compact_json_length() -> None:
    assert [payload_bytes(v) for v in (None, "abc", b"ab", 7, 2.5, True)] == [0, 3, 2, 8, 8, 8]
    assert payload_bytes(["42", {"k": [1, 2]}]) == len('["42",{"k":[1,2]}]')
    assert payload_bytes({"x": "y" * 1000}) > 1000
