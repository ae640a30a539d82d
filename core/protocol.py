"""Wire messages, upstream-compatible, with pure encode/decode functions.

Every payload is a JSON object. Decoding ignores unknown fields (upstream peers send more than we
read) and raises `InvalidMessage` for anything else that is wrong: bad JSON, a non-object, a missing
required field or a field of the wrong type. Nothing else escapes a decoder.

Extensions beyond upstream are optional fields that upstream peers ignore: `wasm_digest`, `limits`,
`attempt` and `traceparent` on start; `traceparent` on every message; `status: "offline"` on alive;
`digest`/`size` on chunks and `missing`/`encoding` on registry requests; and three extra topics
(task_state, result_ack, and registry/server/binary for chunks of raw bytes) that upstream peers
never subscribe to.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pybase64

from core.domain import TaskLimits

# Upstream's manager names a federated-learning round's task `fl-round-<round>-<proplet>`; proplets
# run such a task's module as a command (`_start`).
FL_ROUND_TASK_PREFIX = "fl-round-"
# What a proplet's answer to an invocation says when it does not hold the task deployed; upstream's
# manager matches this text to try another proplet, so proplets keep it word for word.
NOT_DEPLOYED_MARK = "has not been precompiled"
NOT_DEPLOYED = "task {id} " + NOT_DEPLOYED_MARK + "; deploy it as a latent task first"
# Extension, in a round task's env: the manager takes the update from the task's result (the FL
# envelope), so the proplet need not POST it or publish it on the fallback topic as well.
FL_UPDATE_IN_RESULT = "FL_UPDATE_IN_RESULT"
_GLOBAL_MODEL_VERSION = re.compile(r"global_model_v(\d+)")
_TRAILING_DIGITS = re.compile(r"(\d+)$")


def model_version(model_uri: str) -> int:
    """The version a model reference names: N of `...global_model_vN...`, else its trailing digits,
    else 0 (upstream's rule, shared by the manager and the proplet)."""
    found = _GLOBAL_MODEL_VERSION.search(model_uri) or _TRAILING_DIGITS.search(model_uri)
    return int(found.group(1)) if found else 0

# Upstream's proxy chunk size in raw bytes (about 683 KB of base64 per message).
UPSTREAM_CHUNK_SIZE = 512_000


class InvalidMessage(ValueError):
    """A message that cannot be used. Logged, counted and dropped by its receiver."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"invalid message on {topic or '<unknown topic>'}: {reason}")
        self.topic = topic
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# field readers: each raises InvalidMessage with the field name on a type error


class _Reader:
    __slots__ = ("obj", "topic")

    def __init__(self, payload: bytes | str, topic: str) -> None:
        self.topic = topic
        try:
            obj = orjson.loads(payload)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise InvalidMessage(topic, f"not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise InvalidMessage(topic, f"expected a JSON object, got {type(obj).__name__}")
        self.obj: dict[str, Any] = obj

    def fail(self, reason: str) -> InvalidMessage:
        return InvalidMessage(self.topic, reason)

    def req_str(self, key: str, *, non_empty: bool = True) -> str:
        value = self.obj.get(key)
        if value is None:
            raise self.fail(f"missing required field '{key}'")
        if not isinstance(value, str):
            raise self.fail(f"field '{key}' must be a string, got {type(value).__name__}")
        if non_empty and not value:
            raise self.fail(f"field '{key}' must not be empty")
        return value

    def opt_str(self, key: str, default: str = "") -> str:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(f"field '{key}' must be a string, got {type(value).__name__}")
        return value

    def opt_bool(self, key: str, default: bool = False) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"field '{key}' must be a boolean, got {type(value).__name__}")
        return value

    def opt_int(self, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return default
        # Go encodes integers that went through float64 as e.g. 3.0; accept exact floats.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"field '{key}' must be an integer, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise self.fail(f"field '{key}' must be at least {minimum}, got {value}")
        return value

    def req_int(self, key: str, *, minimum: int | None = None) -> int:
        if self.obj.get(key) is None:
            raise self.fail(f"missing required field '{key}'")
        value = self.opt_int(key, minimum=minimum)
        assert value is not None
        return value

    def opt_str_list(self, key: str, *, numbers_as_text: bool = False) -> tuple[str, ...]:
        value = self.obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(f"field '{key}' must be a list, got {type(value).__name__}")
        out: list[str] = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(item)
            elif numbers_as_text and isinstance(item, (int, float)) and not isinstance(item, bool):
                # Upstream's FlexStrings keeps numbers as their literal text.
                out.append(orjson.dumps(item).decode())
            else:
                raise self.fail(f"field '{key}[{i}]' must be a string, got {type(item).__name__}")
        return tuple(out)

    def opt_int_list(self, key: str) -> tuple[int, ...]:
        value = self.obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            raise self.fail(f"field '{key}' must be a list of non-negative integers")
        return tuple(value)

    def opt_str_map(self, key: str) -> dict[str, str]:
        value = self.obj.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"field '{key}' must be an object, got {type(value).__name__}")
        for k, v in value.items():
            if not isinstance(v, str):
                raise self.fail(f"field '{key}.{k}' must be a string, got {type(v).__name__}")
        return dict(value)

    def opt_obj(self, key: str) -> dict[str, Any] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(f"field '{key}' must be an object, got {type(value).__name__}")
        return value

    def opt_base64(self, key: str) -> bytes:
        return self.base64_text(key, self.opt_str(key))

    def base64_text(self, key: str, text: str | memoryview) -> bytes:
        if not text:
            return b""
        try:
            # pybase64 (SIMD) decodes ~25x faster than the standard library: chunks and inline
            # modules are megabytes of base64.
            return pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(f"field '{key}' is not valid standard base64") from None

    def limits(self) -> TaskLimits:
        raw = self.opt_obj("limits")
        if not raw:
            return TaskLimits()
        timeout = raw.get("timeout_s")
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0
        ):
            raise self.fail("field 'limits.timeout_s' must be a positive number")
        values: dict[str, int | None] = {}
        for name in ("fuel", "memory_bytes"):
            v = raw.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise self.fail(f"field 'limits.{name}' must be a positive integer")
            values[name] = v
        return TaskLimits(
            timeout_s=None if timeout is None else float(timeout),
            fuel=values["fuel"],
            memory_bytes=values["memory_bytes"],
        )


def _dumps(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


def _put_if(obj: dict[str, Any], key: str, value: Any) -> None:
    if value:
        obj[key] = value


# ---------------------------------------------------------------------------------------------
# manager -> proplets


@dataclass(frozen=True, slots=True)
class StartMessage:
    """`control/manager/start`: run the export `name` of a module (upstream §3.1)."""

    id: str
    name: str
    state: int = 0
    image_url: str = ""
    file: bytes = b""
    inputs: tuple[str, ...] = ()
    cli_args: tuple[str, ...] = ()
    broadcast: bool = False
    daemon: bool = False
    latent: bool = False
    encrypted: bool = False
    env: dict[str, str] = field(default_factory=dict)
    kbs_resource_path: str = ""
    monitoring_profile: dict[str, Any] | None = None
    proplet_id: str = ""
    hal_storage_path: str = ""
    parent_results: dict[str, Any] | None = None
    mode: str = ""
    # extensions
    wasm_digest: str = ""
    # Extension: base64 Ed25519 signature of wasm_digest by the manager (core.signing).
    wasm_signature: str = ""
    limits: TaskLimits = field(default_factory=TaskLimits)
    attempt: int = 0
    traceparent: str = ""
    # Extension, to a proplet announcing `result_ack_in_start` only: its results the manager has
    # stored since ([task_id, attempt] pairs), which would otherwise take a result_ack message each.
    result_acks: tuple[tuple[str, int], ...] = ()

    def targets(self, proplet_id: str) -> bool:
        """Whether a proplet with this id should run the task (upstream's filter)."""
        return self.broadcast or not self.proplet_id or self.proplet_id == proplet_id


def encode_start(msg: StartMessage) -> bytes:
    obj: dict[str, Any] = {"id": msg.id, "name": msg.name, "state": msg.state}
    _put_if(obj, "image_url", msg.image_url)
    if msg.file:
        obj["file"] = pybase64.b64encode(msg.file).decode("ascii")
    _put_if(obj, "inputs", list(msg.inputs))
    # Upstream always sends cli_args, as null when there are none.
    obj["cli_args"] = list(msg.cli_args) if msg.cli_args else None
    obj["broadcast"] = msg.broadcast
    obj["daemon"] = msg.daemon
    obj["latent"] = msg.latent
    obj["encrypted"] = msg.encrypted
    _put_if(obj, "env", msg.env)
    _put_if(obj, "kbs_resource_path", msg.kbs_resource_path)
    if msg.monitoring_profile is not None:
        obj["monitoring_profile"] = msg.monitoring_profile
    _put_if(obj, "proplet_id", msg.proplet_id)
    _put_if(obj, "hal_storage_path", msg.hal_storage_path)
    if msg.parent_results is not None:
        obj["parent_results"] = msg.parent_results
    _put_if(obj, "mode", msg.mode)
    _put_if(obj, "wasm_digest", msg.wasm_digest)
    _put_if(obj, "wasm_signature", msg.wasm_signature)
    if not msg.limits.is_empty():
        obj["limits"] = msg.limits.to_dict()
    _put_if(obj, "attempt", msg.attempt)
    _put_if(obj, "traceparent", msg.traceparent)
    if msg.result_acks:
        obj["result_acks"] = [list(pair) for pair in msg.result_acks]
    return _dumps(obj)


def decode_start(payload: bytes | str, topic: str = "control/manager/start") -> StartMessage:
    return _start_from(_Reader(payload, topic))


def decode_start_for(proplet_id: str, payload: bytes | str,
                     topic: str = "control/manager/start") -> StartMessage | None:
    """`decode_start` for one proplet: None, without validating the rest, when the start names
    another proplet. Every proplet on a channel receives every start (upstream's single start
    topic), so in a fleet of N most starts are someone else's."""
    r = _Reader(payload, topic)
    target = r.obj.get("proplet_id")
    if target and isinstance(target, str) and target != proplet_id and r.obj.get("broadcast") is not True:
        return None
    return _start_from(r)


def _start_from(r: _Reader) -> StartMessage:
    msg = StartMessage(
        id=r.req_str("id"),
        name=r.req_str("name"),
        state=r.opt_int("state", 0) or 0,
        image_url=r.opt_str("image_url"),
        file=r.opt_base64("file"),
        inputs=r.opt_str_list("inputs", numbers_as_text=True),
        cli_args=r.opt_str_list("cli_args"),
        broadcast=r.opt_bool("broadcast"),
        daemon=r.opt_bool("daemon"),
        latent=r.opt_bool("latent"),
        encrypted=r.opt_bool("encrypted"),
        env=r.opt_str_map("env"),
        kbs_resource_path=r.opt_str("kbs_resource_path"),
        monitoring_profile=r.opt_obj("monitoring_profile"),
        proplet_id=r.opt_str("proplet_id"),
        hal_storage_path=r.opt_str("hal_storage_path"),
        parent_results=r.opt_obj("parent_results"),
        mode=r.opt_str("mode"),
        wasm_digest=r.opt_str("wasm_digest"),
        wasm_signature=r.opt_str("wasm_signature"),
        limits=r.limits(),
        attempt=r.opt_int("attempt", 0, minimum=0) or 0,
        traceparent=r.opt_str("traceparent"),
        result_acks=_ack_pairs(r, "result_acks"),
    )
    if msg.encrypted:
        if not msg.image_url:
            raise r.fail("an encrypted task needs 'image_url'")
        if msg.file:
            raise r.fail("an encrypted task must not carry 'file'")
    elif not msg.file and not msg.image_url:
        raise r.fail("one of 'file' or 'image_url' is required")
    if msg.wasm_digest and not _is_sha256_digest(msg.wasm_digest):
        raise r.fail("field 'wasm_digest' must look like sha256:<64 hex digits>")
    return msg


def _is_sha256_digest(text: str) -> bool:
    if not text.startswith("sha256:") or len(text) != 71:
        return False
    return all(c in "0123456789abcdef" for c in text[7:])


@dataclass(frozen=True, slots=True)
class StopMessage:
    """`control/manager/stop` (upstream §3.2)."""

    id: str
    proplet_id: str = ""
    broadcast: bool = False
    traceparent: str = ""

    def targets(self, proplet_id: str) -> bool:
        return self.broadcast or not self.proplet_id or self.proplet_id == proplet_id


def encode_stop(msg: StopMessage) -> bytes:
    obj: dict[str, Any] = {"id": msg.id, "broadcast": msg.broadcast}
    if not msg.broadcast:
        _put_if(obj, "proplet_id", msg.proplet_id)
    _put_if(obj, "traceparent", msg.traceparent)
    return _dumps(obj)


def decode_stop(payload: bytes | str, topic: str = "control/manager/stop") -> StopMessage:
    r = _Reader(payload, topic)
    return StopMessage(
        id=r.req_str("id"),
        proplet_id=r.opt_str("proplet_id"),
        broadcast=r.opt_bool("broadcast"),
        traceparent=r.opt_str("traceparent"),
    )


@dataclass(frozen=True, slots=True)
class InvokeMessage:
    """`control/manager/invoke`: call a latent task again (upstream §3.3)."""

    id: str
    invocation_id: str = ""
    proplet_id: str = ""
    broadcast: bool = False
    inputs: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    traceparent: str = ""

    def targets(self, proplet_id: str) -> bool:
        return self.broadcast or not self.proplet_id or self.proplet_id == proplet_id


def encode_invoke(msg: InvokeMessage) -> bytes:
    obj: dict[str, Any] = {
        "id": msg.id,
        "broadcast": msg.broadcast,
        "proplet_id": msg.proplet_id,
        "invocation_id": msg.invocation_id,
        "inputs": list(msg.inputs),
    }
    _put_if(obj, "env", msg.env)
    _put_if(obj, "traceparent", msg.traceparent)
    return _dumps(obj)


def decode_invoke(payload: bytes | str, topic: str = "control/manager/invoke") -> InvokeMessage:
    r = _Reader(payload, topic)
    return InvokeMessage(
        id=r.req_str("id"),
        invocation_id=r.opt_str("invocation_id"),
        proplet_id=r.opt_str("proplet_id"),
        broadcast=r.opt_bool("broadcast"),
        inputs=r.opt_str_list("inputs", numbers_as_text=True),
        env=r.opt_str_map("env"),
        traceparent=r.opt_str("traceparent"),
    )


@dataclass(frozen=True, slots=True)
class ResultAckMessage:
    """Extension `control/manager/result_ack`: the manager has stored these results.

    One message acknowledges a task (`task_id`, `attempt`) and, under load, the proplet's other
    results stored in the same commit (`more`: [[task_id, attempt], ...]).
    """

    task_id: str
    proplet_id: str
    attempt: int = 0
    more: tuple[tuple[str, int], ...] = ()

    def acks(self) -> tuple[tuple[str, int], ...]:
        return ((self.task_id, self.attempt), *self.more)


def encode_result_ack(msg: ResultAckMessage) -> bytes:
    obj: dict[str, Any] = {"task_id": msg.task_id, "proplet_id": msg.proplet_id, "attempt": msg.attempt}
    if msg.more:
        obj["more"] = [list(pair) for pair in msg.more]
    return _dumps(obj)


def decode_result_ack(payload: bytes | str, topic: str = "control/manager/result_ack") -> ResultAckMessage:
    r = _Reader(payload, topic)
    return ResultAckMessage(
        task_id=r.req_str("task_id"),
        proplet_id=r.req_str("proplet_id"),
        attempt=r.opt_int("attempt", 0, minimum=0) or 0,
        more=_ack_pairs(r, "more"),
    )


def _ack_pairs(r: _Reader, name: str) -> tuple[tuple[str, int], ...]:
    """An optional list of [task_id, attempt] pairs."""
    raw = r.obj.get(name) or []
    if not isinstance(raw, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int)
        and not isinstance(p[1], bool) and p[1] >= 0 for p in raw
    ):
        raise r.fail(f"field '{name}' must be a list of [task_id, attempt] pairs")
    return tuple((p[0], p[1]) for p in raw)


# ---------------------------------------------------------------------------------------------
# proplets -> manager


@dataclass(frozen=True, slots=True)
class DiscoveryMessage:
    """`control/proplet/create` (upstream §3.4)."""

    proplet_id: str
    namespace: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    traceparent: str = ""


def encode_discovery(msg: DiscoveryMessage) -> bytes:
    obj: dict[str, Any] = {"proplet_id": msg.proplet_id, "namespace": msg.namespace}
    obj["metadata"] = msg.metadata
    _put_if(obj, "traceparent", msg.traceparent)
    return _dumps(obj)


def decode_discovery(payload: bytes | str, topic: str = "control/proplet/create") -> DiscoveryMessage:
    r = _Reader(payload, topic)
    return DiscoveryMessage(
        proplet_id=r.req_str("proplet_id"),
        namespace=r.opt_str("namespace"),
        metadata=r.opt_obj("metadata") or {},
        traceparent=r.opt_str("traceparent"),
    )


ALIVE_STATUS = "alive"
OFFLINE_STATUS = "offline"


@dataclass(frozen=True, slots=True)
class AliveMessage:
    """`control/proplet/alive`: heartbeat, or `status: "offline"` as the Last Will (upstream §3.5)."""

    proplet_id: str
    status: str = ALIVE_STATUS
    namespace: str = ""
    # Extension: tasks the proplet is running now, for the manager's reconciliation.
    running: tuple[str, ...] = ()
    traceparent: str = ""
    # Extension: shutting down; it finishes what it runs and takes no new task (status stays
    # "alive": upstream's manager reads any status as alive, and the proplet is).
    draining: bool = False

    @property
    def offline(self) -> bool:
        return self.status == OFFLINE_STATUS


def encode_alive(msg: AliveMessage) -> bytes:
    obj: dict[str, Any] = {"proplet_id": msg.proplet_id, "status": msg.status}
    _put_if(obj, "namespace", msg.namespace)
    _put_if(obj, "running", list(msg.running))
    _put_if(obj, "traceparent", msg.traceparent)
    _put_if(obj, "draining", msg.draining)
    return _dumps(obj)


def decode_alive(payload: bytes | str, topic: str = "control/proplet/alive") -> AliveMessage:
    r = _Reader(payload, topic)
    return AliveMessage(
        proplet_id=r.req_str("proplet_id"),
        status=r.opt_str("status", ALIVE_STATUS) or ALIVE_STATUS,
        namespace=r.opt_str("namespace"),
        running=r.opt_str_list("running"),
        traceparent=r.opt_str("traceparent"),
        draining=r.opt_bool("draining"),
    )


@dataclass(frozen=True, slots=True)
class ResultMessage:
    """`control/proplet/results` (upstream §3.6). `results` is any JSON value."""

    task_id: str
    proplet_id: str = ""
    results: Any = None
    error: str = ""
    attempt: int = 0
    traceparent: str = ""
    # Extension: when the run began (RFC 3339, the proplet's clock), for a task that finished
    # before the proplet confirmed it was running.
    started_at: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.error)


