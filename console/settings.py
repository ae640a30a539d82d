"""Console settings: the `console:` section of the config file, `PROPELLER_CONSOLE_*` variables, defaults.

Precedence, highest first: values the caller passes (flags the user typed), environment variables
(`PROPELLER_CONSOLE_THEME`, `PROPELLER_CONSOLE_FIRMWARE__ENV`, ...), the config file, defaults.

```yaml
console:
  theme: propeller-light          # or propeller-dark, ansi-dark / ansi-light (terminal colours), a user theme
  mouse: false
  read_only: true
  keymap: {tasks.stop: k, app.command: ";"}
  local_proplet_command: "{python} -m propeller proplet --log-level debug"
  firmware:
    build: "{pio} run --project-dir {project} --environment {env}"
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from pydantic_settings import SettingsConfigDict

from core import paths
from core.config import SectionSettings

DEFAULT_THEME = "propeller-dark"
# The `propeller` flags (propeller/cli.py) not spelt --<setting with '-' for '_'>, for messages about a value given.
FLAGS = {"mouse": "--mouse/--no-mouse"}


class FirmwareSettings(BaseModel):
    """The firmware view's project and command templates (see propeller/firmware.py)."""

    model_config = ConfigDict(extra="ignore")

    project: Path | None = Field(default=None,
                                 description="The PlatformIO project. Default: firmware/ of this checkout.")
    env: str = Field(default="esp32-s3-devkitc-1", description="PlatformIO environment to build and flash.")
    build: str | None = Field(
        default=None,
        description="Build command template; placeholders {pio}, {project}, {env}. Default: pio run.",
    )
    flash: str | None = Field(
        default=None,
        description="Flash command template; placeholders {python}, {port}, {baud}, {build_dir}. Default: esptool.",
    )
    baud: int = Field(default=460800, gt=0, description="Flashing baud rate.")
    build_timeout: float = Field(default=1800.0, gt=0, description="Seconds before a build is stopped.")
    flash_timeout: float = Field(default=300.0, gt=0, description="Seconds before flashing is stopped.")


class ConsoleSettings(SectionSettings):
    """Everything the operator console reads besides the manager's own settings."""

    model_config = SettingsConfigDict(env_prefix="PROPELLER_CONSOLE_", env_nested_delimiter="__", extra="ignore")
    CONFIG_SECTION: ClassVar[str] = "console"

    theme: str = Field(default=DEFAULT_THEME, description="Theme name; `:theme` or the command palette changes it.")
    theme_dirs: list[Path] = Field(
        default_factory=list,
        description="More directories with theme YAML files (the config directory's themes/ is always read).",
    )
    mouse: bool = Field(default=True, description="Mouse support; turn it off for terminals that mangle clicks.")
    read_only: bool = Field(default=False, description="Disable every action that changes the fleet.")
    cursor_blink: bool = Field(default=True, description="Blink the text cursor (off saves bandwidth over SSH).")
    keymap: dict[str, str] = Field(
        default_factory=dict,
        description="Binding id -> keys (comma-separated), e.g. {tasks.stop: k}. `?` shows the ids in use.",
    )
    refresh_interval: float = Field(
        default=0.25, ge=0.05, le=5.0, description="Seconds between screen updates (events are buffered between)."
    )
    task_rows: int = Field(default=1000, ge=10, le=100_000,
                           description="Tasks kept in the task table; oldest finished ones go first.")
    traffic_lines: int = Field(default=5000, ge=100, le=100_000, description="MQTT messages kept in the traffic view.")
    payload_preview_limit: int = Field(
        default=8000, ge=256, description="Bytes of a payload kept for the payload view; longer ones are summarised."
    )
    topic_history: int = Field(default=20, ge=1, le=1000, description="Messages kept per topic for the payload view.")
    local_proplet_command: str = Field(
        default="{python} -m propeller proplet --id {id}",
        description="Command of a local proplet; placeholders {python}, {id}, {broker}, {tenant}, {channel}. "
        "The PROPLET_* variables pointing it at this console's manager are set too.",
    )
    local_proplet_env: dict[str, str] = Field(
        default_factory=lambda: {"PROPLET_LIVELINESS_INTERVAL": "2", "PROPLET_METRICS_INTERVAL": "5"},
        description="Extra environment of local proplets (the console's own PROPLET_* pointers win).",
    )
    local_proplet_output_lines: int = Field(default=2000, ge=10, description="Output lines kept per local proplet.")
    firmware: FirmwareSettings = Field(default_factory=FirmwareSettings)

    @field_validator("keymap", mode="before")
    @classmethod
    def _keymap_values_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): ",".join(v) if isinstance(v, list) else str(v) for k, v in value.items()}
        return value


    # The settings given by flags the user typed (load_settings), so a message about a value names
    # what the user wrote: `--theme nosuch`, not the config file's `console.theme`.
    _from_flags: frozenset[str] = PrivateAttr(default_factory=frozenset)

    def all_theme_dirs(self) -> list[Path]:
        return [paths.config_dir() / "themes", *self.theme_dirs]

    def origin(self, name: str) -> str:
        """Where the user gave this setting's value: the flag, the environment variable or the config file."""
        if name in self._from_flags:
            return FLAGS.get(name, f"--{name.replace('_', '-')}")
        variable = f"{self.model_config.get('env_prefix', '')}{name}".upper()
        if any(key.upper() == variable for key in os.environ):
            return variable
        return f"console.{name} in the config file"


def load_settings(**overrides: Any) -> ConsoleSettings:
    """The console settings with the given overrides (None values are ignored: flags not typed)."""
    typed = {k: v for k, v in overrides.items() if v is not None}
    settings = ConsoleSettings(**typed)
    settings._from_flags = frozenset(typed)
    return settings
