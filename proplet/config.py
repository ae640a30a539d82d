"""Proplet configuration: upstream's `PROPLET_*` variables, the `proplet:` section of the YAML config
file, upstream's TOML credentials file when `PROPLET_CONFIG_FILE` names one, and defaults.

Durations accept plain seconds or a unit (`30s`, `500ms`, `2m`): upstream silently keeps its default
for `30s` (defect 44), which misleads operators.

The settings are a msgspec Struct, not pydantic settings as the manager's are: the proplet runs on
small edge boxes, and pydantic is ~9.5 MB of an idle proplet's memory (msgspec ~1.3 MB).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import typing
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from core import paths
from core.mqtt import MqttClientOptions

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration: use seconds (10) or a unit (10s, 500ms, 2m)")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return value


def _split(value: Any, sep: str) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


# The words pydantic (the manager's settings) accepts for booleans, so both read a file alike.
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _boolean(value: Any) -> Any:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    return value


def total_memory() -> int:
    """This machine's physical memory in bytes (0 if the system will not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _half_the_memory() -> int:
    return total_memory() // 2 or 4 * 1024**3  # unknown: wasm32's own ceiling


def _an_eighth_of_the_memory_up_to_1_gib() -> int:
    return min(total_memory() // 8 or 256 * 1024**2, 1024**3)


def a_tenth_of_the_disk_up_to_1_gib(path: Path) -> int:
    """The default bound of the module cache: a tenth of the file system that holds `path` (or
    would, once created), at most 1 GiB, as wasmtime's own cache."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        size = shutil.disk_usage(existing).total
    except OSError:
        size = 0
    return min(size // 10 or 1024**3, 1024**3)


class PropletSettings(msgspec.Struct, MqttClientOptions, kw_only=True):
    """Everything `propeller proplet` reads. Names and meanings follow upstream's Rust proplet.

    `PropletSettings.load(**overrides)` reads the environment and the files; the plain constructor
    takes the given values and defaults only, unchecked (tests and embedding code)."""

    ENV_PREFIX: ClassVar[str] = "PROPLET_"
    CONFIG_SECTION: ClassVar[str] = "proplet"

    # The mqtt_* fields mirror core.config.MqttClientSettings (the manager's and proxy's): change both.
    mqtt_address: Annotated[str | None, Meta(
        description="Broker URL: mqtt://host:port (or tcp://), mqtts://host:port (or ssl://, tls://). The default "
        "is where a manager run with no broker configured has its in-process broker, on the same machine.",
    )] = "mqtt://localhost:1883"
    mqtt_qos: Annotated[Literal[0, 1, 2], Meta(
        description="QoS of publishes and subscriptions, except heartbeats, metrics, task_state and result_ack, "
        "which go at 0 (the next one, or an acknowledgement, repairs a loss). 1 (at least once) with idempotent "
        "handlers is the default; upstream defaults to 2.",
    )] = 1
    mqtt_keep_alive: Annotated[int, Meta(ge=2, description="MQTT keep-alive in seconds.")] = 30
    mqtt_timeout: Annotated[float, Meta(
        gt=0, description="Seconds to wait for a connection or a publish before giving up.")] = 30.0
    mqtt_tls_ca_cert: Annotated[str | None, Meta(description="PEM file of the CA that signed the broker.")] = None
    mqtt_tls_client_cert: Annotated[str | None, Meta(description="PEM client certificate (mutual TLS).")] = None
    mqtt_tls_client_key: Annotated[str | None, Meta(description="PEM key of the client certificate.")] = None
    mqtt_tls_insecure_skip_verify: Annotated[bool, Meta(
        description="Accept any broker certificate (testing only).")] = False
    tenant_id: Annotated[str, Meta(description="Domain of the MQTT topics; must match the manager's.")] = "propeller"
    channel_id: Annotated[str, Meta(description="Channel of the MQTT topics; must match the manager's.")] = "default"
    entity_id: Annotated[str, Meta(
        description="This proplet's id (MQTT client id and username). Empty: one is generated once and kept "
        "in the state directory, so a second proplet on the machine needs an id of its own (one started with "
        "the id of a running one refuses to start).",
    )] = ""
    api_key: Annotated[str, Meta(description="MQTT password.")] = ""
    log_level: Annotated[str, Meta(description="debug, info, warning or error.")] = "info"
    liveliness_interval: Annotated[float, Meta(gt=0, description="Seconds between heartbeats.")] = 10.0
    metrics_interval: Annotated[float, Meta(
        ge=0, description="Seconds between metrics reports; 0 disables them.")] = 10.0
    enable_monitoring: Annotated[bool, Meta(
        description="Send each task's metrics (control/proplet/task_metrics: CPU, memory, disk, threads) while it "
        "runs, from 100 ms after it began, every interval of its monitoring_profile (10 s; daemons 120 s); "
        "false: none.",
    )] = True
    metrics_enabled: Annotated[bool, Meta(
        description="Serve Prometheus metrics (GET /metrics, upstream's proplet_* names) and GET /health over "
        "HTTP, as upstream's proplet does. A port in use is logged and the proplet runs without them.",
    )] = True
    metrics_port: Annotated[int, Meta(ge=1, le=65535, description="Port of /metrics and /health.")] = 9092
    metrics_host: Annotated[str, Meta(
        description="Address /metrics and /health listen on (upstream: all interfaces); 127.0.0.1 keeps them "
        "on this machine.")] = "0.0.0.0"
    external_wasm_runtime: Annotated[str, Meta(
        description="Path or name of a wasmtime CLI to run modules with, instead of the internal runtime (one not "
                    "found, or that does not answer `--version` as wasmtime, is logged and the internal runtime used).",
    )] = ""
    dirs: Annotated[list[str], Meta(
        description="':'-separated host directories a task may use (preopened at the same path). Nothing else "
        "of the host file system is visible to guests; a task asking (`--dir`) for another one is not run here, "
        "naming it: this project's manager sends it to another proplet (it fails if pinned here or none can run it).",
    )] = msgspec.field(default_factory=list)
    tags: Annotated[list[str], Meta(description="Comma-separated tags (discovery).")] = msgspec.field(
        default_factory=list)
    description: Annotated[str, Meta(description="Free text shown in the proplet list (discovery).")] = ""
    location: Annotated[str, Meta(description="Where the proplet is (discovery).")] = ""
    manager_k8s_namespace: Annotated[str, Meta(description="The `namespace` field of messages.")] = "default"
    collect_system_info: Annotated[bool, Meta(
        description="Put os, hostname, arch, memory, ip in discovery.")] = True
    max_concurrent_tasks: Annotated[int, Meta(
        ge=1, description="Modules running at once. Default: 2 x the CPUs (the figure shown is this machine's).",
    )] = msgspec.field(
        default_factory=lambda: (os.cpu_count() or 1) * 2)
    max_queued_tasks: Annotated[int, Meta(
        ge=0,
        description="Starts the manager may send beyond the running slots; they wait here for a free slot, so "
        "the proplet is not idle for a round trip to the manager between short tasks. Announced in discovery. "
        "Default: 3 x max_concurrent_tasks; 0: only as many as can run at once (long tasks on a busy fleet).",
    )] | None = None
    trusted_keys: Annotated[list[Path], Meta(
        description="':'-separated Ed25519 public keys (PEM). When set, only modules whose digest the manager "
        "signed with one of these keys run.",
    )] = msgspec.field(default_factory=list)
    allow_network: Annotated[bool, Meta(
        description="Let tasks that ask for it (`-S http` in their cli_args) make outgoing HTTP requests. Without it "
        "such a task is not run here, saying so: this project's manager sends it to another proplet.",
    )] = False
    http_enabled: Annotated[bool, Meta(
        description="Let daemon tasks serve wasi:http components (needs PROPLET_EXTERNAL_WASM_RUNTIME).",
    )] = False
    http_proxy_port: Annotated[int, Meta(
        ge=1, le=65535, description="First port tried for a served wasi:http component: each daemon task takes "
        "the first free one from here (the task's result names it).")] = 8222
    task_timeout: Annotated[float, Meta(
        gt=0, description="Wall-clock limit of a task that sets none (seconds).")] = 300.0
    task_memory_limit: Annotated[int, Meta(
        gt=0, description="Linear-memory limit of a task that sets none (bytes).")] = 256 * 1024 * 1024
    task_memory_max: Annotated[int, Meta(
        gt=0, description="Largest linear-memory limit a task may set (limits.memory_bytes, bytes); a task asking "
        "for more is not run here, naming both (this project's manager sends it to another proplet). Default: half "
        "this machine's memory (the figure shown is this machine's).",
    )] = msgspec.field(default_factory=_half_the_memory)
    wasm_fetch_max_bytes: Annotated[int, Meta(gt=0, description=(
        "Largest module fetched (bytes), announced to the manager as max_module_bytes; a task with a larger module "
        "is not run here (this project's manager sends it to another proplet)."))] = 104_857_600
    http_tls_ca_cert: Annotated[str | None, Meta(description="CA bundle for https module URLs.")] = None
    http_tls_insecure_skip_verify: Annotated[bool, Meta(description="Do not verify https certificates.")] = False
    chunk_stall_timeout: Annotated[float, Meta(
        gt=0, description="Seconds without a chunk before asking again for the missing ones.")] = 10.0
    outbox_max: Annotated[int, Meta(
        ge=1, description="Results kept until the manager confirms them; when full, new tasks are refused.",
    )] = 100_000
    outbox_max_bytes: Annotated[int, Meta(
        ge=1, description="Bytes of results kept until the manager confirms them (in memory and on disk); "
                          "when exceeded, new tasks are refused.",
    )] = 32 * 1024 * 1024
    outbox_fsync: Annotated[bool, Meta(
        description="Flush each result to disk (survives power loss, costs a disk flush per result).",
    )] = False
    result_resend: Annotated[float, Meta(gt=0, description="Seconds before an unconfirmed result is sent again.")] = 5.0
    shutdown_grace: Annotated[float, Meta(
        ge=0, description="On SIGTERM or SIGINT: seconds the running tasks get to finish, while the proplet takes no "
        "new task (its heartbeats say it is shutting down). Tasks still running then, and those that were not yet "
        "running, are given back to the manager, which runs them again (upstream's manager, which cannot, gets "
        "them failed, saying why). A second signal stops at once. 0: give them back at once.",
    )] = 20.0
    cache_dir: Annotated[Path, Meta(description="Where compiled modules are kept between runs.")] = msgspec.field(
        default_factory=lambda: paths.cache_dir() / "proplet")
    compiled_cache_max_bytes: Annotated[int, Meta(
        gt=0, description="Compiled code kept in memory for the next runs (bytes; least recently used dropped, the "
        "copy in cache_dir stays): a 10 MiB module holds 10-20 MiB while kept. Default: an eighth of this "
        "machine's memory, at most 1 GiB (the figure shown is this machine's).",
    )] = msgspec.field(default_factory=_an_eighth_of_the_memory_up_to_1_gib)
    cache_max_bytes: Annotated[int, Meta(
        gt=0, description="Bytes of modules and compiled code kept in cache_dir; the modules run least recently "
        "are removed first (and fetched again when a task needs them). Default: a tenth of the file system that "
        "holds cache_dir, at most 1 GiB.",
    )] | None = None
    state_dir: Annotated[Path, Meta(
        description="Where the generated entity id and the result outbox are kept.")] = msgspec.field(
        default_factory=lambda: paths.state_dir() / "proplet")

    _DURATIONS: ClassVar[frozenset[str]] = frozenset(
        {"liveliness_interval", "metrics_interval", "task_timeout", "chunk_stall_timeout", "result_resend",
         "shutdown_grace"})
    _COLON_LISTS: ClassVar[frozenset[str]] = frozenset({"dirs", "trusted_keys"})
    _COMMA_LISTS: ClassVar[frozenset[str]] = frozenset({"tags"})

    def __post_init__(self) -> None:
        if not self.entity_id:
            self.entity_id = generated_entity_id(self.state_dir)

    @property
    def disk_cache_bytes(self) -> int:
        """`cache_max_bytes`, or its default for cache_dir's file system."""
        if self.cache_max_bytes is not None:
            return self.cache_max_bytes
        return a_tenth_of_the_disk_up_to_1_gib(self.cache_dir)

    @property
    def queued_tasks(self) -> int:
        """`max_queued_tasks`, or its default of 3 x the running slots."""
        if self.max_queued_tasks is not None:
            return self.max_queued_tasks
        return 3 * self.max_concurrent_tasks

    @classmethod
    def load(cls, **overrides: Any) -> PropletSettings:
        """Settings from, highest priority first: `overrides` (None = not given), `PROPLET_*` variables,
        upstream's TOML file, the config file's `proplet:` section, defaults. Raises ValueError
        naming the variable when a value is invalid."""
        names = _FIELD_KINDS.keys()
        values: dict[str, Any] = {}
        values.update(_yaml_section(cls.CONFIG_SECTION, names))
        values.update(_upstream_toml())
        prefix = cls.ENV_PREFIX
        for var, text in os.environ.items():  # case-insensitive, as pydantic-settings reads the manager's
            if var.upper().startswith(prefix) and (name := var[len(prefix):].lower()) in names:
                values[name] = text
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name, value in list(values.items()):
            try:
                values[name] = cls._prepare(name, value)
            except ValueError as exc:
                raise ValueError(f"{prefix}{name.upper()}: {exc}") from None
        try:
            return msgspec.convert(values, cls, strict=False, dec_hook=_decode_path)
        except msgspec.ValidationError as exc:
            raise ValueError(_explain(str(exc), prefix, values)) from None

    @classmethod
    def _prepare(cls, name: str, value: Any) -> Any:
        if name in cls._DURATIONS:
            return parse_duration(value)
        if name in cls._COLON_LISTS:
            return _split(value, ":")
        if name in cls._COMMA_LISTS:
            return _split(value, ",")
        if name == "mqtt_qos" and isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if _FIELD_KINDS.get(name) is bool:
            return _boolean(value)
        return value

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) rows for --help texts."""
        rows = []
        for field in msgspec.structs.fields(cls):
            hint = _HINTS[field.name]
            # `Annotated[int, Meta(...)] | None` keeps its Meta one level down.
            annotated = [hint, *typing.get_args(hint)] if typing.get_origin(hint) is not Annotated else [hint]
            meta = [m for a in annotated for m in getattr(a, "__metadata__", ()) if isinstance(m, Meta)]
            description = meta[0].description if meta and meta[0].description else ""
            value = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
            if value is None:
                default = "(unset)"
            elif value == []:
                default = "(none)"
            else:
                default = str(value)
            rows.append((f"{cls.ENV_PREFIX}{field.name.upper()}", default, description))
        return rows


# Upstream's proplet variables this proplet does not act on, and why (said at start when one is set).
UPSTREAM_ONLY = {
    "MQTT_MAX_PACKET_SIZE": "a module too big for one message comes in chunks instead",
    "MQTT_INFLIGHT": "paho keeps its own window of unacknowledged messages",
    "MQTT_REQUEST_CHANNEL_CAPACITY": "messages go straight to the MQTT client here",
    "KBS_URI": "this proplet has no TEE runtime: it does not run encrypted tasks, saying so",
    "AA_CONFIG_PATH": "this proplet has no TEE runtime",
    "LAYER_STORE_PATH": "this proplet has no TEE runtime",
    "PULL_CONCURRENT_LIMIT": "this proplet has no TEE runtime",
    "HAL_ENABLED": "this proplet gives guests no HAL",
    "USB_ENABLED": "this proplet gives guests no USB",
    "PLUGIN_DIR": "this proplet loads no plugins",
    "OTEL_URL": "this proplet exports no traces (each message carries the task's traceparent)",
    "TRACE_RATIO": "this proplet exports no traces",
}
# Read by other parts than the settings.
_READ_ELSEWHERE = {"CONFIG_FILE", "CONFIG_SECTION"}


def unused_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A sentence for each PROPLET_* variable set that no setting reads: upstream's that do nothing
    here, and the rest, most likely misspelt (with the nearest setting's name)."""
    prefix = PropletSettings.ENV_PREFIX
    settings = [name.upper() for name in _FIELD_KINDS]
    out = []
    for var in sorted(os.environ if environ is None else environ):
        name = var.upper()[len(prefix):] if var.upper().startswith(prefix) else None
        if name is None or name in settings or name in _READ_ELSEWHERE:
            continue
        if name in UPSTREAM_ONLY:
            out.append(f"{var} (upstream's) has no effect here: {UPSTREAM_ONLY[name]}.")
            continue
        import difflib  # only for a variable no setting reads: ~0.2 MB of every idle proplet otherwise

        near = difflib.get_close_matches(name, settings, n=1, cutoff=0.75)
        hint = f" Did you mean {prefix}{near[0]}?" if near else ""
        out.append(f"{var} is not a setting of this proplet and is ignored.{hint} "
                   "`propeller proplet --help` lists them.")
    return out


