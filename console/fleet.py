"""What the console knows about the fleet: latest-state maps and ring buffers fed at event rate.

Nothing here imports Textual. The console's ingest workers call `apply_events` / `TrafficState.ingest`
as core events and MQTT traffic arrive; the views read these structures at a fixed cadence
(console/app.py `flush`) and only render what changed since they last looked, through a dirty set
per view (`watch()`). Every structure is bounded; the bound and the overflow policy sit next to it.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from core.domain import (
    MessageRejected,
    Proplet,
    PropletCameOnline,
    PropletHeartbeat,
    PropletMetricsReceived,
    PropletWentOffline,
    Task,
    TaskDeleted,
    TaskState,
    TaskStateChanged,
)

Clock = Callable[[], datetime]


def utc_clock() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------
# rates


class RateSeries:
    """Events per second over the last `seconds` seconds (for sparklines). Bounded: old seconds drop."""

    def __init__(self, seconds: int = 60) -> None:
        self.seconds = seconds
        self._buckets: deque[list[int]] = deque(maxlen=seconds)
        self.total = 0

    def add(self, now: float, count: int = 1) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, count])
        self.total += count

    def values(self, now: float) -> list[float]:
        last = int(now)
        counts = {s: c for s, c in self._buckets}
        # The current second is still filling: show complete seconds only.
        return [float(counts.get(s, 0)) for s in range(last - self.seconds, last)]

    def per_second(self, now: float, window: int = 5) -> float:
        last = int(now)
        return sum(c for s, c in self._buckets if last - window <= s < last) / window


# ------------------------------------------------------------------------------------------
# tasks


# Characters of a result or an error a task row keeps: a result may be 1 MiB (a proplet's output
# cap), and 1,000 rows of those, turned to text for every redraw and searched by every filter, took
# the console's memory and time.
ROW_TEXT_MAX = 1000


def result_text(results: Any) -> str:
    """A task's result as text: a string as it is, anything else as JSON."""
    return results if isinstance(results, str) else orjson.dumps(results).decode()


def row_text(text: str) -> str:
    return text if len(text) <= ROW_TEXT_MAX else text[:ROW_TEXT_MAX] + "…"


@dataclass(slots=True)
class TaskRow:
    id: str
    name: str
    state: TaskState
    proplet_id: str = ""
    attempt: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    start_time: datetime | None = None
    finish_time: datetime | None = None
    # The beginning of the result as text, and of the error (ROW_TEXT_MAX): the detail screen reads
    # the whole task from the core.
    results: str | None = None
    error: str = ""
    detail: str = ""
    source: str = ""
    inputs: tuple[str, ...] = ()
    # Set when results/metadata are still to be fetched from the core.
    incomplete: bool = False

    @classmethod
    def from_task(cls, task: Task) -> TaskRow:
        return cls(
            id=task.id, name=task.name, state=task.state, proplet_id=task.proplet_id, attempt=task.attempt,
            created_at=task.created_at, updated_at=task.updated_at, start_time=task.start_time,
            finish_time=task.finish_time, results=None if task.results is None else row_text(result_text(task.results)),
            error=row_text(task.error), detail=task.reason,
            source=describe_source(task), inputs=tuple(task.inputs),
        )

    @property
    def outcome(self) -> str:
        """What the RESULT column shows: the error, the result, or why it waits."""
        if self.error:
            return self.error
        if self.results is not None:
            return self.results
        return self.detail

    @property
    def duration(self) -> float | None:
        if self.start_time and self.finish_time:
            return max(0.0, (self.finish_time - self.start_time).total_seconds())
        return None

    def search_text(self) -> tuple[str, ...]:
        return (self.id, self.name, self.state.label, self.proplet_id, self.outcome, self.source)


def describe_source(task: Task) -> str:
    if task.image_url:
        return task.image_url
    if task.wasm_digest:
        return f"inline {task.wasm_digest[:19]}"
    return ""


@dataclass(frozen=True, slots=True)
class Failure:
    at: datetime
    task_id: str
    name: str
    detail: str


# ------------------------------------------------------------------------------------------
# proplets