def encode_result(msg: ResultMessage) -> bytes:
    obj: dict[str, Any] = {"task_id": msg.task_id}
    _put_if(obj, "proplet_id", msg.proplet_id)
    obj["results"] = msg.results
    obj["error"] = msg.error or None
    _put_if(obj, "attempt", msg.attempt)
    _put_if(obj, "traceparent", msg.traceparent)
    _put_if(obj, "started_at", msg.started_at)
    return _dumps(obj)


def decode_result(payload: bytes | str, topic: str = "control/proplet/results") -> ResultMessage:
    r = _Reader(payload, topic)
    results = r.obj.get("results")
    # The FL envelope carries proplet_id inside `results` instead of at the top level.
    proplet_id = r.opt_str("proplet_id")
    if not proplet_id and isinstance(results, dict) and isinstance(results.get("proplet_id"), str):
        proplet_id = results["proplet_id"]
    return ResultMessage(
        task_id=r.req_str("task_id"),
        proplet_id=proplet_id,
        results=results,
        error=r.opt_str("error"),
        attempt=r.opt_int("attempt", 0, minimum=0) or 0,
        traceparent=r.opt_str("traceparent"),
        started_at=r.opt_str("started_at"),
    )


@dataclass(frozen=True, slots=True)
class InvokeResultMessage:
    """`control/proplet/invoke_results` (upstream §3.7)."""

    task_id: str
    invocation_id: str
    proplet_id: str = ""
    results: str = ""
    error: str = ""
    traceparent: str = ""


