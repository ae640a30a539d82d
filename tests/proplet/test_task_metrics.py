"""Per-task metrics on control/proplet/task_metrics, in upstream's shape, stored by the manager
(GET /tasks/{id}/metrics): a real agent on both runtimes, a real manager, Mosquitto and wasm.
`busy` spins on the CPU for the milliseconds it is given."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from core.domain import TaskState
from core.schemas import TaskCreate
from proplet.monitoring import LONG_RUNNING_DAEMON, STANDARD, profile_for
from tests.proplet.conftest import PropletFactory
from tests.proplet.helpers import b64, run_task, run_to_end
from tests.wasmfixtures import wasm, wasmtime_cli
from tests.wire import eventually

UPSTREAM_FIELDS = {"cpu_percent", "memory_bytes", "memory_percent", "disk_read_bytes", "disk_write_bytes",
                   "uptime_seconds", "thread_count"}
AGGREGATES = {"avg_cpu_usage", "max_cpu_usage", "avg_memory_usage", "max_memory_usage", "total_disk_read",
              "total_disk_write", "sample_count"}


async def stored_metrics(manager: Any, task_id: str, at_least: int) -> list[Any]:
    """The task's samples, oldest first, once the manager has stored `at_least` of them."""
    async def enough() -> list[Any] | None:
        page = await manager.task_metrics(task_id, 0, 100)
        return sorted(page.items, key=lambda m: m.metrics["uptime_seconds"]) if page.total >= at_least else None

    return await eventually(enough, 5)


@pytest.mark.parametrize("runtime", ["internal", "external"])
async def test_a_running_task_reports_its_own_cpu_and_memory_every_interval(
        manager: Any, proplet_factory: PropletFactory, runtime: str) -> None:
    extra = {"external_wasm_runtime": wasmtime_cli()} if runtime == "external" else {}
    async with proplet_factory(manager, f"p-mon-{runtime}", **extra):
        done = await run_task(manager, name="_start", file=b64(wasm("busy")), inputs=["1300"],
                              monitoring_profile={"interval": 0.4})
        assert done.state is TaskState.COMPLETED, done.error
        samples = await stored_metrics(manager, done.id, 3)
    # At 0.1 s, then every 0.4 s while it ran: 0.1, 0.5, 0.9 (and 1.3 if it was still running).
    assert 3 <= len(samples) <= 4
    uptimes = [m.metrics["uptime_seconds"] for m in samples]
    assert uptimes[0] == pytest.approx(0.1, abs=0.08)
    assert all(b - a == pytest.approx(0.4, abs=0.15) for a, b in itertools.pairwise(uptimes))
    for i, m in enumerate(samples, 1):
        assert UPSTREAM_FIELDS <= set(m.metrics) and set(m.aggregated) == AGGREGATES
        assert m.proplet_id == f"p-mon-{runtime}" and m.aggregated["sample_count"] == i
        # It spins a core: its own CPU, not the proplet's (nothing else runs there, but the
        # internal runtime's figure comes from the guest's thread alone). Never more than one core,
        # the first sample too; well above idle on average, however much of a core a loaded machine
        # leaves it. One sample alone may read low: the first covers 0.1 s, and a process's CPU
        # time (the external runtime's) counts in 10 ms ticks, so a busy machine read 10%.
        assert 0 <= m.metrics["cpu_percent"] <= 140, m.metrics
        assert m.aggregated["max_cpu_usage"] >= m.aggregated["avg_cpu_usage"]
    assert samples[-1].aggregated["avg_cpu_usage"] > 20, [m.metrics["cpu_percent"] for m in samples]
    memory = samples[-1].metrics["memory_bytes"]
    if runtime == "internal":
        # The guest's linear memory: whole wasm pages, far below the proplet's own RSS.
        assert memory > 0 and memory % 65536 == 0 and memory < 16 * 1024 * 1024
        assert samples[-1].metrics["thread_count"] == 1
    else:
        # `wasmtime run`'s process: its resident memory, threads and open files.
        assert memory > 4 * 1024 * 1024
        assert samples[-1].metrics["file_descriptor_count"] >= 3


async def test_short_tasks_send_none_and_a_profile_or_the_setting_turns_them_off(
        manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-mon-quiet") as agent:
        short = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[1, 2])
        unsent = await run_task(manager, name="_start", file=b64(wasm("busy")), inputs=["500"],
                                monitoring_profile={"interval": 0.1, "export_to_mqtt": False})
        disabled = await run_task(manager, name="_start", file=b64(wasm("busy")), inputs=["500"],
                                  monitoring_profile={"enabled": False})
        agent.settings.enable_monitoring = False
        off = await run_task(manager, name="_start", file=b64(wasm("busy")), inputs=["500"],
                             monitoring_profile={"interval": 0.1})
        agent.settings.enable_monitoring = True
        sent = await run_task(manager, name="_start", file=b64(wasm("busy")), inputs=["500"],
                              monitoring_profile={"interval": 0.1})
        await stored_metrics(manager, sent.id, 3)  # the same path, sending: the checks below could fail
        for task in (short, unsent, disabled, off):
            assert task.state is TaskState.COMPLETED
            assert (await manager.task_metrics(task.id, 0, 10)).total == 0


def test_profiles_follow_upstream_and_read_gos_nanoseconds() -> None:
    assert profile_for(None, daemon=False) == STANDARD and (STANDARD.interval_s, STANDARD.history_size) == (10, 100)
    assert profile_for({}, daemon=True) == LONG_RUNNING_DAEMON
    assert (LONG_RUNNING_DAEMON.interval_s, LONG_RUNNING_DAEMON.history_size) == (120, 500)
    # Go's manager marshals time.Duration as nanoseconds; upstream's proplet reads them as seconds.
    assert profile_for({"interval": 2_000_000_000}, daemon=False).interval_s == 2.0
    assert profile_for({"interval": 3}, daemon=False).interval_s == 3.0
    partial = profile_for({"interval": 0.001, "collect_disk_io": False, "history_size": 10**9,
                           "enabled": "yes"}, daemon=False)
    assert (partial.interval_s, partial.collect_disk_io, partial.history_size, partial.enabled) == (
        0.1, False, 10_000, True)


async def test_two_guests_at_once_are_measured_apart_on_the_internal_runtime(
        manager: Any, proplet_factory: PropletFactory) -> None:
    """Upstream's internal runtime reports the whole proplet for each task: two spinning guests
    would each show both cores. Here each shows its own thread: about one core."""
    async with proplet_factory(manager, "p-mon-two", max_concurrent_tasks=2):
        tasks = [await manager.create_task(TaskCreate(name="_start", file=b64(wasm("busy")), inputs=["1000"],
                                                      monitoring_profile={"interval": 0.3})) for _ in range(2)]
        for task in tasks:
            await manager.start_task(task.id)
        done = [await run_to_end(manager, task.id) for task in tasks]
        assert all(d.state is TaskState.COMPLETED for d in done)
        samples = [await stored_metrics(manager, task.id, 3) for task in tasks]
    cpu = [m.metrics["cpu_percent"] for each in samples for m in each]
    # One core at most, give or take the sampling moments (a process-wide clock gave 193-237%). A
    # loaded machine gives each guest what share of a core its other work leaves: one sample of a
    # CI run read 18%, the others 62-94%.
    assert all(0 < c <= 140 for c in cpu), cpu
    assert sum(cpu) / len(cpu) > 20, cpu
