"""Task schedules: a task with a `schedule` (cron, 5 fields, read in its `timezone`) is started at
each time the schedule names: once, after which the schedule is cleared, or every time
(`is_recurring`). A finished task runs again as a new attempt, as a manual start would.

Upstream's semantics (reference §6.9) with its defects fixed: schedules are stored on every backend
(upstream's SQL stores drop them, so its cron works only in memory); the manager wakes at the next
due time instead of polling once a minute; an update that does not mention `schedule` keeps it; an
unknown timezone is refused instead of silently read as UTC. As upstream: times missed while the
manager was down are skipped, and due tasks start by priority, then age. A run still going when its
next time comes is not started twice: that occurrence is skipped and logged. When clocks go back, a
schedule naming its hours runs once in the repeated hour; one whose hour is `*` runs in both.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from core.domain import utcnow
from core.errors import Conflict, CoreError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from core.service import ManagerCore

log = logging.getLogger(__name__)

_DESCRIPTORS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
# The longest a schedule loop sleeps without looking again (a changed clock, a missed wake-up).
_MAX_SLEEP_S = 60.0
# A due task that could not be started (no module, a full backlog) is tried again this much later.
_RETRY_S = 60.0


@dataclass(slots=True)
class Schedule:
    task_id: str
    expression: str
    timezone: str
    recurring: bool
    next_run: datetime  # UTC


def check(expression: str, timezone: str) -> None:
    """InvalidRequest unless `expression` is a 5-field cron expression (or @daily and the like) and
    `timezone` an IANA zone name."""
    text = expression.strip()
    if not (text in _DESCRIPTORS or (len(text.split()) == 5 and croniter.is_valid(text))):
        raise InvalidRequest(f"invalid cron expression {expression!r}: give 5 fields (minute hour day-of-month "
                             "month day-of-week, e.g. '*/15 * * * *') or @hourly, @daily, @weekly, @monthly, @yearly")
    _zone(timezone)


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(f"unknown timezone {timezone!r}: use an IANA name such as UTC or Europe/Paris") from None


def next_time(expression: str, timezone: str, after: datetime) -> datetime:
    """The first time after `after` that `expression` names, read in `timezone`; in UTC.

    When clocks go back, an hour of wall time happens twice. croniter names both occurrences, so
    a daily 02:30 ran twice that night; as cron does, a schedule that names its hours skips the
    second occurrence (fold=1), and one whose hour field is `*` runs in both.
    """
    zone = _zone(timezone)
    text = expression.strip()
    any_hour = text == "@hourly" or (not text.startswith("@") and text.split()[1] == "*")
    times = croniter(text, after.astimezone(zone))
    while True:
        found = times.get_next(datetime).astimezone(UTC)
        if any_hour or not found.astimezone(zone).fold:
            return found


class CronScheduler:
    """The manager's schedules, in memory (a row each in `task_schedules`), and the loop that
    starts their tasks."""

    def __init__(self, core: ManagerCore) -> None:
        self.core = core
        self.schedules: dict[str, Schedule] = {}
        self._changed = asyncio.Event()
        self.fired = 0
        self.skipped_busy = 0
        self.errors = 0

    def get(self, task_id: str) -> Schedule | None:
        return self.schedules.get(task_id)

    async def load(self) -> None:
        """Read the stored schedules; a time that passed while the manager was down is skipped."""
        now = utcnow()
        late = []
        for schedule in await self.core.store.task_schedules():
            if schedule.next_run <= now:
                schedule.next_run = next_time(schedule.expression, schedule.timezone, now)
                late.append(schedule)
            self.schedules[schedule.task_id] = schedule
        if late:
            log.info("%d scheduled runs were due while the manager was down; skipped to the next time", len(late))
            await self.core.writer.write(*(self.core.store.op_put_schedule(s) for s in late))

    def plan(self, task_id: str, expression: str, timezone: str, recurring: bool) -> Schedule:
        """A schedule for a task (checked; its next time computed), not yet stored."""
        check(expression, timezone)
        timezone = timezone or "UTC"
        return Schedule(task_id, expression.strip(), timezone, recurring, next_time(expression, timezone, utcnow()))

    def adopt(self, schedule: Schedule) -> None:
        """Take a stored schedule into account."""
        self.schedules[schedule.task_id] = schedule
        self._changed.set()

    async def clear(self, task_id: str) -> None:
        if self.schedules.pop(task_id, None) is not None:
            await self.core.writer.write(self.core.store.op_delete_schedule(task_id))
            self._changed.set()

    def forget(self, task_id: str) -> None:
        """The task is gone (its row went with it)."""
        self.schedules.pop(task_id, None)

    async def run(self) -> None:
        while True:
            self._changed.clear()
            now = utcnow()
            due = [s for s in self.schedules.values() if s.next_run <= now]
            if due:
                try:
                    await self._fire(due)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A store that fails for a moment must not stop the manager (a loop that ends
                    # does): the due schedules are looked at again a little later.
                    self.errors += 1
                    log.exception("starting scheduled tasks failed; trying again in %.0f s", _RETRY_S)
                    await asyncio.sleep(_RETRY_S)
                continue
            upcoming = min((s.next_run for s in self.schedules.values()), default=None)
            wait = _MAX_SLEEP_S if upcoming is None else min(_MAX_SLEEP_S, (upcoming - now).total_seconds())
            try:
                async with asyncio.timeout(max(wait, 0.001)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def _fire(self, due: list[Schedule]) -> None:
        order = []
        for schedule in due:
            try:
                task = await self.core.get_task(schedule.task_id)
            except NotFound:
                self.forget(schedule.task_id)
                continue
            order.append((-task.priority, task.created_at, schedule))
        for _, _, schedule in sorted(order, key=lambda o: (o[0], o[1])):
            if not await self._start(schedule):
                # Tried again a little later (upstream: at the next tick), not dropped.
                schedule.next_run = utcnow() + timedelta(seconds=_RETRY_S)
                continue
            if schedule.recurring:
                schedule.next_run = next_time(schedule.expression, schedule.timezone, utcnow())
                await self.core.writer.write(self.core.store.op_put_schedule(schedule))
            else:
                await self.clear(schedule.task_id)

    async def _start(self, schedule: Schedule) -> bool:
        """Start the task; False when it should be tried again shortly."""
        try:
            await self.core.start_task(schedule.task_id)
            self.fired += 1
            log.info("started task %s by its schedule %r", schedule.task_id, schedule.expression)
        except Conflict as exc:
            self.skipped_busy += 1
            log.warning("task %s was due by its schedule %r but is still queued or running (%s); this time is "
                        "skipped", schedule.task_id, schedule.expression, exc)
        except CoreError as exc:
            log.warning("task %s was due by its schedule %r but could not be started (%s); trying again in "
                        "%.0f s", schedule.task_id, schedule.expression, exc, _RETRY_S)
            return False
        return True
