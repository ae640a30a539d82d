"""End-to-end benchmark: manager + real proplets (separate processes) + real wasm.

Prints, next to the raw MQTT QoS 1 round trip of the same broker in the same run:
- warm task latency (module cached on the proplet), submit -> the core emits its completion, p50/p99,
  split at the moment the start is published;
- tasks per second end to end with N proplet processes on SQLite;
- both again for a bigger module (`--module-kib`, 1 MiB by default: `add` with a custom section,
  as debug info or embedded data make a real module), sent inline with each task as upstream's
  clients do: what a module's size costs on the warm path (the manager stores it once per digest);
- a call of a deployed latent task (upstream's FaaS path: `invoke_task`, module compiled and kept),
  p50/p99;
- the resident memory of an idle proplet;
- CPU time per task in the throughput run, by process (manager, broker, each proplet).

    .venv/bin/python benchmarks/bench_e2e.py [--latency-samples 1000] [--tasks 10000] [--proplets 4]
                                             [--module-kib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_dispatch import pct, raw_round_trip  # noqa: E402

from core.config import ManagerSettings  # noqa: E402
from core.domain import TaskState, TaskStateChanged  # noqa: E402
from core.events import Fanout, Subscription  # noqa: E402
from core.schemas import TaskCreate  # noqa: E402
from core.service import ManagerCore  # noqa: E402
from tests.services import Mosquitto, free_port  # noqa: E402
from tests.wasmfixtures import wasm, with_custom_section  # noqa: E402


def start_proplet(broker: Mosquitto, domain: str, name: str, workdir: Path, **extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PROPLET_MQTT_ADDRESS": broker.url, "PROPLET_TENANT_ID": domain,
           "PROPLET_ENTITY_ID": name, "PROPLET_CACHE_DIR": str(workdir / name / "cache"),
           "PROPLET_STATE_DIR": str(workdir / name), "PROPLET_LOG_LEVEL": "warning",
           "PROPLET_METRICS_INTERVAL": "0", "PROPLET_METRICS_PORT": str(free_port()), **extra}
    return subprocess.Popen([sys.executable, "-m", "propeller", "proplet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextmanager
def proplet_processes(broker: Mosquitto, domain: str, names: list[str], workdir: Path,
                      **extra: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`propeller proplet` processes, one per name (`extra`: more environment), stopped after."""
    procs = [start_proplet(broker, domain, n, workdir, **extra) for n in names]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_online(core: ManagerCore, names: list[str]) -> None:
    while not all(n in core.proplets and core.proplets[n].online for n in names):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


class FinishStamps(Subscription[object]):
    """Notes the moment the core emits each task's terminal state, on the core's own turn: what the
    benchmark's coroutine then takes to wake up (an event, `wait_for`'s task, two more turns of the
    loop, ~0.2 ms here) is the reader's cost, not the task's."""

    def __init__(self, fanout: Fanout[object], maxlen: int) -> None:
        super().__init__(fanout, maxlen)
        self.finished_at: dict[str, float] = {}

    def push(self, item: object) -> None:
        if isinstance(item, TaskStateChanged) and item.new.is_terminal:
            self.finished_at[item.task_id] = time.perf_counter()
        super().push(item)


async def latency(core: ManagerCore, body: TaskCreate, samples: int) -> tuple[list[float], list[float]]:
    """Submit -> completed of each task, and of that the part before its start was published (the
    dispatch, stored before the start goes out)."""
    sub = core.events.subscribe(maxlen=100_000, kind=FinishStamps)
    assert isinstance(sub, FinishStamps)
    published: dict[str, float] = {}
    core.on_start_published = published.__setitem__
    out = []
    before_start = []
    try:
        for i in range(samples + 50):
            task = await core.create_task(body)
            # Each sample starts with the manager idle: the task's own writes, not the commit of the
            # previous task's result still under way (which the sample would otherwise wait behind
            # or not, depending on how soon this loop wakes up).
            await core.writer.wait_idle()
            sub.drain()
            t0 = time.perf_counter()
            await core.start_task(task.id)
            done = False
            while not done:
                for ev in await sub.wait(5):
                    if isinstance(ev, TaskStateChanged) and ev.task_id == task.id and ev.new.is_terminal:
                        assert ev.new is TaskState.COMPLETED, ev
                        done = True
            if i >= 50:  # warm-up: the first runs compile and cache the module
                out.append((sub.finished_at.pop(task.id) - t0) * 1000)
                before_start.append((published.pop(task.id) - t0) * 1000)
            sub.finished_at.clear()
            published.clear()
    finally:
        core.on_start_published = None
        sub.close()
    return out, before_start


async def invocations(core: ManagerCore, body: TaskCreate, samples: int) -> list[float]:
    """Deploy the task as a latent one, then call it `samples` times, one after another: the manager
    publishes the invoke, the proplet runs the kept module, the answer comes back to the caller."""
    task = await core.create_task(TaskCreate.model_validate({**body.model_dump(), "latent": True}))
    await core.start_task(task.id)
    while core.active[task.id].state is not TaskState.RUNNING:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    out = []
    for i in range(samples + 50):
        t0 = time.perf_counter()
        assert await core.invoke_task(task.id, ["1", "2"], {}) == "3"
        if i >= 50:
            out.append((time.perf_counter() - t0) * 1000)
    await core.stop_task(task.id)
    return out


