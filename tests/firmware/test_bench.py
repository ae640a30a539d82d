"""The resident-instance benchmark: its embedded kernels match their WAT sources, and the
benchmark runs on the host engine (the device figures need a board; see firmware/README.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import orjson

from tests.firmware.conftest import FIRMWARE, WAT_DIR
from tests.services import need


def embedded_modules() -> dict[str, bytes]:
    source = (FIRMWARE / "src/core/bench_modules.c").read_text()
    arrays = re.findall(r"const unsigned char (\w+)_wasm\[\] = \{(.*?)\};", source, re.DOTALL)
    return {name: bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})", body)) for name, body in arrays}


def test_the_embedded_kernels_are_their_wat_sources() -> None:
    need(shutil.which("wat2wasm") is not None, "wabt's wat2wasm", "install it with `apt-get install wabt`")
    embedded = embedded_modules()
    assert set(embedded) == {"bench_cpu", "bench_mem"}
    for name, data in embedded.items():
        built = subprocess.run(["wat2wasm", str(WAT_DIR / f"{name}.wat"), "--output=-"], capture_output=True,
                               check=True).stdout
        assert data == built, f"{name}: regenerate with `python firmware/tools/embed_wasm.py`"


def test_the_kernels_compute_what_the_benchmark_expects() -> None:
    import wasmtime

    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    modules = embedded_modules()
    cpu = wasmtime.Instance(store, wasmtime.Module(engine, modules["bench_cpu"]), []).exports(store)["cpu"]
    mem = wasmtime.Instance(store, wasmtime.Module(engine, modules["bench_mem"]), []).exports(store)["mem"]
    acc = 0
    for k in range(20000, 0, -1):
        acc = (acc * 31 + k) & 0xFFFFFFFF
    assert cpu(store, 20000) & 0xFFFFFFFF == acc
    total = sum(addr + r for r in (2, 1) for addr in range(0, 65536, 4)) & 0xFFFFFFFF
    assert mem(store, 2) & 0xFFFFFFFF == total


def test_the_benchmark_runs_on_the_host_engine(host_build: Path) -> None:
    result = subprocess.run([str(host_build), "--bench"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    reports = [orjson.loads(line.removeprefix("BENCH ")) for line in result.stdout.splitlines()
               if line.startswith("BENCH ")]
    assert [r["kind"] for r in reports] == ["cpu", "mem"]
    for report in reports:
        # wasmtime has no fixed arena: it stops at the cap, and every instance computed the
        # expected value.
        assert report["instances"] == 64
        assert report["calls_ok"] == 64
        assert report["arena_free_bytes"] is None
        assert report["stopped_by"] == "reached the limit of 64 instances"