@dataclass(slots=True)
class PropletRow:
    id: str
    name: str = ""
    online: bool = False
    last_seen: datetime | None = None
    offline_reason: str = ""
    # Shutting down: finishing its tasks, sent no new one.
    draining: bool = False
    task_count: int = 0
    # Tasks the manager may send it at once (running slots plus the starts it queues), and of
    # those how many run at once.
    capacity: int | None = None
    slots: int | None = None
    runtime: str = ""
    platform: str = ""
    # Its Prometheus endpoint, when it announced one (metadata.metrics_port).
    metrics_url: str = ""
    # What the manager sends it, as far as it is limited ("modules up to 4.0 KiB, core modules only").
    takes: str = ""
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    # Bounded histories for the detail plots: oldest dropped.
    heartbeats: deque[datetime] = field(default_factory=lambda: deque(maxlen=120))
    cpu: deque[float] = field(default_factory=lambda: deque(maxlen=120))
    memory: deque[float] = field(default_factory=lambda: deque(maxlen=120))

    def update_from(self, p: Proplet) -> bool:
        """Refresh from the core's view; True when something shown changed."""
        md = p.metadata
        port = md.get("metrics_port")
        host = md.get("ip") or md.get("hostname")
        metrics_url = f"http://{host}:{port}/metrics" if isinstance(port, int) and host else ""
        new = (p.name, p.online, p.last_alive_at, p.offline_reason, p.draining, p.task_count, p.max_in_flight,
               p.max_tasks, str(md.get("wasm_runtime", "")),
               "/".join(x for x in (str(md.get("os", "")), str(md.get("cpu_arch", ""))) if x), metrics_url,
               p.takes)
        old = (self.name, self.online, self.last_seen, self.offline_reason, self.draining, self.task_count,
               self.capacity, self.slots, self.runtime, self.platform, self.metrics_url, self.takes)
        if new == old:
            return False
        (self.name, self.online, self.last_seen, self.offline_reason, self.draining, self.task_count,
         self.capacity, self.slots, self.runtime, self.platform, self.metrics_url, self.takes) = new
        for at in p.alive_history:
            if not self.heartbeats or at > self.heartbeats[-1]:
                self.heartbeats.append(at)
        return True

    @property
    def state(self) -> str:
        return ("draining" if self.draining else "online") if self.online else "offline"

    def search_text(self) -> tuple[str, ...]:
        return (self.id, self.name, self.state, self.runtime, self.platform)


# ------------------------------------------------------------------------------------------
# the fleet


