"""Proplet configuration: upstream's `PROPLET_*` variables, the `proplet:` section of the YAML config
file, upstream's TOML credentials file when `PROPLET_CONFIG_FILE` names one, and defaults.

Durations accept plain seconds or a unit (`30s`, `500ms`, `2m`): upstream silently keeps its default
for `30s` (defect 44), which misleads operators.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from core import paths
from core.config import MqttClientSettings

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration: use seconds (10) or a unit (10s, 500ms, 2m)")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return value


def _split(sep: str) -> Any:
    def split(value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(sep) if part.strip()]
        return value
    return split


class PropletSettings(MqttClientSettings):
    """Everything `propeller proplet` reads. Names and meanings follow upstream's Rust proplet."""

    model_config = SettingsConfigDict(env_prefix="PROPLET_", extra="ignore")
    CONFIG_SECTION: ClassVar[str] = "proplet"

    mqtt_address: str | None = Field(
        default="mqtt://localhost:1883",
        description="Broker URL: mqtt://host:port (or tcp://), mqtts://host:port (or ssl://, tls://).",
    )
    tenant_id: str = Field(default="propeller", description="Domain of the MQTT topics; must match the manager's.")
    channel_id: str = Field(default="default", description="Channel of the MQTT topics; must match the manager's.")
    entity_id: str = Field(
        default="",
        description="This proplet's id (MQTT client id and username). Empty: one is generated once and kept "
        "in the state directory.",
    )
    api_key: str = Field(default="", description="MQTT password.")
    log_level: str = Field(default="info", description="debug, info, warning or error.")
    liveliness_interval: float = Field(default=10.0, gt=0, description="Seconds between heartbeats.")
    metrics_interval: float = Field(default=10.0, ge=0, description="Seconds between metrics reports; 0 disables them.")
    external_wasm_runtime: str = Field(
        default="", description="Path or name of a wasmtime CLI to run modules with, instead of the internal runtime."
    )
    dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="':'-separated host directories a task may use (preopened at the same path). Nothing else "
        "of the host file system is visible to guests.",
    )
    tags: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Comma-separated tags (discovery).")
    description: str = Field(default="", description="Free text shown in the proplet list (discovery).")
    location: str = Field(default="", description="Where the proplet is (discovery).")
    manager_k8s_namespace: str = Field(default="default", description="The `namespace` field of messages.")
    collect_system_info: bool = Field(default=True, description="Put os, hostname, arch, memory, ip in discovery.")
    max_concurrent_tasks: int = Field(
        default_factory=lambda: (os.cpu_count() or 1) * 2, ge=1, description="Modules running at once."
    )
    max_queued_tasks: int | None = Field(
        default=None, ge=0,
        description="Starts the manager may send beyond the running slots; they wait here for a free slot, so "
        "the proplet is not idle for a round trip to the manager between short tasks. Announced in discovery. "
        "Default: 3 x max_concurrent_tasks; 0: only as many as can run at once (long tasks on a busy fleet).",
    )
    trusted_keys: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="':'-separated Ed25519 public keys (PEM). When set, only modules whose digest the manager "
        "signed with one of these keys run.",
    )
    allow_network: bool = Field(
        default=False,
        description="Let tasks that ask for it (`-S http` in their cli_args) make outgoing HTTP requests.",
    )
    http_enabled: bool = Field(
        default=False,
        description="Let daemon tasks serve wasi:http components (needs PROPLET_EXTERNAL_WASM_RUNTIME).",
    )
    http_proxy_port: int = Field(
        default=8222, ge=1, le=65535, description="First port tried for a served wasi:http component."
    )
    task_timeout: float = Field(default=300.0, gt=0, description="Wall-clock limit of a task that sets none (seconds).")
    task_memory_limit: int = Field(
        default=256 * 1024 * 1024, gt=0, description="Linear-memory limit of a task that sets none (bytes)."
    )
    wasm_fetch_max_bytes: int = Field(default=104_857_600, gt=0, description="Largest module fetched (bytes).")
    http_tls_ca_cert: str | None = Field(default=None, description="CA bundle for https module URLs.")
    http_tls_insecure_skip_verify: bool = Field(default=False, description="Do not verify https certificates.")
    chunk_stall_timeout: float = Field(
        default=10.0, gt=0, description="Seconds without a chunk before asking again for the missing ones."
    )
    outbox_max: int = Field(
        default=100_000, ge=1, description="Results kept until the manager confirms them; when full, new tasks "
        "are refused.",
    )
    outbox_fsync: bool = Field(
        default=False, description="Flush each result to disk (survives power loss, costs a disk flush per result).",
    )
    result_resend: float = Field(
        default=5.0, gt=0, description="Seconds before an unconfirmed result is sent again.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: paths.cache_dir() / "proplet",
        description="Where compiled modules are kept between runs.",
    )
    state_dir: Path = Field(
        default_factory=lambda: paths.state_dir() / "proplet",
        description="Where the generated entity id and the result outbox are kept.",
    )

    _duration = field_validator(
        "liveliness_interval", "metrics_interval", "task_timeout", "chunk_stall_timeout", "result_resend",
        mode="before"
    )(parse_duration)
    _dirs = field_validator("dirs", "trusted_keys", mode="before")(_split(":"))
    _tags = field_validator("tags", mode="before")(_split(","))

    @model_validator(mode="after")
    def _identity(self) -> PropletSettings:
        if not self.entity_id:
            self.entity_id = generated_entity_id(self.state_dir)
        return self

    @property
    def queued_tasks(self) -> int:
        """`max_queued_tasks`, or its default of 3 x the running slots."""
        if self.max_queued_tasks is not None:
            return self.max_queued_tasks
        return 3 * self.max_concurrent_tasks

    @classmethod
    def extra_sources(cls, settings_cls: type[BaseSettings]) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_UpstreamToml(settings_cls),)


class _UpstreamToml(PydanticBaseSettingsSource):
    """Upstream's credentials file: TOML `PROPLET_CONFIG_FILE`, section `PROPLET_CONFIG_SECTION`
    (default `proplet`), keys tenant_id, entity_id, api_key, channel_id. Read only when named."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
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