def encode_invoke_result(msg: InvokeResultMessage) -> bytes:
    obj: dict[str, Any] = {
        "task_id": msg.task_id,
        "invocation_id": msg.invocation_id,
        "proplet_id": msg.proplet_id,
        "results": msg.results,
        "error": msg.error or None,
    }
    _put_if(obj, "traceparent", msg.traceparent)
    return _dumps(obj)


def decode_invoke_result(
    payload: bytes | str, topic: str = "control/proplet/invoke_results"
) -> InvokeResultMessage:
    r = _Reader(payload, topic)
    return InvokeResultMessage(
        task_id=r.req_str("task_id"),
        invocation_id=r.req_str("invocation_id"),
        proplet_id=r.opt_str("proplet_id"),
        results=r.opt_str("results"),
        error=r.opt_str("error"),
        traceparent=r.opt_str("traceparent"),
    )


@dataclass(frozen=True, slots=True)
class PropletMetricsMessage:
    """`control/proplet/metrics` (upstream §3.8). `timestamp` is kept as sent; see parse_timestamp."""

    proplet_id: str
    namespace: str = ""
    timestamp: Any = None
    cpu_metrics: dict[str, Any] = field(default_factory=dict)
    memory_metrics: dict[str, Any] = field(default_factory=dict)
    traceparent: str = ""