class FleetState:
    """Latest state of tasks and proplets, plus dashboard series. Fed by core events."""

    def __init__(self, *, max_tasks: int = 1000, clock: Clock = utc_clock) -> None:
        self.clock = clock
        # Bounded: when full, the least recently changed finished task is evicted (its row goes too).
        self.tasks: OrderedDict[str, TaskRow] = OrderedDict()
        self.max_tasks = max_tasks
        self.proplets: dict[str, PropletRow] = {}
        self.failures: deque[Failure] = deque(maxlen=50)
        self.rejected: deque[tuple[datetime, str, str]] = deque(maxlen=50)
        self.finished_rate = RateSeries()
        self.dispatched_rate = RateSeries()
        self.heartbeat_rate = RateSeries()
        self.counts: dict[TaskState, int] = {}
        self.loaded = False
        # Bumped when the views must rebuild from scratch (events were dropped, a reload).
        self.generation = 0
        self.events_dropped = 0
        self._task_watchers: list[set[str]] = []
        self._proplet_watchers: list[set[str]] = []
        # Tasks whose results or name must still be fetched from the core (bounded by max_tasks).
        self.to_fetch: set[str] = set()

    # -- watchers: one dirty set per view, so a hidden view catches up when shown ----------

    def watch_tasks(self) -> set[str]:
        dirty = set(self.tasks)
        self._task_watchers.append(dirty)
        return dirty

    def watch_proplets(self) -> set[str]:
        dirty = set(self.proplets)
        self._proplet_watchers.append(dirty)
        return dirty

    def unwatch_tasks(self, dirty: set[str]) -> None:
        self._task_watchers = [w for w in self._task_watchers if w is not dirty]

    def unwatch_proplets(self, dirty: set[str]) -> None:
        self._proplet_watchers = [w for w in self._proplet_watchers if w is not dirty]

    @property
    def counts_total(self) -> int:
        return sum(self.counts.values())

    def _touch_task(self, task_id: str) -> None:
        for dirty in self._task_watchers:
            dirty.add(task_id)

    def _touch_proplet(self, proplet_id: str) -> None:
        for dirty in self._proplet_watchers:
            dirty.add(proplet_id)

    # -- loading --------------------------------------------------------------------------

    def load_tasks(self, tasks: Iterable[Task]) -> None:
        """Replace the task map (newest first in `tasks`) and ask every view to rebuild."""
        self.tasks.clear()
        for task in reversed(list(tasks)[: self.max_tasks]):
            self.tasks[task.id] = TaskRow.from_task(task)
        self.generation += 1
        self.loaded = True

    def upsert_task(self, task: Task) -> None:
        if task.state is TaskState.FAILED and task.error:
            # The state event only says where it failed; the error text arrives with the task.
            for i, failure in enumerate(self.failures):
                if failure.task_id == task.id and failure.detail != task.error:
                    self.failures[i] = Failure(failure.at, task.id, task.name, task.error)
        row = TaskRow.from_task(task)
        self.tasks[task.id] = row
        self.tasks.move_to_end(task.id)
        self.to_fetch.discard(task.id)
        self._touch_task(task.id)
        self._evict()

    def sync_proplets(self, proplets: Iterable[Proplet]) -> None:
        seen = set()
        for p in proplets:
            seen.add(p.id)
            row = self.proplets.get(p.id)
            if row is None:
                row = self.proplets[p.id] = PropletRow(p.id)
                row.update_from(p)
                self._touch_proplet(p.id)
            elif row.update_from(p):
                self._touch_proplet(p.id)
        for gone in set(self.proplets) - seen:
            del self.proplets[gone]
            self._touch_proplet(gone)

    # -- events ---------------------------------------------------------------------------

    def apply_events(self, events: Iterable[Any], now: float) -> None:
        for event in events:
            if isinstance(event, TaskStateChanged):
                self._task_changed(event, now)
            elif isinstance(event, PropletHeartbeat):
                row = self._proplet_row(event.proplet_id)
                row.last_seen = event.at
                row.online = True
                row.heartbeats.append(event.at)
                self.heartbeat_rate.add(now)
                self._touch_proplet(event.proplet_id)
            elif isinstance(event, PropletCameOnline):
                row = self._proplet_row(event.proplet_id)
                row.online = True
                row.offline_reason = ""
                self._touch_proplet(event.proplet_id)
            elif isinstance(event, PropletWentOffline):
                row = self._proplet_row(event.proplet_id)
                row.online = False
                row.draining = False
                row.offline_reason = event.reason
                self._touch_proplet(event.proplet_id)
            elif isinstance(event, PropletMetricsReceived):
                m = event.metrics
                row = self._proplet_row(m.proplet_id)
                cpu = m.cpu_metrics.get("percent")
                rss = m.memory_metrics.get("rss_bytes")
                if isinstance(cpu, (int, float)):
                    row.cpu_percent = float(cpu)
                    row.cpu.append(float(cpu))
                if isinstance(rss, (int, float)):
                    row.rss_bytes = int(rss)
                    row.memory.append(float(rss))
                self._touch_proplet(m.proplet_id)
            elif isinstance(event, TaskDeleted):
                if self.tasks.pop(event.task_id, None) is not None:
                    self._touch_task(event.task_id)
                self.to_fetch.discard(event.task_id)
            elif isinstance(event, MessageRejected):
                self.rejected.append((self.clock(), event.topic, event.reason))

    def note_dropped(self, dropped_total: int) -> bool:
        """Events were lost to the subscription's bound: the views must reload. True if so."""
        if dropped_total > self.events_dropped:
            self.events_dropped = dropped_total
            return True
        return False

    def _proplet_row(self, proplet_id: str) -> PropletRow:
        row = self.proplets.get(proplet_id)
        if row is None:
            row = self.proplets[proplet_id] = PropletRow(proplet_id)
        return row

    def _task_changed(self, e: TaskStateChanged, now: float) -> None:
        row = self.tasks.get(e.task_id)
        if row is None:
            row = TaskRow(e.task_id, e.name, e.new, created_at=e.at)
            # The event has no module, inputs or creation time (if created before the console
            # started): fetch the task once (cheap: the core caches recently touched tasks).
            row.incomplete = True
            self.to_fetch.add(e.task_id)
            self.tasks[e.task_id] = row
        else:
            self.tasks.move_to_end(e.task_id)
        row.state = e.new
        row.updated_at = e.at
        row.detail = e.detail
        if e.proplet_id or e.new is TaskState.PENDING:
            row.proplet_id = e.proplet_id
        if e.new is TaskState.PENDING and e.old.is_terminal:
            row.results, row.error, row.start_time, row.finish_time = None, "", None, None
        if e.new in (TaskState.SCHEDULED, TaskState.RUNNING) and e.old is TaskState.PENDING:
            self.dispatched_rate.add(now)
            row.attempt += 1
        if e.new is TaskState.RUNNING and row.start_time is None:
            row.start_time = e.at
        if e.new.is_terminal and e.new is not e.old:
            row.finish_time = e.at
            if row.start_time is None:
                row.start_time = e.at
            self.finished_rate.add(now)
            # Results and errors are not in the event: fetch them (cheap: the core caches recent tasks).
            row.incomplete = True
            self.to_fetch.add(e.task_id)
            if e.new is TaskState.FAILED:
                self.failures.append(Failure(e.at, e.task_id, e.name, e.detail))
        self._touch_task(e.task_id)
        self._evict()

    def _evict(self) -> None:
        while len(self.tasks) > self.max_tasks:
            victim = None
            for i, (task_id, row) in enumerate(self.tasks.items()):
                if row.state.is_terminal:
                    victim = task_id
                    break
                if i > 64:
                    break
            if victim is None:
                victim = next(iter(self.tasks))
            del self.tasks[victim]
            self.to_fetch.discard(victim)
            self._touch_task(victim)

    # -- reading --------------------------------------------------------------------------

    def recent_failures(self, limit: int = 8) -> list[Failure]:
        return list(self.failures)[-limit:][::-1]


