"""The manager's domain: tasks, proplets and their lifecycle.

Nothing here knows about MQTT, SQL or HTTP. Adapters translate to and from these types.
"""

from __future__ import annotations

import dataclasses
import uuid
from copy import copy as _shallow_copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

from core.bounded import size_text
from core.wasmbin import WasmParseError, imported_modules

# Upstream serialises unset times as Go's zero time; clients of the upstream API expect it.
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_task_id() -> str:
    return str(uuid.uuid4())


class TaskState(IntEnum):
    """Task states with upstream's numeric values (they travel as JSON numbers)."""

    PENDING = 0
    SCHEDULED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    SKIPPED = 5
    INTERRUPTED = 6

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int) -> TaskState:
        """Accept a number, a numeric string or a name ("running", "Running")."""
        if isinstance(value, int):
            return cls(value)
        text = value.strip()
        if text.isdigit():
            return cls(int(text))
        return cls[text.upper()]


_TERMINAL = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.SKIPPED, TaskState.INTERRUPTED}
)

# The transitions the manager performs. Anything else is a bug or a stale message.
ALLOWED_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset(
        {TaskState.SCHEDULED, TaskState.RUNNING, TaskState.FAILED, TaskState.SKIPPED,
         TaskState.INTERRUPTED}
    ),
    TaskState.SCHEDULED: frozenset(
        {TaskState.PENDING, TaskState.RUNNING, TaskState.COMPLETED, TaskState.FAILED,
         TaskState.INTERRUPTED}
    ),
    TaskState.RUNNING: frozenset(
        {TaskState.PENDING, TaskState.COMPLETED, TaskState.FAILED, TaskState.INTERRUPTED}
    ),
    # A terminal task goes back to pending only when it is started again (a re-run).
    TaskState.COMPLETED: frozenset({TaskState.PENDING}),
    TaskState.FAILED: frozenset({TaskState.PENDING}),
    TaskState.SKIPPED: frozenset({TaskState.PENDING}),
    TaskState.INTERRUPTED: frozenset({TaskState.PENDING}),
}


class SchedulerPolicy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"


WASM_MAGIC = b"\0asm"


def is_component(wasm: bytes | bytearray | memoryview) -> bool:
    """Whether a wasm binary is a component rather than a core module, from its header as upstream
    tells them apart: byte 4 is the version for core modules (1) and the layer-encoded version for
    components (0x0d, and 0x0a in older component encodings), followed by the layer (1)."""
    return len(wasm) >= 8 and wasm[:4] == WASM_MAGIC and wasm[4] in (0x0D, 0x0A) and wasm[6:8] == b"\x01\x00"


def is_http_url(url: str) -> bool:
    """Whether a task's image_url is fetched over HTTP(S) by the proplet (upstream's rule), rather
    than in chunks over MQTT from an OCI registry through the proxy."""
    return url[:8].lower().startswith(("http://", "https://"))


# The import modules of WASI preview 1 (and its older name): a module importing from one needs a
# proplet that provides WASI, which embedded proplets do not (the firmware links no host function,
# upstream's embedded proplet only WAMR's libc-builtin).
WASI_IMPORT_MODULES = frozenset({"wasi_snapshot_preview1", "wasi_unstable"})
# How much of a stored module the manager reads back to learn its needs (see module_needs): the
# header and, for all but unusual modules, the type and import sections that follow it.
MODULE_HEAD_BYTES = 4096


@dataclass(frozen=True, slots=True)
class ModuleNeeds:
    """What a proplet must take to run a module (placement): its size, whether it is a component, and
    whether it imports WASI."""

    size: int
    component: bool
    wasi: bool = False


def module_needs(size: int, head: bytes | bytearray) -> ModuleNeeds:
    """The needs of a module of `size` bytes from its first bytes (the whole module, or at least
    MODULE_HEAD_BYTES of it). Imports cut off in a shorter head, or a module that does not parse, count
    as no WASI: the proplet it lands on then says whether it can run it (task_state unsupported)."""
    component = is_component(head)
    wasi = False
    if not component:
        try:
            wasi = bool(imported_modules(head) & WASI_IMPORT_MODULES)
        except WasmParseError:
            pass
    return ModuleNeeds(size, component, wasi)


# How long the manager waits for an invocation of a latent task: upstream's 30 s, or the task's own
# wall-clock limit and a margin (for the call to reach the proplet and the answer to come back).
INVOKE_TIMEOUT_S = 30.0
INVOKE_MARGIN_S = 5.0


def invocation_wait_s(task_timeout_s: float | None) -> float:
    return task_timeout_s + INVOKE_MARGIN_S if task_timeout_s else INVOKE_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """Per-task sandbox limits (an extension; upstream peers ignore it)."""

    timeout_s: float | None = None
    fuel: int | None = None
    memory_bytes: int | None = None

    def is_empty(self) -> bool:
        return self.timeout_s is None and self.fuel is None and self.memory_bytes is None

    def to_dict(self) -> dict[str, Any]:
        # Written out: dataclasses.asdict is slow, and this runs on every state transition.
        out: dict[str, Any] = {}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        if self.fuel is not None:
            out["fuel"] = self.fuel
        if self.memory_bytes is not None:
            out["memory_bytes"] = self.memory_bytes
        return out


