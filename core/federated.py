"""Federated learning: rounds of training tasks on chosen proplets, their updates averaged into the
next model.

Upstream's manager (reference §6.9) only relays: it POSTs an experiment to an external coordinator
(`MANAGER_COORDINATOR_URL`), starts one task per online participant and forwards `/fl/task`,
`/fl/update` and round status to that coordinator. With `MANAGER_COORDINATOR_URL` set this manager
does the same (`RemoteCoordinator`). Without it, the manager is the coordinator (upstream has a
FedAvg in `pkg/fl` but never wires it): a round takes its participants' updates from every path a
proplet may use -- `POST /fl/update`, CBOR, the unprefixed fallback topic
`fl/rounds/<round>/updates/<proplet>` and the FL envelope in the round task's result -- counting the
first per participant, and once `k_of_n` have arrived it averages them (weighted by `num_samples`)
into model version N+1, served at `/fl/models/<N>` and named `global_model_v<N>` for the next
round. A round whose time runs out aggregates what it has, or fails with nothing. Rounds, updates
and models are stored, so a restart loses none of them.

Upstream defects fixed: FL validation errors are a 400, not a 500; a round announced twice on
`fl/rounds/start` (upstream subscribes to it twice) starts its tasks once.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import pybase64
from pydantic import ValidationError

from core.domain import FLRound, FLUpdateRecord, RoundState, Task, TaskState, utcnow
from core.errors import Conflict, CoreError, InvalidRequest, NotFound, Unavailable, UpstreamFailed
from core.protocol import FL_ROUND_TASK_PREFIX, FL_UPDATE_IN_RESULT, model_version
from core.schemas import ExperimentConfig, FLUpdate, TaskCreate, format_validation_error
from core.store.base import WriteOp
from core.topics import FL_ROUND_NEXT, FL_ROUND_START, fl_update_parts

if TYPE_CHECKING:
    from core.service import ManagerCore

log = logging.getLogger(__name__)

# A model this small goes to the round's tasks inline (env MODEL_DATA), so a proplet that cannot reach
# the manager's REST API still trains on it.
MAX_INLINE_MODEL_BYTES = 64 * 1024
# Updates taken from MQTT wait here for the round loop. Policy: block (the MQTT intake waits).
_INTAKE_MAX = 1024
# Remote mode: round ids already started, so a repeated announcement starts nothing. Oldest dropped.
_KNOWN_ROUNDS_MAX = 10_000
# The longest the round loop sleeps without looking at the deadlines again.
_MAX_SLEEP_S = 60.0
# After a failure of the round loop (the store, say), it goes on this much later.
_RETRY_S = 5.0
# Model versions are stored as 32-bit integers.
MAX_MODEL_VERSION = 2**31 - 1


class AggregationError(ValueError):
    """Updates whose weights cannot be averaged together (different shapes, not numbers)."""


def model_uri(version: int) -> str:
    return f"global_model_v{version}"


def federated_average(updates: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """FedAvg: each weight averaged over the updates that have it, weighted by their sample counts.

    A weight is a number or a (nested) list of numbers; every update that has a weight must give it
    the same shape. An update with 0 samples counts as 1 (it was still trained)."""
    if not updates:
        raise AggregationError("no updates to average")
    names: dict[str, None] = {}
    for _, update in updates:
        names.update(dict.fromkeys(update))
    model: dict[str, Any] = {}
    for name in names:
        having = [(max(n, 1), u[name]) for n, u in updates if name in u]
        total = sum(n for n, _ in having)
        try:
            model[name] = _weighted(having, total)
        except AggregationError as exc:
            raise AggregationError(f"weight {name!r}: {exc}") from None
    return model


def _weighted(values: list[tuple[int, Any]], total: int) -> Any:
    first = values[0][1]
    if isinstance(first, bool) or not isinstance(first, (int, float, list)):
        raise AggregationError(f"{type(first).__name__} is not a number or a list of numbers")
    if isinstance(first, list):
        if any(not isinstance(v, list) or len(v) != len(first) for _, v in values):
            raise AggregationError("the updates give it different shapes")
        return [_weighted([(n, v[i]) for n, v in values], total) for i in range(len(first))]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for _, v in values):
        raise AggregationError("the updates give it different shapes")
    # Each value times its share (at most 1): a sum of n * v divided afterwards overflows to
    # infinity for large finite weights (1.5e308 and 1.7e308), which the model stores as null.
    return sum(n / total * v for n, v in values)


@dataclass(frozen=True, slots=True)
class _Intake:
    """Work for the round loop: an update, a round task that ended, or only a wake-up."""

    round_id: str
    update: FLUpdate | None = None
    source: str = ""
    # The participant whose round task ended (with `update`, or without one).
    ended_proplet: str = ""
    # Why that task brought no update (failed, or printed something else), for the round's reason.
    why_none: str = ""


@dataclass(slots=True)
class _Running:
    """A round that runs (built-in mode), with what it heard so far."""

    round: FLRound
    # By participant; the first update of each counts.
    updates: dict[str, FLUpdateRecord] = field(default_factory=dict)
    # Participants whose round task ended (completed or failed): once all started ones have, a round
    # that still lacks updates need not wait for its deadline.
    ended: set[str] = field(default_factory=set)
    # Why a participant's ended task brought no update: said in the reason of a round left without any.
    lacks: dict[str, str] = field(default_factory=dict)

    def answer(self, counted: bool) -> dict[str, Any]:
        """What POST /fl/update answers."""
        return {"status": "accepted", "round_id": self.round.round_id, "counted": counted,
                "num_updates": len(self.updates), "k_of_n": self.round.k_of_n}


@dataclass(slots=True)
class FLCounters:
    rounds_started: int = 0
    rounds_completed: int = 0
    rounds_failed: int = 0
    updates_accepted: int = 0
    # The same participant's update again (by another path, or resent): ignored.
    updates_repeated: int = 0
    # Unknown round, a round that ended, not a participant, or malformed.
    updates_refused: int = 0
    loop_errors: int = 0


class RemoteCoordinator:
    """Upstream's mode: an external coordinator keeps the rounds; the manager relays to it."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        # Upstream's client timeout; slower coordinators get a 504-like error, not a hang.
        self._client = httpx.AsyncClient(timeout=30.0)

    async def call(self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None) -> Any:
        import httpx

        try:
            response = await self._client.request(method, self.url + path, json=json, params=params)
        except httpx.HTTPError as exc:
            raise Unavailable(f"the FL coordinator at {self.url} cannot be reached ({type(exc).__name__}: {exc}); "
                              "check MANAGER_COORDINATOR_URL") from None
        if response.status_code >= 400:
            raise UpstreamFailed(f"the FL coordinator answered {response.status_code} to {method} {path}: "
                                 f"{response.text[:300]}")
        if not response.content:
            return {}
        try:
            return response.json()
        except ValueError:
            raise UpstreamFailed(f"the FL coordinator's answer to {method} {path} is not JSON") from None

    async def close(self) -> None:
        await self._client.aclose()


