"""Proplet selection: round-robin (upstream's) and least-loaded.

Priority is not decided here: the dispatcher hands tasks over in priority order, and a task only
waits when no proplet can take it, so priority decides who gets the next free slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from core.domain import Proplet, SchedulerPolicy


class Scheduler:
    def __init__(self, policy: SchedulerPolicy = SchedulerPolicy.ROUND_ROBIN) -> None:
        self.policy = policy
        # Round-robin remembers the last id rather than an index, so proplets joining or
        # leaving do not shift the rotation (upstream indexes an unordered SQL list).
        self._last_id = ""

    def select(self, candidates: Sequence[Proplet], load: Mapping[str, int]) -> Proplet | None:
        """Pick one of `candidates` (live proplets with a free slot); None if there are none."""
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda p: p.id)
        if self.policy is SchedulerPolicy.LEAST_LOADED:
            lowest = min(load.get(p.id, 0) for p in ordered)
            ordered = [p for p in ordered if load.get(p.id, 0) == lowest]
        chosen = next((p for p in ordered if p.id > self._last_id), ordered[0])
        self._last_id = chosen.id
        return chosen