# ------------------------------------------------------------------------------------------
# MQTT traffic


class TrafficEntry(NamedTuple):
    """One buffered message. The collector keeps tracking it (it untracks exact tuples only). Kept as
    exact tuples instead, the buffer's 5,000 entries stopped counting as long-lived objects, so full
    collections came sooner (one per dispatch phase of bench_console.py, 50-75 ms) and the console's
    dispatch tail got no better: measured on 6 Dec 2026 and left out (docs/performance.md)."""

    seq: int
    at: float
    direction: str
    topic: str
    size: int
    qos: int
    # The payload, or a summary of it when it is larger than the preview limit.
    preview: bytes
    summarised: bool = False


_BASE64_FIELD = re.compile(rb'("(?:file|data)"\s*:\s*")([A-Za-z0-9+/=]{12,})("?)')
_BASE64_FIELD_TEXT = re.compile(r'("(?:file|data)"\s*:\s*")([A-Za-z0-9+/=]{12,})("?)')
_LONG_BASE64 = re.compile(r"^[A-Za-z0-9+/]{64,}={0,2}$")
BLOB_KEYS = frozenset({"file", "data"})


def base64_summary(text: str) -> str:
    padding = len(text) - len(text.rstrip("="))
    decoded = len(text) * 3 // 4 - padding
    return f"<base64: {decoded:,} bytes, not shown>"


