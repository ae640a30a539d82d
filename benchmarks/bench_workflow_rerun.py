"""Re-run of a finished workflow task: how long `start_task` of a task with `--downstream` finished
tasks downstream of it takes (the caller's wait: the task queued again and every task downstream
reset to pending), on SQLite and on PostgreSQL (a database of its own on the shared test server).

The workflow is a root, half of the downstream tasks depending on it and the other half each on
one of those. No proplet is online: the root stays queued, and each sample ends with a stop of the
root, which skips everything downstream again (a finished workflow, ready for the next sample).
Printed next to a start of a lone finished task in the same run (one commit, no downstream).

    .venv/bin/python benchmarks/bench_workflow_rerun.py [--downstream 100] [--samples 30]
        [--backend sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_dispatch import WASM, pct  # noqa: E402

from core.config import ManagerSettings  # noqa: E402
from core.schemas import TaskCreate, WorkflowCreate  # noqa: E402
from core.service import ManagerCore  # noqa: E402
from core.store.postgres import PostgresStore  # noqa: E402
from tests.services import Mosquitto, create_database, drop_database  # noqa: E402


def task(*deps: str) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "name": "add", "file": WASM, "depends_on": list(deps)}


async def finish(core: ManagerCore, task_id: str) -> None:
    """Stop a queued task (no proplet is there to run it) and wait for its dependents' skips."""
    await core.stop_task(task_id)
    await core.groups.settle()


async def measure(core: ManagerCore, downstream: int, samples: int) -> tuple[list[float], list[float]]:
    root = task()
    first = [task(root["id"]) for _ in range(downstream // 2)]
    second = [task(first[i % len(first)]["id"]) for i in range(downstream - len(first))]
    await core.create_workflow(WorkflowCreate.model_validate({"tasks": [root, *first, *second]}))
    lone = (await core.create_task(TaskCreate.model_validate(task()))).id
    for task_id in (root["id"], lone):
        await core.start_task(task_id)
        await finish(core, task_id)
    group = await core.group_tasks(workflow_id=(await core.get_task(root["id"])).workflow_id)
    assert all(t.state.is_terminal for t in group), [t.state.label for t in group]

    rerun, alone = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        await core.start_task(root["id"])
        rerun.append((time.perf_counter() - t0) * 1000)
        await finish(core, root["id"])
        t0 = time.perf_counter()
        await core.start_task(lone)
        alone.append((time.perf_counter() - t0) * 1000)
        await finish(core, lone)
    group = await core.group_tasks(workflow_id=(await core.get_task(root["id"])).workflow_id)
    assert sum(t.state.label == "skipped" for t in group) == downstream
    return rerun, alone


async def on(backend: str, broker: Mosquitto, tmp: Path, downstream: int, samples: int) -> None:
    settings = ManagerSettings(mqtt_address=broker.url, tenant_id=f"bench-{backend}", entity_id="bench-manager",
                               storage_type="sqlite", sqlite_path=tmp / f"{backend}.db", http_port=0,
                               _env_file=None)
    db = await create_database() if backend == "postgres" else None
    try:
        async with ManagerCore(settings, store=PostgresStore(db.dsn) if db is not None else None) as core:
            rerun, alone = await measure(core, downstream, samples)
    finally:
        if db is not None:
            await drop_database(db)
    print(f"{backend:8} re-run of a task with {downstream} tasks downstream: p50 {pct(rerun, 0.5):7.1f} ms  "
          f"max {max(rerun):7.1f} ms  mean {statistics.mean(rerun):7.1f} ms   | start of a lone finished task: "
          f"p50 {pct(alone, 0.5):5.1f} ms  max {max(alone):5.1f} ms   ({samples} samples)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--downstream", type=int, default=100)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "broker")
        broker.start()
        try:
            for backend in ("sqlite", "postgres") if args.backend == "both" else (args.backend,):
                await on(backend, broker, Path(tmp), args.downstream, args.samples)
        finally:
            broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