# Each field's annotation (with its Meta), and its type without the Meta.
_HINTS: dict[str, Any] = typing.get_type_hints(PropletSettings, include_extras=True)
_FIELD_KINDS: dict[str, Any] = {
    field.name: typing.get_args(_HINTS[field.name])[0] if typing.get_origin(_HINTS[field.name]) is Annotated
    else _HINTS[field.name]
    for field in msgspec.structs.fields(PropletSettings)
}


def _decode_path(kind: type, value: Any) -> Any:
    if kind is not Path:
        raise NotImplementedError
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise TypeError(f"expected a path, got {type(value).__name__}")


def _explain(message: str, prefix: str, values: dict[str, Any]) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.max_concurrent_tasks`" as "PROPLET_MAX_CONCURRENT_TASKS=0:
    expected `int` >= 1"."""
    text, sep, where = message.rpartition(" - at `$.")
    if not sep:
        return message
    name = where.split("`")[0].split("[")[0]
    choices = typing.get_args(_FIELD_KINDS.get(name)) if typing.get_origin(_FIELD_KINDS.get(name)) is Literal else ()
    if choices:
        text = "must be one of " + ", ".join(map(str, choices))
    return f"{prefix}{name.upper()}={values.get(name)!r}: {text[:1].lower()}{text[1:]}"


