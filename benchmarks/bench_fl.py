"""Federated-learning benchmark: rounds coordinated by the manager on real proplets (separate
processes) running the C training module tests/wasm/flclient.c.

Prints, next to baselines measured in the same run on the same broker and proplets:
- a round's latency, configure (what POST /fl/experiments runs) -> the round's model stored, p50/p99,
  against the same module run as plain tasks, one per proplet started together (submit -> all
  completed), one such task alone, and the raw MQTT QoS 1 round trip;
- what a round adds to its tasks: its writes, the dataset fetch, the updates, averaging.

Each proplet trains on its own rows (served by a data store in this process); the model of each
round is the next round's starting point, so the benchmark also prints the loss falling.

    .venv/bin/python benchmarks/bench_fl.py [--rounds 50] [--proplets 4] [--task-samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.server
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_dispatch import pct, raw_round_trip  # noqa: E402
from bench_e2e import latency, proplet_processes, wait_online  # noqa: E402

from core.config import ManagerSettings  # noqa: E402
from core.domain import RoundState  # noqa: E402
from core.schemas import ExperimentConfig, TaskCreate  # noqa: E402
from core.service import ManagerCore  # noqa: E402
from tests.services import Mosquitto  # noqa: E402
from tests.wasmfixtures import wasm  # noqa: E402


def datasets(names: list[str], rows: int) -> dict[str, bytes]:
    """y = 3 x0 - 2 x1 + 0.5 plus noise, split across the proplets."""
    rng = random.Random(20261206)
    out = {}
    for name in names:
        xs = [[rng.uniform(-2, 2), rng.uniform(-2, 2)] for _ in range(rows)]
        ys = [3 * x0 - 2 * x1 + 0.5 + rng.gauss(0, 0.1) for x0, x1 in xs]
        out[name] = json.dumps({"x": xs, "y": ys}).encode()
    return out


class DataStore:
    """GET /datasets/<proplet id>, on a thread of this process."""

    def __init__(self, data: dict[str, bytes]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's method names
                body = data.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if body is not None else 404)
                self.send_header("content-length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def parallel_tasks(core: ManagerCore, names: list[str], module: str, samples: int) -> list[float]:
    """The same module as plain tasks, one per proplet started together: submit -> all completed (ms)."""
    out = []
    for _ in range(samples):
        tasks = [await core.create_task(TaskCreate(name="_start", file=module, proplet_id=n)) for n in names]
        t0 = time.perf_counter()
        await asyncio.gather(*(core.start_task(t.id) for t in tasks))
        for t in tasks:
            while not (await core.get_task(t.id)).state.is_terminal:  # noqa: ASYNC110
                await asyncio.sleep(0.0002)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def rounds(core: ManagerCore, participants: list[str], module: str, count: int,
                 prefix: str) -> tuple[list[float], list[float]]:
    """Round latencies (ms) and the mean loss each round started from."""
    latencies, losses = [], []
    model = "global_model_v0"
    for n in range(count):
        config = ExperimentConfig(round_id=f"{prefix}-{n}", model_ref=model, participants=participants,
                                  hyperparams={"lr": 0.05, "epochs": 5}, task_wasm_file=module)
        t0 = time.perf_counter()
        await core.federated.configure(config)
        while core.federated.is_running(config.round_id):  # noqa: ASYNC110
            await asyncio.sleep(0.0002)
        latencies.append((time.perf_counter() - t0) * 1000)
        done, updates = await core.federated.get_round(config.round_id)
        assert done.state is RoundState.COMPLETED, (done.state, done.reason)
        losses.append(sum(u.body["metrics"]["loss"] for u in updates) / len(updates))
        model = f"global_model_v{done.model_version}"
    return latencies, losses


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--proplets", type=int, default=4)
    parser.add_argument("--rows", type=int, default=200, help="training rows per proplet")
    parser.add_argument("--task-samples", type=int, default=200)
    args = parser.parse_args()
    module = base64.b64encode(wasm("flclient")).decode()
    names = [f"fl-{i}" for i in range(args.proplets)]
    store = DataStore(datasets(names, args.rows))

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir / "broker")
        broker.start()
        try:
            rtt = await raw_round_trip(broker, 1000)
            settings = ManagerSettings(mqtt_address=broker.url, tenant_id="fl", entity_id="fl-manager",
                                       storage_type="sqlite", sqlite_path=workdir / "fl.db", http_port=0)
            async with ManagerCore(settings) as core:
                with proplet_processes(broker, "fl", names, workdir, DATA_STORE_URL=store.url):
                    await wait_online(core, names)
                    # Baseline: one proplet, the same module as a plain WASI command (its built-in data).
                    task = TaskCreate(name="_start", file=module, proplet_id=names[0])
                    task_ms = await latency(core, task, args.task_samples)
                    await rounds(core, names, module, 3, "warm-up")  # every proplet compiles the module
                    together_ms = await parallel_tasks(core, names, module, args.rounds)
                    round_ms, losses = await rounds(core, names, module, args.rounds, "bench")
        finally:
            broker.stop()
            store.server.shutdown()

    r50, r99 = pct(rtt, 0.5), pct(rtt, 0.99)
    t50, t99 = pct(task_ms, 0.5), pct(task_ms, 0.99)
    f50, f99 = pct(round_ms, 0.5), pct(round_ms, 0.99)
    print(f"raw MQTT QoS 1 round trip (same broker):              p50 {r50:7.3f} ms  p99 {r99:7.3f} ms")
    print(f"one task, flclient on 1 proplet (submit -> completed): p50 {t50:7.3f} ms  p99 {t99:7.3f} ms")
    g50, g99 = pct(together_ms, 0.5), pct(together_ms, 0.99)
    print(f"{args.proplets} such tasks started together, one per proplet: p50 {g50:7.3f} ms  p99 {g99:7.3f} ms")
    print(f"round of {args.proplets} proplets, configure -> model stored:   p50 {f50:7.3f} ms  p99 {f99:7.3f} ms  "
          f"({f50 / g50:.2f}x / {f99 / g99:.2f}x the {args.proplets} tasks)")
    print(f"what a round adds to its tasks (its writes, the dataset fetch, the updates, averaging): "
          f"{f50 - g50:.3f} ms at p50 ({args.rounds} rounds, {args.rows} rows per proplet)")
    print(f"mean loss at the start of round 1, 10, {len(losses)}: "
          f"{losses[0]:.4f}, {losses[min(9, len(losses) - 1)]:.4f}, {losses[-1]:.4f}")


if __name__ == "__main__":
    asyncio.run(main())