@dataclass(slots=True)
class Task:
    """A unit of work: run the export `name` of a wasm module somewhere in the fleet."""

    id: str
    name: str
    kind: str = "standard"
    state: TaskState = TaskState.PENDING
    image_url: str = ""
    file: bytes = b""
    wasm_digest: str = ""
    cli_args: list[str] | None = None
    inputs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    daemon: bool = False
    latent: bool = False
    encrypted: bool = False
    kbs_resource_path: str = ""
    proplet_id: str = ""
    # True when the user chose the proplet; otherwise proplet_id is where the scheduler sent it.
    pinned: bool = False
    broadcast: bool = False
    priority: int = 50
    metadata: dict[str, Any] = field(default_factory=dict)
    monitoring_profile: dict[str, Any] | None = None
    hal_storage_path: str | None = None
    mode: str = ""
    depends_on: list[str] = field(default_factory=list)
    run_if: str = ""
    workflow_id: str = ""
    job_id: str = ""
    limits: TaskLimits = field(default_factory=TaskLimits)
    max_retries: int = 0
    # Dispatches so far (0 before the first); proplets echo it so a stale result is recognised.
    attempt: int = 0
    # Retries used by the current run (a manual re-run starts again from 0).
    retries: int = 0
    results: Any = None
    error: str = ""
    # Why a pending task is still waiting (no live proplet, all slots taken, ...).
    reason: str = ""
    # Set when the task was asked to start; a pending task with it set is in the dispatch queue.
    queued_at: datetime | None = None
    start_time: datetime | None = None
    finish_time: datetime | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)

    def copy(self) -> Task:
        """A copy whose containers can be changed without touching this task."""
        # copy.copy of a slots dataclass is several times faster than dataclasses.replace.
        clone = _shallow_copy(self)
        clone.inputs = list(self.inputs)
        clone.env = dict(self.env)
        clone.metadata = dict(self.metadata)
        clone.cli_args = None if self.cli_args is None else list(self.cli_args)
        clone.depends_on = list(self.depends_on)
        return clone


JOB_MODES = ("parallel", "sequential", "configurable")


@dataclass(frozen=True, slots=True)
class Job:
    """A named group of tasks (their `job_id`) started together. Its state is derived from theirs."""

    id: str
    name: str
    execution_mode: str  # one of JOB_MODES
    created_at: datetime
    updated_at: datetime


def group_state(states: list[TaskState]) -> TaskState:
    """A job's state from its tasks' (upstream's rule): any failed or interrupted -> failed; else any
    queued, scheduled or running -> running; else all completed or skipped -> completed; else pending."""
    if any(s in (TaskState.FAILED, TaskState.INTERRUPTED) for s in states):
        return TaskState.FAILED
    if any(s in (TaskState.SCHEDULED, TaskState.RUNNING) for s in states):
        return TaskState.RUNNING
    if states and all(s in (TaskState.COMPLETED, TaskState.SKIPPED) for s in states):
        return TaskState.COMPLETED
    return TaskState.PENDING


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One persisted lifecycle transition: what the console's timeline shows."""

    task_id: str
    state: TaskState
    at: datetime
    attempt: int = 0
    proplet_id: str = ""
    detail: str = ""