def _yaml_section(section: str, names: Collection[str]) -> dict[str, Any]:
    """The given section of the config file (known keys only), or nothing when the file or section is absent."""
    path = paths.default_config_file()
    if not path.is_file():
        return {}
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    part = doc.get(section) if isinstance(doc, dict) else None
    if not isinstance(part, dict):
        return {}
    return {k: v for k, v in part.items() if k in names}


def _upstream_toml() -> dict[str, Any]:
    """Upstream's credentials file: TOML `PROPLET_CONFIG_FILE`, section `PROPLET_CONFIG_SECTION`
    (default `proplet`), keys tenant_id, entity_id, api_key, channel_id. Read only when named."""
    path = os.environ.get("PROPLET_CONFIG_FILE")
    if not path:
        return {}
    import tomllib

    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"PROPLET_CONFIG_FILE={path} cannot be read: {exc}") from None
    section = doc.get(os.environ.get("PROPLET_CONFIG_SECTION", "proplet"), {})
    keys = ("tenant_id", "entity_id", "api_key", "channel_id")
    return {k: str(section[k]) for k in keys if k in section}


def generated_entity_id(state_dir: Path) -> str:
    """A stable id for this machine: generated once, then read back from the state directory."""
    path = state_dir / "entity-id"
    try:
        existing = path.read_text().strip()
        if existing:
            return existing
    except OSError:
        pass
    host = re.sub(r"[^a-zA-Z0-9-]", "-", socket.gethostname())[:32] or "proplet"
    new = f"proplet-{host}-{uuid.uuid4().hex[:8]}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(new + "\n")
        tmp.replace(path)
    except OSError:
        pass  # read-only state dir: the id lives as long as the process
    return new
