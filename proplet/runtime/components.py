"""What a component exports, and how a task's name and inputs become a call of it.

Both runtimes decide here, so a task gets the same answer on either: which export its name means
(or that it runs the component as a `wasi:cli/run` command), whether its inputs fit the export's
parameters (converted by wave.py), and the sentence when they do not. The internal runtime calls
the export through wasmtime-py with the converted values; the external one writes them back as
canonical WAVE into one `wasmtime run --invoke` call, so the CLI parses only checked values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wasmtime import Engine
from wasmtime import component as cm

from . import wave
from .api import CallError, count_error, missing_export_error, names_command


@dataclass(slots=True)
class ComponentFunc:
    path: str  # "name" or "instance#name"
    index: cm.ExportIndex
    params: list[tuple[str, Any]]
    result: Any


@dataclass(slots=True)
class ComponentExports:
    funcs: dict[str, ComponentFunc] = field(default_factory=dict)
    # short function name -> paths that export it (for a name given without its interface)
    by_name: dict[str, list[str]] = field(default_factory=dict)
    run_index: cm.ExportIndex | None = None
    is_proxy: bool = False
    needs_http: bool = False


@dataclass(frozen=True, slots=True)
class Call:
    """A task resolved against a component: an export with its converted inputs, or (func None)
    a run of `wasi:cli/run` with `argv`."""

    func: ComponentFunc | None
    args: list[Any]
    argv: list[str] | None


def describe_exports(component: cm.Component, engine: Engine) -> ComponentExports:
    """The exported functions (top level and in exported instances) with their types."""
    exports = ComponentExports()
    ctype = component.type
    exports.needs_http = any(name.startswith("wasi:http/") for name in ctype.imports(engine))
    for name, ext in ctype.exports(engine).items():
        item = ext.ty
        if isinstance(item, cm.FuncType):
            _add(exports, name, name, component.get_export_index(name), item)
        elif isinstance(item, cm.ComponentInstanceType):
            instance_index = component.get_export_index(name)
            if name.startswith("wasi:http/incoming-handler@"):
                exports.is_proxy = True
            for func_name, func_ext in item.exports(engine).items():
                func_ty = func_ext.ty
                if not isinstance(func_ty, cm.FuncType):
                    continue
                index = component.get_export_index(func_name, instance_index)
                if name.startswith("wasi:cli/run@") and func_name == "run":
                    exports.run_index = index
                _add(exports, f"{name}#{func_name}", func_name, index, func_ty)
    return exports


def _add(exports: ComponentExports, path: str, short: str, index: cm.ExportIndex | None, ty: cm.FuncType) -> None:
    if index is None:
        return
    exports.funcs[path] = ComponentFunc(path, index, ty.params, ty.result)
    exports.by_name.setdefault(short, []).append(path)


def resolve(exports: ComponentExports, function: str) -> ComponentFunc | None:
    """"iface#func" or a top-level name, as exported; else a function of that name in an exported
    instance, preferring the component's own interfaces over wasi:* ones."""
    if function in exports.funcs and not function.startswith("wasi:cli/run"):
        return exports.funcs[function]
    paths = [p for p in exports.by_name.get(function, ()) if not p.startswith("wasi:cli/run")]
    if not paths:
        return None
    paths.sort(key=lambda p: p.startswith("wasi:"))
    return exports.funcs[paths[0]]


def plan_call(exports: ComponentExports, function: str, inputs: tuple[str, ...], *, network: bool) -> Call:
    """The call a task makes, or CallError saying why it cannot be made."""
    func = resolve(exports, function)
    if func is None:
        # A name that is not an export's runs the command with it as argv[0], unless it names an
        # export ("iface#func", "ns:pkg/iface") or there is no command to run.
        looks_like_export = "#" in function or "/" in function
        if exports.run_index is None or not (names_command(function, component=True) or not looks_like_export):
            raise CallError(missing_export_error(function, tuple(exports.funcs)))
        call = Call(None, [], [function or "main", *inputs])
    else:
        if len(inputs) != len(func.params):
            raise CallError(count_error(func.path, [wave.type_name(t) for _, t in func.params], len(inputs)))
        try:
            args = [wave.parse_input(text, ty, i) for i, (text, (_, ty)) in
                    enumerate(zip(inputs, func.params, strict=True))]
        except wave.WaveError as e:
            raise CallError(f"Cannot call `{func.path}`: {e}. Fix the task's inputs.") from None
        call = Call(func, args, None)
    if exports.needs_http and not network:
        raise CallError(
            "The component imports wasi:http (outgoing network), which this task was not granted. "
            "Ask for it with `-S http` in the task's cli_args on a proplet started with "
            "PROPLET_ALLOW_NETWORK=true.")
    return call


def invoke_text(call: Call) -> str:
    """The call as the wasmtime CLI's `--invoke` takes it: the export's full name (an interface's
    function as `ns:pkg/iface.func`, its version after the function) and each input as canonical
    WAVE, so a plain string is quoted and nothing in an input can end the call early."""
    assert call.func is not None
    instance, _, name = call.func.path.rpartition("#")
    if instance:
        base, at, version = instance.partition("@")
        name = f"{base}.{name}" + (f"@{version}" if at else "")
    values = ", ".join(wave.encode(value, ty) for value, (_, ty) in zip(call.args, call.func.params, strict=True))
    return f"{name}({values})"
