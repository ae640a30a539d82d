"""Request bodies shared by the REST API and the console, validated in one place."""

from __future__ import annotations

import binascii
import math
import re
import uuid
from typing import Any, Literal

import orjson
import pybase64
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.domain import WASM_MAGIC, Task, TaskLimits, new_task_id
from core.errors import InvalidRequest

MAX_METADATA_BYTES = 1024 * 1024


class LimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float | None = Field(default=None, gt=0, description="Wall-clock limit in seconds.")
    # Bounded by what the stores and the wire hold (64-bit integers).
    fuel: int | None = Field(default=None, gt=0, le=2**63 - 1, description="Instruction budget (wasmtime fuel).")
    memory_bytes: int | None = Field(default=None, gt=0, le=2**63 - 1,
                                     description="Largest linear memory in bytes.")

    def to_domain(self) -> TaskLimits:
        return TaskLimits(self.timeout_s, self.fuel, self.memory_bytes)


def _inputs_as_text(value: Any) -> Any:
    """Upstream's FlexStrings: strings stay, numbers keep their literal text (5 -> "5")."""
    if value is None:
        return []
    if not isinstance(value, list):
        return value
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))  # the literal, however large (orjson stops at 64 bits)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"inputs[{i}]: {item} is not a number a task can take")
            out.append(orjson.dumps(item).decode())
        else:
            raise ValueError(f"inputs[{i}]: expected string or number")
    return out


def decode_module(text: str, field_name: str = "file") -> bytes:
    # pybase64, as strict as the standard library's and ~20x faster: a task's module is decoded up
    # to three times while its body is validated, and the standard decoder took 3.2 ms per MiB.
    try:
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"'{field_name}' must be standard base64") from None
    if data and not data.startswith(WASM_MAGIC):
        raise ValueError(f"'{field_name}' is not a WebAssembly module (it does not start with \\0asm)")
    return data


# Workflow and job ids: chosen by clients (upstream keeps a client-supplied one), and they appear
# in URLs and Location headers.
GROUP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")


def _check_group_id(value: str) -> str:
    if value and not GROUP_ID.fullmatch(value):
        raise ValueError("must be 1 to 200 letters, digits, '.', '_', ':', '@' or '-', starting with a "
                         "letter or digit (a UUID, say)")
    return value


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    """Metadata is stored as JSON: it must encode (integers within 64 bits) and stay under 1 MiB."""
    if metadata is None:
        return
    try:
        size = len(orjson.dumps(metadata))
    except TypeError as exc:
        raise ValueError(f"'metadata' cannot be stored: {exc} (integers must fit in 64 bits)") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError("'metadata' is larger than 1 MiB")