def encode_proplet_metrics(msg: PropletMetricsMessage) -> bytes:
    obj: dict[str, Any] = {
        "proplet_id": msg.proplet_id,
        "namespace": msg.namespace,
        "timestamp": msg.timestamp,
        "cpu_metrics": msg.cpu_metrics,
        "memory_metrics": msg.memory_metrics,
    }
    _put_if(obj, "traceparent", msg.traceparent)
    return _dumps(obj)


def decode_proplet_metrics(
    payload: bytes | str, topic: str = "control/proplet/metrics"
) -> PropletMetricsMessage:
    r = _Reader(payload, topic)
    return PropletMetricsMessage(
        proplet_id=r.req_str("proplet_id"),
        namespace=r.opt_str("namespace"),
        timestamp=r.obj.get("timestamp"),
        cpu_metrics=r.opt_obj("cpu_metrics") or {},
        memory_metrics=r.opt_obj("memory_metrics") or {},
        traceparent=r.opt_str("traceparent"),
    )


@dataclass(frozen=True, slots=True)
class TaskMetricsMessage:
    """`control/proplet/task_metrics` (upstream §3.9)."""

    task_id: str
    proplet_id: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    aggregated: dict[str, Any] | None = None
    timestamp: Any = None
    traceparent: str = ""


