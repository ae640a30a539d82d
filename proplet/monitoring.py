"""Per-task metrics on `control/proplet/task_metrics`, in upstream's shape (upstream §3.9, §5.9).

A task still running 100 ms after it began is sampled then and every `interval` seconds of its
monitoring profile until it ends; a shorter task sends none, so a stream of short tasks costs no
message more. The start's `monitoring_profile` picks the interval, what is collected, whether it is
sent and how many samples the aggregates cover; without one, upstream's profiles apply: `standard`
(10 s, 100 samples) and, for daemons, `long_running_daemon` (120 s, 500).

Where upstream's internal runtime reports the whole proplet process for every task, here a task
running in wasmtime-py is measured alone: the CPU time of its guest thread and the size of its
linear memory (`Runtime.usage`). A task of the external runtime is its own process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.protocol import TaskMetricsMessage
from proplet.runtime import Usage

# First sample this long after the task began (upstream: "100 ms after start").
FIRST_SAMPLE_S = 0.1
# An interval below this is raised to it: a task's metrics must not flood the broker.
MIN_INTERVAL_S = 0.1
MAX_HISTORY = 10_000
# Go's manager sends the profile's interval as a time.Duration, in nanoseconds (upstream quirk 11):
# more seconds than this can only be nanoseconds.
_NANOSECONDS_ABOVE = 10_000_000


@dataclass(frozen=True, slots=True)
class Profile:
    enabled: bool = True
    interval_s: float = 10.0
    collect_cpu: bool = True
    collect_memory: bool = True
    collect_disk_io: bool = True
    collect_threads: bool = True
    collect_file_descriptors: bool = True
    export_to_mqtt: bool = True
    retain_history: bool = True
    history_size: int = 100


STANDARD = Profile()
LONG_RUNNING_DAEMON = Profile(interval_s=120.0, history_size=500)
_FLAGS = ("enabled", "collect_cpu", "collect_memory", "collect_disk_io", "collect_threads",
          "collect_file_descriptors", "export_to_mqtt", "retain_history")


def profile_for(monitoring_profile: Mapping[str, Any] | None, daemon: bool) -> Profile:
    """The profile a start asks for, over upstream's default for its kind. Fields it leaves out, or
    gives a value of the wrong type, keep the default (upstream's proplet refuses the whole start)."""
    base = LONG_RUNNING_DAEMON if daemon else STANDARD
    if not monitoring_profile:
        return base
    values: dict[str, Any] = {}
    for name in _FLAGS:
        value = monitoring_profile.get(name)
        if isinstance(value, bool):
            values[name] = value
    interval = monitoring_profile.get("interval")
    if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
        seconds = interval / 1e9 if interval > _NANOSECONDS_ABOVE else float(interval)
        values["interval_s"] = max(MIN_INTERVAL_S, seconds)
    size = monitoring_profile.get("history_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        values["history_size"] = min(size, MAX_HISTORY)
    return Profile(**{**{f: getattr(base, f) for f in Profile.__dataclass_fields__}, **values})


class TaskMonitor:
    """Samples one task's usage and builds its task_metrics messages."""

    def __init__(self, task_id: str, proplet_id: str, profile: Profile, usage: Callable[[], Usage | None],
                 machine_memory: int, traceparent: str = "") -> None:
        self.task_id = task_id
        self.proplet_id = proplet_id
        self.profile = profile
        self._usage = usage
        self._machine_memory = machine_memory
        self._traceparent = traceparent
        # (cpu seconds, wall seconds) of the run at the last sample: the first covers the run so far.
        self._last = (0.0, 0.0)
        # (cpu %, memory bytes) of the samples the aggregates cover; oldest dropped.
        self._history: deque[tuple[float, int]] = deque(maxlen=profile.history_size)

    def sample(self) -> TaskMetricsMessage | None:
        """The next message, or None when the task no longer runs."""
        usage = self._usage()
        if usage is None:
            return None
        cpu0, wall0 = self._last
        wall = usage.wall_seconds
        cpu_percent = round(100.0 * (usage.cpu_seconds - cpu0) / (wall - wall0), 2) if wall > wall0 else 0.0
        self._last = (usage.cpu_seconds, wall)
        self._history.append((cpu_percent, usage.memory_bytes))
        p = self.profile
        metrics: dict[str, Any] = {"uptime_seconds": round(wall, 3)}
        if p.collect_cpu:
            metrics["cpu_percent"] = cpu_percent
        if p.collect_memory:
            metrics["memory_bytes"] = usage.memory_bytes
            metrics["memory_percent"] = (round(100.0 * usage.memory_bytes / self._machine_memory, 4)
                                         if self._machine_memory else 0.0)
        if p.collect_disk_io:
            metrics["disk_read_bytes"] = usage.disk_read_bytes or 0
            metrics["disk_write_bytes"] = usage.disk_write_bytes or 0
        if p.collect_threads:
            metrics["thread_count"] = usage.threads
        if p.collect_file_descriptors and usage.open_files is not None:
            metrics["file_descriptor_count"] = usage.open_files
        aggregated = None
        if p.retain_history:
            cpus = [c for c, _ in self._history]
            memories = [m for _, m in self._history]
            aggregated = {
                "avg_cpu_usage": round(sum(cpus) / len(cpus), 2), "max_cpu_usage": max(cpus),
                "avg_memory_usage": sum(memories) // len(memories), "max_memory_usage": max(memories),
                "total_disk_read": usage.disk_read_bytes or 0, "total_disk_write": usage.disk_write_bytes or 0,
                "sample_count": len(self._history),
            }
        return TaskMetricsMessage(self.task_id, self.proplet_id, metrics, aggregated,
                                  datetime.now(UTC).isoformat().replace("+00:00", "Z"), self._traceparent)