def _check_no_nul(model: BaseModel, exclude: set[str]) -> None:
    """PostgreSQL stores no NUL character in text or JSON: refuse it here, for every backend alike."""
    try:
        encoded = orjson.dumps(model.model_dump(exclude=exclude))
    except TypeError as exc:
        raise ValueError(f"a value cannot be stored: {exc} (integers must fit in 64 bits)") from None
    if b"\\u0000" in encoded:
        raise ValueError("text fields (name, inputs, env, metadata, ...) must not contain the NUL character")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class TaskCreate(BaseModel):
    """A new task. Unknown fields are ignored, as upstream does."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(default="", max_length=200, description="Kept in workflows and jobs only, where "
                    "'depends_on' names other tasks by id; a task created alone always gets a new id.")
    name: str = Field(min_length=1, description="Export to call (for a WASI command: _start or main).")
    kind: Literal["standard", "federated"] = "standard"
    image_url: str = Field(default="", description="OCI reference (via the proxy) or http(s):// URL of the module.")
    file: str = Field(default="", description="The module inline, standard base64.")
    inputs: list[str] = Field(default_factory=list, description="Arguments; numbers are accepted and kept as text.")
    env: dict[str, str] = Field(default_factory=dict)
    cli_args: list[str] | None = None
    daemon: bool = False
    latent: bool = False
    encrypted: bool = False
    kbs_resource_path: str = ""
    proplet_id: str = Field(default="", description="Pin the task to this proplet.")
    broadcast: bool = Field(default=False, description="Run on every live proplet.")
    priority: int = Field(default=50, ge=0, le=100, description="0..100, higher first; 0 means the default 50.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    monitoring_profile: dict[str, Any] | None = None
    hal_storage_path: str | None = None
    mode: Literal["", "infer", "train"] = ""
    depends_on: list[str] = Field(default_factory=list, description="Ids of tasks of the same workflow or "
                                  "job that must finish first.")
    run_if: Literal["", "success", "failure"] = Field(
        default="", description="When a dependent task runs: 'success' (the default) if every dependency "
        "completed, 'failure' if one failed; otherwise it is skipped.")
    workflow_id: str = ""
    job_id: str = ""
    schedule: str = Field(default="", description="Cron expression (5 fields, or @hourly, @daily, ...): "
                          "the task is started at the times it names.")
    is_recurring: bool = Field(default=False, description="Run at every time of the schedule, not only the next.")
    timezone: str = Field(default="", description="IANA zone the schedule is read in (default UTC).")
    limits: LimitsBody = Field(default_factory=LimitsBody)
    max_retries: int = Field(default=0, ge=0, le=100, description="Retries on another proplet when one goes offline.")
    wasm_digest: str = Field(
        default="",
        description="sha256:<hex> the module must have. Pins an image_url to exact bytes (and lets the manager "
        "sign it); for an inline file it must match.",
    )

    @field_validator("id")
    @classmethod
    def _id_is_uuid(cls, value: str) -> str:
        if value and not _is_uuid(value):
            raise ValueError("'id' must be a UUID (task ids are UUIDs)")
        return value

    @field_validator("depends_on")
    @classmethod
    def _dependencies_are_task_ids(cls, value: list[str]) -> list[str]:
        bad = [d for d in value if not _is_uuid(d)]
        if bad:
            raise ValueError(f"'depends_on' names tasks of the same workflow or job by their ids (UUIDs); "
                             f"{bad[0]!r} is not one")
        return value

    @field_validator("workflow_id", "job_id")
    @classmethod
    def _group_id(cls, value: str) -> str:
        return _check_group_id(value)

    @field_validator("wasm_digest")
    @classmethod
    def _digest_shape(cls, value: str) -> str:
        if value and (not value.startswith("sha256:") or len(value) != 71
                      or any(c not in "0123456789abcdef" for c in value[7:])):
            raise ValueError("'wasm_digest' must be sha256: followed by 64 lower-case hex digits")
        return value

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        return _inputs_as_text(value)

    @field_validator("file")
    @classmethod
    def _file_is_wasm(cls, value: str) -> str:
        if value:
            decode_module(value)
        return value

    @field_validator("image_url")
    @classmethod
    def _image_url_plain(cls, value: str) -> str:
        if value != value.strip() or any(c.isspace() for c in value):
            raise ValueError("'image_url' must not contain whitespace")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TaskCreate:
        if self.proplet_id and self.broadcast:
            raise ValueError("'proplet_id' and 'broadcast' cannot both be set: pin the task or broadcast it")
        _check_metadata(self.metadata)
        _check_no_nul(self, exclude={"file"})
        if self.encrypted and self.file:
            raise ValueError("an encrypted task takes its module from 'image_url', not 'file'")
        if self.file and self.image_url:
            raise ValueError("give the module either inline ('file') or by reference ('image_url'), not both")
        if self.file and self.wasm_digest:
            from core.protocol import sha256_digest

            actual = sha256_digest(decode_module(self.file))
            if actual != self.wasm_digest:
                raise ValueError(f"'wasm_digest' is {self.wasm_digest} but the file's sha256 is {actual}")
        return self

    def to_task(self) -> Task:
        data = decode_module(self.file) if self.file else b""
        from core.protocol import sha256_digest

        return Task(
            id=new_task_id(), name=self.name, kind=self.kind, image_url=self.image_url, file=data,
            wasm_digest=sha256_digest(data) if data else self.wasm_digest, cli_args=self.cli_args,
            inputs=list(self.inputs), env=dict(self.env), daemon=self.daemon, latent=self.latent,
            encrypted=self.encrypted, kbs_resource_path=self.kbs_resource_path,
            proplet_id=self.proplet_id, pinned=bool(self.proplet_id), broadcast=self.broadcast,
            priority=self.priority or 50, metadata=dict(self.metadata),
            monitoring_profile=self.monitoring_profile, hal_storage_path=self.hal_storage_path,
            mode=self.mode, depends_on=list(self.depends_on), run_if=self.run_if, workflow_id=self.workflow_id,
            job_id=self.job_id,
            limits=self.limits.to_domain(), max_retries=self.max_retries,
        )


class TaskUpdate(BaseModel):
    """A partial update: only the fields present change. Not allowed while the task runs."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = Field(default=None, min_length=1)
    image_url: str | None = None
    file: str | None = None
    inputs: list[str] | None = None
    env: dict[str, str] | None = None
    cli_args: list[str] | None = None
    daemon: bool | None = None
    latent: bool | None = None
    proplet_id: str | None = None
    broadcast: bool | None = None
    priority: int | None = Field(default=None, ge=0, le=100)
    metadata: dict[str, Any] | None = None
    limits: LimitsBody | None = None
    max_retries: int | None = Field(default=None, ge=0, le=100)
    # Absent: the schedule stays as it is (upstream clears it); "" removes it.
    schedule: str | None = None
    is_recurring: bool | None = None
    timezone: str | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        return None if value is None else _inputs_as_text(value)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        _check_metadata(value)
        return value

    @field_validator("file")
    @classmethod
    def _file_is_wasm(cls, value: str | None) -> str | None:
        if value:
            decode_module(value)
        return value

    @model_validator(mode="after")
    def _storable(self) -> TaskUpdate:
        _check_no_nul(self, exclude={"file"})
        return self

    def apply(self, task: Task) -> None:
        from core.protocol import sha256_digest

        fields = self.model_fields_set
        if "name" in fields and self.name:
            task.name = self.name
        if "image_url" in fields and self.image_url is not None:
            task.image_url = self.image_url
        if "file" in fields and self.file is not None:
            task.file = decode_module(self.file) if self.file else b""
            task.wasm_digest = sha256_digest(task.file) if task.file else ""
        for name in ("inputs", "env", "daemon", "latent", "metadata", "max_retries"):
            if name in fields and getattr(self, name) is not None:
                setattr(task, name, getattr(self, name))
        if "cli_args" in fields:
            task.cli_args = self.cli_args
        if "priority" in fields and self.priority is not None:
            task.priority = self.priority or 50
        if "limits" in fields and self.limits is not None:
            task.limits = self.limits.to_domain()
        if "proplet_id" in fields and self.proplet_id is not None:
            task.proplet_id = self.proplet_id
            task.pinned = bool(self.proplet_id)
        if "broadcast" in fields and self.broadcast is not None:
            task.broadcast = self.broadcast
        if task.pinned and task.broadcast:
            raise InvalidRequest("'proplet_id' and 'broadcast' cannot both be set: pin the task or broadcast it")


class InvokeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        return _inputs_as_text(value)


def parse_task_create(body: dict[str, Any]) -> TaskCreate:
    """Validate a create request from a non-HTTP caller (console), raising InvalidRequest."""
    from pydantic import ValidationError

    try:
        return TaskCreate.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(format_validation_error(exc)) from None


def format_validation_error(exc: Any) -> str:
    """Pydantic's error list as one readable sentence."""
    parts = []
    for err in exc.errors():
        where = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            # FastAPI's location is ("body", <character offset>): it read as "1: JSON decode error".
            reason = (err.get("ctx") or {}).get("error") or "JSON decode error"
            at = f" (at character {where[-1]})" if where and isinstance(where[-1], int) else ""
            parts.append(f"the body is not valid JSON: {reason}{at}")
            continue
        if where == ("body",) and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the body must be a JSON object")
            continue
        loc = ".".join(str(p) for p in where if p not in ("body",))
        msg = err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


class WorkflowCreate(BaseModel):
    """POST /workflows: tasks whose `depends_on` name each other by `id`. Nothing is started: start
    the roots (POST /tasks/{id}/start); each dependent starts, or is skipped by its `run_if`, once
    its dependencies have finished."""

    model_config = ConfigDict(extra="ignore")

    tasks: list[TaskCreate] = Field(min_length=1, max_length=1000)


