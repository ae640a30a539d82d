"""The manager core: task lifecycle, dispatch, proplet liveness, message handling.

`ManagerCore` is an async context manager. The console hosts it in-process; `propeller serve` runs
it headless. Entering it opens and migrates the store, recovers in-flight work, connects to the
broker (or starts the in-process one) and starts the REST API; leaving it stops intake, commits
what is queued and closes everything.

Threading: everything runs on the event loop of the caller. Handlers never wait for the database
on the hot path; writes go through the group-commit writer (core.store.writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import itertools
import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from core import protocol
from core import topics as topic_names
from core.bounded import BoundedLru, payload_bytes, size_text
from core.chunks import Artifact, ArtifactCache, ArtifactUnavailable, ChunkServer, blob_ref, is_blob_ref
from core.config import ManagerSettings
from core.critical import CriticalWork
from core.cron import CronScheduler, Schedule
from core.domain import (
    ALLOWED_TRANSITIONS,
    WASM_MAGIC,
    Job,
    MessageRejected,
    ModuleNeeds,
    Proplet,
    PropletCameOnline,
    PropletHeartbeat,
    PropletMetrics,
    PropletMetricsReceived,
    PropletWentOffline,
    Task,
    TaskDeleted,
    TaskEvent,
    TaskMetrics,
    TaskState,
    TaskStateChanged,
    group_state,
    invocation_wait_s,
    is_http_url,
    module_needs,
    new_task_id,
    utcnow,
)
from core.errors import Conflict, InvalidRequest, NotFound, TimedOut, Unavailable, UpstreamFailed
from core.events import Fanout
from core.federated import FederatedLearning
from core.lifecycle import KeyedLocks, cancel_and_wait
from core.mqtt import BrokerAddress, BrokerUnavailable, MqttBus, parse_broker_url
from core.protocol import InvalidMessage
from core.scheduler import Scheduler
from core.schemas import JobCreate, TaskCreate, TaskUpdate, WorkflowCreate
from core.store import Page, Store, store_from_settings
from core.store.base import DatabaseTakenOver, StoreError, WriteOp
from core.store.migrate import migrate
from core.store.reads import TaskReader
from core.store.writer import StoreWriter
from core.telemetry import CoreMetrics
from core.topics import Topics
from core.workflows import GroupCoordinator, never_started, validate_dag, validate_sequence

log = logging.getLogger(__name__)

# Seconds between stored rows of a proplet that keeps heartbeating (see `_seen_alive`). A
# restarted manager may find a row this much staler; it counts silence from its own start anyway.
ALIVE_SAVE_INTERVAL = 1.0
# Capabilities a proplet may announce in its discovery metadata (`metadata.capabilities`).
CAP_TASK_STATE = "task_state"  # confirms starts on control/proplet/task_state
CAP_RESULT_ACK = "result_ack"  # keeps results until control/manager/result_ack arrives
CAP_MODULE_CACHE = "module_cache"  # keeps modules by digest: a start may name one by reference
CAP_RESULT_ACK_IN_START = "result_ack_in_start"  # reads acknowledgements a start carries (`result_acks`)
# How long a result's acknowledgement to such a proplet waits for a start to it to carry it before
# it goes alone: a message less per task for a client that submits the next task on a result, and
# the acknowledgement's send (~0.1 ms here) no longer on the way of that start.
ACK_RIDE_S = 0.02
# The reason of a pending task never queued (created, not started): without one it looked queued.
NOT_STARTED = "not started: start it (s in the console, propeller tasks start <id>, POST /tasks/<id>/start)"
NOT_STARTED_IN_JOB = "not started: start its job (propeller jobs start <job_id>, POST /jobs/<job_id>/start)"
NOT_STARTED_AFTER_DEPENDENCIES = "not started: waiting for its dependencies to finish"
NOT_STARTED_IN_SEQUENCE = "not started: waiting for the job's earlier tasks to finish (sequential job)"


def not_started_reason(task: Task, schedule: Schedule | None = None) -> str:
    """What a task never started waits for, and how to start it: what `reason` says until it is queued."""
    if schedule is not None and schedule.expression:
        return f"not started: scheduled for {schedule.next_run:%Y-%m-%d %H:%M} UTC (cron '{schedule.expression}')"
    if task.job_id:
        return NOT_STARTED_IN_JOB
    if task.depends_on:
        return NOT_STARTED_AFTER_DEPENDENCIES
    return NOT_STARTED


# A module at least this big goes to a proplet that ran it before (and keeps modules) by reference
# instead of inside the start: decoding and hashing a 240 KB start cost every repeated run ~1 ms.
MODULE_BY_REFERENCE_MIN = 16 * 1024
# Idle tasks kept in memory (least recently used dropped), so that a start or a read right after a
# change does not go to the database; bounded by bytes too, as a task's results may be 1 MiB or more.
RECENT_TASKS = 10_000
RECENT_TASKS_MAX_BYTES = 64 * 1024 * 1024
# Modules remembered per proplet as held by it (least recently used dropped).
MODULES_HELD_MAX = 64
# Seconds before a task whose dispatch the store refused goes back to the queue.
UNSTORED_DISPATCH_RETRY = 1.0
# The reason a queued task gives while its stored module cannot be read (the database is unreachable).
MODULE_UNREADABLE_REASON = "waiting for the database"
# Dispatch heap entries beyond 3 × the queued tasks (stale ones outnumbering live ones 2 to 1) and this
# slack make the heap be rebuilt from the queued tasks (see _push).
HEAP_STALE_SLACK = 1024
# Seconds a proplet that refused a start (task_state `rejected`: it was full) is not offered that task
# again, unless a slot frees on it sooner. Both proplets refuse only for being full (the firmware's
# slots all busy, our outbox full), which passes; a start they can never run fails with a result.
REFUSAL_BACKOFF = 2.0
# After the manager was cut off from the broker (a broker restart, as a rule), proplets come back on
# their own reconnect backoff, which grows with the outage (the firmware's up to 30 s, ours 2 s): the
# silence the manager counts against them starts that much later, up to this.
RECONNECT_ALLOWANCE_MAX = 30.0
# Invocations waiting for their answers at once (each holds an API request): more are refused (503)
# rather than piling up.
INVOCATIONS_MAX = 1024

_T = TypeVar("_T")


def _one_change_at_a_time(method: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    """A start, stop, change, upload, delete or skip of a task waits for any other one of the same
    task to end. Each checks the task's state, awaits (a read, a commit) and then acts on what it
    checked; interleaved, they disagreed with each other and with the database: a PUT and a start
    both answered 200 and the task was queued with its old inputs while the database held the new
    ones, a start racing a delete queued the deleted task again (or answered 500: the store refused
    its write), a PUT racing a delete kept the deleted task in memory. The dispatcher and the result
    path do not take this turn."""

    @functools.wraps(method)
    async def one_at_a_time(self: ManagerCore, task_id: str, *args: Any, **kwargs: Any) -> _T:
        async with self._task_turns.hold(task_id):
            return await method(self, task_id, *args, **kwargs)

    return one_at_a_time


class ModuleUnreadable(Exception):
    """A task's stored module could not be read (the database is unreachable): not now, later."""


@dataclass(frozen=True, slots=True)
class CoreStatus:
    """A snapshot for the console header and the dashboard."""

    broker_url: str
    broker_connected: bool
    broker_embedded: bool
    store: str
    api_url: str | None
    proplets_online: int
    proplets_total: int
    backlog: int
    active: int
    # Why the broker cannot be reached (and what to do), while it cannot; "" otherwise.
    broker_error: str = ""
    # False while writes find the database unreachable (they wait and are retried), with its reason.
    store_connected: bool = True
    store_error: str = ""