def summarise_json(value: Any, key: str = "") -> Any:
    """The same JSON with module bytes and chunk data replaced by a one-line summary."""
    if isinstance(value, dict):
        return {k: summarise_json(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [summarise_json(v) for v in value]
    if isinstance(value, str) and len(value) > 32 and (key in BLOB_KEYS or _LONG_BASE64.match(value)):
        return base64_summary(value)
    return value


def summarise_payload(payload: bytes, limit: int) -> tuple[bytes, bool]:
    """What the traffic buffer keeps of a payload: itself when small, else a summary within `limit`."""
    if len(payload) <= limit:
        return payload, False
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:limit], True
    compact = orjson.dumps(summarise_json(doc))
    return compact[:limit], True


def pretty_payload(entry: TrafficEntry) -> str:
    """The payload view: indented JSON with blobs summarised, text, or a hex dump of binary data."""
    note = f"(summarised: the message was {entry.size:,} bytes)\n" if entry.summarised else ""
    try:
        doc = orjson.loads(entry.preview)
    except orjson.JSONDecodeError:
        pass
    else:
        return note + orjson.dumps(summarise_json(doc), option=orjson.OPT_INDENT_2).decode()
    try:
        text = entry.preview.decode()
    except UnicodeDecodeError:
        head = entry.preview[:256]
        rows = [f"{i:04x}  {head[i:i + 16].hex(' ')}" for i in range(0, len(head), 16)]
        return note + f"(binary, {entry.size:,} bytes)\n" + "\n".join(rows)
    return note + _BASE64_FIELD_TEXT.sub(lambda m: m.group(1) + base64_summary(m.group(2)) + m.group(3), text)


def short_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


class TrafficState:
    """The MQTT tap, bounded: the last `max_entries` messages (oldest dropped and counted), counts per
    topic, and the last `topic_history` messages per topic for the payload view."""

    def __init__(self, *, max_entries: int = 5000, preview_limit: int = 8000, topic_history: int = 20,
                 prefix: str = "") -> None:
        self.entries: deque[TrafficEntry] = deque(maxlen=max_entries)
        self.preview_limit = preview_limit
        self.topic_history = topic_history
        self.prefix = prefix
        self.seq = 0
        self.counts: dict[str, int] = {}
        self.history: dict[str, deque[TrafficEntry]] = {}
        # Topics whose count changed since the traffic view last looked, and topics it has not seen.
        self.changed_topics: set[str] = set()
        self.rate_in = RateSeries()
        self.rate_out = RateSeries()
        self.dropped = 0

    def ingest(self, records: Iterable[Any], dropped_total: int = 0) -> None:
        self.dropped = dropped_total
        limit = self.preview_limit
        for r in records:
            self.seq += 1
            preview, summarised = summarise_payload(r.payload, limit)
            entry = TrafficEntry(self.seq, r.at, r.direction, r.topic, r.size, r.qos, preview, summarised)
            self.entries.append(entry)
            topic = r.topic
            self.counts[topic] = self.counts.get(topic, 0) + 1
            history = self.history.get(topic)
            if history is None:
                history = self.history[topic] = deque(maxlen=self.topic_history)
            history.append(entry)
            self.changed_topics.add(topic)
            (self.rate_in if r.direction == "in" else self.rate_out).add(r.at)

    def since(self, seq: int) -> list[TrafficEntry]:
        """Entries newer than `seq` still in the buffer (all of them if `seq` fell out of it)."""
        out: list[TrafficEntry] = []
        for e in reversed(self.entries):
            if e.seq <= seq:
                break
            out.append(e)
        out.reverse()
        return out

    def short_topic(self, topic: str) -> str:
        return topic[len(self.prefix):] if self.prefix and topic.startswith(self.prefix) else topic

    def format_line(self, e: TrafficEntry, width: int = 160, compact: bool = False) -> str:
        """`compact`: for a narrow stream (a split pane), seconds without milliseconds, the arrow alone
        and no QoS, so the topic's last level (what the message is) still shows."""
        if compact:
            at = datetime.fromtimestamp(e.at, UTC).strftime("%H:%M:%S")
            arrow = "→" if e.direction == "out" else "←"
        else:
            at = datetime.fromtimestamp(e.at, UTC).strftime("%H:%M:%S.%f")[:-3]
            arrow = ("→ out" if e.direction == "out" else "← in ") + f" q{e.qos}"
        head = e.preview[:400]
        head = _BASE64_FIELD.sub(lambda m: m.group(1) + b"<base64>" + m.group(3), head)
        text = head.decode(errors="replace").replace("\n", " ").replace("\r", " ")
        if len(text) > width:
            text = text[: width - 1] + "…"
        return f"{at} {arrow} {self.short_topic(e.topic)}  {short_size(e.size)}  {text}"