class JobCreate(BaseModel):
    """POST /jobs: a named group of tasks started together (POST /jobs/{id}/start)."""

    model_config = ConfigDict(extra="ignore")

    name: str = ""
    tasks: list[TaskCreate] = Field(min_length=1, max_length=1000)
    execution_mode: Literal["", "parallel", "sequential", "configurable"] = Field(
        default="", description="parallel: every task without dependencies at once, dependents as their "
        "dependencies finish; sequential: one after another, each once the one before completed; "
        "configurable: as parallel (the dependencies decide the order). Empty: parallel.")

    @field_validator("execution_mode", mode="before")
    @classmethod
    def _trimmed(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


# ---- federated learning (core/federated.py) ----------------------------------------------------

# An update's weights are JSON numbers (or lists of them): they are stored and averaged, so they must
# encode, and the whole update stays well below what a round keeps in memory per proplet.
MAX_FL_UPDATE_BYTES = 16 * 1024 * 1024


class ExperimentConfig(BaseModel):
    """POST /fl/experiments (upstream's ExperimentConfig): start one training round on the
    participants that are online. The round's tasks run `task_wasm_image` (or, an extension, the
    module inline in `task_wasm_file`) with ROUND_ID, MODEL_URI and HYPERPARAMS in their env."""

    model_config = ConfigDict(extra="ignore")

    experiment_id: str = Field(default="", description="Groups rounds; defaults to the round id.")
    round_id: str = Field(min_length=1, description="Names the round; unique.")
    model_ref: str = Field(min_length=1, description="The model the round starts from, e.g. global_model_v0 "
                           "(the version is the trailing number).")
    participants: list[str] = Field(min_length=1, max_length=10_000, description="Proplet ids asked to train.")
    hyperparams: dict[str, Any] = Field(default_factory=dict, description="Passed to each task as HYPERPARAMS (JSON).")
    k_of_n: int = Field(default=0, ge=0, le=10_000, description="Updates that complete the round (0: one from "
                        "every participant that was started).")
    timeout_s: float = Field(default=300.0, gt=0, le=7 * 24 * 3600, description="Seconds the round waits for "
                             "updates; it then aggregates those it has, or fails with none.")
    task_wasm_image: str = Field(default="", description="OCI reference or http(s):// URL of the training module.")
    task_wasm_file: str = Field(default="", description="The training module inline, standard base64 (extension).")
    initial_model: dict[str, Any] | None = Field(default=None, description="The weights of model_ref's version, "
                                                 "stored if that version is not (extension).")

    @field_validator("experiment_id", "round_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _check_group_id(value)

    @field_validator("participants")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("'participants' holds proplet ids, and an empty one names none")
        return list(dict.fromkeys(value))

    @field_validator("task_wasm_file")
    @classmethod
    def _file_is_wasm(cls, value: str) -> str:
        if value:
            decode_module(value, "task_wasm_file")
        return value

    @field_validator("task_wasm_image")
    @classmethod
    def _image_plain(cls, value: str) -> str:
        if any(c.isspace() for c in value):
            raise ValueError("'task_wasm_image' must not contain whitespace")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if bool(self.task_wasm_image) == bool(self.task_wasm_file):
            raise ValueError("give the training module as 'task_wasm_image' (a reference) or 'task_wasm_file' "
                             "(base64), one of the two")
        if self.k_of_n > len(self.participants):
            raise ValueError(f"'k_of_n' is {self.k_of_n} but there are only {len(self.participants)} participants")
        _check_no_nul(self, exclude={"task_wasm_file"})
        if self.initial_model is not None:
            _check_update_values(self.initial_model, "initial_model")
        return self


class FLUpdate(BaseModel):
    """A participant's update (upstream's FLUpdate): POST /fl/update, CBOR at /fl/update_cbor, the
    unprefixed MQTT topic fl/rounds/<round>/updates/<proplet>, or a round task's result envelope."""

    model_config = ConfigDict(extra="ignore")

    round_id: str = Field(min_length=1)
    proplet_id: str = Field(default="", description="Who trained it; required to tell participants apart.")
    base_model_uri: str = ""
    num_samples: int = Field(default=1, ge=0, le=2**53, description="Weight in the federated average.")
    metrics: dict[str, Any] = Field(default_factory=dict)
    update: dict[str, Any] = Field(description="The trained weights: numbers or lists of numbers by name.")
    received_at: str = ""

    @field_validator("update")
    @classmethod
    def _update_not_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("'update' is empty: send the trained weights")
        _check_update_values(value, "update")
        return value

    @model_validator(mode="after")
    def _storable(self) -> FLUpdate:
        if not self.proplet_id:
            raise ValueError("'proplet_id' is required: it tells the round's participants apart")
        _check_no_nul(self, exclude=set())
        return self


def _check_update_values(value: dict[str, Any], field_name: str) -> None:
    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:
        raise ValueError(f"'{field_name}' cannot be stored: {exc} (integers must fit in 64 bits)") from None
    if len(encoded) > MAX_FL_UPDATE_BYTES:
        raise ValueError(f"'{field_name}' is larger than {MAX_FL_UPDATE_BYTES // (1024 * 1024)} MiB")
    if not _all_finite(value):
        raise ValueError(f"'{field_name}' holds a non-finite number (NaN or infinity), which cannot be averaged")


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True