class ManagerCore:
    def __init__(self, settings: ManagerSettings | None = None, *, store: Store | None = None) -> None:
        self.settings = settings or ManagerSettings()
        self.topics = Topics(self.settings.tenant_id, self.settings.channel_id)
        self.store = store or store_from_settings(self.settings)
        self.metrics = CoreMetrics()
        self.events: Fanout[Any] = Fanout()
        self.scheduler = Scheduler(self.settings.scheduler)
        self.writer = StoreWriter(self.store)
        self.metrics.watch_writer(self.writer)
        # Starts, stops and results in hand, for a host that shares the interpreter (the console).
        self.critical_work = CriticalWork(lambda: not self.writer.backlog, self.writer.wait_idle)
        self.reader = TaskReader(self.store)
        # Workflows and jobs: dependents started or skipped as the tasks they wait for finish.
        self.groups = GroupCoordinator(self)
        # Tasks started by their cron schedules.
        self.cron = CronScheduler(self)
        # Federated-learning rounds: the coordinator, or a relay to MANAGER_COORDINATOR_URL.
        self.federated = FederatedLearning(self)
        self.proplets: dict[str, Proplet] = {}
        # Tasks the dispatcher owns: queued (pending with queued_at), scheduled or running.
        self.active: dict[str, Task] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._queued: set[str] = set()
        self._seq = itertools.count()
        self._slots: defaultdict[str, set[str]] = defaultdict(set)
        # The latent tasks among them, deployed and waiting for invocations (they take no capacity).
        self._latent_deployed: defaultdict[str, set[str]] = defaultdict(set)
        self._broadcast_waiting: dict[str, set[str]] = {}
        # Running broadcasts recovered after a restart with no proplet counted online to wait for
        # (the manager was down for longer than the liveness timeout): whom they wait for is decided
        # once the fleet has had a liveness timeout to be heard (_settle_recovered_broadcasts). An
        # empty waiting set finished them at the first answer, or never without one.
        self._broadcasts_unheard: set[str] = set()
        # task id -> {proplet id: monotonic time it refused the task}; see REFUSAL_BACKOFF.
        self._refused_by: defaultdict[str, dict[str, float]] = defaultdict(dict)
        # task id -> {proplet id: why it cannot run the task} (task_state `unsupported`): never sent
        # there again while the task lives.
        self._unsupported_by: dict[str, dict[str, str]] = {}
        # proplet id -> monotonic time a slot last freed on it, kept only while refusals are held:
        # a refusal older than that was for being full, which it may no longer be.
        self._slot_freed_at: dict[str, float] = {}
        # When each in-flight task's start last went out (monotonic): drives re-publishing of
        # unconfirmed starts and reconciliation with heartbeats.
        self._sent_at: dict[str, float] = {}
        # Scheduled tasks their proplet confirmed as waiting there for a slot (task_state `queued`):
        # not sent again, but still reconciled with its heartbeats (their `_sent_at` is kept for
        # that: popping it took them out of reconciliation, so a proplet that lost them left them
        # scheduled, or running once they had started, for ever).
        self._waiting_on_proplet: set[str] = set()
        # When the manager last (re)connected to the broker: proplet silence is measured from here,
        # plus the allowance for their reconnect backoff after an outage of the manager's own.
        self._listening_since: datetime | None = None
        self._reconnect_allowance = 0.0
        self._heard_broker_at: datetime | None = None  # last known connected (connect, liveness loop)
        # Starts that never left: (task id, attempt, why). Their publish found no connection, or the
        # store refused their dispatch; the dispatcher puts them back in the queue.
        self._lost_starts: list[tuple[str, int, str]] = []
        self._pending_acks: dict[str, list[tuple[str, int]]] = {}
        # Acknowledgements waiting for a start to carry them (CAP_RESULT_ACK_IN_START), by proplet.
        self._riding_acks: dict[str, list[tuple[str, int]]] = {}
        self._invocations: dict[str, asyncio.Future[protocol.InvokeResultMessage]] = {}
        # Whose turn it is to answer the next call of each broadcast latent task (an index into
        # its holders), dropped with the task.
        self._invoke_turns: dict[str, int] = {}
        # What stored modules need of a proplet (by digest: noted as they arrive, read back for tasks
        # read from the database), to send a task only to a proplet that can take its module: not a
        # component, a WASI program or a module over its announced max_module_bytes to the firmware.
        # Unknown (a URL, an OCI reference): any proplet, which answers `unsupported` if it cannot
        # run it, and the task goes to another (_unsupported_on).
        self._module_needs: BoundedLru[str, ModuleNeeds] = BoundedLru(max_entries=4096, max_bytes=1 << 62,
                                                                      weigh=lambda _: 0)
        self._files = ArtifactCache(max_bytes=64 * 1024 * 1024)
        # Digests of modules each proplet completed a task with, for proplets that keep modules
        # (CAP_MODULE_CACHE). Bounded per proplet; a proplet that lost one fetches it in chunks.
        self._modules_held: dict[str, OrderedDict[str, None]] = {}
        self._signer: Any = None
        self._signatures: OrderedDict[str, str] = OrderedDict()
        # Write-through copies of recently touched idle tasks (the manager is the only writer), so a
        # start or a read right after a create does not go to the database. Bounded: LRU eviction.
        self._recent: BoundedLru[str, Task] = BoundedLru(RECENT_TASKS, RECENT_TASKS_MAX_BYTES, _held_bytes)
        # One client change of a task at a time (see _one_change_at_a_time).
        self._task_turns = KeyedLocks()
        # Finished tasks whose result the store refused to write (task id -> the task as finished):
        # the result is not acknowledged, so its proplet sends it again, and that repeat writes it
        # again instead of being taken for an ordinary duplicate (acknowledged, the result lost).
        # Bounded like `_recent`, by count and by the bytes of the results held: oldest dropped (a
        # proplet that never repeats its result keeps none here).
        self._unstored_results: BoundedLru[str, Task] = BoundedLru(RECENT_TASKS, RECENT_TASKS_MAX_BYTES,
                                                                   _held_bytes)
        # Tasks evicted from `_recent` while writes were still queued: task id -> how many writer
        # entries had been queued then. Reading such a task back waits for those writes only; any
        # other task not in memory has nothing queued (every task write goes through memory), so
        # its read needs no barrier. Oldest first; pruned as the writer catches up.
        self._evicted_unwritten: OrderedDict[str, int] = OrderedDict()
        # Heartbeats are applied in memory at once but stored at most once a second per proplet
        # (a fleet's chatter would otherwise be a database write per message); the liveness loop
        # and shutdown store what is left. proplet id -> monotonic time of its last stored row.
        self._alive_saved_at: dict[str, float] = {}
        self._alive_unsaved: set[str] = set()
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[Any]] = []
        self._shutdown = asyncio.Event()
        # Set when another manager took the database over while this one was cut off from it: this
        # one stops without storing anything more (`propeller serve` exits with this error).
        self.taken_over: DatabaseTakenOver | None = None
        self._handlers: dict[str, Callable[[str, bytes], Awaitable[None]]] = {
            topic_names.CREATE: self._on_discovery,
            topic_names.ALIVE: self._on_alive,
            topic_names.RESULTS: self._on_result,
            topic_names.INVOKE_RESULTS: self._on_invoke_result,
            topic_names.METRICS: self._on_proplet_metrics,
            topic_names.TASK_METRICS: self._on_task_metrics,
            topic_names.TASK_STATE: self._on_task_state,
            topic_names.REGISTRY_REQUEST: self._on_registry_request,
            topic_names.FL_ROUND_START: self.federated.on_round_start,
        }
        self.bus: MqttBus | None = None
        self.chunks: ChunkServer | None = None
        # MANAGER_OCI_PROXY: the OCI proxy's chunk server on the manager's connection.
        self.oci_chunks: ChunkServer | None = None
        self.oci_artifacts: Any = None  # proplet.proxy.OciArtifacts, imported only when hosted
        self.broker_address: BrokerAddress | None = None
        self._embedded_broker: Any = None
        self._http: Any = None
        self._http_sockets: list[Any] = []
        self.api_url: str | None = None
        # Observers of the dispatch hot path (benchmarks): called with (task_id, perf_counter).
        self.on_start_published: Callable[[str, float], None] | None = None

    # ------------------------------------------------------------------------------------
    # lifecycle

    async def __aenter__(self) -> ManagerCore:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _start(self) -> None:
        started = time.perf_counter()
        if self.settings.signing_key is not None:
            from core.signing import SignatureError, load_private_key

            try:
                self._signer = load_private_key(self.settings.signing_key)
            except SignatureError as exc:
                raise InvalidRequest(str(exc)) from None
        await self.store.open()
        applied = await migrate(self.store)
        if applied:
            log.info("applied migrations %s to %s", ", ".join(applied), self.store.description)
        await self.store.reserve_row_ids()
        self._spawn(self.writer.run(), "store-writer")
        self._spawn(self.store.keep_manager_lock(), "database-lock")
        await self._recover()

        if self.settings.http_enabled:
            # Before the broker: a manager that cannot serve its API stops here, without having
            # connected with the manager client id (which would take over another manager's session).
            from core.api import check_bind_is_safe, listen_for_api

            check_bind_is_safe(self.settings)
            self._http_sockets = listen_for_api(self.settings.http_host, self.settings.http_port)
        self.broker_address = await self._resolve_broker()
        # clean_session off: the broker keeps the manager's subscriptions and queues results while
        # it restarts.
        conn = self.settings.mqtt_connection(self.broker_address, self.settings.entity_id, self.settings.api_key,
                                             clean_session=False)
        # No Last Will on the proplet alive topic: upstream's manager registers itself as a
        # phantom proplet that way (upstream defect 9).
        self.bus = MqttBus(
            conn,
            subscriptions=[(self.topics.topic(s), 0) if s in topic_names.MANAGER_TELEMETRY else self.topics.topic(s)
                           for s in self._handlers] + [topic_names.FL_UPDATES_FILTER],
            on_message=self._on_message,
            on_connected=self._broker_connected,
            name="manager",
        )
        self.chunks = ChunkServer(
            self.bus, self.topics.registry_chunk, resolve=self._resolve_blob, accepts=is_blob_ref,
            chunk_size=self.settings.chunk_size, binary_topic=self.topics.registry_chunk_binary,
        )
        if self.settings.oci_proxy:
            self.oci_chunks = self._host_oci_proxy()
        self._spawn(self.bus.run(), "mqtt")
        self._spawn(self.chunks.run(), "chunk-server")
        if self.oci_chunks is not None:
            self._spawn(self.oci_chunks.run(), "oci-proxy")
        self._spawn(self._dispatch_loop(), "dispatcher")
        self._spawn(self.cron.run(), "cron")
        self._spawn(self.federated.run(), "federated-learning")
        self._spawn(self._liveness_loop(), "liveness")
        self._spawn(self._maintenance_loop(), "maintenance")
        self._spawn(self._housekeeping_loop(), "store-housekeeping")
        if self.settings.http_enabled:
            await self._start_http()
        self._wake.set()
        log.info(
            "manager ready in %.0f ms: store %s, broker %s%s, API %s",
            (time.perf_counter() - started) * 1000, self.store.description, self.broker_address.url,
            " (in-process)" if self._embedded_broker else "", self.api_url or "disabled",
        )

    async def _stop(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._http_task
            self._http = None
        for sock in self._http_sockets:
            sock.close()
        self._http_sockets = []
        await self.groups.close()
        await self.federated.close()
        if self.bus is not None:
            self._flush_riding_acks()  # not left for the proplets to send those results again
            await self.bus.close()
        if self.taken_over is None:
            with contextlib.suppress(Exception):
                await self._save_unsaved_alive()
            # Commit every state change taken in before the loops stop (not into a database another
            # manager has taken over: those writes wait for a lock that will not come back).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self.writer.wait_idle()
        await cancel_and_wait(self._loops, owner="manager")
        self._loops.clear()
        if self.oci_artifacts is not None:
            self.oci_artifacts.close()  # pulls still under way in their threads are not waited for
        await self.critical_work.close()
        for fut in self._invocations.values():
            if not fut.done():
                fut.cancel()
        await self.store.close()
        if self._embedded_broker is not None:
            await self._embedded_broker.stop()
            self._embedded_broker = None
        self._shutdown.set()

    async def _broker_connected(self) -> None:
        self._listening_since = utcnow()
        if self._heard_broker_at is not None:
            outage = (self._listening_since - self._heard_broker_at).total_seconds()
            self._reconnect_allowance = min(RECONNECT_ALLOWANCE_MAX, max(0.0, outage))
        else:
            # Subscribed for the first time: proplets that announced before now (started with this
            # manager, or before it) announce again. After a broker outage they do so on their own
            # reconnect. Upstream's proplets do not subscribe to it; they announce only on connect.
            assert self.bus is not None
            self.bus.send(self.topics.discover, b"{}")
        self._heard_broker_at = self._listening_since
        # Tasks queued while the broker was away go out now, and starts it may have lost in a
        # crash are sent again at once instead of after the ack timeout.
        for task_id in self._sent_at:
            self._sent_at[task_id] = 0.0
        self._wake.set()

    def request_shutdown(self) -> None:
        """Ask `wait_closed()` to return (signal handlers call this; a failing background loop does the
        same, which closes the console hosting the core)."""
        self._shutdown.set()

    async def wait_closed(self) -> None:
        """Run until request_shutdown() or a fatal error in a background loop."""
        await self._shutdown.wait()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._loop_ended)
        self._loops.append(task)

    def _loop_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, DatabaseTakenOver):
            self.taken_over = exc
            log.error("%s", exc)
            self._shutdown.set()
        elif exc is not None:
            log.error("background loop %s failed; shutting the manager down", task.get_name(),
                      exc_info=exc)
            self._shutdown.set()

    async def _resolve_broker(self) -> BrokerAddress:
        if self.settings.mqtt_address:
            return parse_broker_url(self.settings.mqtt_address)
        from core.embedded_broker import MQTT_BROKER, NOTHING, EmbeddedBroker, port_taken_message, what_listens

        port = self.settings.default_broker_port
        listener = await asyncio.to_thread(what_listens, "127.0.0.1", port)
        if listener == MQTT_BROKER:
            return BrokerAddress("127.0.0.1", port)
        if listener != NOTHING:
            # Connecting would retry forever with "no CONNACK", and proplets would find nothing there.
            raise Unavailable(port_taken_message(port))
        broker = EmbeddedBroker("127.0.0.1", port)
        await broker.start()
        self._embedded_broker = broker
        return BrokerAddress("127.0.0.1", broker.port)

    async def _start_http(self) -> None:
        from core.api import ApiServer, create_app

        server = ApiServer(create_app(self), self._http_sockets)
        self._http_sockets = []  # the server closes them from now on
        self._http = server
        self._http_task = asyncio.ensure_future(server.serve())
        self._http_task.set_name("http")
        while not server.started:
            if self._http_task.done():
                self._http = None
                exc = self._http_task.exception()
                raise Unavailable(f"The REST API did not start ({exc!r}); the debug log has the details.")
            await asyncio.sleep(0.005)
        self.api_url = server.url

    async def _recover(self) -> None:
        """Rebuild the in-memory view from the database after a (re)start."""
        now = utcnow()
        for p in await self.store.all_proplets():
            last = p.last_alive_at
            # Stored offline stays offline: it said so (clean shutdown, Last Will) or went silent, and
            # its last heartbeat, however recent, is no sign of life. Judged by that heartbeat alone, a
            # proplet stopped just before the manager came back as online for a liveness timeout, and
            # was sent tasks meanwhile. Stored online is kept only while its heartbeat is recent.
            p.online = p.online and bool(last and (now - last).total_seconds() <= self._liveness_timeout(p))
            self.proplets[p.id] = p
        recovered_at = time.monotonic()
        holding: set[str] = set()
        active = await self.store.active_tasks()
        await self._learn_module_needs(active)
        for task in active:
            self.active[task.id] = task
            if task.state is not TaskState.PENDING:
                # Unconfirmed starts go out again after the ack timeout, and running tasks that no
                # heartbeat lists any more are reconciled (see _reconcile).
                self._sent_at[task.id] = recovered_at
            if task.state is TaskState.PENDING:
                self._push(task)
            elif task.broadcast:
                answered = set(task.results) if isinstance(task.results, dict) else set()
                waiting = {p.id for p in self.proplets.values() if p.online and p.id not in answered}
                if waiting:
                    self._broadcast_waiting[task.id] = waiting
                else:
                    self._broadcasts_unheard.add(task.id)
            elif task.proplet_id:
                self._take_slot(task.proplet_id, task)
                holding.add(task.proplet_id)
        # A proplet holding in-flight tasks is presumed alive however stale its last stored
        # heartbeat: the manager was down, not the proplet. The liveness check then gives it one
        # timeout from when the manager can hear it again, and its tasks fail or retry only if it
        # stays silent for that long.
        for proplet_id in holding:
            p = self.proplets.get(proplet_id)
            if p is not None and not p.online:
                p.online = True
                log.info("proplet %s holds in-flight tasks; presumed alive until its heartbeat is due", p.id)
        if self.active:
            log.info("recovered %d in-flight tasks (%d queued)", len(self.active), len(self._queued))
        await self.cron.load()
        await self.federated.load()
        # Dependents whose last dependency finished just before the manager stopped.
        for workflow_id, job_id in await self.store.groups_with_waiting_dependents():
            self.groups.finished_group(workflow_id, job_id)
        self.metrics.proplets_online.set(sum(p.online for p in self.proplets.values()))

    # ------------------------------------------------------------------------------------
    # status

    def status(self) -> CoreStatus:
        bus = self.bus
        connected = bool(bus and bus.connected.is_set())
        return CoreStatus(
            broker_url=self.broker_address.url if self.broker_address else "",
            broker_connected=connected,
            broker_embedded=self._embedded_broker is not None,
            store=self.store.description,
            api_url=self.api_url,
            proplets_online=sum(p.online for p in self.proplets.values()),
            proplets_total=len(self.proplets),
            backlog=len(self._queued),
            active=len(self.active),
            broker_error=bus.counters.last_error if bus is not None and not connected else "",
            # The lock's connection is checked when nothing is written: an idle manager's database going
            # away shows too.
            store_connected=self.writer.reachable and self.store.holds_manager_lock,
            store_error=self.writer.unreachable_reason or (
                "" if self.store.holds_manager_lock
                else "the connection holding this manager's lock on the database was lost; taking it again"),
        )

    # ------------------------------------------------------------------------------------
    # task operations (REST API and console)

    async def create_task(self, body: TaskCreate) -> Task:
        task = body.to_task()
        if task.depends_on:
            if not (task.workflow_id or task.job_id):
                raise InvalidRequest("'depends_on' needs 'workflow_id': dependencies are between tasks of one "
                                     "workflow (POST /workflows) or job (POST /jobs)")
            # A task appended to an existing workflow or job: its dependencies must be tasks of it.
            group = {t.id: t for t in await self.group_tasks(workflow_id=task.workflow_id, job_id=task.job_id)}
            validate_dag({**group, task.id: task})
        schedule = self.cron.plan(task.id, body.schedule, body.timezone, body.is_recurring) if body.schedule else None
        task.reason = not_started_reason(task, schedule)
        await self._insert_tasks([task], *([self.store.op_put_schedule(schedule)] if schedule else []))
        if schedule is not None:
            self.cron.adopt(schedule)
        return task.copy()

    async def create_pinned_tasks(self, body: TaskCreate, names: dict[str, str], *extra: WriteOp) -> list[Task]:
        """One task per proplet (`names`: proplet id -> task name) from one body, pinned to it, its
        module decoded once, all stored in one commit (with `extra` first)."""
        template = body.to_task()
        tasks = []
        for proplet_id, name in names.items():
            task = template.copy()
            task.id, task.name, task.proplet_id, task.pinned = new_task_id(), name, proplet_id, True
            tasks.append(task)
        await self._insert_tasks(tasks, *extra)
        return [t.copy() for t in tasks]

    async def get_task(self, task_id: str) -> Task:
        """The current state of a task (a copy)."""
        task = self.active.get(task_id) or self._recent.get(task_id)
        if task is not None:
            return task.copy()
        await self._written(task_id)
        stored = await self.reader.get(task_id)
        # Brought into memory while the row was read (and perhaps changed since: a stop, a failed
        # turn): the row is the older, and remembered it would stand for the task from then on.
        task = self.active.get(task_id) or self._recent.get(task_id)
        if task is not None:
            return task.copy()
        if stored is None:
            raise NotFound(f"task {task_id} not found")
        self._remember(stored)
        return stored.copy()

    async def _load_for_start(self, task_id: str) -> Task:
        await self._written(task_id)
        stored = await self.reader.get(task_id)
        if stored is None:
            raise NotFound(f"task {task_id} not found")
        await self._learn_module_needs([stored])
        return stored

    async def _learn_module_needs(self, tasks: Iterable[Task]) -> None:
        """Learn what the stored modules of tasks read from the database need of a proplet (size,
        component or not, WASI or not): known already for modules received since the start, and read
        once per module otherwise (its size and first MODULE_HEAD_BYTES, not the module)."""
        unknown = {t.wasm_digest for t in tasks
                   if t.wasm_digest and not t.image_url and t.wasm_digest not in self._module_needs}
        if not unknown:
            return
        try:
            heads = await self.store.module_heads(sorted(unknown))
        except StoreError as exc:
            log.warning("cannot read the sizes of %d modules; their tasks go to any proplet: %s", len(unknown), exc)
            return
        for digest, (size, head) in heads.items():
            self._module_needs.put(digest, module_needs(size, head))

    def _remember(self, task: Task) -> None:
        for evicted in self._recent.put(task.id, task):
            if self.writer.backlog:
                self._evicted_unwritten[evicted] = self.writer.queued_entries
                self._evicted_unwritten.move_to_end(evicted)
        unwritten = self._evicted_unwritten
        while unwritten and next(iter(unwritten.values())) <= self.writer.finished_entries:
            unwritten.popitem(last=False)

    async def _written(self, task_id: str) -> None:
        """Wait until every queued write of a task that is not in memory is committed."""
        queued_before = self._evicted_unwritten.get(task_id)
        if queued_before is not None:
            await self.writer.barrier_for(queued_before)
            self._evicted_unwritten.pop(task_id, None)

    async def list_tasks(
        self,
        *,
        offset: int = 0,
        limit: int = 100,
        metadata: dict[str, Any] | None = None,
        states: Sequence[TaskState] | None = None,
        proplet_id: str | None = None,
        id_prefix: str | None = None,
    ) -> Page[Task]:
        await self.writer.barrier()
        try:
            return await self.store.list_tasks(
                offset=offset, limit=limit, metadata=metadata, states=states, proplet_id=proplet_id,
                id_prefix=id_prefix,
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    async def task_events(self, task_id: str) -> list[TaskEvent]:
        await self.get_task(task_id)
        await self.writer.barrier()
        return await self.store.task_events(task_id)

    async def task_metrics(self, task_id: str, offset: int, limit: int) -> Page[TaskMetrics]:
        await self.get_task(task_id)
        await self.writer.barrier()
        return await self.store.list_task_metrics(task_id, offset, limit)

    @_one_change_at_a_time
    async def update_task(self, task_id: str, body: TaskUpdate) -> Task:
        if task_id in self.active:
            raise Conflict(f"task {task_id} is queued or running; stop it before changing it")
        task = await self.get_task(task_id)
        old_digest = task.wasm_digest
        # A never-started task's reason follows a schedule added or removed; a reset's reason stays.
        said_not_started = task.state is TaskState.PENDING and task.queued_at is None and task.reason in (
            "", not_started_reason(task, self.cron.get(task_id)))
        body.apply(task)
        task.updated_at = utcnow()
        schedule = self._updated_schedule(task_id, body)
        if said_not_started:
            task.reason = not_started_reason(task, schedule if schedule is not None else self.cron.get(task_id))
        ops = [self.store.op_update_task(task)]
        if schedule is not None:
            ops.append(self.store.op_put_schedule(schedule) if schedule.expression
                       else self.store.op_delete_schedule(task_id))
        if task.wasm_digest != old_digest:
            ops += self.store.ops_set_task_module(task, old_digest)
            if task.file:
                self._files.put(task.wasm_digest, Artifact(task.file, task.wasm_digest))
                self._note_module_needs(task.wasm_digest, task.file)
        await self.writer.write(*ops)
        if schedule is not None:
            if schedule.expression:
                self.cron.adopt(schedule)
            else:
                self.cron.forget(task_id)
        task.file = b""
        self._remember(task)
        return task.copy()

    def _updated_schedule(self, task_id: str, body: TaskUpdate) -> Schedule | None:
        """The schedule an update asks for (an empty expression: none), or None when it leaves it."""
        fields = body.model_fields_set & {"schedule", "is_recurring", "timezone"}
        current = self.cron.get(task_id)
        if not fields or (current is None and not body.schedule):
            return None
        if "schedule" in fields and not body.schedule:
            return Schedule(task_id, "", "", False, utcnow())
        expression = body.schedule or (current.expression if current else "")
        timezone = body.timezone if body.timezone is not None else (current.timezone if current else "")
        recurring = body.is_recurring if body.is_recurring is not None else bool(current and current.recurring)
        return self.cron.plan(task_id, expression, timezone, recurring)

    @_one_change_at_a_time
    async def upload_file(self, task_id: str, filename: str, data: bytes) -> Task:
        if not filename.endswith(".wasm"):
            raise InvalidRequest(f"the uploaded file must be a .wasm file, got {filename!r}")
        if not data.startswith(WASM_MAGIC):
            raise InvalidRequest(f"{filename} is not a WebAssembly module (it does not start with \\0asm)")
        if task_id in self.active:
            raise Conflict(f"task {task_id} is queued or running; stop it before replacing its module")
        task = await self.get_task(task_id)
        old_digest = task.wasm_digest
        task.file = data
        task.wasm_digest = protocol.sha256_digest(data)
        task.updated_at = utcnow()
        self._files.put(task.wasm_digest, Artifact(data, task.wasm_digest))
        await self.writer.write(*self.store.ops_set_task_module(task, old_digest))
        task.file = b""
        self._remember(task)
        return task.copy()

    @_one_change_at_a_time
    async def delete_task(self, task_id: str) -> None:
        task = self.active.get(task_id)
        if task is not None and task.state is not TaskState.PENDING:
            self._send_stop(task)
        deleted = await self.get_task(task_id)
        if task is not None:
            self._forget(task)
        self._recent.pop(task_id)
        self._unstored_results.pop(task_id)
        self.cron.forget(task_id)
        ops = [self.store.op_delete_task(task_id)]
        if deleted.wasm_digest:
            ops.append(self.store.op_forget_module(deleted.wasm_digest))
        await self.writer.write(*ops)
        self.events.emit(TaskDeleted(task_id))
        if task is not None and deleted.job_id:
            # A queued or running task of a job deleted is stopped first, and an interrupted task
            # ends its job. Looked at as a group only, a sequential job whose running task went left
            # the next one, now its first, for start_job to start: pending for ever.
            deleted.state = TaskState.INTERRUPTED
            self.groups.finished(deleted)
        elif deleted.workflow_id or deleted.job_id:
            # Its dependents will never see it finish: they are skipped now, not left waiting.
            self.groups.finished_group(deleted.workflow_id, deleted.job_id)

    # ------------------------------------------------------------------------------------
    # workflows and jobs (core/workflows.py)

    async def group_tasks(self, *, workflow_id: str = "", job_id: str = "") -> list[Task]:
        """The tasks of a workflow or job as they are now, in the order they were created."""
        await self.writer.barrier()
        return await self._stored_group(workflow_id=workflow_id, job_id=job_id)

    async def _stored_group(self, *, workflow_id: str = "", job_id: str = "") -> list[Task]:
        """group_tasks for a caller that has waited for the queued writes already."""
        tasks = await self.store.group_tasks(workflow_id=workflow_id, job_id=job_id)
        return [self.active[t.id].copy() if t.id in self.active else t for t in tasks]

    async def _check_dependencies(self, task: Task, group_read: list[Task] | None = None) -> None:
        """Conflict unless every dependency has finished; `group_read`: the task's group, read in its turn."""
        if group_read is None:
            group_read = await self.group_tasks(workflow_id=task.workflow_id, job_id=task.job_id)
        group = {t.id: t for t in group_read}
        unmet = [d for d in task.depends_on if d not in group or not group[d].state.is_terminal]
        if unmet:
            raise Conflict(f"task {task.id} has unmet dependencies: {', '.join(unmet)} not finished yet; it "
                           "starts by itself once they have")

    @_one_change_at_a_time
    async def skip_task(self, task_id: str, why: str) -> None:
        """A task that will not run (its run_if does not hold, or its job ended): skipped."""
        await self._end_waiting(task_id, TaskState.SKIPPED, why)

    @_one_change_at_a_time
    async def fail_unstarted(self, task_id: str, why: str) -> None:
        """A task whose turn came but that cannot start as it is (it has no module): failed."""
        await self._end_waiting(task_id, TaskState.FAILED, why)

    async def _end_waiting(self, task_id: str, end: TaskState, why: str) -> None:
        if task_id in self.active:
            raise Conflict(f"task {task_id} is queued or running")
        task = self._recent.pop(task_id) or await self._load_for_start(task_id)
        try:
            if task.state is not TaskState.PENDING:
                raise Conflict(f"task {task_id} is {task.state.label}, not waiting")
            task.reason = why
            if end is TaskState.FAILED:
                task.error = why
            task.finish_time = utcnow()
            done = await self._transition(task, end, why, durable=True)
            assert done is not None
            await done
        finally:
            self._remember(task)

    def _group_from_bodies(self, bodies: Sequence[TaskCreate], *, workflow_id: str = "",
                           job_id: str = "") -> list[Task]:
        now = utcnow()
        tasks: list[Task] = []
        for i, body in enumerate(bodies):
            task = body.to_task()
            task.id = body.id or task.id
            task.workflow_id, task.job_id = workflow_id or task.workflow_id, job_id or task.job_id
            # Creation order is the order of the body (a sequential job runs in it).
            task.created_at = task.updated_at = now + timedelta(microseconds=i)
            tasks.append(task)
        ids = [t.id for t in tasks]
        if len(set(ids)) < len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidRequest(f"task ids must be unique; repeated: {', '.join(dup)}")
        return tasks

    async def _insert_group(self, tasks: list[Task], *first: WriteOp) -> None:
        """Tasks with client-chosen ids: none may exist already."""
        for task in tasks:
            if task.id in self.active or task.id in self._recent or await self.reader.get(task.id) is not None:
                raise Conflict(f"a task with id {task.id} already exists")
        await self._insert_tasks(tasks, *first)

    async def _insert_tasks(self, tasks: list[Task], *extra: WriteOp) -> None:
        """Store new tasks (with `extra` in the same commit), announce them, keep them in memory."""
        ops = list(extra)
        for task in tasks:
            task.reason = task.reason or not_started_reason(task)
            if task.file:
                self._files.put(task.wasm_digest, Artifact(task.file, task.wasm_digest))
                self._note_module_needs(task.wasm_digest, task.file)
                ops.append(self.store.op_put_module(task.wasm_digest, task.file))
            ops += [self.store.op_insert_task(task),
                    self.store.op_task_event(TaskEvent(task.id, TaskState.PENDING, task.created_at, 0, "", "created"))]
        await self.writer.write(*ops)
        for task in tasks:
            # The console shows the event's detail as the task's reason.
            self.events.emit(TaskStateChanged(task.id, task.name, TaskState.PENDING, TaskState.PENDING,
                                              task.created_at, "", task.reason))
            task.file = b""
            self._remember(task)

    async def create_workflow(self, body: WorkflowCreate) -> list[Task]:
        """Tasks that depend on each other by id. Nothing starts: start the roots."""
        workflow_id = body.tasks[0].workflow_id or str(uuid.uuid4())
        tasks = self._group_from_bodies(body.tasks, workflow_id=workflow_id)
        existing = {t.id: t for t in await self.group_tasks(workflow_id=workflow_id)}
        validate_dag({**existing, **{t.id: t for t in tasks}})
        await self._insert_group(tasks)
        return [t.copy() for t in tasks]

    async def create_job(self, body: JobCreate) -> tuple[Job, list[Task]]:
        job_id = body.tasks[0].job_id or str(uuid.uuid4())
        if await self.store.get_job(job_id) is not None:
            raise Conflict(f"job {job_id} already exists")
        tasks = self._group_from_bodies(body.tasks, job_id=job_id)
        validate_dag({t.id: t for t in tasks})
        if body.execution_mode == "sequential":
            validate_sequence(tasks)
        now = utcnow()
        job = Job(job_id, body.name, body.execution_mode or "parallel", now, now)
        await self._insert_group(tasks, self.store.op_insert_job(job))
        return job, [t.copy() for t in tasks]

    async def get_job(self, job_id: str) -> tuple[Job, list[Task]]:
        await self.writer.barrier()
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job, await self._stored_group(job_id=job_id)

    async def list_jobs(self, *, offset: int = 0, limit: int = 100, state: TaskState | None = None,
                        id_prefix: str | None = None) -> Page[tuple[Job, list[Task]]]:
        """Jobs, newest first, with their tasks; `state` filters on the derived state, `id_prefix`
        on the start of the id."""
        await self.writer.barrier()
        if state is None:
            page = await self._stored_jobs(offset, limit, id_prefix)
            return Page([(job, await self._stored_group(job_id=job.id)) for job in page.items], page.total)
        matching: list[tuple[Job, list[Task]]] = []
        at = 0
        while True:
            page = await self._stored_jobs(at, 500, id_prefix)
            for job in page.items:
                tasks = await self._stored_group(job_id=job.id)
                if group_state([t.state for t in tasks]) is state:
                    matching.append((job, tasks))
            at += len(page.items)
            if not page.items or at >= page.total:
                break
        return Page(matching[offset:offset + limit], len(matching))

    async def _stored_jobs(self, offset: int, limit: int, id_prefix: str | None) -> Page[Job]:
        try:
            return await self.store.list_jobs(offset, limit, id_prefix)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    async def start_job(self, job_id: str) -> None:
        """Start a job: its tasks without dependencies (parallel, configurable), or its first task
        (sequential); the rest follow as they finish. A job that has run (completed, failed or
        stopped) and has nothing queued or running runs again from the start: each finished task
        is reset to pending first (its lifecycle events keep the earlier runs).

        The resets and the queueing of the first tasks are one commit: a manager killed half way
        through left the job half reset, its reset tasks never queued and nothing to start them
        after a restart. Now a restart finds the job as it was, or its run under way."""
        # Advances already due run first: between two tasks of a sequential job nothing is queued
        # or running, and a job in that gap is still running, not finished.
        await self.groups.settle()
        async with self.groups.turn(job_id=job_id):
            async with self._turns_of_tasks(t.id for t in await self._job_rows(job_id)):
                # Read in the tasks' turns, after the writes queued before: what is reset is what is stored.
                job, tasks = await self.get_job(job_id)
                if not tasks:
                    raise InvalidRequest(f"job {job_id} has no tasks")
                busy = sum(t.id in self.active for t in tasks)
                if busy:
                    raise Conflict(f"job {job_id} is running ({busy} of its {len(tasks)} tasks queued or running); "
                                   f"wait for it to finish, or stop it (POST /jobs/{job_id}/stop), to run it again")
                first = tasks[:1] if job.execution_mode == "sequential" else [t for t in tasks if not t.depends_on]
                # Checked for all before any starts: a job refused half way would be half started.
                bare = [t.id for t in first if not t.wasm_digest and not t.image_url]
                if bare:
                    raise InvalidRequest(f"job {job_id} cannot start: its tasks {', '.join(bare)} have no module; "
                                         "upload a .wasm (PUT /tasks/{id}/upload) or set image_url")
                if len(self._queued) + len(first) > self.settings.max_backlog:
                    raise Unavailable(
                        f"{len(self._queued)} tasks are already waiting for a proplet (the limit is "
                        f"{self.settings.max_backlog}) and job {job_id} would queue {len(first)} more; try "
                        "again when proplets have caught up")
                await self._start_job_tasks(job_id, tasks, {t.id for t in first}, job.execution_mode)

    async def _start_job_tasks(self, job_id: str, stored: list[Task], first: set[str], execution_mode: str) -> None:
        """Reset the finished tasks of a job and queue `first`, in one commit (the caller holds the
        group's and the tasks' turns and has checked that none is queued or running)."""
        ops: list[WriteOp] = []
        changed: list[TaskStateChanged] = []
        before: dict[str, Task] = {}
        waiting: dict[str, Task] = {}  # tasks whose reason only changes, as they were
        queued: list[Task] = []
        for row in stored:
            rerun, starts = row.state.is_terminal, row.id in first
            if not (rerun or starts):
                if row.reason == NOT_STARTED_IN_JOB:
                    # Its job runs now: it waits for its turn, not for someone to start the job.
                    task = self._recent.pop(row.id) or row
                    waiting[task.id] = task.copy()
                    task.reason = (NOT_STARTED_IN_SEQUENCE if execution_mode == "sequential"
                                   else NOT_STARTED_AFTER_DEPENDENCIES)
                    ops.append(self.store.op_update_task_state(task))
                    self._remember(task)
                continue
            task = self._recent.pop(row.id) or row
            before[task.id] = task.copy()
            self._unstored_results.pop(task.id)  # the re-run's writes supersede it
            if rerun:
                self._stage_reset(task, f"reset: job {job_id} runs again", ops, changed)
            if starts:
                task.queued_at = utcnow()
                task.reason = self._why_waiting(task)
                staged, event = self._change_state(task, TaskState.PENDING, "queued")
                ops += staged
                changed.append(event)
                queued.append(task)
            else:
                self._remember(task)
        for task in queued:
            self.active[task.id] = task
            self._push(task)
        try:
            await self._store_staged(ops, changed)
        except StoreError:
            # Not stored: the job is as it was (the caller is told), in memory too.
            for task_id, was in before.items():
                task = self.active.get(task_id)
                if task is not None:
                    await self._not_started(task, was)
                else:
                    self._unreset(was)
            for was in waiting.values():
                self._remember(was)
            raise

    async def stop_job(self, job_id: str) -> None:
        """Stop a job's queued and running tasks; those that have not started are skipped. Once it
        returns, no task of the job starts by itself.

        Every change is in one commit, which is all the call waits for: one commit per task (and
        the coordinator's look at the group after each) made a stop of a 200-task job take a second."""
        # In the group's turn, with advances that already read the group told to start nothing: a
        # task's result handled meanwhile would otherwise start the next task of a sequential job
        # after this stop had read it as pending and passed it by.
        with self.groups.stopping(job_id):
            async with self.groups.turn(job_id=job_id):
                rows = await self._job_rows(job_id)
                async with self._turns_of_tasks(t.id for t in rows):
                    await self._stop_job_tasks(job_id, rows)

    async def _stop_job_tasks(self, job_id: str, stored: list[Task]) -> None:
        """Interrupt the queued and running tasks, skip those not started, in one commit. Nothing
        is awaited between reading a task's state and changing it: a result handled meanwhile
        cannot slip in between."""
        ops: list[WriteOp] = []
        changed: list[TaskStateChanged] = []
        ended: list[Task] = []
        for row in stored:
            task = self.active.get(row.id)
            row = self._recent.get(row.id) or row  # what the task is now, its writes queued or not
            if task is not None:
                staged, event = self._change_state(task, TaskState.INTERRUPTED, self._stopping(task))
            elif never_started(row, self):
                task = self._recent.pop(row.id) or row
                task.reason = f"job {job_id} was stopped"
                task.finish_time = utcnow()
                staged, event = self._change_state(task, TaskState.SKIPPED, task.reason)
                self._remember(task)
            else:
                continue
            ops += staged
            changed.append(event)
            ended.append(task)
        if not ops:
            return
        done = await self.writer.enqueue(*ops)
        for event in changed:
            self.events.emit(event)
        # The coordinator is not told of each: the job is over, every task of it finished, and
        # there is nothing left for it to start or skip.
        for task in ended:
            await self._round_task_ended(task)
        await done

    async def _job_rows(self, job_id: str) -> list[Task]:
        """A job's stored tasks, read without waiting for the writer (a stop would wait behind
        every result and dispatch queued before it). Every change of a task is made in memory
        (`active`, `_recent`) before it is queued: read those first, not these rows, for the state."""
        if await self.store.get_job(job_id) is None:
            raise NotFound(f"job {job_id} not found")
        rows = await self.store.group_tasks(job_id=job_id)
        if any(row.id in self._evicted_unwritten for row in rows):
            # Out of memory with writes still queued (rare): their rows are read once those are in.
            await self.writer.barrier()
            rows = await self.store.group_tasks(job_id=job_id)
        return rows

    @contextlib.asynccontextmanager
    async def _turns_of_tasks(self, task_ids: Iterable[str]) -> AsyncIterator[None]:
        """The turns (see _one_change_at_a_time) of many tasks, taken in one order so that two
        callers cannot each hold one the other waits for."""
        async with contextlib.AsyncExitStack() as stack:
            for task_id in sorted(set(task_ids)):
                await stack.enter_async_context(self._task_turns.hold(task_id))
            yield

    async def start_task(self, task_id: str, *, dependencies_met: bool = False) -> Task:
        """Queue a task for dispatch (or re-run a finished one). Returns once that is stored.
        `dependencies_met`: the caller has just checked them (the workflow coordinator).

        A finished task of a workflow started again resets the finished tasks downstream of it,
        directly or not, to pending, in the commit that queues it: they run (or are skipped) again
        as their dependencies finish. It is refused (Conflict) while one of them is queued or
        running. A commit per reset left a manager killed half way with a workflow half re-run, the
        tasks not yet reset keeping the results of the run before."""
        with self.critical_work:
            return await self._start_task(task_id, dependencies_met)

    async def _start_task(self, task_id: str, dependencies_met: bool) -> Task:
        # In the task's turn (see _one_change_at_a_time), and for a re-run in a workflow in the
        # turns of its downstream tasks too: known only once the task and its group are read, so
        # then the turns are let go and all taken again in one order (_turns_of_tasks).
        held: set[str] = set()
        while True:
            turns = self._turns_of_tasks({task_id, *held}) if held else self._task_turns.hold(task_id)
            async with turns:
                if task_id in self.active:
                    raise Conflict(f"task {task_id} is already {_activity(self.active[task_id])}; "
                                   "stop it first to start it again")
                task = self._recent.get(task_id) or await self._load_for_start(task_id)
                group: list[Task] | None = None
                downstream: set[str] = set()
                if task.state.is_terminal and task.workflow_id:
                    group = await self.group_tasks(workflow_id=task.workflow_id)
                    downstream = _downstream_of(task.id, group)
                    if not downstream <= held:
                        held = downstream
                        continue
                return await self._start_in_turn(task, group, [t for t in group or () if t.id in downstream],
                                                 dependencies_met=dependencies_met)

    async def _start_in_turn(self, task: Task, group: list[Task] | None, downstream: list[Task], *,
                             dependencies_met: bool) -> Task:
        """start_task once the turns are held. For a re-run in a workflow, `group` is the workflow
        as read in them and `downstream` its tasks downstream of `task`, reset in the same commit."""
        if task.depends_on and not dependencies_met:
            await self._check_dependencies(task, group)
        busy = [row.id for row in downstream if row.id in self.active]
        if busy:
            # Left alone, it would finish on this task's previous result and never run again after
            # this run: the workflow would end looking re-run with a stale result in it.
            raise Conflict(f"task {busy[0]}, downstream of {task.id}, is {_activity(self.active[busy[0]])}: "
                           f"stop it (or wait for it to finish) before running {task.id} again")
        if not task.wasm_digest and not task.image_url:
            raise InvalidRequest(
                f"task {task.id} has no module: upload a .wasm (PUT /tasks/{task.id}/upload) or set image_url"
            )
        if len(self._queued) >= self.settings.max_backlog:
            raise Unavailable(
                f"{len(self._queued)} tasks are already waiting for a proplet (the limit is "
                f"{self.settings.max_backlog}); try again when proplets have caught up"
            )
        task = self._recent.pop(task.id) or task
        self._unstored_results.pop(task.id)  # the re-run's writes supersede it
        before = task.copy()
        detail = "queued"
        if task.state.is_terminal:
            detail = f"queued again (re-run after {task.state.label})"
            self._clear_last_run(task)
        task.queued_at = utcnow()
        task.reason = self._why_waiting(task)
        staged, queued = self._change_state(task, TaskState.PENDING, detail)
        ops = list(staged)
        changed = [queued]
        reset: dict[str, Task] = {}  # the downstream tasks reset, as they were
        why = f"reset: {task.id}, which it depends on, runs again"
        for row in downstream:
            other = self._recent.get(row.id) or row
            if not other.state.is_terminal:
                continue
            reset[other.id] = other.copy()
            self._unstored_results.pop(other.id)
            self._stage_reset(other, why, ops, changed)
            self._remember(other)
        self.active[task.id] = task
        self._push(task)
        try:
            await self._store_staged(ops, changed)
        except StoreError:
            # Not stored: the task and its downstream are as they were (the caller is told), in memory too.
            await self._not_started(task, before)
            for was in reset.values():
                self._unreset(was)
            raise
        return task.copy()

    def _stage_reset(self, task: Task, why: str, ops: list[WriteOp], changed: list[TaskStateChanged]) -> None:
        """Clear a finished task's last run and make it pending again, its writes and announcement
        added to `ops` and `changed` (a re-run stores all it resets in one commit)."""
        self._clear_last_run(task)
        task.reason = why
        staged, event = self._change_state(task, TaskState.PENDING, why)
        ops += staged
        changed.append(event)

    def _unreset(self, was: Task) -> None:
        """A reset the database refused: the finished task as it was, in memory too."""
        self._remember(was)
        self.events.emit(TaskStateChanged(was.id, was.name, TaskState.PENDING, was.state, utcnow(),
                                          was.proplet_id, "not reset: the database refused to store it"))

    async def _store_staged(self, ops: list[WriteOp], changed: list[TaskStateChanged]) -> None:
        """Store staged changes in one commit, announcing them at once; raises what refused them."""
        done = await self.writer.enqueue(*ops)
        for event in changed:
            self.events.emit(event)
        self._wake.set()
        await done

    @staticmethod
    def _clear_last_run(task: Task) -> None:
        task.queued_at = None  # "never started": what the coordinator looks for
        task.results = None
        task.error = ""
        task.start_time = None
        task.finish_time = None
        task.retries = 0
        if not task.pinned:
            task.proplet_id = ""

    async def _not_started(self, task: Task, before: Task) -> None:
        """Undo a start whose queued state the store refused: the caller is told it failed, so the
        task must not run. Runs as the failure is reported, before any later write of this start (its
        dispatch) is committed, so that dispatch's start is not sent (_publish_start finds the task
        gone) and, were it stored, the row is put back."""
        if self.active.get(task.id) is not task:
            return  # stopped or deleted meanwhile: that decided
        dispatched = task.state is not TaskState.PENDING
        self._forget(task)
        self._recent.pop(task.id)
        self._remember(before)
        self.events.emit(TaskStateChanged(task.id, task.name, task.state, before.state, utcnow(), before.proplet_id,
                                          "not started: the database refused to store it"))
        if dispatched:
            await self.writer.submit(self.store.op_update_task_state(before))

    @_one_change_at_a_time
    async def stop_task(self, task_id: str) -> Task:
        with self.critical_work:
            return await self._stop_task(task_id)

    async def _stop_task(self, task_id: str) -> Task:
        task = self.active.get(task_id)
        if task is None:
            stored = await self.get_task(task_id)
            raise Conflict(f"task {task_id} is {stored.state.label}, not queued or running")
        done = await self._transition(task, TaskState.INTERRUPTED, self._stopping(task), durable=True)
        await done
        return task.copy()

    def _stopping(self, task: Task) -> str:
        """A queued or running task stopped by request: its proplet told (if it has it), its error and end
        set. Returns the detail of its change to interrupted."""
        if task.state is TaskState.PENDING:
            detail = "stopped before it was dispatched"
        else:
            self._send_stop(task)
            detail = "stopped by request"
        task.error = "stopped by request"
        task.finish_time = utcnow()
        return detail

    async def invoke_task(self, task_id: str, inputs: list[str], env: dict[str, str],
                          timeout: float | None = None) -> str:
        """Call a deployed latent task once and return its result. A broadcast one is called on one
        of the proplets holding it, in turn (as upstream's manager does), not on all of them; one
        answering that it does not hold it passes the call to the next. `timeout` (the task's own
        wall-clock limit and a margin, else 30 s as upstream) counts all the tries together."""
        task = self.active.get(task_id)
        if task is None:
            stored = await self.get_task(task_id)
            if not stored.latent:
                raise Conflict(f"task {task_id} is not a latent task and cannot be invoked")
            raise Conflict(f"task {task_id} is {stored.state.label}; start it before invoking it")
        if not task.latent:
            raise Conflict(f"task {task_id} is not a latent task and cannot be invoked")
        if task.state is not TaskState.RUNNING and task.state is not TaskState.SCHEDULED:
            raise Conflict(f"task {task_id} is still queued; invoke it once it has been deployed")
        if timeout is None:
            timeout = invocation_wait_s(task.limits.timeout_s)
        if len(self._invocations) >= INVOCATIONS_MAX:
            raise Unavailable(f"{len(self._invocations)} invocations already wait for their answers (at most "
                              f"{INVOCATIONS_MAX}); call again later")
        holders = self._latent_holders(task) if task.broadcast else [task.proplet_id]
        if not holders:
            raise Conflict(f"broadcast task {task_id} is deployed on no proplet online now; stop it and start "
                           "it again to deploy it on the proplets online")
        try:
            async with asyncio.timeout(timeout):
                for i, proplet_id in enumerate(holders):
                    result = await self._invoke_on(task, proplet_id, inputs, env)
                    if not (result.error and protocol.NOT_DEPLOYED_MARK in result.error and i + 1 < len(holders)):
                        break
        except TimeoutError:
            raise TimedOut(f"invocation of task {task_id} timed out after {timeout:g} s") from None
        except BrokerUnavailable as exc:
            raise Unavailable(str(exc)) from None
        if result.error:
            raise UpstreamFailed(f"invocation of task {task_id} failed on {result.proplet_id}: {result.error}")
        return result.results

    def _latent_holders(self, task: Task) -> list[str]:
        """The proplets online that hold a broadcast latent task deployed (sent its start and not
        answered with an error or gone offline since), starting with the next one's turn."""
        waiting = self._broadcast_waiting.get(task.id)
        if waiting is None:  # recovered after a restart, before its proplets were heard again
            answered = task.results if isinstance(task.results, dict) else {}
            waiting = {p.id for p in self.proplets.values() if p.id not in answered}
        holders = sorted(pid for pid in waiting if (p := self.proplets.get(pid)) is not None and p.online)
        if not holders:
            return []
        turn = self._invoke_turns.get(task.id, 0) % len(holders)
        self._invoke_turns[task.id] = turn + 1
        return holders[turn:] + holders[:turn]

    async def _invoke_on(self, task: Task, proplet_id: str, inputs: list[str],
                         env: dict[str, str]) -> protocol.InvokeResultMessage:
        assert self.bus is not None
        invocation_id = str(uuid.uuid4())
        fut: asyncio.Future[protocol.InvokeResultMessage] = asyncio.get_running_loop().create_future()
        self._invocations[invocation_id] = fut
        try:
            msg = protocol.InvokeMessage(task.id, invocation_id, proplet_id, False, tuple(inputs), env)
            await self.bus.publish(self.topics.invoke, protocol.encode_invoke(msg))
            return await fut
        finally:
            self._invocations.pop(invocation_id, None)

    # ------------------------------------------------------------------------------------
    # proplet operations

    def list_proplets(self, *, online: bool | None = None) -> list[Proplet]:
        items = sorted(self.proplets.values(), key=lambda p: p.id)
        if online is not None:
            items = [p for p in items if p.online == online]
        for p in items:
            p.task_count = len(self._slots.get(p.id, ()))
        return items

    def get_proplet(self, proplet_id: str) -> Proplet:
        p = self.proplets.get(proplet_id)
        if p is None:
            raise NotFound(f"proplet {proplet_id} not found")
        p.task_count = len(self._slots.get(p.id, ()))
        return p

    async def delete_proplet(self, proplet_id: str) -> None:
        p = self.get_proplet(proplet_id)
        if p.task_count:
            raise Conflict(f"proplet {proplet_id} has {p.task_count} active tasks; stop them first")
        del self.proplets[proplet_id]
        self._slots.pop(proplet_id, None)
        self._latent_deployed.pop(proplet_id, None)
        self._alive_saved_at.pop(proplet_id, None)
        self._alive_unsaved.discard(proplet_id)
        self._modules_held.pop(proplet_id, None)
        await self.writer.write(self.store.op_delete_proplet(proplet_id))

    async def proplet_metrics(self, proplet_id: str, offset: int, limit: int) -> Page[PropletMetrics]:
        self.get_proplet(proplet_id)
        await self.writer.barrier()
        return await self.store.list_proplet_metrics(proplet_id, offset, limit)

    def running_tasks(self, proplet_id: str) -> list[str]:
        return sorted(self._slots.get(proplet_id, ()))

    # ------------------------------------------------------------------------------------
    # state machine

    async def _transition(self, task: Task, new: TaskState, detail: str = "", *,
                          durable: bool = False, then: Callable[[], None] | None = None,
                          ) -> asyncio.Future[None] | None:
        """Apply, persist (queued for commit) and announce a state change.

        With `durable` (or `then`, run once the change is committed), returns the commit future
        (callers that answer a client await it, or act once the change is stored); otherwise the
        write is queued without one.
        """
        ops, event = self._change_state(task, new, detail)
        fut = await self.writer.enqueue(*ops, then=then) if durable or then is not None else None
        if fut is None:
            await self.writer.submit(*ops)
        self.events.emit(event)
        if new.is_terminal:
            if task.workflow_id or task.job_id:
                self.groups.finished(task)
            await self._round_task_ended(task)
        return fut

    def _change_state(self, task: Task, new: TaskState, detail: str) -> tuple[tuple[WriteOp, ...], TaskStateChanged]:
        """Apply a state change in memory; return its writes and its event, neither queued nor
        announced yet (_transition does both; a job's start and stop gather many in one commit)."""
        old = task.state
        if new is not old and new not in ALLOWED_TRANSITIONS[old]:
            log.error("refusing transition %s -> %s of task %s (%s)", old.label, new.label, task.id, detail)
            raise Conflict(f"task {task.id} cannot go from {old.label} to {new.label}")
        now = utcnow()
        task.state = new
        task.updated_at = now
        if new.is_terminal:
            self._forget(task)
            self.metrics.tasks_finished.labels(new.label).inc()
        ops = (self.store.op_update_task_state(task),
               self.store.op_task_event(TaskEvent(task.id, new, now, task.attempt, task.proplet_id, detail)))
        return ops, TaskStateChanged(task.id, task.name, old, new, now, task.proplet_id, detail)

    async def _round_task_ended(self, task: Task) -> None:
        if task.state.is_terminal and task.name.startswith(protocol.FL_ROUND_TASK_PREFIX) and "ROUND_ID" in task.env:
            # By its result, or failed when its proplet went offline, or stopped: the round hears of it.
            await self.federated.on_round_task_ended(task)

    def _forget(self, task: Task) -> None:
        """Drop a task from the dispatcher's structures and free its slot."""
        if self.active.pop(task.id, None) is not None:
            self._remember(task)
        self._queued.discard(task.id)
        self._broadcast_waiting.pop(task.id, None)
        self._broadcasts_unheard.discard(task.id)
        self._invoke_turns.pop(task.id, None)
        self._refused_by.pop(task.id, None)
        self._unsupported_by.pop(task.id, None)
        self._sent_at.pop(task.id, None)
        self._waiting_on_proplet.discard(task.id)
        if task.proplet_id:
            slots = self._slots.get(task.proplet_id)
            if slots is not None and task.id in slots:
                self._free_slot(task.proplet_id, task)
                if self._refused_by:
                    self._slot_freed_at[task.proplet_id] = time.monotonic()
                self._wake.set()
        if self._slot_freed_at and not self._refused_by:
            self._slot_freed_at.clear()
        self.metrics.backlog.set(len(self._queued))

    def _push(self, task: Task) -> None:
        self._queued.add(task.id)
        heapq.heappush(self._heap, (-task.priority, next(self._seq), task.id))
        # A stopped or deleted task's entry is dropped only when the dispatcher pops it, and while
        # the fleet is full it stops at the first task nobody can take: entries behind it (started
        # and stopped meanwhile) would pile up without bound.
        if len(self._heap) > 3 * len(self._queued) + HEAP_STALE_SLACK:
            self._compact_heap()
        self.metrics.backlog.set(len(self._queued))

    def _compact_heap(self) -> None:
        """Keep one entry per queued task, its newest (its current queueing's place in line)."""
        newest: dict[str, tuple[int, int, str]] = {}
        for entry in self._heap:
            if entry[2] in self._queued and (entry[2] not in newest or entry[1] > newest[entry[2]][1]):
                newest[entry[2]] = entry
        self._heap[:] = newest.values()
        heapq.heapify(self._heap)

    # ------------------------------------------------------------------------------------
    # dispatch

    def _liveness_timeout(self, p: Proplet) -> float:
        if self.settings.liveness_timeout:
            return self.settings.liveness_timeout
        interval = p.metadata.get("heartbeat_interval")
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
            return 3 * float(interval)
        return self.settings.effective_liveness_timeout

    def _has_slot(self, p: Proplet) -> bool:
        if p.draining:
            return False
        cap = p.max_in_flight
        return cap is None or len(self._slots.get(p.id, ())) - len(self._latent_deployed.get(p.id, ())) < cap

    def _take_slot(self, proplet_id: str, task: Task) -> None:
        """Count the task as held by the proplet. A latent one takes no slot from its capacity: it
        waits for invocations without running (a few deployed functions would otherwise leave the
        proplet no room for tasks), but is still held there (reconciled, failed with the proplet)."""
        self._slots[proplet_id].add(task.id)
        if task.latent:
            self._latent_deployed[proplet_id].add(task.id)

    def _free_slot(self, proplet_id: str, task: Task) -> None:
        """The task is no longer held by the proplet (`_take_slot` undone)."""
        self._slots[proplet_id].discard(task.id)
        if task.latent:
            self._latent_deployed[proplet_id].discard(task.id)

    def _why_waiting(self, task: Task) -> str:
        if self.bus is not None and not self.bus.connected.is_set():
            return f"waiting for the MQTT broker at {self.bus.address.url} to come back"
        online = [p for p in self.proplets.values() if p.online]
        if task.pinned:
            p = self.proplets.get(task.proplet_id)
            if p is None:
                return f"waiting for proplet {task.proplet_id}, which the manager has never seen"
            if not p.online:
                return f"waiting for proplet {task.proplet_id}, which is offline"
            if p.draining:
                return f"waiting for proplet {task.proplet_id}, which is shutting down, to come back"
            if not self._has_slot(p):
                return f"waiting for a free slot on proplet {task.proplet_id}"
            if self._refused_lately(task.id, p.id):
                return (f"proplet {task.proplet_id} is busy (it refused the task); sent again when a slot "
                        f"frees there or in {REFUSAL_BACKOFF:.0f}s")
            return "waiting for the dispatcher"
        if not online:
            return "no live proplet: the task starts when one comes online"
        if task.latent and not any(p.holds_latent for p in online):
            return ("no live proplet can hold a latent task (embedded proplets cannot): it starts when one that "
                    "can comes online")
        if is_http_url(task.image_url) and not any(p.fetches_http for p in online):
            return ("its module is fetched from an HTTP URL, which no live proplet does (embedded proplets take "
                    "modules in chunks over MQTT only): it starts when one that does comes online")
        needs = self._module_needs.get(task.wasm_digest) if task.wasm_digest else None
        if needs is not None and not task.broadcast and not any(p.can_take(needs) for p in online):
            return _why_none_can_take(needs, online)
        unsupported = self._unsupported_by.get(task.id)
        if unsupported and not self._able(task, online):
            return f"no live proplet can run it ({_each_reason(unsupported)}): it starts when one that can comes online"
        if all(p.draining for p in online):
            return f"the {len(online)} live proplets are shutting down: the task starts when one comes online"
        if not task.broadcast and not any(self._has_slot(p) for p in online):
            return f"all {len(online)} live proplets are at capacity"
        if task.id in self._refused_by and all(self._refused_lately(task.id, p.id)
                                               for p in online if self._has_slot(p)):
            return (f"all live proplets busy (they refused the task); sent again when a slot frees or in "
                    f"{REFUSAL_BACKOFF:.0f}s")
        return "waiting for the dispatcher"

    def _refused_lately(self, task_id: str, proplet_id: str) -> bool:
        """Whether the proplet refused the task for being full, and has not had time or a free slot since."""
        refused = self._refused_by.get(task_id)
        if refused is None or proplet_id not in refused:
            return False
        at = refused[proplet_id]
        if time.monotonic() - at >= REFUSAL_BACKOFF or self._slot_freed_at.get(proplet_id, 0.0) > at:
            del refused[proplet_id]
            return False
        return True

    def _candidates(self, task: Task) -> list[Proplet]:
        out = [p for p in self.proplets.values() if p.online and self._has_slot(p)]
        if task.id in self._refused_by:
            out = [p for p in out if not self._refused_lately(task.id, p.id)]
        return self._able(task, out)

    def _able(self, task: Task, proplets: Iterable[Proplet]) -> list[Proplet]:
        """Those of `proplets` that can run the task, as far as the manager knows: by what they
        announced, and by what they answered when it was sent to them."""
        out = list(proplets)
        if task.latent:
            out = [p for p in out if p.holds_latent]
        if is_http_url(task.image_url):
            out = [p for p in out if p.fetches_http]
        needs = self._module_needs.get(task.wasm_digest) if task.wasm_digest else None
        if needs is not None:
            out = [p for p in out if p.can_take(needs)]
        unsupported = self._unsupported_by.get(task.id)
        if unsupported:
            out = [p for p in out if p.id not in unsupported]
        return out

    def _note_module_needs(self, digest: str, module: bytes) -> None:
        self._module_needs.put(digest, module_needs(len(module), module))

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._dispatch_ready()

    async def _dispatch_ready(self) -> None:
        while self._lost_starts:
            task_id, attempt, why = self._lost_starts.pop()
            task = self.active.get(task_id)
            if (task is not None and task.attempt == attempt and not task.state.is_terminal
                    and task.state is not TaskState.PENDING):
                await self._requeue(task, why)
        if self.bus is None or not self.bus.connected.is_set():
            return  # woken again by _broker_connected
        deferred: list[tuple[int, int, str]] = []
        try:
            while self._heap:
                entry = heapq.heappop(self._heap)
                task = self.active.get(entry[2])
                if task is None or entry[2] not in self._queued or task.state is not TaskState.PENDING:
                    continue  # stopped, deleted or already dispatched
                if task.broadcast:
                    live = [p for p in self.proplets.values() if p.online and not p.draining]
                    targets = self._able(task, live)
                    if not targets:
                        deferred.append(entry)
                        await self._set_reason(task)
                        continue
                    # Some live proplets cannot run it (a board, for a component): a start of its
                    # own to each of the others, instead of one that every proplet reads.
                    if not await self._dispatch(task, targets, one_by_one=len(targets) < len(live)):
                        deferred.append(entry)
                        break  # nothing can be read from the database now
                    continue
                if task.pinned:
                    p = self.proplets.get(task.proplet_id)
                    chosen = (p if p is not None and p.online and self._has_slot(p)
                              and not self._refused_lately(task.id, p.id) else None)
                else:
                    chosen = self.scheduler.select(self._candidates(task), {
                        pid: len(s) for pid, s in self._slots.items()})
                if chosen is None:
                    deferred.append(entry)
                    await self._set_reason(task)
                    if not task.pinned and not any(self._has_slot(p) for p in self.proplets.values() if p.online):
                        break  # nothing can take an unpinned task now; leave the rest queued
                    continue
                if not await self._dispatch(task, [chosen]):
                    deferred.append(entry)
                    break  # nothing can be read from the database now
        finally:
            for entry in deferred:
                heapq.heappush(self._heap, entry)
            self.metrics.backlog.set(len(self._queued))

    async def _set_reason(self, task: Task) -> None:
        reason = self._why_waiting(task)
        if reason != task.reason:
            task.reason = reason
            task.updated_at = utcnow()
            await self.writer.submit(self.store.op_update_task_state(task))

    async def _dispatch(self, task: Task, targets: list[Proplet], *, one_by_one: bool = False) -> bool:
        """Send the task to `targets` (a broadcast with `one_by_one`: a start to each, not one to all).
        False: not now, its module cannot be read (the database is unreachable); it stays queued,
        saying so, and the dispatcher looks again a second later."""
        assert self.bus is not None
        module: Artifact | None = None
        if task.wasm_digest and not task.image_url:
            # Read before anything changes: a read that fails leaves the task as it was, queued.
            try:
                module = await self._resolve_blob(blob_ref(task.wasm_digest))
            except ArtifactUnavailable:
                pass  # the task fails below, saying so
            except ModuleUnreadable as exc:
                if not task.reason.startswith(MODULE_UNREADABLE_REASON):
                    log.warning("task %s waits in the queue: %s", task.id, exc)
                task.reason = f"{MODULE_UNREADABLE_REASON} ({exc.__cause__ or exc})"
                task.updated_at = utcnow()
                await self.writer.submit(self.store.op_update_task_state(task))
                asyncio.get_running_loop().call_later(UNSTORED_DISPATCH_RETRY, self._wake.set)
                return False
        self._queued.discard(task.id)
        task.attempt += 1
        task.reason = ""
        now = utcnow()
        if task.broadcast:
            task.proplet_id = ""
            self._broadcast_waiting[task.id] = {p.id for p in targets}
            task.results = {}
            new = TaskState.RUNNING
            detail = f"broadcast to {len(targets)} proplets"
        else:
            p = targets[0]
            task.proplet_id = p.id
            self._take_slot(p.id, task)
            # A proplet that confirms starts is scheduled until it does; an upstream proplet
            # is marked running on publish, as upstream's manager does.
            new = TaskState.SCHEDULED if CAP_TASK_STATE in p.capabilities else TaskState.RUNNING
            detail = f"dispatched to {p.id}"
        if new is TaskState.RUNNING:
            task.start_time = now
        # Acknowledgements to the proplet ride along: if the start is not sent after all, the
        # proplet sends those results again (result_resend) and they are acknowledged again.
        acks = () if task.broadcast else tuple(self._riding_acks.pop(task.proplet_id, ()))
        try:
            if one_by_one:
                payloads = [await self._start_payload(task, module, to=p.id) for p in targets]
            else:
                payloads = [await self._start_payload(task, module, acks)]
        except ArtifactUnavailable as exc:
            task.error = str(exc)
            task.finish_time = now
            await self._transition(task, TaskState.FAILED, f"cannot dispatch: {exc}")
            return True
        attempt = task.attempt

        # The start goes out only once the dispatch is stored (a manager that dies in between would
        # otherwise dispatch the task again on restart, perhaps to another proplet), and at once
        # then: before whoever waits for the same commit (the API answering the start) resumes.
        committed = await self._transition(task, new, detail,
                                           then=lambda: self._publish_start(task, attempt, *payloads))
        assert committed is not None
        committed.add_done_callback(lambda f: self._dispatch_stored(f, task.id, attempt))
        return True

    def _dispatch_stored(self, committed: asyncio.Future[None], task_id: str, attempt: int) -> None:
        if committed.cancelled() or committed.exception() is None:
            return
        # The store refused the dispatch, so its start never left (`then` runs after a commit only):
        # left alone, the task held its slot, scheduled or running, for ever. Back to the queue, after
        # a pause: a store that refuses writes does so for a while, and dispatching again at once
        # would spin on it.
        asyncio.get_running_loop().call_later(
            UNSTORED_DISPATCH_RETRY, self._start_lost, task_id, attempt,
            "the database refused to store its dispatch (see the manager's log)")

    def _start_lost(self, task_id: str, attempt: int, why: str) -> None:
        self._lost_starts.append((task_id, attempt, why))
        self._wake.set()

    def _publish_start(self, task: Task, attempt: int, *payloads: bytes) -> None:
        """Publish the task's start (a broadcast's one by one: one message per proplet)."""
        # Pending again with the same attempt: put back in the queue before its dispatch was
        # committed (its proplet declared offline, a stop then a re-run); the next dispatch sends
        # its own start, and this one would run the task a second time.
        if (self.active.get(task.id) is not task or task.attempt != attempt or task.state.is_terminal
                or task.state is TaskState.PENDING):
            return  # stopped or re-queued meanwhile
        assert self.bus is not None
        for payload in payloads:
            if not self.bus.publish_nowait(self.topics.start, payload):
                self._start_lost(task.id, attempt, "the broker connection dropped before the start went out")
                return
        self._sent_at[task.id] = time.monotonic()
        self.metrics.tasks_dispatched.inc()
        if self.on_start_published is not None:
            self.on_start_published(task.id, time.perf_counter())

    async def _start_payload(self, task: Task, module: Artifact | None = None,
                             result_acks: tuple[tuple[str, int], ...] = (), to: str = "") -> bytes:
        """The task's start message; `module`: its stored module, when the caller has read it;
        `result_acks`: acknowledgements it carries to its proplet; `to`: a broadcast task's start for
        this one proplet only."""
        file = b""
        image_url = task.image_url
        digest = task.wasm_digest
        # A digest on a task with an image_url pins external bytes; otherwise the module is stored here.
        if digest and not image_url:
            if module is None:
                module = await self._resolve_blob(blob_ref(digest))
            size = len(module.data)
            if self.settings.inline_limit and size > self.settings.inline_limit:
                # Too big for one message (upstream breaks at ~760 KB on a 1 MiB broker limit):
                # the proplet fetches it in chunks from the manager's blob server instead.
                image_url = blob_ref(digest)
            elif size >= MODULE_BY_REFERENCE_MIN and digest in self._modules_held.get(to or task.proplet_id, ()):
                # It ran this module before: by reference, which it resolves from its own cache.
                image_url = blob_ref(digest)
            else:
                file = module.data
        traceparent = _traceparent(task.id, task.attempt)
        msg = protocol.StartMessage(
            id=task.id, name=task.name, state=int(TaskState.RUNNING), image_url=image_url, file=file,
            inputs=tuple(task.inputs), cli_args=tuple(task.cli_args or ()), broadcast=task.broadcast and not to,
            daemon=task.daemon, latent=task.latent, encrypted=task.encrypted, env=task.env,
            kbs_resource_path=task.kbs_resource_path, monitoring_profile=task.monitoring_profile,
            proplet_id=to or task.proplet_id, hal_storage_path=task.hal_storage_path or "", mode=task.mode,
            wasm_digest=digest, wasm_signature=self._signature(digest), limits=task.limits,
            attempt=task.attempt, traceparent=traceparent, result_acks=result_acks,
        )
        return protocol.encode_start(msg)

    def _signature(self, digest: str) -> str:
        if self._signer is None or not digest:
            return ""
        signature = self._signatures.get(digest)
        if signature is None:
            from core.signing import sign_digest

            signature = sign_digest(self._signer, digest)
            self._signatures[digest] = signature
            while len(self._signatures) > 4096:
                self._signatures.popitem(last=False)
        return signature

    async def _requeue(self, task: Task, why: str) -> None:
        if task.proplet_id:
            self._free_slot(task.proplet_id, task)
            if not task.pinned:
                task.proplet_id = ""
        self._broadcast_waiting.pop(task.id, None)
        self._broadcasts_unheard.discard(task.id)
        self._sent_at.pop(task.id, None)
        self._waiting_on_proplet.discard(task.id)
        task.start_time = None
        task.reason = why
        self._push(task)
        await self._transition(task, TaskState.PENDING, why)
        self._wake.set()

    def _send_stop(self, task: Task) -> None:
        if self.bus is None:
            return
        msg = protocol.StopMessage(task.id, task.proplet_id, task.broadcast, _traceparent(task.id, task.attempt))
        self.bus.send(self.topics.stop, protocol.encode_stop(msg))

    async def _resolve_blob(self, app_name: str) -> Artifact:
        digest = app_name.removeprefix("blob:")
        cached = self._files.get(digest)
        if cached is not None:
            return cached
        try:
            data = await self.store.file_by_digest(digest)
        except Exception as exc:
            raise ModuleUnreadable(f"its module {digest[:12]} cannot be read from the database now") from exc
        if data is None:
            raise ArtifactUnavailable(f"no task of this manager has a module with digest {digest}")
        artifact = Artifact(data, digest)
        self._files.put(digest, artifact)
        return artifact

    # ------------------------------------------------------------------------------------
    # liveness and maintenance

    async def _liveness_loop(self) -> None:
        while True:
            # A tenth of the shortest timeout in play, so a silent proplet is caught within 10%.
            shortest = min((self._liveness_timeout(p) for p in self.proplets.values() if p.online),
                           default=self.settings.effective_liveness_timeout)
            await asyncio.sleep(min(1.0, shortest / 10))
            if self.bus is not None:
                self.metrics.broker_connected.set(1 if self.bus.connected.is_set() else 0)
            await self._check_liveness()
            await self._save_unsaved_alive()
            await self._republish_unconfirmed()

    async def _check_liveness(self) -> None:
        # Silence counts only while the manager can hear: heartbeats sent while it was down or cut
        # off from the broker never reached it, and are no sign of a dead proplet.
        listening_since = self._listening_since
        if listening_since is None or self.bus is None or not self.bus.connected.is_set():
            return
        now = self._heard_broker_at = utcnow()
        # A proplet reconnecting after the same outage waits out its own backoff first.
        listening_since += timedelta(seconds=self._reconnect_allowance)
        for p in list(self.proplets.values()):
            if not p.online:
                continue
            last = p.last_alive_at
            heard = max(last, listening_since) if last is not None else listening_since
            timeout = self._liveness_timeout(p)
            if (now - heard).total_seconds() > timeout:
                silent = (now - last).total_seconds() if last is not None else timeout
                await self._mark_offline(p, f"no heartbeat for {silent:.0f}s (timeout {timeout:.0f}s)")
        if self._broadcasts_unheard:
            await self._settle_recovered_broadcasts(now, listening_since)

    async def _settle_recovered_broadcasts(self, now: datetime, listening_since: datetime) -> None:
        """Decide whom the broadcasts recovered with nobody online wait for, once every proplet has had
        its liveness timeout to be heard: those online then that have not answered. With none left, the
        broadcast ends like a task whose proplet stayed silent after a restart: finished with the
        answers it has, else retried or failed by its retry policy."""
        grace = max((self._liveness_timeout(p) for p in self.proplets.values()),
                    default=self.settings.effective_liveness_timeout)
        if (now - listening_since).total_seconds() <= grace:
            return
        for task_id in list(self._broadcasts_unheard):
            self._broadcasts_unheard.discard(task_id)
            task = self.active.get(task_id)
            if task is None or task.state is not TaskState.RUNNING:
                continue
            answered = set(task.results) if isinstance(task.results, dict) else set()
            waiting = {p.id for p in self.proplets.values() if p.online and p.id not in answered}
            if waiting:
                self._broadcast_waiting[task_id] = waiting
            elif answered:
                await self._broadcast_finished(task, task.results)
            else:
                await self._retry_or_fail(task, f"no proplet answered it or was heard within {grace:.0f}s of "
                                                "the manager's restart", now)

    async def _save_unsaved_alive(self) -> None:
        """Store the heartbeats `_seen_alive` held back."""
        if not self._alive_unsaved:
            return
        mono = time.monotonic()
        # pop, not iterate then clear: enqueue may wait, and a heartbeat held back meanwhile stays.
        while self._alive_unsaved:
            proplet_id = self._alive_unsaved.pop()
            p = self.proplets.get(proplet_id)
            if p is not None and p.last_alive_at is not None:
                self._alive_saved_at[proplet_id] = mono
                await self.writer.submit(self.store.op_upsert_proplet(p, p.last_alive_at))

    async def _republish_unconfirmed(self) -> None:
        """Send the start again for tasks an acknowledging proplet has not confirmed in time.

        A broker that crashes loses what it had not delivered; the proplet ignores a start it
        already runs or ran (it confirms or re-sends the result), so repeating is safe.
        """
        if self.bus is None or not self.bus.connected.is_set():
            return
        deadline = time.monotonic() - self.settings.ack_timeout
        for task_id, sent in list(self._sent_at.items()):
            task = self.active.get(task_id)
            if (task is None or task.state is not TaskState.SCHEDULED or sent > deadline
                    or task_id in self._waiting_on_proplet):
                continue
            p = self.proplets.get(task.proplet_id)
            if p is None or not p.online:
                continue
            try:
                payload = await self._start_payload(task)
            except (ArtifactUnavailable, ModuleUnreadable):
                continue  # the next round tries again
            if self.bus.publish_nowait(self.topics.start, payload):
                self._sent_at[task_id] = time.monotonic()
                self.metrics.starts_republished.inc()
                log.info("start of task %s not confirmed by %s after %.0fs; sent again", task_id,
                         task.proplet_id, self.settings.ack_timeout)

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.store.housekeeping()
            except Exception:
                log.exception("store housekeeping failed; retrying in a second")

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(60)
            try:
                await self.writer.barrier()
                deleted = await self.store.prune_metrics(self.settings.metrics_retention)
                if deleted:
                    log.debug("pruned %d old metrics samples", deleted)
            except Exception:
                log.exception("pruning metrics failed; retrying in a minute")

    async def _mark_offline(self, p: Proplet, reason: str) -> None:
        p.online = False
        p.offline_reason = reason
        p.draining = False
        now = utcnow()
        await self.writer.submit(self.store.op_upsert_proplet(p, now))
        self.metrics.proplets_online.set(sum(x.online for x in self.proplets.values()))
        self.events.emit(PropletWentOffline(p.id, now, reason))
        log.info("proplet %s is offline: %s", p.id, reason)
        for task_id in list(self._slots.get(p.id, ())):
            task = self.active.get(task_id)
            if task is None:
                continue
            await self._retry_or_fail(task, f"proplet {p.id} went offline while the task ran ({reason})", now)
        for task_id, waiting in list(self._broadcast_waiting.items()):
            if p.id in waiting:
                task = self.active[task_id]
                await self._broadcast_answer(task, p.id, None, f"went offline ({reason})")

    # ------------------------------------------------------------------------------------
    # inbound messages

    async def _on_message(self, topic: str, payload: bytes) -> None:
        suffix = self.topics.suffix(topic)
        handler = self._handlers.get(suffix) if suffix is not None else None
        if handler is None:
            if suffix is None and topic.startswith("fl/rounds/"):
                # Upstream's FL update fallback is published outside the prefix.
                self.metrics.message_in("fl/rounds/updates")
                await self.federated.on_update_message(topic, payload)
            return
        self.metrics.message_in(suffix)
        try:
            await handler(topic, payload)
        except InvalidMessage as exc:
            self._reject(suffix or topic, "malformed", exc.reason)

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        self.metrics.reject(topic, reason, detail)
        self.events.emit(MessageRejected(topic, f"{reason}: {detail}"))

    def _proplet(self, proplet_id: str, namespace: str = "") -> tuple[Proplet, bool]:
        p = self.proplets.get(proplet_id)
        if p is not None:
            return p, False
        p = Proplet(id=proplet_id, name=friendly_name(proplet_id), namespace=namespace)
        self.proplets[proplet_id] = p
        return p, True

    async def _seen_alive(self, p: Proplet, now: datetime) -> None:
        p.alive_history.append(now)
        del p.alive_history[:-self.settings.alive_history_size]
        came_online = not p.online
        p.online = True
        p.offline_reason = ""
        mono = time.monotonic()
        if came_online or mono - self._alive_saved_at.get(p.id, 0.0) >= ALIVE_SAVE_INTERVAL:
            self._alive_saved_at[p.id] = mono
            self._alive_unsaved.discard(p.id)
            await self.writer.submit(self.store.op_upsert_proplet(p, now))
        else:
            self._alive_unsaved.add(p.id)
        self.events.emit(PropletHeartbeat(p.id, now))
        if came_online:
            self.metrics.proplets_online.set(sum(x.online for x in self.proplets.values()))
            self.events.emit(PropletCameOnline(p.id, now))
            log.info("proplet %s is online", p.id)
            self._wake.set()
            if self._broadcast_waiting and p.holds_latent:
                await self._deploy_broadcast_functions(p)

    async def _deploy_broadcast_functions(self, p: Proplet) -> None:
        """Deploy on a proplet that came online (new, or back) the broadcast latent tasks that run:
        such a task is a function of the whole fleet, and one deployed on no proplet but those live
        when it started would leave out every proplet that joins or restarts later."""
        for task_id, holders in list(self._broadcast_waiting.items()):
            task = self.active.get(task_id)
            if task is None or not task.latent or task.state is not TaskState.RUNNING or p.id in holders:
                continue
            holders.add(p.id)
            if isinstance(task.results, dict) and p.id in task.results:
                # Its answer of before (it went offline, say) no longer stands: it is asked again.
                task.results = {k: v for k, v in task.results.items() if k != p.id}
            try:
                payload = await self._start_payload(task, to=p.id)
            except (ArtifactUnavailable, ModuleUnreadable) as exc:
                holders.discard(p.id)
                log.warning("broadcast latent task %s not deployed on %s, which came online: %s", task.id, p.id, exc)
                continue
            attempt = task.attempt

            def publish(task: Task = task, attempt: int = attempt, payload: bytes = payload) -> None:
                if self.active.get(task.id) is task and task.attempt == attempt and task.state is TaskState.RUNNING:
                    assert self.bus is not None
                    self.bus.publish_nowait(self.topics.start, payload)

            await self._transition(task, TaskState.RUNNING, f"deployed on {p.id} too (it came online)", then=publish)

    async def _on_discovery(self, topic: str, payload: bytes) -> None:
        msg = protocol.decode_discovery(payload, topic)
        p, _ = self._proplet(msg.proplet_id, msg.namespace)
        # Metadata is refreshed on every discovery (upstream freezes the first one, defect 10).
        p.metadata = msg.metadata
        p.namespace = msg.namespace or p.namespace
        await self._seen_alive(p, utcnow())

    async def _on_alive(self, topic: str, payload: bytes) -> None:
        msg = protocol.decode_alive(payload, topic)
        if msg.offline:
            p = self.proplets.get(msg.proplet_id)
            # Upstream marks a proplet alive on its own Last Will (defect 8); an unknown id with
            # "offline" is an upstream manager's or proxy's will, not a proplet (defect 9).
            if p is not None and p.online:
                await self._mark_offline(p, "it announced it is offline (clean shutdown, or its Last Will "
                                            "when its connection dropped)")
            return
        p, _ = self._proplet(msg.proplet_id, msg.namespace)
        if msg.draining != p.draining:
            p.draining = msg.draining
            if p.draining:
                log.info("proplet %s is shutting down: it finishes the tasks it runs and is sent no new one", p.id)
            else:
                self._wake.set()
        await self._seen_alive(p, utcnow())
        if CAP_TASK_STATE in p.capabilities:
            await self._reconcile(p, frozenset(msg.running))

    async def _reconcile(self, p: Proplet, held: frozenset[str]) -> None:
        """Tasks we think run on `p` that its heartbeat no longer lists were lost (the proplet
        restarted, or the start never arrived and the ack timeout has not caught it yet)."""
        # Only starts sent well before this heartbeat count: it may have left before they arrived.
        grace = max(3.0, 2 * self.settings.ack_timeout)
        cutoff = time.monotonic() - grace
        for task_id in list(self._slots.get(p.id, ())):
            task = self.active.get(task_id)
            sent = self._sent_at.get(task_id)
            if task is None or task_id in held or sent is None or sent > cutoff:
                continue
            # An unconfirmed scheduled start is sent again instead (_republish_unconfirmed); one
            # the proplet confirmed as waiting there is as lost as a running one.
            if task.state is not TaskState.RUNNING and task_id not in self._waiting_on_proplet:
                continue
            await self._retry_or_fail(task, f"proplet {p.id} no longer has the task (it may have restarted)",
                                      utcnow())

    async def _retry_or_fail(self, task: Task, why: str, now: datetime) -> None:
        """A running task was lost with its proplet: another attempt by its retry policy, else failed."""
        if task.retries < task.max_retries:
            task.retries += 1
            self.metrics.tasks_retried.inc()
            await self._requeue(task, f"retry {task.retries} of {task.max_retries}: {why}")
        else:
            task.error = why
            task.finish_time = now
            await self._transition(task, TaskState.FAILED, why)

    async def _task_for_message(self, topic: str, task_id: str, proplet_id: str,
                                attempt: int | None = None) -> Task | None:
        """The active task a proplet message refers to, or None after rejecting/acking it."""
        task = self.active.get(task_id)
        if task is not None:
            return task
        if self._unstored_results and topic == topic_names.RESULTS:
            unstored = self._unstored_results.pop(task_id)
            if unstored is not None:
                await self._store_result_again(unstored, proplet_id)
                return None
        stored = self._recent.get(task_id) or await self.reader.get(task_id)
        if stored is None:
            self._reject(topic, "unknown_task", f"no task {task_id} (from proplet {proplet_id or '?'})")
            if topic == topic_names.RESULTS:
                # Final too (the task was deleted, typically while it ran): unacknowledged, the
                # result would stay in the sender's outbox and be sent again for ever.
                self._ack_result(proplet_id, task_id, attempt or 0)
        elif stored.state.is_terminal:
            self.metrics.duplicate_results.inc()
            log.debug("ignoring a message for finished task %s from %s", task_id, proplet_id)
            if topic == topic_names.RESULTS:
                await self._ack_once_earlier_writes_done(proplet_id, task_id,
                                                         attempt if attempt is not None else stored.attempt)
        else:
            self._reject(topic, "not_started", f"task {task_id} was never started")
        return None

    async def _on_result(self, topic: str, payload: bytes) -> None:
        with self.critical_work:
            await self._take_result(topic, payload)

    async def _take_result(self, topic: str, payload: bytes) -> None:
        msg = protocol.decode_result(payload, topic)
        task = await self._task_for_message(topic_names.RESULTS, msg.task_id, msg.proplet_id, msg.attempt)
        if task is None:
            return
        if len(payload) > self.settings.max_result_bytes:
            # Stored and served whole, one such result (Mosquitto passes up to 256 MB) would take the
            # manager's memory and disk with it; the task fails saying why instead.
            error = (f"the result sent by {msg.proplet_id or 'the proplet'} was {size_text(len(payload))}, over the "
                     f"manager's limit of {size_text(self.settings.max_result_bytes)} (MANAGER_MAX_RESULT_BYTES); "
                     "it was dropped")
            self._reject(topic_names.RESULTS, "result_too_large", f"task {task.id}: {error}")
            msg = dataclasses.replace(msg, results=None, error=error)
        if task.broadcast:
            # The same checks as for one proplet's task below: an answer to an earlier run (an
            # outbox repeats it until acknowledged) must not count for this run, nor finish a
            # broadcast that waits to be dispatched.
            if task.state is TaskState.PENDING or (msg.attempt and msg.attempt != task.attempt):
                self._reject(topic_names.RESULTS, "stale_attempt",
                             f"answer of attempt {msg.attempt or '?'} for broadcast task {task.id}, now on "
                             f"attempt {task.attempt} ({task.state.label})")
                self._ack_result(msg.proplet_id, task.id, msg.attempt)
                return
            key = msg.proplet_id or f"proplet-{len(task.results or {}) + 1}"
            committed = await self._broadcast_answer(task, key, msg.results, msg.error)
            if msg.proplet_id:
                # Acknowledged once stored, as one proplet's result is: left for the end of the
                # broadcast, each answer came again every few seconds from its outbox until the
                # slowest proplet had answered.
                self._ack_once_stored(committed, msg.proplet_id, task)
            return
        # Refused results are still acknowledged: the decision is final, and the sender's outbox
        # must not send them forever.
        if task.state is TaskState.PENDING:
            self._reject(topic_names.RESULTS, "not_dispatched",
                         f"result for task {task.id}, which is waiting to be dispatched again")
            self._ack_result(msg.proplet_id, task.id, msg.attempt)
            return
        if msg.proplet_id and task.proplet_id and msg.proplet_id != task.proplet_id:
            self._reject(topic_names.RESULTS, "wrong_proplet",
                         f"result for task {task.id} from {msg.proplet_id}, but it runs on {task.proplet_id}")
            self._ack_result(msg.proplet_id, task.id, msg.attempt)
            return
        if msg.attempt and msg.attempt != task.attempt:
            self._reject(topic_names.RESULTS, "stale_attempt",
                         f"result of attempt {msg.attempt} for task {task.id}, now on attempt {task.attempt}")
            self._ack_result(msg.proplet_id, task.id, msg.attempt)
            return
        now = utcnow()
        if task.state is TaskState.SCHEDULED:
            # A task that finished before its proplet confirmed it (fast tasks are not confirmed
            # separately): record the run with the start time the proplet reports.
            task.start_time = protocol.parse_timestamp(msg.started_at) or now
            await self._transition(task, TaskState.RUNNING,
                                   f"running on {task.proplet_id or msg.proplet_id} (reported with its result)")
        task.results = msg.results
        task.error = msg.error
        task.finish_time = now
        if task.start_time is None:
            task.start_time = now
        new = TaskState.FAILED if msg.error else TaskState.COMPLETED
        detail = f"{'failed' if msg.error else 'completed'} on {task.proplet_id or msg.proplet_id or '?'}"
        sender = self.proplets.get(msg.proplet_id) if msg.proplet_id else None
        capabilities = sender.capabilities if sender is not None else frozenset()
        acks = CAP_RESULT_ACK in capabilities
        if (new is TaskState.COMPLETED and task.wasm_digest and not task.image_url
                and CAP_MODULE_CACHE in capabilities):
            self._note_module_held(msg.proplet_id, task.wasm_digest)
        committed = await self._transition(task, new, detail, durable=acks)
        if committed is not None:
            self._ack_once_stored(committed, msg.proplet_id, task, keep_if_refused=True)

    async def _store_result_again(self, task: Task, proplet_id: str) -> None:
        """Write a finished task whose first write the store refused; acknowledge once stored."""
        committed = await self.writer.enqueue(
            self.store.op_update_task_state(task),
            self.store.op_task_event(TaskEvent(task.id, task.state, utcnow(), task.attempt, task.proplet_id,
                                               f"{task.state.label}: stored when {proplet_id} sent the result again")))
        self._ack_once_stored(committed, proplet_id, task, keep_if_refused=True)

    def _ack_once_stored(self, committed: asyncio.Future[None], proplet_id: str, task: Task, *,
                         keep_if_refused: bool = False) -> None:
        """Acknowledge the task's result to its proplet once `committed` has stored it. With
        `keep_if_refused`, a result the store refused waits in `_unstored_results` for the proplet's
        repeat (unless the task runs again meanwhile): unacknowledged, it is sent again."""
        attempt = task.attempt

        def done(f: asyncio.Future[None]) -> None:
            if f.cancelled():
                return
            if f.exception() is None:
                self._ack_result(proplet_id, task.id, attempt)
            elif keep_if_refused and task.id not in self.active:
                self._unstored_results.put(task.id, task)

        committed.add_done_callback(done)

    async def _ack_once_earlier_writes_done(self, proplet_id: str, task_id: str, attempt: int) -> None:
        """Acknowledge a repeated result once the writes queued before it are done. The first copy's
        write may still wait for an unreachable database: acknowledged now, the result left the
        proplet's outbox, and were that write given up, nothing would ever store it."""
        earlier = await self.writer.enqueue()

        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None and task_id not in self._unstored_results:
                self._ack_result(proplet_id, task_id, attempt)

        earlier.add_done_callback(done)

    def _note_module_held(self, proplet_id: str, digest: str) -> None:
        held = self._modules_held.setdefault(proplet_id, OrderedDict())
        held[digest] = None
        held.move_to_end(digest)
        while len(held) > MODULES_HELD_MAX:
            held.popitem(last=False)

    def _ack_result(self, proplet_id: str, task_id: str, attempt: int) -> None:
        p = self.proplets.get(proplet_id)
        if p is None or CAP_RESULT_ACK not in p.capabilities or self.bus is None:
            return
        if CAP_RESULT_ACK_IN_START in p.capabilities:
            if not self._riding_acks:
                asyncio.get_running_loop().call_later(ACK_RIDE_S, self._flush_riding_acks)
            self._riding_acks.setdefault(proplet_id, []).append((task_id, attempt))
            return
        # Acks stored by the same commit leave together, one message per proplet.
        if not self._pending_acks:
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._pending_acks.setdefault(proplet_id, []).append((task_id, attempt))

    def _flush_acks(self) -> None:
        pending, self._pending_acks = self._pending_acks, {}
        self._send_acks(pending)

    def _flush_riding_acks(self) -> None:
        """The acknowledgements no start took along in ACK_RIDE_S."""
        pending, self._riding_acks = self._riding_acks, {}
        self._send_acks(pending)

    def _send_acks(self, pending: dict[str, list[tuple[str, int]]]) -> None:
        if self.bus is None:
            return
        for proplet_id, acks in pending.items():
            for i in range(0, len(acks), 500):
                (task_id, attempt), *more = acks[i:i + 500]
                # QoS 0: a lost ack only means the proplet sends the result again, and is acked again.
                self.bus.send(self.topics.result_ack, protocol.encode_result_ack(
                    protocol.ResultAckMessage(task_id, proplet_id, attempt, tuple(more))), qos=0)

    async def _broadcast_answer(self, task: Task, proplet_id: str, results: Any, error: str) -> asyncio.Future[None]:
        """Record one proplet's answer; returns the commit that stores it."""
        answers = dict(task.results) if isinstance(task.results, dict) else {}
        if proplet_id in answers:
            self.metrics.duplicate_results.inc()
            # Its outbox sent it again: written again (in case the first write failed) so that
            # the acknowledgement follows a commit that holds it.
            return await self.writer.enqueue(self.store.op_update_task_state(task))
        answers[proplet_id] = {"results": results, "error": error or None}
        task.results = answers
        if task.id in self._broadcasts_unheard:
            return await self._durably(task, task.state, f"answer from {proplet_id} (whom else it waits for is "
                                                           "known once the proplets are heard after the restart)")
        waiting = self._broadcast_waiting.get(task.id, set())
        waiting.discard(proplet_id)
        if waiting and task.latent:
            # Its holders never answer while it is deployed: an answer is one fewer holder.
            why = error or "it answered"
            return await self._durably(task, task.state, f"{proplet_id} no longer holds it ({why}); "
                                                         f"{len(waiting)} still do")
        if waiting:
            return await self._durably(task, task.state, f"answer from {proplet_id} ({len(waiting)} to go)")
        return await self._broadcast_finished(task, answers)

    async def _broadcast_finished(self, task: Task, answers: dict[str, Any]) -> asyncio.Future[None]:
        failures = {pid: a["error"] for pid, a in answers.items() if a.get("error")}
        task.finish_time = utcnow()
        if failures:
            task.error = "; ".join(f"{pid}: {err}" for pid, err in sorted(failures.items()))
            return await self._durably(task, TaskState.FAILED, f"{len(failures)} of {len(answers)} proplets failed")
        return await self._durably(task, TaskState.COMPLETED, f"all {len(answers)} proplets answered")

    async def _durably(self, task: Task, new: TaskState, detail: str) -> asyncio.Future[None]:
        """`_transition` with its commit future (for acting once the change is stored)."""
        committed = await self._transition(task, new, detail, durable=True)
        assert committed is not None
        return committed

    async def _on_task_state(self, topic: str, payload: bytes) -> None:
        msg = protocol.decode_task_state(payload, topic)
        task = self.active.get(msg.task_id)
        if task is None or task.broadcast:
            return
        if msg.proplet_id != task.proplet_id or (msg.attempt and msg.attempt != task.attempt):
            self._reject(topic_names.TASK_STATE, "wrong_proplet",
                         f"state of task {task.id} from {msg.proplet_id}, but it runs on {task.proplet_id}")
            return
        if task.state is TaskState.PENDING:
            # Back in the queue (its proplet was declared offline) with the attempt unchanged: a late
            # report of that attempt changes nothing; marked running here it would sit outside every
            # slot, found by no retry or reconciliation.
            self._reject(topic_names.TASK_STATE, "not_dispatched",
                         f"state of task {task.id} from {msg.proplet_id}, which is waiting to be dispatched again")
            return
        if msg.state == protocol.TASK_STATE_RUNNING:
            detail = f"running on {msg.proplet_id}" + (f": {msg.reason}" if msg.reason else "")
            if task.daemon and msg.reason:
                # A served daemon reports where it serves (e.g. its port) while it runs.
                task.results = msg.reason
            if task.state is TaskState.SCHEDULED:
                task.start_time = utcnow()
                await self._transition(task, TaskState.RUNNING, detail)
            elif msg.reason:
                await self._transition(task, TaskState.RUNNING, detail)
        elif msg.state == protocol.TASK_STATE_QUEUED:
            if (task.state is TaskState.SCHEDULED and task.id in self._sent_at
                    and task.id not in self._waiting_on_proplet):
                # The proplet holds the start until a slot frees: confirmed, so not sent again; it
                # stays scheduled until the proplet says it runs (or its result does).
                self._waiting_on_proplet.add(task.id)
                await self._transition(task, TaskState.SCHEDULED, f"waiting on {msg.proplet_id}"
                                       + (f": {msg.reason}" if msg.reason else " for a free slot"))
        elif msg.state == protocol.TASK_STATE_RETURNED:
            p = self.proplets.get(msg.proplet_id)
            if p is not None and p.online:
                # Its draining heartbeat was missed (this manager started since): without this, the
                # task would go straight back to it, and back again, until its next heartbeat.
                p.draining = True
            if task.state in (TaskState.SCHEDULED, TaskState.RUNNING):
                # Not a retry (nothing went wrong with the task) and not a refusal (no back-off):
                # the proplet shut down, and the task runs again from the start.
                await self._requeue(task, f"given back by proplet {msg.proplet_id}, which is shutting down"
                                    + (f" ({msg.reason})" if msg.reason else "") + "; queued again")
        elif msg.state == protocol.TASK_STATE_UNSUPPORTED:
            if task.state in (TaskState.SCHEDULED, TaskState.RUNNING):
                await self._unsupported_on(task, msg.proplet_id, msg.reason or "no reason given")
        elif task.state in (TaskState.SCHEDULED, TaskState.RUNNING):
            # A refusal says the proplet is full (REFUSAL_BACKOFF), which passes: the task waits in
            # the queue, offered to others now and to this one again once a slot frees there or the
            # back-off ends (failed for it, a task would be lost to a busy moment of the fleet).
            # Refusals that cannot pass come as a failed result instead.
            self._refused_by[task.id][msg.proplet_id] = time.monotonic()
            # (a little after the back-off: timers may fire up to the clock's resolution early)
            asyncio.get_running_loop().call_later(REFUSAL_BACKOFF + 0.1, self._wake.set)
            await self._requeue(task, f"proplet {msg.proplet_id} refused it: {msg.reason or 'no reason given'}")

    async def _unsupported_on(self, task: Task, proplet_id: str, why: str) -> None:
        """The proplet cannot run the task (task_state `unsupported`): another live proplet that
        may gets it; pinned there, or with none left to try, it fails with every proplet's reason."""
        self.metrics.tasks_unsupported.inc()
        unsupported = self._unsupported_by.setdefault(task.id, {})
        unsupported[proplet_id] = why
        others = [] if task.pinned else self._able(task, (p for p in self.proplets.values() if p.online))
        if others:
            await self._requeue(task, f"proplet {proplet_id} cannot run it ({why}); queued for another proplet")
            return
        if task.pinned:
            error = f"proplet {proplet_id}, which the task is pinned to, cannot run it: {why}"
        elif len(unsupported) == 1:
            error = f"proplet {proplet_id} cannot run it, and no other live proplet can: {why}"
        else:
            error = "no live proplet can run it: " + _each_reason(unsupported)
        task.error = error
        task.finish_time = utcnow()
        await self._transition(task, TaskState.FAILED, error)

    async def _on_invoke_result(self, topic: str, payload: bytes) -> None:
        msg = protocol.decode_invoke_result(payload, topic)
        fut = self._invocations.get(msg.invocation_id)
        if fut is None:
            self._reject(topic_names.INVOKE_RESULTS, "unknown_invocation",
                         f"nobody waits for invocation {msg.invocation_id}")
        elif not fut.done():
            fut.set_result(msg)

    async def _on_proplet_metrics(self, topic: str, payload: bytes) -> None:
        msg = protocol.decode_proplet_metrics(payload, topic)
        if msg.proplet_id not in self.proplets:
            self._reject(topic_names.METRICS, "unknown_proplet", f"metrics from unknown proplet {msg.proplet_id}")
            return
        # Upstream proplets send uptime or serde timestamps; fall back to the receive time.
        ts = protocol.parse_timestamp(msg.timestamp) or utcnow()
        metrics = PropletMetrics(msg.proplet_id, msg.namespace, ts, msg.cpu_metrics, msg.memory_metrics)
        await self.writer.submit(self.store.op_proplet_metrics(metrics))
        self.events.emit(PropletMetricsReceived(metrics))

    async def _on_task_metrics(self, topic: str, payload: bytes) -> None:
        msg = protocol.decode_task_metrics(payload, topic)
        ts = protocol.parse_timestamp(msg.timestamp) or utcnow()
        await self.writer.submit(self.store.op_task_metrics(
            TaskMetrics(msg.task_id, msg.proplet_id, ts, msg.metrics, msg.aggregated)))

    async def _on_registry_request(self, topic: str, payload: bytes) -> None:
        request = protocol.decode_registry_request(payload, topic)
        # Each server takes the requests that are its own: blob refs the manager's, OCI references
        # the hosted proxy's.
        if self.chunks is not None:
            self.chunks.submit(request)
        if self.oci_chunks is not None:
            if self.oci_chunks.submit(request):
                self.oci_artifacts.counters.requests += 1

    def _host_oci_proxy(self) -> ChunkServer:
        """The OCI proxy's chunk server, on the manager's bus (which subscribes to the registry
        requests already) with the proxy's PROXY_* settings; MQTT settings of the proxy's own are
        not read (it has no connection of its own)."""
        from core.entrypoint import settings_error_text
        from proplet.proxy import OciArtifacts, ProxySettings

        assert self.bus is not None
        try:
            settings = ProxySettings()
        except ValueError as exc:  # pydantic's ValidationError
            raise InvalidRequest(f"MANAGER_OCI_PROXY: the proxy's settings are invalid: "
                                 f"{settings_error_text(exc, ProxySettings)}") from None
        self.oci_artifacts = OciArtifacts(settings)
        log.info("hosting the OCI proxy (registry %s, chunks of %d bytes)", settings.registry_url or "named by "
                 "each reference", settings.chunk_size)
        return self.oci_artifacts.chunk_server(self.bus, self.topics)


def _held_bytes(task: Task) -> int:
    """About what a kept task holds beyond its fixed fields (`file` is dropped once cached)."""
    return (payload_bytes(task.results) + len(task.error) + sum(map(len, task.inputs))
            + (payload_bytes(task.metadata) if task.metadata else 0) + len(task.file))


def _activity(active_task: Task) -> str:
    """What a queued or running task is doing, as a refusal to start it (or what it depends on) says."""
    return "queued" if active_task.state is TaskState.PENDING else active_task.state.label


def _downstream_of(task_id: str, group: Sequence[Task]) -> set[str]:
    """The ids of the tasks of `group` that depend on `task_id`, directly or not."""
    downstream: set[str] = set()
    frontier = {task_id}
    while frontier:
        frontier = {t.id for t in group if frontier & set(t.depends_on)} - downstream
        downstream |= frontier
    return downstream


def _traceparent(task_id: str, attempt: int) -> str:
    """A W3C traceparent whose trace id is derived from the task, so every hop of it correlates."""
    trace = hashlib.sha256(task_id.encode()).hexdigest()[:32]
    span = hashlib.sha256(f"{task_id}/{attempt}".encode()).hexdigest()[:16]
    return f"00-{trace}-{span}-01"


def _each_reason(by_proplet: dict[str, str]) -> str:
    """`a: why; b: why`, each reason without its closing full stop (it reads as one sentence)."""
    return "; ".join(f"{p}: {why.rstrip('.')}" for p, why in by_proplet.items())


def _why_none_can_take(needs: ModuleNeeds, online: list[Proplet]) -> str:
    if needs.component and not any(p.runs_components for p in online):
        return ("its module is a component, and no live proplet runs components (embedded proplets run core "
                "modules only): it starts when one that does comes online")
    if needs.wasi and not any(p.provides_wasi for p in online):
        return ("its module imports WASI, and no live proplet provides it (embedded proplets do not): it "
                "starts when one that does comes online")
    return (f"its module ({size_text(needs.size)}) is larger than every live proplet that could run it takes "
            "(max_module_bytes in their metadata): it starts when one that takes it comes online")


_ADJECTIVES = (
    "amber", "brave", "calm", "deft", "eager", "fair", "gentle", "hardy", "keen", "lively", "merry",
    "nimble", "plucky", "quick", "rapid", "steady", "swift", "tidy", "vivid", "witty",
)
_NOUNS = (
    "otter", "falcon", "lynx", "heron", "badger", "marten", "osprey", "wren", "ibex", "puffin",
    "gecko", "bison", "crane", "dingo", "egret", "ferret", "gannet", "hare", "jackal", "koala",
)


def friendly_name(proplet_id: str) -> str:
    """A stable, readable name for a proplet id (upstream generates one at random)."""
    h = int.from_bytes(hashlib.sha256(proplet_id.encode()).digest()[:4], "big")
    return f"{_ADJECTIVES[h % len(_ADJECTIVES)]}-{_NOUNS[(h // 7) % len(_NOUNS)]}"


__all__ = ["CoreStatus", "ManagerCore", "friendly_name"]