def encode_task_metrics(msg: TaskMetricsMessage) -> bytes:
    obj: dict[str, Any] = {
        "task_id": msg.task_id,
        "proplet_id": msg.proplet_id,
        "metrics": msg.metrics,
        "aggregated": msg.aggregated,
        "timestamp": msg.timestamp,
    }
    _put_if(obj, "traceparent", msg.traceparent)
    return _dumps(obj)


def decode_task_metrics(
    payload: bytes | str, topic: str = "control/proplet/task_metrics"
) -> TaskMetricsMessage:
    r = _Reader(payload, topic)
    return TaskMetricsMessage(
        task_id=r.req_str("task_id"),
        proplet_id=r.opt_str("proplet_id"),
        metrics=r.opt_obj("metrics") or {},
        aggregated=r.opt_obj("aggregated"),
        timestamp=r.obj.get("timestamp"),
        traceparent=r.opt_str("traceparent"),
    )


TASK_STATE_RUNNING = "running"
TASK_STATE_REJECTED = "rejected"
# Accepted and waiting on the proplet for a free slot (it announced `max_queued_tasks`).
TASK_STATE_QUEUED = "queued"
# Given back unfinished: the proplet is shutting down. The manager queues it again at once, not as
# a retry (nothing went wrong with the task) and not as a refusal (no back-off).
TASK_STATE_RETURNED = "returned"
# Cannot be run by this proplet, for what the proplet is or allows (a component on a board, a module
# over its size limit, a directory or the network it does not grant): unlike `rejected`, waiting
# does not help. The manager sends the task to another proplet, or fails it when it is pinned there
# or no live proplet is left to try. Sent only to a manager that numbers attempts (this project's);
# upstream's reads no task_state, and gets a failed result instead.
TASK_STATE_UNSUPPORTED = "unsupported"
TASK_STATES = (TASK_STATE_RUNNING, TASK_STATE_REJECTED, TASK_STATE_QUEUED, TASK_STATE_RETURNED,
               TASK_STATE_UNSUPPORTED)


