"""Turning what the dispatch form holds into a task body: local .wasm/.wat files, OCI references, URLs.

No Textual here. Compiling (for the list of exports, and .wat to .wasm) runs in a thread: a large
module takes seconds and the console shares its event loop with the manager.
"""

from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.domain import WASM_MAGIC

_OCI = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?/[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})?$", re.IGNORECASE)


class FieldError(ValueError):
    """A form field is invalid; `field` names it, the message says what to do."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True, slots=True)
class ModuleSource:
    kind: str  # "file", "url", "oci"
    text: str
    data: bytes = b""
    exports: tuple[str, ...] = ()

    def body_fields(self) -> dict[str, Any]:
        if self.kind == "file":
            return {"file": base64.b64encode(self.data).decode()}
        return {"image_url": self.text}


def _read_module(path: Path) -> tuple[bytes, tuple[str, ...]]:
    raw = module_bytes(path)
    return raw, function_exports(raw, path)


def module_bytes(path: Path) -> bytes:
    """The binary module in a local file: a .wasm as it is, WebAssembly text (.wat, or a file that
    starts with '(') compiled to binary. The CLI's --wasm reads files through this too."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FieldError("module", f"Cannot read {path}: {exc.strerror or exc}.") from None
    if path.suffix == ".wat" or not raw.startswith(WASM_MAGIC):
        if path.suffix != ".wat" and not raw.lstrip().startswith(b"("):
            raise FieldError("module", f"{path} is not a WebAssembly module (it does not start with \\0asm) "
                             "nor WebAssembly text; pick a .wasm or .wat file.")
        import wasmtime

        try:
            raw = wasmtime.wat2wasm(raw.decode(errors="replace"))
        except Exception as exc:
            raise FieldError("module", f"{path} is not valid WebAssembly text: {_first_line(exc)}") from None
    return raw


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # wasmtime puts the useful part last ("Caused by: ... type mismatch: ...").
    return lines[-1].lstrip("0123456789: ") if lines else type(exc).__name__


# A component's header: the magic, then layer 1 (a core module's version is 1, layer 0).
_COMPONENT_VERSION = b"\x0d\x00\x01\x00"


def function_exports(data: bytes, path: Path | None = None) -> tuple[str, ...]:
    """Names of the exported functions; a module that does not compile is refused here, so the user
    learns it now and not from a proplet. Components are passed through (no export list)."""
    import wasmtime

    if data[4:8] == _COMPONENT_VERSION:
        return ()
    try:
        module = wasmtime.Module(wasmtime.Engine(), data)
    except Exception as exc:
        where = str(path) if path else "the module"
        raise FieldError("module", f"{where} is not a valid WebAssembly module: {_first_line(exc)}") from None
    return tuple(e.name for e in module.exports if isinstance(e.type, wasmtime.FuncType))


async def resolve_module(text: str, cwd: Path | None = None) -> ModuleSource:
    """Where the module comes from, as typed in the form."""
    value = text.strip()
    if not value:
        raise FieldError("module", "Choose a module: a local .wasm or .wat file (Ctrl+O browses), an "
                         "http(s):// URL, or an OCI reference such as registry.lan/wasm/app:v1.")
    if value.startswith(("http://", "https://")):
        return ModuleSource("url", value)
    path, kind = await asyncio.to_thread(_local_path, value, cwd)
    if kind == "file":
        data, exports = await asyncio.to_thread(_read_module, path)
        return ModuleSource("file", str(path), data, exports)
    if kind == "other":
        raise FieldError("module", f"{path} is a directory; pick a .wasm or .wat file inside it (Ctrl+O browses).")
    if _OCI.match(value) and not value.endswith((".wasm", ".wat")):
        return ModuleSource("oci", value)
    raise FieldError("module", f"No file {path}. Type a path to a .wasm/.wat file, an http(s):// URL or an "
                     "OCI reference (registry/repository:tag).")


def _local_path(value: str, cwd: Path | None) -> tuple[Path, str]:
    """The path typed and what is there: "file", "other" (a directory, say) or "none" (touches the disk)."""
    path = Path(value).expanduser()
    if not path.is_absolute() and cwd is not None:
        path = cwd / path
    if path.is_file():
        return path, "file"
    return path, "other" if path.exists() else "none"


