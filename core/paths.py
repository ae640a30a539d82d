"""Where Propeller keeps its files (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path

APP = "propeller"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / APP


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / APP


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / APP


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / APP


def default_config_file() -> Path:
    """The config file: `$PROPELLER_CONFIG` if set, else `config.yaml` in the config directory."""
    explicit = os.environ.get("PROPELLER_CONFIG")
    return Path(explicit) if explicit else config_dir() / "config.yaml"


def default_sqlite_path() -> Path:
    return data_dir() / "propeller.db"


def console_log_file() -> Path:
    """Where the console logs (it owns the terminal, so its log cannot go to stderr)."""
    return state_dir() / "console.log"
