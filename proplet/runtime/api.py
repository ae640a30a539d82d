"""The contract between the proplet agent and a wasm runtime: what to run, what came out.

The agent hands a runtime a verified module (`digest` is "sha256:<hex>" of its bytes) and an
`Invocation`; the runtime answers with an `Outcome`. Guest problems (traps, timeouts, memory
refusals, bad inputs, missing exports) never raise: they become `Outcome.error`, a sentence a user
can act on (STYLE rule 14). Only a module that cannot be compiled raises, as `ModuleError`, at load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from core.domain import WASM_MAGIC, TaskLimits, is_component
from core.protocol import FL_ROUND_TASK_PREFIX
from core.wasmvalues import WasmValueError, parse_input, quoted_input

MIB = 1024 * 1024

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


# Task names that mean "run the module as a command" rather than "call this export".
_COMMAND_NAMES = frozenset({"", "_start", "main"})
_COMPONENT_COMMAND_NAMES = frozenset({"", "_start", "main", "run", "wasi:cli/run"})


class ModuleError(Exception):
    """The module cannot be used at all: not wasm, invalid, or needing imports nobody provides."""


class ServeError(Exception):
    """A wasi:http server could not be started (or this runtime cannot serve HTTP at all)."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """One task run: which export to call, with what, under which limits."""

    task_id: str
    # The task's `name`: the export to call ("" / "_start" / "main" run a WASI command).
    function: str
    inputs: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # The task's cli_args: extra flags for the external runtime's command line.
    args: tuple[str, ...] = ()
    # None fields fall back to the runtime's defaults (RuntimeConfig).
    limits: TaskLimits = field(default_factory=TaskLimits)
    # Host directories to preopen, each at the same path inside the guest. The agent decides
    # which are allowed; the runtime grants nothing else.
    dirs: tuple[str, ...] = ()
    # Outgoing network (wasi:http) for components. The agent grants it only when both the task
    # and the proplet's configuration allow it; without it a component importing wasi:http fails.
    network: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a run produced. `error` is "" on success."""

    results: str
    error: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    duration_s: float = 0.0
    fuel_used: int | None = None
    # The module cannot run on this proplet but may on another (a wasi:http proxy component, which
    # only a proplet that serves HTTP runs): the agent lets the manager give a daemon task elsewhere.
    elsewhere: bool = False

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Runtime defaults and bounds; a task's own limits override the per-task defaults."""

    # Guests running at once; further runs wait their turn (policy: block).
    max_concurrent: int = field(default_factory=lambda: (os.cpu_count() or 1) * 2)
    # Wall-clock limit for a task that sets none.
    default_timeout_s: float = 300.0
    # Linear-memory limit for a task that sets none.
    default_memory_bytes: int = 256 * MIB
    # Bytes kept of each of stdout and stderr; the rest is dropped and the drop noted.
    capture_bytes: int = MIB
    # Where compiled modules are serialized; None keeps them in memory only.
    cache_dir: Path | None = None
    # Compiled modules kept in memory (least recently used evicted; the disk copy stays), and
    # their compiled code's bytes together: a 10 MiB module holds 10-20 MiB while it is kept.
    memory_cache_entries: int = 64
    memory_cache_bytes: int = 256 * MIB
    # Bytes of modules and compiled code kept under cache_dir (least recently used removed first;
    # wasmtime's own cache defaults to the same 1 GiB).
    disk_cache_bytes: int = 1024 * MIB
    # Virtual address space reserved per linear memory (wasmtime's default, 4 GiB + guard,
    # when None). Lower it to fit tens of thousands of live instances in one process.
    memory_reservation: int | None = None
    # Guard region after each linear memory (wasmtime's default when None).
    memory_guard_size: int | None = None
    # Epoch tick: how often deadlines and stop requests are checked while guests run.
    epoch_tick_s: float = 0.01
    # A guest blocked in a host call (e.g. a WASI sleep) cannot be interrupted; after its
    # deadline plus this grace the run is reported as timed out and its thread abandoned.
    blocked_grace_s: float = 2.0
    # First port tried for a served wasi:http component (the next free one is taken); None: any free port.
    http_first_port: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """What a running task has used so far, for its task_metrics. None: this runtime cannot tell.

    The internal runtime runs a guest on a thread of the proplet: its CPU time is that thread's
    since the run began and its memory the guest's linear memory. The external runtime's guest is a
    process of its own: all of it is that process's."""

    # Since the run began: wall-clock seconds, and CPU seconds used.
    wall_seconds: float
    cpu_seconds: float
    memory_bytes: int
    threads: int
    open_files: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None


