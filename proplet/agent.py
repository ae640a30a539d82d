"""The proplet: joins the fleet over MQTT, fetches modules, runs them, reports back.

`PropletAgent` is an async context manager like the manager core: entering it connects (with a Last
Will that marks it offline at once if the connection dies) and announces the proplet; leaving it
stops running tasks, says goodbye with `status: offline` and disconnects.

Message handling never waits for guest code: each start gets its own task (owned by the agent),
fetching happens on the event loop, compiling and running on the runtime's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import platform
import socket
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import orjson

from core import __version__, protocol
from core import topics as t
from core.bounded import BoundedLru, payload_bytes
from core.instance import HeldElsewhere, hold_lock_file
from core.lifecycle import cancel_and_wait
from core.mqtt import BrokerUnavailable, MqttBus, parse_broker_url
from core.protocol import InvalidMessage, ResultMessage, StartMessage
from core.signing import SignatureError
from core.topics import Topics
from proplet.config import PropletSettings, total_memory
from proplet.federated import FederatedClient, FederatedError, is_round_task
from proplet.outbox import Outbox
from proplet.process import cgroup_memory, rss_bytes
from proplet.runtime import Invocation, ModuleError, Runtime, RuntimeConfig, runtime_from_config
from proplet.runtime.api import mib, split_dirs
from proplet.sources import (
    ChunkSource,
    FetchError,
    HttpSource,
    InlineSource,
    ModuleFetcher,
    ModuleTooLarge,
    WasmRef,
)

if TYPE_CHECKING:
    from proplet.telemetry import MetricsServer

log = logging.getLogger(__name__)

# module_cache: modules are kept by digest, so a start may name one it ran before by reference.
# result_ack_in_start: a start may carry acknowledgements of earlier results (`result_acks`).
CAPABILITIES = ["task_state", "result_ack", "result_ack_in_start", "chunk_resume", "wasm_digest", "limits",
                "module_cache", "latent"]
# A task still running after this long is confirmed with task_state; a faster one is confirmed by
# its result (which carries its start time), saving a message and a state change per task.
CONFIRM_AFTER_S = 0.05
# Requests to announce again (`discover`) closer together than this get one answer.
DISCOVER_ANSWER_MIN_S = 1.0
# Results remembered for repeated starts (see PropletAgent._finished): at most this many, weighing
# at most this much together, which an edge box can spare.
FINISHED_RESULTS = 2_000
FINISHED_RESULTS_MAX_BYTES = 16 * 1024 * 1024


class _Refused(Exception):
    """The proplet will not run this task; the message says why and what to do."""


@dataclass(slots=True)
class PropletCounters:
    started: int = 0
    completed: int = 0
    failed: int = 0
    duplicate_starts: int = 0
    rejected_messages: int = 0
    stopped: int = 0
    # Unfinished tasks handed back to the manager as the proplet shut down.
    given_back: int = 0
    # Invocations answered "busy" (more in flight than the slots and the queue).
    calls_refused: int = 0
    # Starts answered with task_state `unsupported` (this proplet cannot run them; another may).
    unsupported: int = 0


@dataclass(slots=True)
class _Running:
    start: StartMessage
    job: asyncio.Task[None]
    started_at: float = field(default_factory=time.monotonic)
    stop_requested: bool = False
    # False while the start waits for its module or a free slot (the manager sends up to
    # max_queued_tasks more than the slots); waiting_for_slot says which.
    executing: bool = False
    waiting_for_slot: bool = False
    # Interrupted by the proplet's shutdown: given back to the manager instead of a result; why.
    given_back: str = ""
    confirm: asyncio.TimerHandle | None = None
    # Sends its task_metrics while it runs (started once it has run for a moment; see _confirm).
    monitor: asyncio.Task[None] | None = None


class ProcessConflict(OSError):
    """Another process on this machine already is the proplet this one would be."""


def hold_proplet_id(directory: Path, proplet_id: str) -> int:
    """Lock `<state dir>/<id>/lock` for this process (the descriptor to close when done), or refuse:
    two proplets with one id (two started with the generated id of one machine, say) take the broker
    session from each other many times a second and share one result outbox."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return hold_lock_file(directory / "lock")
    except HeldElsewhere as held:
        raise ProcessConflict(
            f"Another proplet runs as {proplet_id} on this machine: {held.holder}. Two proplets with one id "
            "take the broker session from each other. Stop it, or give this one an id of its own: "
            "PROPLET_ENTITY_ID=<id> (or --id <id>).") from None