@dataclass(slots=True)
class Proplet:
    """An execution agent known to the manager."""

    id: str
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    namespace: str = ""
    alive_history: list[datetime] = field(default_factory=list)
    online: bool = False
    # Why the proplet was last marked offline (Last Will, heartbeat timeout).
    offline_reason: str = ""
    # Shutting down (its heartbeats say so): it finishes what it runs and is sent no new task.
    # Not stored: the next heartbeat after a manager restart says it again.
    draining: bool = False
    task_count: int = 0
    created_at: datetime = field(default_factory=utcnow)

    @property
    def last_alive_at(self) -> datetime | None:
        return self.alive_history[-1] if self.alive_history else None

    @property
    def capabilities(self) -> frozenset[str]:
        caps = self.metadata.get("capabilities")
        if isinstance(caps, list):
            return frozenset(str(c) for c in caps)
        return frozenset()

    def _announced_count(self, key: str) -> int | None:
        """A positive whole number from the discovery metadata (None: absent or not one)."""
        value = self.metadata.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return None

    @property
    def max_tasks(self) -> int | None:
        """Concurrent task slots the proplet announced (None: it did not say)."""
        return self._announced_count("max_concurrent_tasks")

    @property
    def embedded(self) -> bool:
        """The firmware or upstream's embedded proplet (`environment: embedded`): WAMR on a board."""
        return self.metadata.get("environment") == "embedded"

    @property
    def holds_latent(self) -> bool:
        """Whether it deploys latent tasks and answers invocations: ours say so in their capabilities
        (earlier versions did not, but held them), and so does upstream's Rust proplet; embedded ones
        do not, unless they announce it (sent one, the firmware fails it and upstream's runs it once:
        no function left to call)."""
        return "latent" in self.capabilities or not self.embedded

    @property
    def runs_components(self) -> bool:
        """Embedded proplets (WAMR, and the firmware's host build) run core modules only, unless they say."""
        return "components" in self.capabilities or not self.embedded

    @property
    def fetches_http(self) -> bool:
        """Embedded proplets get modules in chunks over MQTT only (the firmware, upstream's embedded
        proplet), not from an HTTP URL, unless they say so (`http_fetch`)."""
        return "http_fetch" in self.capabilities or not self.embedded

    @property
    def provides_wasi(self) -> bool:
        """Embedded proplets give modules no WASI (WASI_IMPORT_MODULES), unless they say so (`wasi`)."""
        return "wasi" in self.capabilities or not self.embedded

    @property
    def max_module_bytes(self) -> int | None:
        """The largest module it takes, as it announced (None: it did not say)."""
        return self._announced_count("max_module_bytes")

    @property
    def takes(self) -> str:
        """What limits the tasks the manager sends it, in words, from what it announced ("" for none)."""
        parts = []
        if self.max_module_bytes is not None:
            parts.append(f"modules up to {size_text(self.max_module_bytes)}")
        if not self.runs_components:
            parts.append("core modules only")
        if not self.provides_wasi:
            parts.append("no WASI")
        if not self.fetches_http:
            parts.append("no HTTP URLs")
        if not self.holds_latent:
            parts.append("no latent tasks")
        return ", ".join(parts)

    def can_take(self, needs: ModuleNeeds) -> bool:
        """Whether it can run a module of this size and kind, by what it announced."""
        limit = self.max_module_bytes
        if limit is not None and limit < needs.size:
            return False
        if needs.wasi and not self.provides_wasi:
            return False
        return not needs.component or self.runs_components

    @property
    def max_in_flight(self) -> int | None:
        """Tasks the manager may have on this proplet at once: its slots plus the starts it said it
        queues (`max_queued_tasks`, ours only; a proplet that refuses starts when full, such as the
        firmware, does not announce it). None: no limit announced."""
        slots = self.max_tasks
        if slots is None:
            return None
        return slots + (self._announced_count("max_queued_tasks") or 0)

    def copy(self) -> Proplet:
        return dataclasses.replace(
            self, metadata=dict(self.metadata), alive_history=list(self.alive_history)
        )


@dataclass(frozen=True, slots=True)
class PropletMetrics:
    proplet_id: str
    namespace: str
    timestamp: datetime
    cpu_metrics: dict[str, Any]
    memory_metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TaskMetrics:
    task_id: str
    proplet_id: str
    timestamp: datetime
    metrics: dict[str, Any]
    aggregated: dict[str, Any] | None = None


# ---- events the core emits (past tense; the console and tests subscribe to them) ----


@dataclass(frozen=True, slots=True)
class TaskStateChanged:
    task_id: str
    name: str
    old: TaskState
    new: TaskState
    at: datetime
    proplet_id: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TaskDeleted:
    task_id: str


@dataclass(frozen=True, slots=True)
class PropletCameOnline:
    proplet_id: str
    at: datetime


@dataclass(frozen=True, slots=True)
class PropletWentOffline:
    proplet_id: str
    at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class PropletHeartbeat:
    proplet_id: str
    at: datetime


@dataclass(frozen=True, slots=True)
class PropletMetricsReceived:
    metrics: PropletMetrics


@dataclass(frozen=True, slots=True)
class MessageRejected:
    topic: str
    reason: str


CoreEvent = (
    TaskStateChanged
    | TaskDeleted
    | PropletCameOnline
    | PropletWentOffline
    | PropletHeartbeat
    | PropletMetricsReceived
    | MessageRejected
)


class RoundState(StrEnum):
    """A federated-learning round (core/federated.py)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(slots=True)
class FLRound:
    """One training round: the tasks it started and what completes it."""

    round_id: str
    model_ref: str
    participants: list[str]
    k_of_n: int
    timeout_s: float
    deadline: datetime
    experiment_id: str = ""
    task_wasm_image: str = ""
    # Participants whose round task was started (those online when the round began).
    started: list[str] = field(default_factory=list)
    hyperparams: dict[str, Any] = field(default_factory=dict)
    state: RoundState = RoundState.RUNNING
    reason: str = ""
    # The model the round's aggregate became, once completed.
    model_version: int | None = None
    created_at: datetime = field(default_factory=utcnow)
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class FLUpdateRecord:
    """A participant's update as a round received it (the first one per participant counts)."""

    round_id: str
    proplet_id: str
    num_samples: int
    body: dict[str, Any]
    # How it came: rest, cbor, mqtt (the fallback topic) or result (the task's result envelope).
    source: str
    received_at: datetime = field(default_factory=utcnow)