async def throughput(core: ManagerCore, body: TaskCreate, tasks: int, window: int) -> float:
    ids = [(await core.create_task(body)).id for _ in range(tasks)]
    sub = core.events.subscribe(maxlen=tasks * 6)
    completed = 0
    slots = asyncio.Semaphore(window)
    started = time.perf_counter()

    async def start(tid: str) -> None:
        async with slots:
            await core.start_task(tid)

    jobs = [asyncio.create_task(start(tid)) for tid in ids]
    while completed < tasks:
        for ev in await sub.wait(5):
            if isinstance(ev, TaskStateChanged) and ev.new is TaskState.COMPLETED:
                completed += 1
    elapsed = time.perf_counter() - started
    await asyncio.gather(*jobs)
    sub.close()
    return tasks / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-samples", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--proplets", type=int, default=4)
    parser.add_argument("--window", type=int, default=400)
    parser.add_argument("--module-kib", type=int, default=1024,
                        help="size of the bigger module measured after the small one (0: skip it)")
    args = parser.parse_args()
    body = TaskCreate(name="add", file=base64.b64encode(wasm("add")).decode(), inputs=["1", "2"])
    big_module = with_custom_section(wasm("add"), "padding", os.urandom(args.module_kib * 1024))
    big_body = TaskCreate(name="add", file=base64.b64encode(big_module).decode(), inputs=["1", "2"])
    big_tasks = max(1, args.tasks // 5)
    big_lat: list[float] = []
    big_rate = 0.0

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir / "broker")
        broker.start()
        try:
            rtt = await raw_round_trip(broker, 1000)
            settings = ManagerSettings(mqtt_address=broker.url, tenant_id="e2e", entity_id="e2e-manager",
                                       storage_type="sqlite", sqlite_path=workdir / "e2e.db", http_port=0)
            names = [f"e2e-{i}" for i in range(args.proplets)]
            async with ManagerCore(settings) as core:
                with proplet_processes(broker, "e2e", names, workdir) as procs:
                    await wait_online(core, names)
                    await asyncio.sleep(2)
                    idle_rss = [rss_mb(p.pid) for p in procs]
                    one = TaskCreate.model_validate({**body.model_dump(), "proplet_id": names[0]})
                    lat, before_start = await latency(core, one, args.latency_samples)
                    calls = await invocations(core, one, args.latency_samples)
                    assert broker.process is not None
                    pids = {"manager (this process)": os.getpid(), "Mosquitto": broker.process.pid,
                            **{f"proplet {n}": p.pid for n, p in zip(names, procs, strict=True)}}
                    cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                    rate = await throughput(core, body, args.tasks, args.window)
                    cpu_used = {k: cpu_seconds(pid) - cpu_before[k] for k, pid in pids.items()}
                    if args.module_kib:
                        big_one = TaskCreate.model_validate({**big_body.model_dump(), "proplet_id": names[0]})
                        big_lat, _ = await latency(core, big_one, args.latency_samples)
                        big_rate = await throughput(core, big_body, big_tasks, args.window)
        finally:
            broker.stop()

    r50, r99 = pct(rtt, 0.5), pct(rtt, 0.99)
    l50, l99 = pct(lat, 0.5), pct(lat, 0.99)
    print(f"raw MQTT QoS 1 round trip (same broker):               p50 {r50:6.3f} ms  p99 {r99:6.3f} ms")
    print(f"warm task, submit -> completed (1 proplet process):   p50 {l50:6.3f} ms  p99 {l99:6.3f} ms  "
          f"({l50 / r50:.2f}x / {l99 / r99:.2f}x the round trip)")
    after = [total - before for total, before in zip(lat, before_start, strict=True)]
    print(f"  of which submit -> start published (the dispatch stored first): p50 {pct(before_start, 0.5):6.3f} ms"
          f"  p99 {pct(before_start, 0.99):6.3f} ms")
    print(f"  and start published -> completed (broker both ways, the proplet, the result taken in): "
          f"p50 {pct(after, 0.5):6.3f} ms  p99 {pct(after, 0.99):6.3f} ms")
    c50, c99 = pct(calls, 0.5), pct(calls, 0.99)
    print(f"call of a deployed latent task (invoke -> its answer): p50 {c50:6.3f} ms  p99 {c99:6.3f} ms  "
          f"({c50 / r50:.2f}x / {c99 / r99:.2f}x the round trip)")
    print(f"end to end, SQLite, {args.proplets} proplet processes: {rate:,.0f} tasks/s over {args.tasks:,} tasks")
    if big_lat:
        b50, b99 = pct(big_lat, 0.5), pct(big_lat, 0.99)
        print(f"with a {args.module_kib:,} KiB module, sent inline with each task: warm task p50 {b50:6.3f} ms  "
              f"p99 {b99:6.3f} ms ({b50 / r50:.2f}x / {b99 / r99:.2f}x the round trip); "
              f"{big_rate:,.0f} tasks/s over {big_tasks:,} tasks")
    print(f"idle proplet RSS: {', '.join(f'{m:.1f}' for m in idle_rss)} MB")
    # Where the throughput goes: the machine's cores are shared by all of these.
    total = sum(cpu_used.values())
    print(f"CPU per task in the throughput run: {total / args.tasks * 1e6:,.0f} µs in all, of which")
    for name, used in cpu_used.items():
        print(f"  {name:28s} {used / args.tasks * 1e6:6,.0f} µs")


if __name__ == "__main__":
    asyncio.run(main())
