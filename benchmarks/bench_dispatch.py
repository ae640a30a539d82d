"""Manager dispatch benchmark: latency of submit -> start on the wire, and start/result throughput.

Prints each figure next to the raw MQTT QoS 1 round trip measured on the same broker in the same
run (a paho echo process), so results read as ratios. The broker is a Mosquitto of our own with
set_tcp_nodelay; the synthetic proplet is a separate process (benchmarks/loadgen.py).

    .venv/bin/python benchmarks/bench_dispatch.py [--latency-samples 2000] [--tasks 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import ManagerSettings  # noqa: E402
from core.domain import TaskState, TaskStateChanged  # noqa: E402
from core.mqtt import MqttConnection, make_client, parse_broker_url, received  # noqa: E402
from core.schemas import TaskCreate  # noqa: E402
from core.service import ManagerCore  # noqa: E402
from tests.services import Mosquitto  # noqa: E402

WASM = base64.b64encode(b"\0asm\x01\0\0\0").decode()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def loadgen(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "loadgen.py"), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def raw_round_trip(broker: Mosquitto, samples: int) -> list[float]:
    echo = loadgen("echo", "--port", str(broker.port), "--request", "bench/req", "--reply", "bench/rep")
    try:
        conn = MqttConnection(parse_broker_url(broker.url), "bench-requester", username="bench-requester", qos=1)
        async with make_client(conn) as client:
            await client.subscribe("bench/rep", qos=1)
            # The same intake the manager and the proplet use (not aiomqtt's slower iterator).
            messages = received(client)
            out = []
            for i in range(samples + 100):
                t0 = time.perf_counter()
                await client.publish("bench/req", str(i).encode(), qos=1)
                async for _ in messages:
                    break
                if i >= 100:  # warm-up
                    out.append((time.perf_counter() - t0) * 1000)
            return out
    finally:
        echo.kill()


async def arrivals(proc: subprocess.Popen[str]) -> dict[str, int]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    line = await asyncio.to_thread(proc.stdout.readline)
    return dict(json.loads(line))


async def wait_idle(core: ManagerCore) -> None:
    while core.active:  # noqa: ASYNC110 - the benchmark polls on purpose, between measurements
        await asyncio.sleep(0.0005)


async def dispatch_latency(core: ManagerCore, proplet: subprocess.Popen[str], samples: int) -> list[float]:
    submitted: dict[str, int] = {}
    ids = [(await core.create_task(TaskCreate(name="add", file=WASM))).id for _ in range(samples + 100)]
    await arrivals(proplet)
    for tid in ids:
        submitted[tid] = time.monotonic_ns()
        await core.start_task(tid)
        await wait_idle(core)
    got = await arrivals(proplet)
    return [(got[tid] - submitted[tid]) / 1e6 for tid in ids[100:]]


async def http_latency(core: ManagerCore, proplet: subprocess.Popen[str], samples: int) -> list[float]:
    import httpx

    submitted: dict[str, int] = {}
    ids = [(await core.create_task(TaskCreate(name="add", file=WASM))).id for _ in range(samples + 100)]
    await arrivals(proplet)
    async with httpx.AsyncClient(base_url=core.api_url) as api:
        for tid in ids:
            submitted[tid] = time.monotonic_ns()
            r = await api.post(f"/tasks/{tid}/start")
            assert r.status_code == 200
            await wait_idle(core)
    got = await arrivals(proplet)
    return [(got[tid] - submitted[tid]) / 1e6 for tid in ids[100:]]


async def throughput(core: ManagerCore, tasks: int, window: int, *,
                     precreate: bool = False) -> tuple[float, list[tuple[int, float]]]:
    """Tasks completed per second; with `precreate` the tasks exist before the clock starts, so
    only start/result pairs are measured, else every task is also created in the run."""
    ready: list[str] = []
    if precreate:
        ready = [(await core.create_task(TaskCreate(name="add", file=WASM))).id for _ in range(tasks)]
    done = asyncio.Event()
    completed = 0
    memory: list[tuple[int, float]] = []
    sub = core.events.subscribe(maxlen=200_000)

    async def count() -> None:
        nonlocal completed
        while completed < tasks:
            for ev in await sub.wait(1.0):
                if isinstance(ev, TaskStateChanged) and ev.new is TaskState.COMPLETED:
                    completed += 1
                    if completed % max(1, tasks // 10) == 0:
                        memory.append((completed, rss_mb()))
        done.set()

    slots = asyncio.Semaphore(window)

    async def submit() -> None:
        async with slots:
            tid = ready.pop() if ready else (await core.create_task(TaskCreate(name="add", file=WASM))).id
            await core.start_task(tid)

    counter = asyncio.create_task(count())
    started = time.perf_counter()
    pending: set[asyncio.Task[None]] = set()
    for _ in range(tasks):
        await slots.acquire()
        slots.release()
        job = asyncio.create_task(submit())
        pending.add(job)
        job.add_done_callback(pending.discard)
    await done.wait()
    elapsed = time.perf_counter() - started
    counter.cancel()
    sub.close()
    return tasks / elapsed, memory


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks in the throughput run")
    parser.add_argument("--window", type=int, default=400, help="tasks submitted concurrently")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "broker")
        broker.start()
        try:
            rtt = await raw_round_trip(broker, args.latency_samples)
            settings = ManagerSettings(mqtt_address=broker.url, tenant_id="bench", entity_id="bench-manager",
                                       storage_type="sqlite", sqlite_path=Path(tmp) / "bench.db", http_port=0,
                                       _env_file=None)
            proplet = loadgen("proplet", "--port", str(broker.port), "--domain", "bench", "--id", "bench-proplet")
            try:
                async with ManagerCore(settings) as core:
                    while "bench-proplet" not in core.proplets:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                    lat = await dispatch_latency(core, proplet, args.latency_samples)
                    http = await http_latency(core, proplet, min(args.latency_samples, 1000))
                    pairs, _ = await throughput(core, args.tasks, args.window, precreate=True)
                    rate, memory = await throughput(core, args.tasks, args.window)
                    stats = core.writer.stats
            finally:
                proplet.kill()
        finally:
            broker.stop()

    r50, r99 = pct(rtt, 0.5), pct(rtt, 0.99)
    print(f"raw MQTT QoS 1 round trip (same broker):      p50 {r50:6.3f} ms   p99 {r99:6.3f} ms")
    for label, values in (("submit -> start on the wire (core API):", lat),
                          ("submit -> start on the wire (HTTP):    ", http)):
        p50, p99 = pct(values, 0.5), pct(values, 0.99)
        print(f"{label}      p50 {p50:6.3f} ms   p99 {p99:6.3f} ms   "
              f"({p50 / r50:.2f}x / {p99 / r99:.2f}x the round trip; mean {statistics.mean(values):.3f} ms)")
    print(f"start/result pairs per second (tasks created beforehand), SQLite, 1 synthetic proplet process: "
          f"{pairs:,.0f} over {args.tasks:,} tasks (window {args.window})")
    print(f"create + start + result per second, same set-up: {rate:,.0f} over {args.tasks:,} tasks")
    print(f"store writer: {stats.batches:,} commits for {stats.ops:,} statements "
          f"(largest batch {stats.largest_batch})")
    if memory:
        first, last = memory[0][1], memory[-1][1]
        trail = ", ".join(f"{n // 1000}k: {mb:.0f}" for n, mb in memory)
        print(f"manager process RSS (MB) by tasks completed: {trail}  (growth after the first 10%: "
              f"{last - first:+.1f} MB)")


if __name__ == "__main__":
    asyncio.run(main())