def process_usage(pid: int) -> Usage | None:
    """A process's usage from /proc (Linux); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            # Exited, not reaped yet: its memory reads 0, a sample no one should see (CI saw one).
            return None
        with open(f"/proc/{pid}/statm") as f:
            resident_pages = int(f.read().split()[1])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        threads = int(fields[17])
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        wall = max(0.0, uptime - int(fields[19]) / ticks)  # starttime: clock ticks after boot
        open_files = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None
    read = write = None
    try:
        with open(f"/proc/{pid}/io") as f:
            io = dict(line.split(":", 1) for line in f.read().splitlines())
        read, write = int(io["read_bytes"]), int(io["write_bytes"])
    except (OSError, ValueError, KeyError):
        pass  # /proc/<pid>/io needs ptrace rights, which a hardened box may withhold
    return Usage(wall, cpu, resident_pages * os.sysconf("SC_PAGE_SIZE"), threads, open_files, read, write)


class ServeHandle(Protocol):
    """A running wasi:http server started by `serve_http`."""

    @property
    def port(self) -> int: ...

    async def stop(self) -> None: ...

    async def wait(self) -> int: ...


@runtime_checkable
class Runtime(Protocol):
    """What the agent needs from a wasm runtime."""

    # Shown in discovery metadata: "wasmtime-internal" or the external binary's path.
    name: str
    # Whether serve_http works (wasi:http/proxy components need the wasmtime CLI).
    supports_http: bool

    def has_module(self, digest: str) -> bool: ...

    async def load(self, digest: str, wasm: bytes | bytearray) -> None: ...

    async def run(self, digest: str, inv: Invocation) -> Outcome: ...

    def stop(self, task_id: str) -> bool: ...

    def usage(self, task_id: str) -> Usage | None:
        """What the task's run has used so far (None: it is not running here)."""
        ...

    async def serve_http(self, digest: str, inv: Invocation, port: int | None = None) -> ServeHandle: ...

    async def close(self) -> None: ...


def names_command(function: str, *, component: bool = False) -> bool:
    """Whether a task's name asks to run the module as a command (`_start`, `wasi:cli/run`)."""
    if function.startswith(FL_ROUND_TASK_PREFIX):
        return True
    if component:
        return function in _COMPONENT_COMMAND_NAMES or function.startswith("wasi:cli/run")
    return function in _COMMAND_NAMES


def check_digest(digest: str) -> str:
    """The hex part of a "sha256:<hex>" digest; the digest names files, so it is checked strictly."""
    if not _DIGEST.match(digest):
        raise ValueError(f"{digest!r} is not a sha256 digest of the form sha256:<64 lowercase hex digits>")
    return digest[7:]


def wasm_kind(wasm: bytes | bytearray) -> str:
    """ "module" or "component" from the binary header, as upstream classifies (magic + layer byte)."""
    if len(wasm) < 8 or wasm[:4] != WASM_MAGIC:
        head = wasm[:8].hex(" ") if wasm else "nothing"
        raise ModuleError(
            f"This is not a WebAssembly binary: it starts with {head} instead of 00 61 73 6d. "
            "Check that the task points at a .wasm file (not WAT text, an archive or an error page)."
        )
    return "component" if is_component(wasm) else "module"