@dataclass(frozen=True, slots=True)
class TaskStateMessage:
    """Extension `control/proplet/task_state`: a proplet confirms it started a task, holds it for a
    free slot, refuses it, or gives it back unfinished as it shuts down."""

    task_id: str
    proplet_id: str
    state: str
    attempt: int = 0
    reason: str = ""
    traceparent: str = ""


def encode_task_state(msg: TaskStateMessage) -> bytes:
    obj: dict[str, Any] = {"task_id": msg.task_id, "proplet_id": msg.proplet_id, "state": msg.state}
    _put_if(obj, "attempt", msg.attempt)
    _put_if(obj, "reason", msg.reason)
    _put_if(obj, "traceparent", msg.traceparent)
    return _dumps(obj)


def decode_task_state(
    payload: bytes | str, topic: str = "control/proplet/task_state"
) -> TaskStateMessage:
    r = _Reader(payload, topic)
    state = r.req_str("state")
    if state not in TASK_STATES:
        raise r.fail(f"field 'state' must be one of {', '.join(map(repr, TASK_STATES))}, got {state!r}")
    return TaskStateMessage(
        task_id=r.req_str("task_id"),
        proplet_id=r.req_str("proplet_id"),
        state=state,
        attempt=r.opt_int("attempt", 0, minimum=0) or 0,
        reason=r.opt_str("reason"),
        traceparent=r.opt_str("traceparent"),
    )