@dataclass(slots=True)
class DispatchForm:
    """The form's raw text fields."""

    module: str = ""
    name: str = ""
    inputs: str = ""
    env: str = ""
    target: str = "any"  # any | pinned | broadcast
    proplet_id: str = ""
    timeout_s: str = ""
    fuel: str = ""
    memory_mib: str = ""
    retries: str = ""
    priority: str = ""
    daemon: bool = False
    latent: bool = False
    errors: dict[str, str] = field(default_factory=dict)


def split_inputs(text: str) -> list[str]:
    """`40 2`, `40, 2` and `40,2` all mean two inputs."""
    return [part for part in re.split(r"[\s,]+", text.strip()) if part]


def parse_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FieldError("env", f"'{pair}' is not KEY=VALUE; separate several with spaces.")
        env[key] = value
    return env


def _number(field_name: str, text: str, kind: type, label: str) -> Any:
    text = text.strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise FieldError(field_name, f"{label} must be a{'n integer' if kind is int else ' number'}, "
                         f"not '{text}'.") from None
    if value <= 0:
        raise FieldError(field_name, f"{label} must be greater than 0.")
    return value


class FormErrors(ValueError):
    """Several fields are invalid at once: `errors` maps each field to what to do about it."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def build_body(form: DispatchForm, module: ModuleSource) -> dict[str, Any]:
    """The create-task body. Every field problem is collected (FormErrors), so the form can show them all
    in place at once; core.schemas validates the rest."""
    errors: dict[str, str] = {}
    body: dict[str, Any] = {"name": form.name.strip(), "inputs": split_inputs(form.inputs),
                            "daemon": form.daemon, **module.body_fields()}

    def check(step: Any) -> Any:
        try:
            return step()
        except FieldError as exc:
            errors.setdefault(exc.field, str(exc))
            return None

    def name() -> None:
        if not body["name"]:
            hint = f" This module exports: {', '.join(module.exports)}." if module.exports else ""
            raise FieldError("name", "Name the exported function to call (for a WASI command: _start)." + hint)
        if module.exports and body["name"] not in module.exports:
            raise FieldError("name", f"The module has no function '{body['name']}'; it exports: "
                             f"{', '.join(module.exports)}.")

    def target() -> None:
        if form.target == "pinned":
            if not form.proplet_id.strip():
                raise FieldError("proplet", "Type the id of the proplet to pin the task to (Tab completes known ids).")
            body["proplet_id"] = form.proplet_id.strip()
        elif form.target == "broadcast":
            body["broadcast"] = True

    def whole(field_name: str, text: str, label: str) -> int | None:
        text = text.strip()
        if not text:
            return None
        if not text.isdigit() or not 0 <= int(text) <= 100:
            raise FieldError(field_name, f"{label} must be a whole number from 0 to 100, not '{text}'.")
        return int(text)

    check(name)
    if form.latent:
        if form.daemon:
            errors["form"] = ("A task is either a daemon (it runs until stopped) or latent (deployed, then called "
                              "with i in the task table); untick one.")
        body["latent"] = True
    if form.env.strip():
        env = check(lambda: parse_env(form.env))
        if env is not None:
            body["env"] = env
    check(target)
    limits = {
        "timeout_s": check(lambda: _number("timeout", form.timeout_s, float, "The timeout")),
        "fuel": check(lambda: _number("fuel", form.fuel, int, "Fuel")),
    }
    memory = check(lambda: _number("memory", form.memory_mib, float, "The memory limit"))
    if memory is not None:
        limits["memory_bytes"] = int(memory * 1024 * 1024)
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits:
        body["limits"] = limits
    retries = check(lambda: whole("retries", form.retries, "Retries"))
    if retries is not None:
        body["max_retries"] = retries
    priority = check(lambda: whole("priority", form.priority, "Priority"))
    if priority is not None:
        body["priority"] = priority
    if errors:
        raise FormErrors(errors)
    return body


# Which form field a core.schemas validation message is about ("limits.fuel: ...").
_LOC_FIELDS = {"name": "name", "file": "module", "image_url": "module", "inputs": "inputs", "env": "env",
               "proplet_id": "proplet", "broadcast": "target", "limits": "timeout", "max_retries": "retries",
               "priority": "priority"}


def errors_by_field(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split("; "):
        loc, sep, text = part.partition(": ")
        head = loc.split(".")[0] if sep else ""
        key = _LOC_FIELDS.get(head, "form")
        if head == "limits":
            sub = loc.split(".")[1] if "." in loc else ""
            key = {"fuel": "fuel", "memory_bytes": "memory"}.get(sub, "timeout")
        out[key] = (out.get(key, "") + " " + (text if sep and key != "form" else part)).strip()
    return out