def split_dirs(args: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """A task's cli_args split into the directories it asks for (`--dir X`, `--dir=X`) and the rest.
    The agent grants directories itself (PROPLET_DIRS) and hands them over as `Invocation.dirs`;
    the task's own `--dir` options must never reach the wasmtime CLI."""
    dirs: list[str] = []
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--dir":
            value = next(it, None)
            if value is not None:
                dirs.append(value)
        elif arg.startswith("--dir="):
            dirs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return dirs, rest


# The sentences both runtimes give for the same failure, so an operator reads the same words
# whichever runtime a proplet uses (tests/runtime/test_agreement.py holds them to it).

STOPPED_ERROR = "The task was stopped by request."

# What each trap means, keyed by the message wasmtime gives it (wasmtime-py and the CLI print the
# same messages). Order matters where one message contains another.
_TRAP_DESCRIPTIONS = (
    ("call stack exhausted", "overflowed its call stack (unbounded or too deep recursion)"),
    ("`unreachable` instruction executed",
     "reached an `unreachable` instruction, which is how a guest panics or aborts"),
    ("integer divide by zero", "divided an integer by zero"),
    ("out of bounds memory access", "accessed memory out of bounds"),
    ("misaligned memory access", "made a misaligned atomic memory access"),
    ("out of bounds table access", "accessed a table out of bounds"),
    ("uninitialized element", "called through a null function pointer"),
    ("indirect call type mismatch", "called a function through a pointer of the wrong type"),
    ("integer overflow", "overflowed an integer operation"),
    ("invalid conversion to integer", "converted an out-of-range float to an integer"),
)
# The innermost wasm frame of a wasmtime backtrace: "0: 0x3e - <unknown>!name" or "0: module!name".
_FRAME = re.compile(r"^\s*0:\s+(?:0x[0-9a-f]+ - )?(?:<unknown>|[^!\n]*)!(.+)$", re.M)


def trap_description(message: str) -> str | None:
    """What a trap means ("divided an integer by zero") from wasmtime's message, or None."""
    return next((text for needle, text in _TRAP_DESCRIPTIONS if needle in message), None)


def first_frame(backtrace: str) -> str:
    """The function a trap happened in, from a wasmtime backtrace ("" when it has no name)."""
    m = _FRAME.search(backtrace)
    if not m:
        return ""
    name = m.group(1).strip()
    return "" if name.startswith("<wasm function") else name


def fault_error(what: str, where: str = "") -> str:
    """A guest that trapped: `what` it did (a trap description, or "failed: <cause>"), `where`."""
    if where:
        what += f" (in `{where}`)"
    return f"The module {what}. This is a fault in the module; fix it or check the task's inputs."


def count_error(function: str, kinds: list[str] | tuple[str, ...], given: int) -> str:
    """An export called with the wrong number of inputs."""
    takes = f"{len(kinds)} input{'s' if len(kinds) != 1 else ''}"
    if kinds:
        takes += f" ({', '.join(kinds)})"
    return (f"The export `{function}` takes {takes} but the task gave {given}. "
            "Set the task's inputs to match.")


_RESULT_KINDS = ("i32", "i64", "f32", "f64")


def result_kinds_error(function: str, kinds: tuple[str, ...]) -> str:
    """Why a core export's results cannot be put in a task result ("" when they can)."""
    unsupported = [k for k in kinds if k not in _RESULT_KINDS]
    if not unsupported:
        return ""
    return (f"The export `{function}` returns {', '.join(unsupported)}, which cannot be put in "
            "a task result (only i32, i64, f32 and f64 can). Export a function returning numbers.")


def missing_export_error(function: str, exports: tuple[str, ...]) -> str:
    """A task naming no export, with no command to run instead."""
    shown = [e for e in exports if not e.startswith("cabi_")]
    return (f"The module has no export named {function!r} and no `_start` to run instead. "
            f"Its exports are: {', '.join(shown) or '(none)'}. Set the task's name to one of them.")


def nul_error(env: Mapping[str, str], argv: list[str] | None = None) -> str:
    """Why a command line or an environment cannot carry the task's text ("" when it can): both
    are C strings, cut short at a NUL character (or refused, by the CLI's exec)."""
    for i, text in enumerate(argv or ()):
        if "\0" in text:
            what = "The task's name" if i == 0 else f"Input {i - 1} ({quoted_input(text)})"
            return (f"{what} holds a NUL character, which a command's arguments cannot carry. "
                    "Remove it from the task.")
    for key, value in env.items():
        if "\0" in key or "\0" in value:
            return (f"The task's environment variable {key!r} holds a NUL character, which the "
                    "environment cannot carry. Remove it from the task.")
    return ""


def no_start_error(exports: tuple[str, ...]) -> str:
    """A core module run as a command that has no `_start`."""
    return ("The module has no `_start` export, so it cannot run as a command. "
            f"Its exports are: {', '.join(exports) or '(none)'}. Set the task's name to the function to call.")


class CallError(Exception):
    """The task's name or inputs do not fit the module or component; the message is the task's failure."""


def plan_core_call(funcs: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]], names: tuple[str, ...],
                   function: str, inputs: tuple[str, ...]) -> list[int | float] | None:
    """The converted inputs of the core export a task's name means, or None when the task runs the
    module's `_start` as a command; CallError saying why neither can be. Both runtimes decide here."""
    if function not in funcs or function == "_start":
        if not (names_command(function) or "_start" in funcs):
            raise CallError(missing_export_error(function, names))
        if "_start" not in funcs:
            raise CallError(no_start_error(names))
        return None
    params, results = funcs[function]
    if len(inputs) != len(params):
        raise CallError(count_error(function, params, len(inputs)))
    try:
        values = [parse_input(text, kind, i) for i, (text, kind) in enumerate(zip(inputs, params, strict=True))]
    except WasmValueError as e:
        raise CallError(f"Cannot call `{function}`: {e}. Fix the task's inputs.") from None
    unfit = result_kinds_error(function, results)
    if unfit:
        raise CallError(unfit)
    return values