class FederatedLearning:
    """The manager's FL rounds: the coordinator itself, or a relay to an external one."""

    def __init__(self, core: ManagerCore) -> None:
        self.core = core
        url = core.settings.coordinator_url
        self.remote = RemoteCoordinator(url) if url else None
        # Running rounds (built-in mode); finished rounds are in the store.
        self._running: dict[str, _Running] = {}
        self._known: OrderedDict[str, None] = OrderedDict()
        self._latest_version = -1
        # Round creation and completion change several things at once; one at a time.
        self._lock = asyncio.Lock()
        self._intake: asyncio.Queue[_Intake] = asyncio.Queue(maxsize=_INTAKE_MAX)
        self.counters = FLCounters()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Take up the rounds that were running when the manager stopped."""
        models = await self.core.store.fl_models()
        self._latest_version = models[0][0] if models else -1
        page = await self.core.store.fl_rounds(0, 100_000, state=RoundState.RUNNING)
        for r in page.items:
            updates = {u.proplet_id: u for u in await self.core.store.fl_updates(r.round_id)}
            self._running[r.round_id] = _Running(r, updates)
        if page.items:
            log.info("%d federated-learning rounds were running; taken up again", len(page.items))

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()

    async def run(self) -> None:
        """Take queued updates in, and close rounds whose time ran out (or that can get no more)."""
        # Rounds taken up after a restart may have all they need already.
        recovered = list(self._running)
        while True:
            try:
                while recovered:
                    await self._complete_if_ready(recovered[0])
                    recovered.pop(0)
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A store that fails for a moment must not stop the manager (a loop that ends does);
                # rounds are looked at again shortly, and what was stored stays.
                self.counters.loop_errors += 1
                log.exception("the federated-learning round loop failed; going on in %.0f s", _RETRY_S)
                await asyncio.sleep(_RETRY_S)

    async def _step(self) -> None:
        """One turn: close rounds past their deadline, then take one queued item (or time out)."""
        now = utcnow()
        for running in [x for x in self._running.values() if x.round.deadline <= now]:
            await self._finish(running, timed_out=True)
        upcoming = min((x.round.deadline for x in self._running.values()), default=None)
        wait = _MAX_SLEEP_S if upcoming is None else min(_MAX_SLEEP_S, (upcoming - now).total_seconds())
        try:
            async with asyncio.timeout(max(wait, 0.001)):
                item = await self._intake.get()
        except TimeoutError:
            return
        why_none = item.why_none
        if item.update is not None:
            try:
                await self.accept_update(item.update, item.source, durable=False)
            except CoreError as exc:
                log.warning("update of %s for round %s (by %s) refused: %s", item.update.proplet_id,
                            item.round_id, item.source, exc)
                why_none = f"its update was refused: {exc}"
        # Marked in turn with the updates queued before it, so a round does not close on a task
        # that ended while its update still waited in this queue.
        running = self._running.get(item.round_id)
        if item.ended_proplet and running is not None:
            running.ended.add(item.ended_proplet)
            if why_none:
                running.lacks[item.ended_proplet] = why_none
        await self._complete_if_ready(item.round_id)

    # ---- experiments and rounds --------------------------------------------------------------

    async def configure(self, config: ExperimentConfig) -> dict[str, Any]:
        """POST /fl/experiments: start a round on the participants that are online."""
        experiment_id = config.experiment_id or config.round_id
        if self.remote is not None:
            body = config.model_dump(exclude={"task_wasm_file", "initial_model"})
            body["experiment_id"] = experiment_id
            await self.remote.call("POST", "/experiments", json=body)
            if not self._first_time(config.round_id):
                raise Conflict(f"round {config.round_id} was started already; give a new round_id")
            started, skipped = await self._start_tasks(config, None)
            self._announce(config)
            return {"experiment_id": experiment_id, "round_id": config.round_id, "status": "configured",
                    "participants_started": started, "participants_offline": skipped}
        async with self._lock:
            r, model, ops = await self._new_round(config, experiment_id)
        await self._start_round_tasks(r, config, model, ops)
        self._announce(config)
        return {"experiment_id": experiment_id, "round_id": r.round_id, "status": "configured",
                "participants_started": r.started,
                "participants_offline": [p for p in r.participants if p not in r.started], "k_of_n": r.k_of_n}

    async def _new_round(self, config: ExperimentConfig,
                         experiment_id: str) -> tuple[FLRound, dict[str, Any], list[WriteOp]]:
        """Register a round; returns it, its model and the writes that store them, which
        `_start_round_tasks` commits with the round's tasks, outside the lock (so updates of other
        rounds are not held up meanwhile)."""
        if await self._round_known(config.round_id):
            raise Conflict(f"round {config.round_id} exists; give a new round_id")
        version = model_version(config.model_ref)
        if version > MAX_MODEL_VERSION:
            raise InvalidRequest(f"model_ref {config.model_ref!r} names version {version}; versions go up to "
                                 f"{MAX_MODEL_VERSION}")
        model = await self.core.store.fl_model(version)
        new_model = None
        if model is None:
            if config.initial_model is not None:
                model = new_model = config.initial_model
            elif version == 0:
                model = new_model = {}  # training starts from nothing: the client's own initial weights
            else:
                raise InvalidRequest(
                    f"model version {version} (model_ref {config.model_ref!r}) is unknown: give a version a round "
                    f"produced (GET /fl/models), global_model_v0, or the weights in 'initial_model'")
        online = [p for p in config.participants if self._online(p)]
        if not online:
            raise Conflict(f"none of the participants ({', '.join(config.participants[:5])}"
                           f"{', ...' if len(config.participants) > 5 else ''}) is online")
        now = utcnow()
        r = FLRound(round_id=config.round_id, experiment_id=experiment_id, model_ref=config.model_ref,
                    task_wasm_image=config.task_wasm_image, participants=list(config.participants),
                    started=online, hyperparams=dict(config.hyperparams), k_of_n=config.k_of_n or len(online),
                    timeout_s=config.timeout_s, deadline=now + timedelta(seconds=config.timeout_s), created_at=now)
        if r.k_of_n > len(online):
            r.reason = (f"{len(online)} of the {len(config.participants)} participants are online, fewer than the "
                        f"{r.k_of_n} updates it needs: it will end at its deadline with what it has")
        ops = [self.core.store.op_put_fl_round(r)]
        if new_model is not None:
            ops.insert(0, self.core.store.op_insert_fl_model(version, "", new_model, now))
            self._latest_version = max(self._latest_version, version)
        self._running[r.round_id] = _Running(r)
        self.counters.rounds_started += 1
        return r, model, ops

    async def _start_round_tasks(self, r: FLRound, config: ExperimentConfig, model: dict[str, Any],
                                 ops: list[WriteOp]) -> None:
        started, _ = await self._start_tasks(config, model, ops)
        if len(started) < len(r.started):
            async with self._lock:
                r.started = started
                await self.core.writer.write(self.core.store.op_put_fl_round(r))
        # Wakes the round loop, which may be sleeping past this round's deadline.
        with contextlib.suppress(asyncio.QueueFull):
            self._intake.put_nowait(_Intake(r.round_id))
        log.info("federated round %s started on %s (%d updates complete it; deadline in %.0f s)", r.round_id,
                 ", ".join(started) or "no proplet", r.k_of_n, r.timeout_s)

    async def _round_known(self, round_id: str) -> bool:
        if self.remote is not None:
            return round_id in self._known
        return round_id in self._running or await self.core.store.fl_round(round_id) is not None

    def is_running(self, round_id: str) -> bool:
        """Whether the round is running (or closing: its last writes not yet stored)."""
        return round_id in self._running

    def _online(self, proplet_id: str) -> bool:
        p = self.core.proplets.get(proplet_id)
        return p is not None and p.online

    def _first_time(self, round_id: str) -> bool:
        if round_id in self._known:
            return False
        self._known[round_id] = None
        while len(self._known) > _KNOWN_ROUNDS_MAX:
            self._known.popitem(last=False)
        return True

    def _task_env(self, config: ExperimentConfig, model: dict[str, Any] | None) -> dict[str, str]:
        env = {"ROUND_ID": config.round_id, "MODEL_URI": config.model_ref,
               "HYPERPARAMS": orjson.dumps(config.hyperparams).decode()}
        if self.remote is not None:
            env["MANAGER_COORDINATOR_URL"] = self.remote.url
            return env
        # Our proplets need not POST the update as well: the result carries it, stored and
        # acknowledged (an extension; upstream proplets ignore it and POST as usual).
        env[FL_UPDATE_IN_RESULT] = "1"
        base = (self.core.settings.public_url or self.core.api_url or "").rstrip("/")
        if base:
            # Upstream proplets need both (they fetch the model and POST the update over HTTP).
            env["MODEL_REGISTRY_URL"] = env["MANAGER_COORDINATOR_URL"] = base + "/fl"
        if model is not None:
            data = orjson.dumps(model)
            if len(data) <= MAX_INLINE_MODEL_BYTES:
                env["MODEL_DATA"] = data.decode()
        return env

    async def _start_tasks(self, config: ExperimentConfig, model: dict[str, Any] | None,
                           ops: Sequence[WriteOp] = ()) -> tuple[list[str], list[str]]:
        """A task per online participant (upstream's names and env), stored in one commit with
        `ops`; returns (started, offline)."""
        online = [p for p in config.participants if self._online(p)]
        offline = [p for p in config.participants if p not in online]
        if not online:
            return [], offline
        body = TaskCreate(name=FL_ROUND_TASK_PREFIX, kind="federated", image_url=config.task_wasm_image,
                          file=config.task_wasm_file, env=self._task_env(config, model),
                          metadata={"fl_round_id": config.round_id})
        # The module is decoded and the tasks stored once for the whole round (one commit), and the
        # starts go out together: one by one, a round of 4 took ~35 ms to start on a 2-core VM.
        tasks = await self.core.create_pinned_tasks(
            body, {p: f"{FL_ROUND_TASK_PREFIX}{config.round_id}-{p}" for p in online}, *ops)
        outcomes = await asyncio.gather(*(self.core.start_task(t.id) for t in tasks), return_exceptions=True)
        started = []
        for task, outcome in zip(tasks, outcomes, strict=True):
            if isinstance(outcome, CoreError):
                log.warning("round %s: the task for %s could not be started: %s", config.round_id, task.proplet_id,
                            outcome)
                offline.append(task.proplet_id)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                started.append(task.proplet_id)
        return started, offline

    def _announce(self, config: ExperimentConfig) -> None:
        """Upstream's round-start message, for coordinators and clients that listen to it."""
        if self.core.bus is None:
            return
        payload = orjson.dumps({"round_id": config.round_id, "model_uri": config.model_ref,
                                "task_wasm_image": config.task_wasm_image, "participants": config.participants,
                                "hyperparams": config.hyperparams})
        self.core.bus.send(self.core.topics.topic(FL_ROUND_START), payload)

    async def on_round_start(self, topic: str, payload: bytes) -> None:
        """`fl/rounds/start` from any client starts the round (once: our own announcement comes back too)."""
        try:
            obj = orjson.loads(payload)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            if isinstance(obj.get("round_id"), str) and await self._round_known(obj["round_id"]):
                return
            config = ExperimentConfig.model_validate({
                "round_id": obj.get("round_id"), "model_ref": obj.get("model_uri") or obj.get("model_ref"),
                "task_wasm_image": obj.get("task_wasm_image") or "", "participants": obj.get("participants"),
                "hyperparams": obj.get("hyperparams") or {}, "experiment_id": obj.get("experiment_id") or ""})
        except (ValueError, ValidationError) as exc:
            text = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            self.core._reject(FL_ROUND_START, "malformed", f"round start: {text}")
            return
        if self.remote is not None:
            if self._first_time(config.round_id):
                await self._start_tasks(config, None)
            return
        async with self._lock:
            if await self._round_known(config.round_id):
                return
            try:
                r, model, ops = await self._new_round(config, config.experiment_id or config.round_id)
            except CoreError as exc:
                self.core._reject(FL_ROUND_START, "refused", f"round {config.round_id}: {exc}")
                return
        await self._start_round_tasks(r, config, model, ops)

    # ---- updates -----------------------------------------------------------------------------

    async def on_update_message(self, topic: str, payload: bytes) -> None:
        """The unprefixed fallback topic `fl/rounds/<round>/updates/<proplet>`."""
        parts = fl_update_parts(topic)
        if parts is None or self.remote is not None:
            return  # in upstream's mode the coordinator listens to this topic itself
        if parts[0] not in self._running:
            # The topic has no tenant prefix: on a shared broker, other managers' rounds show up here.
            log.debug("update on %s for a round this manager does not run; ignored", topic)
            return
        try:
            obj = orjson.loads(payload)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            update = _update_from_output(obj, *parts)
        except (ValueError, binascii.Error, ValidationError) as exc:
            self._refused(topic, exc)
            return
        await self._intake.put(_Intake(update.round_id, update, "mqtt"))

    async def on_round_task_ended(self, task: Task) -> None:
        """A round task ended: by its result, whose envelope carries the update (base64 of its
        stdout), or otherwise (failed with its proplet gone, stopped): then it brings no update."""
        round_id = task.env.get("ROUND_ID", "")
        if self.remote is not None or round_id not in self._running:
            return
        envelope = task.results
        update = None
        why_none = ""
        if task.state is not TaskState.COMPLETED:
            why_none = f"its task {task.state.label}" + (f": {task.error}" if task.error else "")
        elif isinstance(envelope, dict) and "update_b64" in envelope:
            try:
                update = _update_from_output(envelope, round_id, task.proplet_id)
            except (ValueError, binascii.Error, ValidationError) as exc:
                self._refused(f"result of task {task.id}", exc)
                text = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
                why_none = f"its task's output is not an update ({text})"
        else:
            why_none = "its task completed without an update in its result"
        await self._intake.put(_Intake(round_id, update, "result", ended_proplet=task.proplet_id,
                                       why_none=why_none))

    def _refused(self, where: str, exc: Exception) -> None:
        self.counters.updates_refused += 1
        text = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        self.core._reject("fl/rounds/updates", "malformed", f"{where}: {text}")

    async def accept_update(self, update: FLUpdate, source: str, *, durable: bool = True) -> dict[str, Any]:
        """Count a participant's update in its round; the k-th completes the round. With `durable`
        (the REST API), return once the update is stored; the round loop does not wait for each
        commit, so the updates that arrive together share one."""
        if self.remote is not None:
            await self.remote.call("POST", "/update", json=update.model_dump(mode="json"))
            return {"status": "accepted"}
        async with self._lock:
            running = self._running.get(update.round_id)
            if running is None:
                # Closed and stored, or unknown.
                stored = await self.core.store.fl_round(update.round_id)
                if stored is None:
                    self.counters.updates_refused += 1
                    raise NotFound(f"round {update.round_id} is unknown")
                running = _Running(stored, {u.proplet_id: u for u in await self.core.store.fl_updates(stored.round_id)})
            r, updates = running.round, running.updates
            if update.proplet_id in updates:
                # The same update by its second path (the result after the POST), or resent.
                self.counters.updates_repeated += 1
                return running.answer(counted=False)
            if r.state is not RoundState.RUNNING:
                self.counters.updates_refused += 1
                raise Conflict(f"round {r.round_id} has {r.state}; updates are taken while it runs")
            if update.proplet_id not in r.participants:
                self.counters.updates_refused += 1
                raise Conflict(f"{update.proplet_id} is not a participant of round {r.round_id}")
            # Refused now rather than failing the whole round at aggregation.
            try:
                federated_average([(1, update.update)] + [(1, u.body["update"]) for u in list(updates.values())[:1]])
            except AggregationError as exc:
                self.counters.updates_refused += 1
                raise InvalidRequest(f"the update of {update.proplet_id} cannot be averaged with round "
                                     f"{r.round_id}'s: {exc}") from None
            record = FLUpdateRecord(r.round_id, update.proplet_id, update.num_samples,
                                    update.model_dump(mode="json"), source)
            stored = await self.core.writer.enqueue(self.core.store.op_insert_fl_update(record))
            updates[update.proplet_id] = record
            self.counters.updates_accepted += 1
            answer = running.answer(counted=True)
            log.info("round %s: update %d of %d, from %s (%s)", r.round_id, len(updates), r.k_of_n,
                     update.proplet_id, source)
        await self._complete_if_ready(r.round_id)
        if durable:
            await stored
        return answer

    async def _complete_if_ready(self, round_id: str) -> None:
        running = self._running.get(round_id)
        if running is None or running.round.state is not RoundState.RUNNING:
            return
        # k_of_n updates in, or every started task has ended and no more updates are coming.
        if (len(running.updates) >= running.round.k_of_n
                or set(running.round.started) <= running.ended | set(running.updates)):
            await self._finish(running, timed_out=False)

    async def _finish(self, running: _Running, *, timed_out: bool) -> None:
        r = running.round
        async with self._lock:
            if self._running.get(r.round_id) is not running or r.state is not RoundState.RUNNING:
                return
            updates = list(running.updates.values())
            now = utcnow()
            why = "its deadline passed" if timed_out else "every started task ended"
            ops = []
            if not updates:
                r.state, r.reason = RoundState.FAILED, f"no update arrived before {why}" + _why_none(r, running.lacks)
            else:
                try:
                    model = federated_average([(u.num_samples, u.body["update"]) for u in updates])
                except AggregationError as exc:
                    r.state, r.reason = RoundState.FAILED, f"the updates cannot be averaged: {exc}"
                else:
                    version = self._latest_version + 1
                    self._latest_version = version
                    r.state, r.model_version = RoundState.COMPLETED, version
                    r.reason = "" if len(updates) >= r.k_of_n else (
                        f"aggregated {len(updates)} of the {r.k_of_n} updates it wanted, as {why}")
                    ops.append(self.core.store.op_insert_fl_model(version, r.round_id, model, now))
            r.completed_at = now
            ops.append(self.core.store.op_put_fl_round(r))
            committed = await self.core.writer.enqueue(*ops)
        try:
            # Outside the lock: other rounds go on meanwhile. Until stored, reads find the round here.
            await committed
        finally:
            del self._running[r.round_id]
        if r.state is RoundState.COMPLETED:
            self.counters.rounds_completed += 1
            log.info("round %s completed with %d updates: model version %d", r.round_id, len(updates),
                     r.model_version)
            if self.core.bus is not None:
                self.core.bus.send(FL_ROUND_NEXT, orjson.dumps({
                    "round_id": r.round_id, "experiment_id": r.experiment_id, "model_version": r.model_version,
                    "model_uri": model_uri(r.model_version or 0), "num_updates": len(updates)}))
        else:
            self.counters.rounds_failed += 1
            log.warning("round %s failed: %s", r.round_id, r.reason)

    # ---- reads (the REST API) ----------------------------------------------------------------

    async def get_round(self, round_id: str) -> tuple[FLRound, list[FLUpdateRecord]]:
        if "\x00" in round_id:  # PostgreSQL takes no NUL in text; no round has one
            raise NotFound(f"round {round_id!r} is unknown")
        running = self._running.get(round_id)
        if running is not None:
            return running.round, list(running.updates.values())
        # Updates and rounds are stored without waiting (see accept_update): read what was queued.
        await self.core.writer.barrier()
        stored = await self.core.store.fl_round(round_id)
        if stored is None:
            raise NotFound(f"round {round_id} is unknown")
        return stored, await self.core.store.fl_updates(round_id)

    async def task_for(self, round_id: str, proplet_id: str) -> dict[str, Any]:
        """GET /fl/task: what a participant trains in a round."""
        if self.remote is not None:
            return await self.remote.call("GET", "/task", params={"round_id": round_id, "proplet_id": proplet_id})
        r, _ = await self.get_round(round_id)
        return {"task": {"round_id": r.round_id, "model_ref": r.model_ref, "hyperparams": r.hyperparams,
                         "config": {"experiment_id": r.experiment_id, "k_of_n": r.k_of_n, "timeout_s": r.timeout_s,
                                    "participants": r.participants, "task_wasm_image": r.task_wasm_image}}}

    async def list_rounds(self, offset: int, limit: int) -> tuple[int, list[tuple[FLRound, list[FLUpdateRecord]]]]:
        """(total, rounds newest first, each with its updates)."""
        await self.core.writer.barrier()
        page = await self.core.store.fl_rounds(offset, limit)
        rounds = []
        for r in page.items:
            running = self._running.get(r.round_id)
            rounds.append((running.round, list(running.updates.values())) if running is not None
                          else (r, await self.core.store.fl_updates(r.round_id)))
        return page.total, rounds

    async def round_summaries(self, limit: int) -> tuple[int, list[tuple[FLRound, int]]]:
        """(total, the newest rounds each with its number of updates): a listing that reads the
        counts in one query, not every round's updates (the console polls it)."""
        # Taken before the reads: a round that closes meanwhile is shown from its own (closed)
        # record, not from a row read while it still ran.
        running = dict(self._running)
        await self.core.writer.barrier()
        page = await self.core.store.fl_rounds(0, limit)
        counts = await self.core.store.fl_update_counts([r.round_id for r in page.items if r.round_id not in running])
        out = []
        for r in page.items:
            live = running.get(r.round_id)
            out.append((live.round, len(live.updates)) if live is not None else (r, counts.get(r.round_id, 0)))
        return page.total, out

    @property
    def newest_model(self) -> int | None:
        """The highest model version stored, None before the first."""
        return self._latest_version if self._latest_version >= 0 else None

    async def models(self) -> list[tuple[int, str, datetime]]:
        await self.core.writer.barrier()
        return await self.core.store.fl_models()

    async def model(self, version: int) -> dict[str, Any]:
        await self.core.writer.barrier()
        data = await self.core.store.fl_model(version)
        if data is None:
            raise NotFound(f"model version {version} is unknown (GET /fl/models lists them)")
        return data


# Participants named in the reason of a round that got no update (the rest are counted).
WHY_NONE_SHOWN = 5


def _why_none(r: FLRound, lacks: dict[str, str]) -> str:
    """": p1: its task failed: …; p2: …" for the started participants whose task brought no update."""
    said = [f"{pid}: {lacks[pid]}" for pid in r.started if pid in lacks]
    if not said:
        return ""
    more = len(said) - WHY_NONE_SHOWN
    return ": " + "; ".join(said[:WHY_NONE_SHOWN]) + (f"; and {more} more" if more > 0 else "")


def _update_from_output(obj: dict[str, Any], round_id: str, proplet_id: str) -> FLUpdate:
    """An update from what a proplet sent: the module's JSON itself (the Rust proplet's fallback
    message), or upstream's FL envelope around it (a result; the embedded proplet's fallback message)."""
    if "update_b64" not in obj:
        return _as_update(obj, round_id, proplet_id, None)
    output = pybase64.b64decode(str(obj["update_b64"]), validate=True)
    try:
        inner = orjson.loads(output)
    except orjson.JSONDecodeError:
        inner = None
    if not isinstance(inner, dict):
        raise ValueError(f"the envelope's update_b64 holds no JSON object (format {obj.get('format')!r}); the "
                         "manager averages weights its modules print as JSON")
    samples = obj.get("num_samples")
    return _as_update(inner, round_id, proplet_id, samples if isinstance(samples, int) else None)


def _as_update(obj: dict[str, Any], round_id: str, proplet_id: str, num_samples: int | None) -> FLUpdate:
    """An update from a proplet's output: upstream's FLUpdate, or bare weights. The round and the
    proplet are those the topic or the task names, whatever the output claims."""
    weights = obj.get("update") if isinstance(obj.get("update"), dict) else obj
    # The output's own count first: upstream's envelope carries FL_NUM_SAMPLES, by default 1.
    samples = obj.get("num_samples", num_samples if num_samples is not None else 1)
    return FLUpdate.model_validate({
        "round_id": round_id, "proplet_id": proplet_id, "num_samples": samples,
        "base_model_uri": obj.get("base_model_uri") or "",
        "metrics": obj.get("metrics") if isinstance(obj.get("metrics"), dict) else {}, "update": weights})

