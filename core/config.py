"""Manager configuration: upstream's `MANAGER_*` variables, a YAML file, and defaults.

Precedence, highest first: values passed by the caller (CLI flags the user typed), environment
variables, the `manager:` section of the config file, defaults. Every setting has a default, so
`propeller serve` starts on a bare machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from core import paths
from core.domain import SchedulerPolicy
from core.mqtt import MqttClientOptions


class SectionSettings(BaseSettings):
    """Settings read, highest priority first, from the caller (flags), the environment, and the
    `CONFIG_SECTION` section of the config file."""

    model_config = SettingsConfigDict(extra="ignore")
    CONFIG_SECTION: ClassVar[str] = ""

    @classmethod
    def extra_sources(cls, settings_cls: type[BaseSettings]) -> tuple[PydanticBaseSettingsSource, ...]:
        """Sources between the environment and the config file (the proplet's upstream TOML file)."""
        return ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, *cls.extra_sources(settings_cls),
                yaml_section(settings_cls, cls.CONFIG_SECTION))


class MqttClientSettings(SectionSettings, MqttClientOptions):
    """Connection settings shared by the manager and the proxy. The proplet declares the same `mqtt_*`
    fields in msgspec (proplet/config.py, kept out of pydantic for its memory): change both."""

    mqtt_address: str | None = Field(
        default=None,
        description="Broker URL: mqtt://host:port (also tcp://), mqtts://host:port (also ssl://, tls://) "
        "or host:port. Unset: localhost:1883 when an MQTT broker listens there, else an in-process broker "
        "(manager only).",
    )
    mqtt_qos: Literal[0, 1, 2] = Field(
        default=1,
        description="QoS of publishes and subscriptions, except heartbeats, metrics, task_state and result_ack, "
        "which go at 0 (the next one, or an acknowledgement, repairs a loss). 1 (at least once) with idempotent "
        "handlers is the default; upstream defaults to 2.",
    )
    mqtt_keep_alive: int = Field(default=30, ge=2, description="MQTT keep-alive in seconds.")
    mqtt_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to wait for a connection or a publish before giving up."
    )
    mqtt_tls_ca_cert: str | None = Field(default=None, description="PEM file of the CA that signed the broker.")
    mqtt_tls_client_cert: str | None = Field(default=None, description="PEM client certificate (mutual TLS).")
    mqtt_tls_client_key: str | None = Field(default=None, description="PEM key of the client certificate.")
    mqtt_tls_insecure_skip_verify: bool = Field(
        default=False, description="Accept any broker certificate (testing only)."
    )

    @field_validator("mqtt_qos", mode="before")
    @classmethod
    def _qos_from_text(cls, value: Any) -> Any:
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class ManagerSettings(MqttClientSettings):
    """Everything `propeller serve` and the console's in-process manager need."""

    model_config = SettingsConfigDict(env_prefix="MANAGER_", extra="ignore")
    CONFIG_SECTION: ClassVar[str] = "manager"

    tenant_id: str = Field(default="propeller", description="Domain of the MQTT topics (m/<tenant>/c/<channel>/...).")
    channel_id: str = Field(default="default", description="Channel of the MQTT topics.")
    entity_id: str = Field(
        default="propeller-manager",
        description="MQTT client id and username. It is fixed so the broker keeps the manager's session.",
    )
    api_key: str = Field(default="", description="MQTT password (upstream: the entity's API key).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")

    http_host: str = Field(default="127.0.0.1", description="Address the REST API listens on.")
    http_port: int = Field(default=7070, ge=0, le=65535, description="Port of the REST API (0: any free port).")
    http_enabled: bool = Field(default=True, description="Serve the REST API.")
    http_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens accepted by the REST API (comma-separated). Empty: no authentication, "
        "which is only allowed on a loopback address unless http_allow_insecure is set.",
    )
    http_allow_insecure: bool = Field(
        default=False, description="Allow listening on a non-loopback address without tokens."
    )

    storage_type: Literal["sqlite", "postgres", "memory"] = Field(
        default="sqlite", description="sqlite (default), postgres, or memory (a throw-away SQLite database)."
    )
    sqlite_path: Path = Field(
        default_factory=paths.default_sqlite_path, description="SQLite database file."
    )
    postgres_host: str = Field(default="localhost", description="PostgreSQL host.")
    postgres_port: int = Field(default=5432, description="PostgreSQL port.")
    postgres_user: str = Field(default="propeller", description="PostgreSQL user.")
    postgres_pass: str = Field(default="propeller", description="PostgreSQL password.")
    postgres_db: str = Field(default="propeller", description="PostgreSQL database.")
    postgres_sslmode: str = Field(
        default="disable", description="PostgreSQL sslmode (disable, require, verify-full...)."
    )

    scheduler: SchedulerPolicy = Field(
        default=SchedulerPolicy.ROUND_ROBIN, description="round_robin (upstream's) or least_loaded."
    )
    heartbeat_interval: float = Field(
        default=10.0, gt=0, description="Seconds between proplet heartbeats, when a proplet does not announce its own."
    )
    liveness_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds without a heartbeat before a proplet is offline. Default: 3 x the heartbeat interval.",
    )
    alive_history_size: int = Field(default=10, ge=1, le=10_000, description="Heartbeats kept per proplet.")
    metrics_retention: int = Field(
        default=1000, ge=1, description="Metrics samples kept per proplet and per task; older ones are deleted."
    )
    inline_limit: int = Field(
        default=256 * 1024,
        ge=0,
        description="Largest module (bytes) sent inline in a start message; larger ones go out in chunks.",
    )
    chunk_size: int = Field(default=512_000, ge=1024, description="Chunk size in bytes for chunked delivery.")
    oci_proxy: bool = Field(
        default=False,
        description="Host the OCI proxy on the manager's own MQTT connection, so tasks naming OCI references "
        "run without a `propeller proxy` service (one box). Its registry, credentials, CA, cache and chunk "
        "settings are the proxy's PROXY_* variables (config file: proxy: section). Leave it off where a "
        "proxy already serves this broker and channel: both would answer every request.",
    )
    max_backlog: int = Field(
        default=100_000, ge=1, description="Tasks that may wait for a proplet; beyond it, starts are refused."
    )
    max_result_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024,
        description="Largest result message a proplet may send (bytes); a larger one fails its task, "
        "its result dropped. Our proplets keep at most 1 MiB each of stdout and stderr.",
    )
    ack_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to wait for a proplet that supports acknowledgements to confirm a start "
        "before the start is published again.",
    )
    signing_key: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM) to sign module digests with; proplets with the public key in "
        "PROPLET_TRUSTED_KEYS then run only modules this manager signed. Make one with `propeller keys generate`.",
    )
    coordinator_url: str = Field(
        default="",
        description="URL of an external federated-learning coordinator (upstream's): experiments, updates and "
        "round status are relayed to it. Empty: the manager coordinates rounds and averages updates itself.",
    )
    public_url: str = Field(
        default="",
        description="URL at which proplets reach this manager's REST API, given to federated-learning tasks "
        "(MODEL_REGISTRY_URL, MANAGER_COORDINATOR_URL). Empty: the API's own address.",
    )
    default_broker_port: int = Field(
        default=1883, ge=1, le=65535,
        description="With no mqtt_address: the broker on localhost at this port is used if one listens "
        "there, else an in-process broker is started on it (on 127.0.0.1 only); a manager refuses to start "
        "when something that is not an MQTT broker listens there. Proplets look for localhost:1883: with "
        "another port, give them PROPLET_MQTT_ADDRESS.",
    )

    @field_validator("http_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @property
    def effective_liveness_timeout(self) -> float:
        return self.liveness_timeout or 3 * self.heartbeat_interval

    @property
    def postgres_dsn(self) -> str:
        from urllib.parse import quote

        return (
            f"postgresql://{quote(self.postgres_user)}:{quote(self.postgres_pass)}@"
            f"{self.postgres_host}:{self.postgres_port}/{quote(self.postgres_db)}"
            f"?sslmode={self.postgres_sslmode}"
        )



def yaml_section(settings_cls: type[BaseSettings], section: str) -> PydanticBaseSettingsSource:
    """The given section of the config file, or nothing when the file or section is absent."""
    path = paths.default_config_file()
    if not path.is_file():
        return _Empty(settings_cls)
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(section), dict):
        return _Empty(settings_cls)
    return YamlConfigSettingsSource(settings_cls, yaml_file=path, yaml_config_section=section)


class _Empty(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {}


def describe_settings(settings_cls: type[BaseSettings], env_prefix: str) -> list[tuple[str, str, str]]:
    """(variable, default, description) rows for --help texts."""
    rows = []
    for name, info in settings_cls.model_fields.items():
        value = info.default_factory() if info.default_factory is not None else info.default
        if value is None:
            default = "(unset)"
        elif value == []:
            default = "(none)"
        else:
            default = str(getattr(value, "value", value))
        rows.append((f"{env_prefix}{name.upper()}", default, info.description or ""))
    return rows