def timeout_error(timeout_s: float) -> str:
    return (f"The task ran longer than its {seconds(timeout_s)} s limit and was stopped. "
            "Raise the task's timeout or make the module finish sooner.")


def fuel_error(fuel: int | None) -> str:
    return (f"The task exceeded its fuel budget of {fuel} and was stopped. Raise the task's fuel limit "
            "or reduce the work it does.")


def memory_limit_error(limit: int) -> str:
    return (f"The module tried to grow memory past its {mib(limit)} MiB limit. Raise the task's memory "
            "limit or reduce what the module allocates.")


def memory_at_start_error(limit: int, detail: str = "") -> str:
    detail = f" ({detail})" if detail else ""
    return (f"The module needs more memory at start than its {mib(limit)} MiB limit{detail}. "
            "Raise the task's memory limit.")


def invalid_module_error(kind: str, detail: str) -> str:
    return (f"The {kind} is not valid WebAssembly: {detail}. Rebuild it, or check that the task points "
            "at the right file.")


def mib(n: int) -> str:
    """A byte count as MiB for messages: 16 MiB, 1.5 MiB."""
    value = n / MIB
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def seconds(s: float) -> str:
    return f"{s:g}"


def overflow_error(stdout: BoundedCapture) -> str:
    """The failure of a task whose output went past the capture cap ("" when it did not).

    A result silently cut short would look complete; the task fails instead, keeping what was
    captured in its results so the operator still sees how the output began."""
    if not stdout.dropped:
        return ""
    total = stdout.dropped + stdout.kept
    return (f"The module wrote {total} bytes to stdout, more than the {mib(stdout.limit)} MiB a proplet keeps; "
            "its results hold the beginning. Write less output, or return data another way.")


class BoundedCapture:
    """Collects a guest's output up to `limit` bytes and counts what it dropped.

    Writes are always accepted in full so the guest never sees a failed write; output past the
    cap is counted, not kept (policy: drop newest and count)."""

    __slots__ = ("_dropped", "_limit", "_parts", "_size")

    def __init__(self, limit: int) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._dropped = 0
        self._limit = limit

    def write(self, data: bytes) -> None:
        room = self._limit - self._size
        if room >= len(data):
            self._parts.append(data)
            self._size += len(data)
        else:
            if room > 0:
                self._parts.append(data[:room])
                self._size += room
            self._dropped += len(data) - max(room, 0)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def kept(self) -> int:
        return self._size

    @property
    def limit(self) -> int:
        return self._limit

    def value(self, stream: str = "output") -> bytes:
        data = b"".join(self._parts)
        if self._dropped:
            data += (
                f"\n[{self._dropped} more bytes of {stream} dropped: the proplet keeps the first "
                f"{mib(self._limit)} MiB]\n"
            ).encode()
        return data


def command_results(stdout: bytes, stderr: bytes) -> str:
    """Upstream's result for a command: stdout, plus "\\n" + stderr when stderr is not empty."""
    text = stdout.decode("utf-8", "replace")
    if stderr:
        text += "\n" + stderr.decode("utf-8", "replace")
    return text


def tail(data: bytes, limit: int = 400) -> str:
    """The last `limit` characters of a guest's stderr, on one line, for error messages."""
    text = data.decode("utf-8", "replace").strip()
    if len(text) > limit:
        text = "…" + text[-limit:]
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())