# ---------------------------------------------------------------------------------------------
# registry: proplet <-> proxy (or the manager's own blob server)


@dataclass(frozen=True, slots=True)
class RegistryRequest:
    """`registry/proplet`: ask for the chunks of an artifact (upstream §3.10).

    Extensions: `missing` lists the only chunk indexes wanted (a resumed transfer); `encoding`
    "binary" asks for chunks of raw bytes on `registry/server/binary` instead of base64 JSON on
    `registry/server` (a server that does not know the field answers in JSON, which the asker
    also reads).
    """

    app_name: str
    missing: tuple[int, ...] = ()
    proplet_id: str = ""
    traceparent: str = ""
    encoding: str = ""

    @property
    def wants_binary(self) -> bool:
        return self.encoding == CHUNK_ENCODING_BINARY


# RegistryRequest.encoding: raw-byte chunks. Anything else (upstream sends nothing) means JSON.
CHUNK_ENCODING_BINARY = "binary"


def encode_registry_request(msg: RegistryRequest) -> bytes:
    obj: dict[str, Any] = {"app_name": msg.app_name}
    _put_if(obj, "missing", list(msg.missing))
    _put_if(obj, "proplet_id", msg.proplet_id)
    _put_if(obj, "traceparent", msg.traceparent)
    _put_if(obj, "encoding", msg.encoding)
    return _dumps(obj)


def decode_registry_request(
    payload: bytes | str, topic: str = "registry/proplet"
) -> RegistryRequest:
    r = _Reader(payload, topic)
    return RegistryRequest(
        app_name=r.req_str("app_name"),
        missing=r.opt_int_list("missing"),
        proplet_id=r.opt_str("proplet_id"),
        traceparent=r.opt_str("traceparent"),
        encoding=r.opt_str("encoding"),
    )


@dataclass(frozen=True, slots=True)
class ChunkMessage:
    """`registry/server`: one piece of an artifact (upstream §3.10).

    Extensions: `digest` (sha256 of the whole artifact) and `size` (its length in bytes), so a
    receiver can verify the reassembled module and size its buffer before the last chunk; and
    `error`, sent as a single empty chunk when the artifact cannot be served, so a waiting proplet
    fails at once with the reason instead of timing out.
    """

    app_name: str
    chunk_idx: int
    total_chunks: int
    # A view of a binary chunk's payload, or of the artifact a server is cutting into chunks;
    # bytes otherwise.
    data: bytes | memoryview
    digest: str = ""
    size: int = 0
    error: str = ""


def encode_chunk(msg: ChunkMessage) -> bytes:
    # The same bytes as dumping the whole object, but the base64 goes in as it is: through a str and
    # the JSON encoder it was copied twice more and scanned for escapes it cannot contain.
    head = _dumps({"app_name": msg.app_name, "chunk_idx": msg.chunk_idx, "total_chunks": msg.total_chunks})
    tail: dict[str, Any] = {}
    _put_if(tail, "digest", msg.digest)
    _put_if(tail, "size", msg.size)
    _put_if(tail, "error", msg.error)
    parts = [head[:-1], b',"data":"', pybase64.b64encode(msg.data), b'"']
    if tail:
        parts += [b",", _dumps(tail)[1:-1]]
    parts.append(b"}")
    return b"".join(parts)


_DATA_KEY = b'"data":"'
_DATA_NAME = b'"data"'


def _cut_data(payload: bytes | str) -> tuple[bytes, memoryview] | None:
    """A chunk without the text of its `data` string (left as ""), and that text, found without
    parsing the ~680 KB of JSON it is (parsing it is ~0.25 ms a chunk, most of a chunk's decoding).

    Only for the compact spelling our encoder and Go's write, a string with no escapes, and a
    payload naming "data" once outside it; anything else (and whatever the cut-down JSON says is
    not the top-level `data`) returns None and the payload is parsed whole.
    """
    if not isinstance(payload, bytes):
        return None
    key = payload.find(_DATA_KEY)
    if key < 0:
        return None
    start = key + len(_DATA_KEY)
    end = payload.find(b'"', start)
    if (end < 0 or payload.find(b"\\", start, end) >= 0
            or payload.find(_DATA_NAME, 0, key) >= 0 or payload.find(_DATA_NAME, end) >= 0):
        return None
    return payload[:start] + payload[end:], memoryview(payload)[start:end]


