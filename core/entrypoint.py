"""Helpers for process entry points only (`propeller serve`, `propeller proplet`, `propeller proxy`).

Library code in core/ and proplet/ never calls these: only a process decides how it logs.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def stop_on_signals(request_shutdown: Any) -> None:
    """SIGINT and SIGTERM ask a running service (manager, proplet, proxy) to shut down cleanly."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_shutdown)


def freeze_startup_objects() -> None:
    """Exempt everything built during start-up (modules, classes, settings, Textual's DOM and
    stylesheets) from later full garbage collections.

    A full collection walks every tracked object: with ~100,000 start-up objects it paused the
    console for 80-130 ms several times a minute, the worst key presses under load. Objects made
    after this call are collected as before; start-up objects live as long as the process anyway.
    """
    import ctypes
    import gc

    gc.collect()
    gc.freeze()
    # The C heap that start-up used and freed (compiling and unpacking modules, building the
    # runtime) goes back to the operating system: glibc would keep ~0.5 MB of an idle proplet.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only; musl has none
    if trim is not None:
        trim(0)


def setup_logging(level: str, fmt: str = "text", file: Path | None = None) -> None:
    """Logging for a process: text for terminals, JSON lines for log collectors; to stderr, or to
    `file` (rotated: 3 x 5 MB) for a process that owns the terminal, such as the console."""
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        from logging.handlers import RotatingFileHandler

        file.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(file, maxBytes=5 * 1024 * 1024, backupCount=3)
    if fmt == "json":
        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                entry = {"time": self.formatTime(record), "level": record.levelname.lower(),
                         "logger": record.name, "msg": record.getMessage()}
                if record.exc_info:
                    entry["exc"] = self.formatException(record.exc_info)
                return json.dumps(entry)
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-request access logs and per-statement driver traces would drown our own messages.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))


def settings_help(rows: list[tuple[str, str, str]]) -> str:
    """The --help epilog listing (variable, default, description) rows: `describe_settings(...)` of
    pydantic settings, `PropletSettings.describe()` of the proplet's."""
    width = max(len(r[0]) for r in rows)
    lines = ["\b", "Environment variables (also keys of the config file section, lower-case without the prefix):"]
    for var, default, desc in rows:
        lines.append(f"  {var.ljust(width)}  {desc} [default: {default}]")
    return "\n".join(lines)


class LazyEpilogCommand(click.Command):
    """A command whose epilog is built only when help is shown: building it imports the settings
    classes, which a plain start of another command does not need."""

    def __init__(self, *args: Any, epilog_factory: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epilog_factory = epilog_factory

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self._epilog_factory is not None and self.epilog is None:
            self.epilog = self._epilog_factory()
        super().format_epilog(ctx, formatter)


def load_settings(make: Callable[..., Any], **overrides: Any) -> Any:
    """Settings from flags the user typed (None = not typed), the environment and the config
    file, by `make` (a pydantic settings class, or `PropletSettings.load`); a clear error instead
    of a traceback when they are invalid."""
    try:
        return make(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        raise click.ClickException(f"invalid configuration: {settings_error_text(exc, make)}") from None


def settings_error_text(exc: ValueError, make: Any) -> str:
    """Why settings of class `make` are invalid, by the names an operator sets."""
    errors = getattr(exc, "errors", None)
    prefix = getattr(make, "model_config", {}).get("env_prefix", "")
    return _settings_errors(errors(), prefix) if callable(errors) and prefix else str(exc)


def _settings_errors(errors: list[Any], env_prefix: str) -> str:
    """Pydantic's errors by the names an operator sets: "MANAGER_HTTP_PORT (http_port in the config
    file's manager: section) is 'x': Input should be a valid integer", without its URL and types."""
    section = env_prefix.rstrip("_").lower()
    parts = []
    for err in errors:
        key = "__".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not key:
            parts.append(msg)
            continue
        given = f" is {err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{env_prefix}{key.upper()} ({key} in the config file's {section}: section){given}: {msg}")
    return "; ".join(parts)
