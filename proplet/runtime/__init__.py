"""Wasm execution for the proplet: the internal wasmtime-py runtime and the external CLI runtime.

The agent uses only the names re-exported here: build a runtime with `runtime_from_config`, then
`load` / `has_module` / `run` / `stop` / `usage` / `serve_http` / `close` (see `api.Runtime`).
"""

from .api import (
    BoundedCapture,
    Invocation,
    ModuleError,
    Outcome,
    Runtime,
    RuntimeConfig,
    ServeError,
    ServeHandle,
    Usage,
    check_digest,
    wasm_kind,
)
from .external import ExternalRuntime, HttpServer, find_wasmtime_cli
from .factory import runtime_from_config
from .internal import WasmtimeRuntime

__all__ = [
    "BoundedCapture",
    "ExternalRuntime",
    "HttpServer",
    "Invocation",
    "ModuleError",
    "Outcome",
    "Runtime",
    "RuntimeConfig",
    "ServeError",
    "ServeHandle",
    "Usage",
    "WasmtimeRuntime",
    "check_digest",
    "find_wasmtime_cli",
    "runtime_from_config",
    "wasm_kind",
]