class PropletAgent:
    def __init__(self, settings: PropletSettings | None = None, *, runtime: Runtime | None = None) -> None:
        self.settings = settings or PropletSettings.load()
        self.id = self.settings.entity_id
        self.topics = Topics(self.settings.tenant_id, self.settings.channel_id)
        self.runtime = runtime or runtime_from_config(
            self.settings.external_wasm_runtime or None,
            RuntimeConfig(
                max_concurrent=self.settings.max_concurrent_tasks,
                default_timeout_s=self.settings.task_timeout,
                default_memory_bytes=self.settings.task_memory_limit,
                cache_dir=self.settings.cache_dir,
                memory_cache_bytes=self.settings.compiled_cache_max_bytes,
                disk_cache_bytes=self.settings.disk_cache_bytes,
                http_first_port=self.settings.http_proxy_port,
            ),
        )
        self.counters = PropletCounters()
        self.running: dict[str, _Running] = {}
        # Modules running at once; starts beyond it wait here (fetched already) for a free slot.
        self._slots = asyncio.Semaphore(self.settings.max_concurrent_tasks)
        # Results of recent tasks by (id, attempt): a repeated start gets the result again instead
        # of a second run. Bounded by count and bytes (a result may hold 1 MiB of output): oldest dropped.
        self._finished: BoundedLru[tuple[str, int], ResultMessage] = BoundedLru(
            FINISHED_RESULTS, FINISHED_RESULTS_MAX_BYTES, _result_bytes)
        self._announced_at = -math.inf  # last discovery sent: on a connect, or for results left unconfirmed
        self._discover_answered_at = -math.inf  # last discovery sent at a manager's request
        from core.signing import load_public_keys

        # A key that cannot be read stops the proplet at start (SignatureError says which file).
        self._trusted_keys = load_public_keys(self.settings.trusted_keys)
        self._id_lock = hold_proplet_id(self.settings.state_dir / self.id, self.id)
        try:
            self.outbox = Outbox(self.settings.state_dir / self.id / "outbox", max_entries=self.settings.outbox_max,
                                 max_bytes=self.settings.outbox_max_bytes, resend_after=self.settings.result_resend,
                                 fsync=self.settings.outbox_fsync)
        except BaseException:
            os.close(self._id_lock)
            raise
        # Deployed latent tasks waiting for invocations: task id -> (the module's digest, the call,
        # and the start, to fetch the module again if the cache removed it meanwhile).
        self._latent: dict[str, tuple[str, Invocation, StartMessage]] = {}
        # Why the latest deployments that failed did (a call of one says so, not "not precompiled").
        self._undeployed: BoundedLru[str, str] = BoundedLru(256, 256 * 4096, len)
        # Invocations running or waiting for the runtime: bounded like starts (slots and queue), so a
        # flood of calls is answered "busy" instead of piling up in memory.
        self.calls_in_flight = 0
        self._loops: list[asyncio.Task[Any]] = []
        self._closed = asyncio.Event()
        # Shutting down (request_shutdown): running tasks finish, new ones are given back.
        self.draining = False
        self._grace_over = False
        self.bus: MqttBus | None = None
        self.http: HttpSource | None = None
        self.chunks: ChunkSource | None = None
        self.fetcher: ModuleFetcher | None = None
        self.federated: FederatedClient | None = None
        self.metrics_server: MetricsServer | None = None
        self._cpu_sample: tuple[float, float] | None = None

    # ------------------------------------------------------------------------------------
    # lifecycle

    async def __aenter__(self) -> PropletAgent:
        s = self.settings
        # clean_session off: the broker keeps our subscriptions and queues starts while we reconnect.
        conn = s.mqtt_connection(parse_broker_url(s.mqtt_address or "mqtt://localhost:1883"), self.id,
                                 s.api_key, clean_session=False)
        will = aiomqtt.Will(self.topics.alive, self._alive_payload(protocol.OFFLINE_STATUS), qos=1)
        self.bus = MqttBus(conn, subscriptions=self.topics.proplet_subscriptions(), on_message=self._on_message,
                           will=will, on_connected=self._announce, name=f"proplet {self.id}")
        self.http = HttpSource(max_bytes=s.wasm_fetch_max_bytes, ca_file=s.http_tls_ca_cert,
                               insecure_skip_verify=s.http_tls_insecure_skip_verify)
        self.chunks = ChunkSource(self._publish_now, self.topics.registry_request, proplet_id=self.id,
                                  stall_timeout=s.chunk_stall_timeout, max_bytes=s.wasm_fetch_max_bytes,
                                  binary=True)
        self.fetcher = ModuleFetcher([InlineSource(), self.http, self.chunks])
        self.federated = FederatedClient(self.id, self._publish_fl_update, self.http)
        self._spawn(self.bus.run(), "mqtt")
        self._spawn(self._heartbeats(), "heartbeats")
        self._spawn(self._resend_results(), "outbox")
        if s.metrics_interval > 0:
            self._spawn(self._metrics(), "metrics")
        if s.metrics_enabled:
            # Imported only then: prometheus_client is ~1.5 MB of an idle proplet's memory.
            from proplet.telemetry import start_metrics_server

            self.metrics_server = start_metrics_server(self)
        log.info("proplet %s: runtime %s, broker %s, domain %s, channel %s", self.id, self.runtime.name,
                 conn.address.url, s.tenant_id, s.channel_id)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Whatever still runs is given back (a task stopped by request meanwhile ends as such).
        for running in list(self.running.values()):
            self._give_back_running(running, f"still running at the end of the {self.settings.shutdown_grace:g} s "
                                    "shutdown grace" if self._grace_over else "still running when the proplet stopped")
        if self.running:
            await asyncio.wait([r.job for r in self.running.values()], timeout=10)
        for task_id in list(self._latent):
            self._give_back(self._latent.pop(task_id)[2], "deployed as latent here")
        if self.federated is not None:
            # While the bus is up: an update that falls back to MQTT must still reach the broker.
            await self.federated.flush()
        if self.bus is not None and self.bus.connected.is_set():
            # A clean exit says goodbye; the Last Will covers crashes only.
            with contextlib.suppress(BrokerUnavailable, aiomqtt.MqttError):
                await self.bus.publish(self.topics.alive, self._alive_payload(protocol.OFFLINE_STATUS), timeout=2)
        if self.bus is not None:
            await self.bus.close()
        await cancel_and_wait(self._loops, owner=f"proplet {self.id}")
        if self.http is not None:
            await self.http.aclose()
        if self.federated is not None:
            await self.federated.aclose()
        await self.runtime.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)
        self.outbox.close()
        os.close(self._id_lock)  # the next proplet with this id may start
        self._closed.set()

    def request_shutdown(self) -> None:
        """SIGTERM or SIGINT. The first drains: the tasks running get `shutdown_grace` seconds to
        finish, and the rest are given back. A second (or a grace of 0) stops at once."""
        if self.draining or self.settings.shutdown_grace <= 0:
            self._closed.set()
            return
        self.draining = True
        self._spawn(self._drain(self.settings.shutdown_grace), "drain")

    async def _drain(self, grace: float) -> None:
        assert self.bus is not None
        # Heard before the tasks given back below (same connection, in order): the manager then
        # dispatches them elsewhere, not here. QoS 1: a lost one would send tasks back here.
        self.bus.send(self.topics.alive, self._alive_payload(protocol.ALIVE_STATUS), qos=1)
        for running in list(self.running.values()):
            # Not started yet (fetching, or waiting for a slot): another proplet can start it now.
            # A daemon serves until stopped: it would only hold the shutdown for the whole grace.
            if not running.executing:
                self._give_back_running(running, "not started yet")
            elif running.start.daemon:
                self._give_back_running(running, "a daemon: it serves until stopped")
        jobs = [r.job for r in self.running.values() if not r.given_back]
        log.info("shutting down: %d running tasks get up to %g s to finish (a second signal stops at once); "
                 "no new task is taken", len(jobs), grace)
        if jobs:
            _, still_running = await asyncio.wait(jobs, timeout=grace)
            self._grace_over = bool(still_running)
        self._closed.set()

    def _give_back_running(self, running: _Running, why: str) -> None:
        if running.stop_requested or running.given_back:
            running.job.cancel()
            return
        running.given_back = why
        self.runtime.stop(running.start.id)
        running.job.cancel()

    def _give_back(self, start: StartMessage, why: str) -> None:
        """Hand an unfinished task back to the manager as this proplet shuts down."""
        assert self.bus is not None
        self.counters.given_back += 1
        log.info("giving task %s back to the manager: %s", start.id, why)
        if start.attempt:
            # Our manager (it numbers attempts) queues it again at once. QoS 1: it must arrive
            # before the goodbye, which would otherwise fail the task as lost with this proplet.
            msg = protocol.TaskStateMessage(start.id, self.id, protocol.TASK_STATE_RETURNED, start.attempt, why,
                                            start.traceparent)
            self.bus.send(self.topics.task_state, protocol.encode_task_state(msg), qos=1)
            return
        # Upstream's manager cannot take a task back: it fails, saying why, rather than showing it
        # running for ever.
        result = ResultMessage(start.id, self.id, "", f"proplet {self.id} shut down before the task finished "
                               f"({why}); start it again", start.attempt, start.traceparent, _now_text())
        self.outbox.put(result)
        self._publish_result(result)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._loop_ended)
        self._loops.append(task)

    def _loop_ended(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("proplet loop %s failed; stopping", task.get_name(), exc_info=task.exception())
            self._closed.set()

    # ------------------------------------------------------------------------------------
    # announcing

    def metadata(self) -> dict[str, Any]:
        s = self.settings
        meta: dict[str, Any] = {
            "proplet_version": __version__,
            "wasm_runtime": self.runtime.name,
            "environment": "docker" if os.path.exists("/.dockerenv") else "binary",
            "capabilities": CAPABILITIES,
            "heartbeat_interval": s.liveliness_interval,
            "max_concurrent_tasks": s.max_concurrent_tasks,
            "max_queued_tasks": s.queued_tasks,
            # The largest module it fetches: the manager sends it no task whose module is larger.
            "max_module_bytes": s.wasm_fetch_max_bytes,
        }
        if s.description:
            meta["description"] = s.description
        if s.tags:
            meta["tags"] = s.tags
        if s.location:
            meta["location"] = s.location
        if s.collect_system_info:
            meta.update({
                "os": platform.system().lower(),
                "hostname": socket.gethostname(),
                "cpu_arch": platform.machine(),
                "total_memory_bytes": total_memory(),
            })
            ip = _local_ip()
            if ip:
                meta["ip"] = ip
        if self.metrics_server is not None:
            meta["metrics_port"] = self.metrics_server.port  # where /metrics and /health answer
        return meta

    def _alive_payload(self, status: str) -> bytes:
        alive = status == protocol.ALIVE_STATUS
        return protocol.encode_alive(protocol.AliveMessage(
            self.id, status, self.settings.manager_k8s_namespace, self.held_tasks() if alive else (),
            draining=alive and self.draining))

    @property
    def latent_deployed(self) -> int:
        """Latent tasks deployed here, waiting for invocations."""
        return len(self._latent)

    def held_tasks(self) -> tuple[str, ...]:
        """Tasks this proplet still answers for: running, deployed as latent, or finished with the
        result unconfirmed. The manager compares it with what it thinks runs here (reconciliation)."""
        return tuple(dict.fromkeys((*self.running, *self._latent, *self.outbox.task_ids())))

    def _discovery_payload(self) -> bytes:
        return protocol.encode_discovery(
            protocol.DiscoveryMessage(self.id, self.settings.manager_k8s_namespace, self.metadata()))

    async def _announce(self) -> None:
        """On every (re)connect: discovery, then a heartbeat right away."""
        assert self.bus is not None
        self._announced_at = time.monotonic()  # a connect's discovery counts, as on the firmware
        await self.bus.publish(self.topics.create, self._discovery_payload())
        await self.bus.publish(self.topics.alive, self._alive_payload(protocol.ALIVE_STATUS))
        # A broker that crashed may have lost results published before: send the unconfirmed again.
        for result in self.outbox.due(reconnected=True):
            self._publish_result(result)

    def _on_discover(self) -> None:
        """A manager that started after this proplet announced asks for the discovery again. Answered
        even right after a connect's own discovery: that one may be what the manager missed."""
        assert self.bus is not None
        now = time.monotonic()
        if now - self._discover_answered_at < DISCOVER_ANSWER_MIN_S:
            return  # one answer per burst of requests (managers of the fleet starting together)
        self._discover_answered_at = self._announced_at = now
        self.bus.send(self.topics.create, self._discovery_payload())

    async def _resend_results(self) -> None:
        assert self.bus is not None
        while True:
            await asyncio.sleep(min(1.0, self.settings.result_resend))
            if self.bus.connected.is_set():
                due = list(self.outbox.due())
                now = time.monotonic()
                if due and now - self._announced_at >= self.settings.result_resend:
                    # A manager that confirmed results before and now lets them wait may know this
                    # proplet only from its heartbeats (it was deleted while online, or the manager
                    # started on a new database): without the discovery's capabilities it never
                    # confirms, and the outbox fills. Announcing again costs one message.
                    self._announced_at = now
                    self.bus.send(self.topics.create, self._discovery_payload())
                for result in due:
                    self._publish_result(result)

    async def _heartbeats(self) -> None:
        assert self.bus is not None
        while True:
            await asyncio.sleep(self.settings.liveliness_interval)
            if self.bus.connected.is_set():
                # QoS 0: a heartbeat is worth nothing late, and the next one follows.
                self.bus.send(self.topics.alive, self._alive_payload(protocol.ALIVE_STATUS), qos=0)

    # ------------------------------------------------------------------------------------
    # inbound

    async def _on_message(self, topic: str, payload: bytes) -> None:
        suffix = self.topics.suffix(topic)
        if suffix in (t.REGISTRY_CHUNK, t.REGISTRY_CHUNK_BINARY):
            assert self.chunks is not None
            self.chunks.on_payload(payload, topic)
            return
        try:
            if suffix == t.START:
                self._on_start(payload, topic)
            elif suffix == t.STOP:
                self._on_stop(protocol.decode_stop(payload, topic))
            elif suffix == t.INVOKE:
                self._on_invoke(protocol.decode_invoke(payload, topic))
            elif suffix == t.DISCOVER:
                self._on_discover()
            elif suffix == t.RESULT_ACK:
                ack = protocol.decode_result_ack(payload, topic)
                if ack.proplet_id == self.id:
                    for task_id, attempt in ack.acks():
                        self.outbox.ack(task_id, attempt)
        except InvalidMessage as exc:
            self.counters.rejected_messages += 1
            log.warning("rejected a message on %s: %s", suffix, exc.reason)

    def _on_start(self, payload: bytes, topic: str) -> None:
        try:
            start = protocol.decode_start_for(self.id, payload, topic)
        except InvalidMessage as exc:
            # Upstream only logs this and the manager waits forever (defect 45): answer when the
            # start names us, so the task fails with the reason.
            self._refuse_invalid_start(payload, exc.reason)
            raise
        if start is None or not start.targets(self.id):
            return
        if start.attempt:
            self.outbox.manager_acknowledges()  # only this project's manager numbers attempts
        for task_id, attempt in start.result_acks:
            self.outbox.ack(task_id, attempt)
        if start.id in self.running:
            # The manager did not see our confirmation (a broker crash loses it): confirm again.
            self.counters.duplicate_starts += 1
            log.info("task %s is already running; confirming it again instead of a second run", start.id)
            self._confirm(start.id)
            return
        previous = self.outbox.get(start.id, start.attempt) or self._finished.get((start.id, start.attempt))
        if previous is not None:
            self.counters.duplicate_starts += 1
            log.info("task %s already ran; sending its result again instead of running it twice", start.id)
            self._publish_result(previous)
            return
        if self.draining:
            self._give_back(start, "it takes no new task while it shuts down")
            return
        if self.outbox.full:
            log.warning("refusing task %s: %d results wait for the manager's confirmation", start.id,
                        len(self.outbox))
            self._send_state(start, protocol.TASK_STATE_REJECTED,
                             f"proplet {self.id} holds {len(self.outbox)} unconfirmed results; its outbox is full")
            return
        job = asyncio.ensure_future(self._run(start))
        job.set_name(f"task {start.id}")
        self.running[start.id] = _Running(start, job)
        job.add_done_callback(lambda _j, tid=start.id: self.running.pop(tid, None))

    def _unsupported(self, start: StartMessage, why: str) -> None:
        assert self.bus is not None
        self.counters.unsupported += 1
        log.info("task %s cannot run here; the manager is told so: %s", start.id, why)
        msg = protocol.TaskStateMessage(start.id, self.id, protocol.TASK_STATE_UNSUPPORTED, start.attempt, why,
                                        start.traceparent)
        # QoS 1, as `returned`: lost, the task would wait for the start's confirmation timeout.
        self.bus.send(self.topics.task_state, protocol.encode_task_state(msg), qos=1)

    def _refuse_invalid_start(self, payload: bytes, reason: str) -> None:
        try:
            raw = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw.get("proplet_id") == self.id:
            self._publish_result(ResultMessage(raw["id"], self.id, "", f"the start message is invalid: {reason}"))

    def _on_stop(self, stop: protocol.StopMessage) -> None:
        # Upstream proplets try every stop on the channel (defect 40); only ours matter.
        if not stop.targets(self.id):
            return
        self._latent.pop(stop.id, None)
        running = self.running.get(stop.id)
        if running is None:
            return
        running.stop_requested = True
        self.counters.stopped += 1
        if not self.runtime.stop(stop.id):
            # Still fetching or compiling: nothing runs yet, cancel the job itself.
            running.job.cancel()

    def _on_invoke(self, invoke: protocol.InvokeMessage) -> None:
        if not invoke.targets(self.id):
            return
        most = self.settings.max_concurrent_tasks + self.settings.queued_tasks
        if self.calls_in_flight >= most:
            self.counters.calls_refused += 1
            self._answer_invocation(invoke, "", f"proplet {self.id} is busy: {self.calls_in_flight} calls of latent "
                                                f"tasks run or wait already (at most {most}); call again later")
            return
        self.calls_in_flight += 1
        job = asyncio.ensure_future(self._invoke(invoke))
        job.set_name(f"invoke {invoke.id}")
        self._loops.append(job)
        job.add_done_callback(self._loops.remove)

    # ------------------------------------------------------------------------------------
    # running tasks

    def _invocation(self, start: StartMessage) -> Invocation:
        if start.encrypted:
            # Its bytes would be fetched and fail as "not valid WebAssembly", which hides why.
            raise _Refused(
                f"task {start.id} is encrypted: it needs a TEE runtime, which proplet {self.id} does not have "
                "(upstream's proplet runs encrypted tasks inside a TEE). Run it on such a proplet, or start it "
                "unencrypted.")
        asked = start.limits.memory_bytes
        if asked is not None and asked > self.settings.task_memory_max:
            # A task's own limit is otherwise taken as it comes: one asking for more than the box
            # has would be stopped by the kernel's OOM killer, with the proplet, not by its limit.
            raise _Refused(
                f"task {start.id} asks for {mib(asked)} MiB of memory (limits.memory_bytes); proplet {self.id} "
                f"allows at most {mib(self.settings.task_memory_max)} MiB per task (PROPLET_TASK_MEMORY_MAX)")
        env = dict(start.env)
        env.setdefault("PROPLET_ID", self.id)
        return Invocation(task_id=start.id, function=start.name, inputs=start.inputs, env=env,
                          args=start.cli_args, limits=start.limits, dirs=self._granted_dirs(start),
                          network=self._network_granted(start))

    def _network_granted(self, start: StartMessage) -> bool:
        """Outgoing network needs both the task (`-S http` / `-S inherit-network` in cli_args, the
        wasmtime CLI's own flags; `allow-ip-name-lookup` too, since DNS queries leave the host) and
        the proplet (PROPLET_ALLOW_NETWORK)."""
        asked = any(_option_on(option, ("http", "inherit-network", "allow-ip-name-lookup"))
                    for option in _wasi_options(start.cli_args))
        if asked and not self.settings.allow_network:
            raise _Refused(
                f"task {start.id} asks for network access (`-S http`), which proplet {self.id} does not "
                "allow. Run it on a proplet started with PROPLET_ALLOW_NETWORK=true.")
        return asked

    def _granted_dirs(self, start: StartMessage) -> tuple[str, ...]:
        """Directories the task asks for (`--dir X` in cli_args), each of which the proplet must allow
        (PROPLET_DIRS): a task asking for another one is refused, naming it.

        A guest sees no host directory unless both the task and the proplet's configuration say so.
        """
        asked, _ = split_dirs(start.cli_args)
        allowed = [os.path.realpath(d) for d in self.settings.dirs]
        granted = []
        for d in asked:
            real = os.path.realpath(d)
            if not any(real == a or real.startswith(a + os.sep) for a in allowed):
                # Refused, as network access is: run without it, the guest failed with only
                # "Capabilities insufficient", the reason left in this proplet's log.
                shared = ", ".join(self.settings.dirs) or "none"
                raise _Refused(
                    f"task {start.id} asks for directory {d} (`--dir` in cli_args), which proplet {self.id} does "
                    f"not share (PROPLET_DIRS: {shared}). Run it on a proplet whose PROPLET_DIRS holds that "
                    "directory, or add it there.")
            granted.append(real)
        return tuple(granted)

    async def _module(self, start: StartMessage) -> str:
        """Make sure the runtime has the task's module; return its digest."""
        if start.wasm_digest and self.runtime.has_module(start.wasm_digest):
            return start.wasm_digest
        assert self.fetcher is not None
        data, digest = await self.fetcher.fetch(WasmRef(start.id, start.image_url, start.file, start.wasm_digest))
        if not self.runtime.has_module(digest):
            await self.runtime.load(digest, data)
        return digest

    async def _run(self, start: StartMessage) -> None:
        self.counters.started += 1
        # One line per execution: the fault tests count them to prove nothing runs twice.
        log.info("running task %s (attempt %d)", start.id, start.attempt)
        started_at = _now_text()
        this = self.running[start.id]  # registered by _on_start before this coroutine first runs
        this.confirm = asyncio.get_running_loop().call_later(CONFIRM_AFTER_S, self._confirm, start.id)
        results: Any = ""
        error = ""
        cannot_run_here = False
        try:
            if self._trusted_keys:
                from core.signing import verify_digest

                # Before any byte is fetched: an unsigned module never reaches the runtime.
                verify_digest(self._trusted_keys, start.wasm_digest, start.wasm_signature)
            invocation = self._invocation(start)
            if self.federated is not None and self.federated.applies(invocation.env):
                # The model and dataset of an FL task, fetched into its env.
                invocation = replace(invocation, env=await self.federated.prepare(start.id, invocation.env))
            digest = await self._module(start)
            if start.latent:
                # Deployed, not run: invocations call it (upstream publishes nothing here either).
                self._latent[start.id] = (digest, invocation, start)
                self._undeployed.pop(start.id)
                log.info("task %s deployed as latent", start.id)
                this.confirm.cancel()
                self._send_state(start, protocol.TASK_STATE_RUNNING)
                return
            served = None
            if start.daemon and self.runtime.supports_http and self.settings.http_enabled:
                self._executing(this)
                served = await self._serve(start, digest, invocation)
            if served is not None:
                results, error = served
            else:
                this.waiting_for_slot = True
                async with self._slots:
                    if not self.runtime.has_module(digest):
                        # Removed from the cache (its bound) while the task waited for a slot.
                        digest = await self._module(start)
                    started_at = _now_text()
                    self._executing(this)
                    outcome = await self.runtime.run(digest, invocation)
                results, error = outcome.results, outcome.error
                # A daemon wasi:http component on a proplet that does not serve HTTP: one that does may.
                cannot_run_here = outcome.elsewhere and start.daemon
                if outcome.ok and is_round_task(invocation.env):
                    assert self.federated is not None
                    results = self.federated.report(start.id, invocation.env, outcome.stdout)
        except (_Refused, ModuleTooLarge) as exc:
            # What this proplet is or allows, not the task: another proplet may run it.
            error = str(exc)
            cannot_run_here = True
        except (FetchError, ModuleError, SignatureError, FederatedError) as exc:
            error = str(exc)
        except asyncio.CancelledError:
            error = "stopped by request"
        except Exception as exc:
            log.exception("task %s failed inside the proplet", start.id)
            error = f"the proplet failed running the task ({type(exc).__name__}: {exc}); see its log"
        if this.monitor is not None:
            this.monitor.cancel()
        if this.given_back:
            self._give_back(start, this.given_back)
            return
        if this.stop_requested and error:
            error = "stopped by request"
        elif cannot_run_here and start.attempt and not start.broadcast:
            # Our manager (it numbers attempts) sends it to another proplet, or fails it if it is
            # pinned here or none is left. Upstream's reads no task_state: it gets the failed result.
            # A broadcast's answer is this proplet's, failed.
            this.confirm.cancel()
            self._unsupported(start, error)
            return
        if error:
            self.counters.failed += 1
            if start.latent:
                self._undeployed.put(start.id, error[:4096])
        else:
            self.counters.completed += 1
        this.confirm.cancel()
        result = ResultMessage(start.id, self.id, results, error, start.attempt, start.traceparent, started_at)
        self._finished.put((start.id, start.attempt), result)
        # Stored before it is sent: it survives our crash and a broker's until the manager confirms.
        self.outbox.put(result)
        self._publish_result(result)

    async def _serve(self, start: StartMessage, digest: str, invocation: Invocation) -> tuple[str, str] | None:
        """Serve a wasi:http component until it exits or is stopped; None if it is not one."""
        from proplet.runtime import ServeError

        try:
            server = await self.runtime.serve_http(digest, invocation, None)
        except ServeError as exc:
            if "Only a wasi:http/proxy component" in str(exc):
                return None
            return "", str(exc)
        # Upstream reports "started at port N" as the result at once and the manager then shows
        # the daemon as completed while it runs; here the port goes with the running state.
        self._send_state(start, protocol.TASK_STATE_RUNNING, f"serving HTTP on port {server.port}")
        try:
            code = await server.wait()
        except asyncio.CancelledError:
            await server.stop()
            return f"served on port {server.port}", "stopped by request"
        running = self.running.get(start.id)
        if running is not None and running.stop_requested:
            return f"served on port {server.port}", "stopped by request"
        if code == 0:
            return f"served on port {server.port}", ""
        return "", f"wasmtime serve exited with code {code}: {server.stderr_tail}"

    async def _invoke(self, invoke: protocol.InvokeMessage) -> None:
        try:
            results, error = await self._call(invoke)
        finally:
            self.calls_in_flight -= 1
        self._answer_invocation(invoke, results, error)

    async def _call(self, invoke: protocol.InvokeMessage) -> tuple[str, str]:
        deployed = self._latent.get(invoke.id)
        deploying = self.running.get(invoke.id) if deployed is None else None
        if deploying is not None and deploying.start.latent:
            # Called while its module is still fetched or compiled (upstream's manager takes a latent
            # task for running once its start is published): the call waits for the deployment.
            await asyncio.wait([deploying.job])
            deployed = self._latent.get(invoke.id)
        if deployed is None:
            why = self._undeployed.get(invoke.id)
            if why is not None:
                return "", f"task {invoke.id} could not be deployed here: {why}"
            return "", protocol.NOT_DEPLOYED.format(id=invoke.id)
        digest, base, start = deployed
        env = {**base.env, **invoke.env}
        inv = Invocation(task_id=f"{invoke.id}-inv-{invoke.invocation_id}", function=base.function,
                         inputs=invoke.inputs or base.inputs, env=env, args=base.args, limits=base.limits,
                         dirs=base.dirs)
        try:
            if not self.runtime.has_module(digest):
                # Removed from the cache since it was deployed: fetched again, as for a start.
                digest = await self._module(start)
            outcome = await self.runtime.run(digest, inv)
        except (FetchError, ModuleError) as exc:
            return "", str(exc)
        return outcome.results, outcome.error

    def _answer_invocation(self, invoke: protocol.InvokeMessage, results: str, error: str) -> None:
        msg = protocol.InvokeResultMessage(invoke.id, invoke.invocation_id, self.id, results, error,
                                           invoke.traceparent)
        assert self.bus is not None
        self.bus.send(self.topics.invoke_results, protocol.encode_invoke_result(msg))

    def _confirm(self, task_id: str) -> None:
        """Tell the manager we hold the task: running, or waiting for a free slot."""
        running = self.running.get(task_id)
        if running is None or running.job.done():
            return
        if running.executing:
            self._send_state(running.start, protocol.TASK_STATE_RUNNING)
            if self.settings.enable_monitoring and running.monitor is None:
                running.monitor = asyncio.ensure_future(self._monitor(running))
        elif running.waiting_for_slot:
            slots = self.settings.max_concurrent_tasks
            self._send_state(running.start, protocol.TASK_STATE_QUEUED,
                             f"all {slots} slots are busy" if slots > 1 else "its one slot is busy")
        else:
            self._send_state(running.start, protocol.TASK_STATE_QUEUED, "getting its module (fetch and compile)")

    async def _monitor(self, running: _Running) -> None:
        """The task's metrics while it runs: first when it has run FIRST_SAMPLE_S, then every interval."""
        from proplet.monitoring import FIRST_SAMPLE_S, TaskMonitor, profile_for

        start = running.start
        profile = profile_for(start.monitoring_profile, start.daemon)
        if not profile.enabled:
            return
        monitor = TaskMonitor(start.id, self.id, profile, lambda: self.runtime.usage(start.id),
                              total_memory(), start.traceparent)
        await asyncio.sleep(max(0.0, FIRST_SAMPLE_S - CONFIRM_AFTER_S))  # _confirm came CONFIRM_AFTER_S in
        assert self.bus is not None
        try:
            while (message := monitor.sample()) is not None:
                if profile.export_to_mqtt and self.bus.connected.is_set():
                    # QoS 0, as the proplet's own metrics: the next sample supersedes a lost one.
                    self.bus.send(self.topics.task_metrics, protocol.encode_task_metrics(message), qos=0)
                await asyncio.sleep(profile.interval_s)
        except Exception:  # the task runs on; only its metrics stop
            log.exception("task %s: its metrics could not be taken; no more are sent for it", start.id)

    def _executing(self, running: _Running) -> None:
        """The task got its slot. One reported as waiting is confirmed as running once it has run
        for a moment (a faster one by its result, which carries the time it started)."""
        running.executing = True
        loop = asyncio.get_running_loop()
        pending = running.confirm
        if pending is not None and not pending.cancelled() and pending.when() > loop.time():
            return  # the first confirmation is still to come, and will say running
        running.confirm = loop.call_later(CONFIRM_AFTER_S, self._confirm, running.start.id)

    def _send_state(self, start: StartMessage, state: str, reason: str = "") -> None:
        assert self.bus is not None
        msg = protocol.TaskStateMessage(start.id, self.id, state, start.attempt, reason, start.traceparent)
        # QoS 0: a lost confirmation only means the manager sends the start again and we confirm again.
        self.bus.send(self.topics.task_state, protocol.encode_task_state(msg), qos=0)

    def _publish_result(self, result: ResultMessage) -> None:
        assert self.bus is not None
        # paho keeps it until the broker acknowledges it; the outbox until the manager does.
        self.bus.send(self.topics.results, protocol.encode_result(result))

    def _publish_fl_update(self, topic: str, payload: bytes) -> None:
        assert self.bus is not None
        # At least once (QoS 1) whatever the proplet's QoS, as upstream's embedded proplet sends it:
        # the update is the round's work, and the envelope in the result does not replace it.
        self.bus.send(topic, payload, qos=1)

    async def _publish_now(self, topic: str, payload: bytes) -> None:
        assert self.bus is not None
        await self.bus.publish(topic, payload)

    # ------------------------------------------------------------------------------------
    # metrics

    async def _metrics(self) -> None:
        assert self.bus is not None
        while True:
            await asyncio.sleep(self.settings.metrics_interval)
            if not self.bus.connected.is_set():
                continue
            payload = protocol.encode_proplet_metrics(protocol.PropletMetricsMessage(
                self.id, self.settings.manager_k8s_namespace, datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                self._cpu_metrics(), _memory_metrics()))
            self.bus.send(self.topics.metrics, payload, qos=0)

    def _cpu_metrics(self) -> dict[str, float]:
        times = os.times()
        cpu = times.user + times.system
        now = time.monotonic()
        percent = 0.0
        if self._cpu_sample is not None:
            cpu0, t0 = self._cpu_sample
            if now > t0:
                percent = 100.0 * (cpu - cpu0) / (now - t0)  # 100 = one core, as upstream
        self._cpu_sample = (cpu, now)
        return {"user_seconds": times.user, "system_seconds": times.system, "percent": round(percent, 2)}


def _result_bytes(result: ResultMessage) -> int:
    return payload_bytes(result.results) + len(result.error)


def _wasi_options(args: tuple[str, ...]) -> list[str]:
    """The WASI options in a task's cli_args, one per item: the CLI takes `-S X`, `-SX`, `--wasi X`
    and `--wasi=X`, each X a comma-separated list (`-S cli,http=y`). Every spelling counts: the
    external runtime passes the arguments to the CLI as they are."""
    values: list[str] = []
    for i, arg in enumerate(args):
        if arg in ("-S", "--wasi"):
            if i + 1 < len(args):
                values.append(args[i + 1])
        elif arg.startswith("--wasi="):
            values.append(arg[len("--wasi="):])
        elif arg.startswith("-S"):
            values.append(arg[2:])
    return [option.strip() for value in values for option in value.split(",")]


def _option_on(option: str, names: tuple[str, ...]) -> bool:
    """Whether `option` (`name` or `name=value`) turns one of `names` on."""
    name, _, value = option.partition("=")
    return name in names and value.lower() not in ("n", "no", "false", "off")


def _memory_metrics() -> dict[str, int]:
    return {"rss_bytes": rss_bytes(), "heap_alloc_bytes": 0, "heap_sys_bytes": 0, "heap_inuse_bytes": 0,
            **cgroup_memory()}


def _local_ip() -> str:
    """The address this host uses towards the outside (a UDP 'connect' sends no packet)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("8.8.8.8", 80))
            return str(s.getsockname()[0])
    except OSError:
        return ""


def _now_text() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