def decode_chunk(payload: bytes | str, topic: str = "registry/server") -> ChunkMessage:
    cut = _cut_data(payload)
    data_text: memoryview | None = None
    if cut is not None:
        r = _Reader(cut[0], topic)
        if r.obj.get("data") == "":
            data_text = cut[1]
        else:  # the "data" found was not the top-level field: read the payload as it is
            r = _Reader(payload, topic)
    else:
        r = _Reader(payload, topic)
    return _read_chunk(r, lambda: r.opt_base64("data") if data_text is None else r.base64_text("data", data_text))


def _read_chunk(r: _Reader, data: Callable[[], bytes]) -> ChunkMessage:
    """The fields every chunk has; `data` is read once they are valid."""
    total = r.req_int("total_chunks", minimum=1)
    idx = r.req_int("chunk_idx", minimum=0)
    if idx >= total:
        raise r.fail(f"chunk_idx {idx} is not below total_chunks {total}")
    digest = r.opt_str("digest")
    if digest and not _is_sha256_digest(digest):
        raise r.fail("field 'digest' must look like sha256:<64 hex digits>")
    return ChunkMessage(
        app_name=r.req_str("app_name"),
        chunk_idx=idx,
        total_chunks=total,
        data=data(),
        digest=digest,
        size=r.opt_int("size", 0, minimum=0) or 0,
        error=r.opt_str("error"),
    )


# A binary chunk (`registry/server/binary`) is the JSON chunk's fields but `data` on one line, a
# newline, then the chunk's bytes as they are: 25% fewer bytes on the wire than base64 and nothing
# to decode. JSON never needs a raw newline, so the first one ends the header.
_BINARY_HEAD_MAX = 64 * 1024


def encode_binary_chunk(msg: ChunkMessage) -> bytes:
    head: dict[str, Any] = {"app_name": msg.app_name, "chunk_idx": msg.chunk_idx, "total_chunks": msg.total_chunks}
    _put_if(head, "digest", msg.digest)
    _put_if(head, "size", msg.size)
    _put_if(head, "error", msg.error)
    return b"".join((_dumps(head), b"\n", msg.data))


def decode_binary_chunk(payload: bytes, topic: str = "registry/server/binary") -> ChunkMessage:
    chunk = decode_binary_chunk_for(None, payload, topic)
    assert chunk is not None
    return chunk


def decode_binary_chunk_for(refs: Container[str] | None, payload: bytes,
                            topic: str = "registry/server/binary") -> ChunkMessage | None:
    """A binary chunk, or None when its `app_name` is not in `refs` (its data is not copied)."""
    end = payload.find(b"\n", 0, _BINARY_HEAD_MAX)
    if end < 0:
        raise InvalidMessage(topic, "a binary chunk must start with a JSON header line ended by a newline")
    r = _Reader(payload[:end], topic)
    name = r.obj.get("app_name")
    if refs is not None and not (isinstance(name, str) and name in refs):
        return None
    if "data" in r.obj:
        raise r.fail("a binary chunk carries its data after the header line, not in a 'data' field")
    # A view, not a copy: a transfer keeps the chunk until the module is joined.
    return _read_chunk(r, lambda: memoryview(payload)[end + 1:])


# ---------------------------------------------------------------------------------------------
# helpers


def parse_timestamp(value: Any) -> datetime | None:
    """A metrics timestamp as sent by either upstream proplet, or None when it is unusable.

    RFC 3339 strings and serde's `{"secs_since_epoch", "nanos_since_epoch"}` are real times; a bare
    number is the embedded proplet's uptime in ms and says nothing about wall-clock time.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        # Go's RFC3339Nano may carry 9 fractional digits; Python parses at most 6.
        if "." in text:
            head, _, tail = text.partition(".")
            digits = "".join(c for c in tail if c.isdigit())
            zone = tail[len(digits):]
            text = f"{head}.{digits[:6]}{zone}" if digits else head + zone
        try:
            ts = datetime.fromisoformat(text)
        except ValueError:
            return None
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    if isinstance(value, dict):
        secs = value.get("secs_since_epoch")
        nanos = value.get("nanos_since_epoch", 0)
        if isinstance(secs, int) and isinstance(nanos, int) and not isinstance(secs, bool):
            try:
                return datetime.fromtimestamp(secs + nanos / 1e9, UTC)
            except (OverflowError, OSError, ValueError):
                return None
    return None


def sha256_digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def split_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if not data:
        return [b""]
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
