"""SVG snapshots of the main views (pytest-textual-snapshot; Textual is pinned, review diffs as UI changes).

Deterministic on purpose: a database seeded here with fixed ids and times, a frozen clock and host name,
HOME pointing at the test directory (so the database shows as ~/propeller.db), a broker address where
nothing listens (so the header always says "not connected"), no REST API, cursor blink off, and MQTT
traffic records with fixed times fed to the traffic view. Regenerate with --snapshot-update and review
the SVGs under __snapshots__/.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from console.app import ConsoleApp
from console.views.dispatch import DispatchScreen
from console.views.proplets import PropletDetailScreen, PropletsScreen
from console.views.tasks import TaskDetailScreen, TasksScreen
from console.views.traffic import TrafficScreen
from core.config import ManagerSettings
from core.domain import Proplet, PropletMetrics, Task, TaskEvent, TaskLimits, TaskState
from core.mqtt import TrafficRecord
from core.store.migrate import migrate
from core.store.sqlite import SqliteStore
from tests.console.conftest import EXAMPLES, ROOT, console_settings, until

NOW = datetime(2026, 1, 5, 10, 5, 0, tzinfo=UTC)
T = NOW - timedelta(minutes=5)
SIZE = (140, 36)
PREFIX = "m/demo/c/default/"


def at(seconds: float) -> datetime:
    return T + timedelta(seconds=seconds)


def _task(task_id: str, name: str, state: TaskState, created: float, **fields: Any) -> Task:
    return Task(id=task_id, name=name, state=state, created_at=at(created), updated_at=at(created), **fields)


TASKS = [
    (_task("6f1c2a9e-0c1b-4e5f-9a61-1f2e3d4c5b6a", "add", TaskState.COMPLETED, 0, inputs=["40", "2"], results="42",
           proplet_id="gw-proplet-1", attempt=1, start_time=at(1.25), finish_time=at(1.31), wasm_digest="sha256:"
           "6e3f2b8a" + "0" * 56, env={"GREETING": "hi"}, limits=TaskLimits(timeout_s=5.0)),
     [(TaskState.PENDING, 0, "created"), (TaskState.PENDING, 1, "queued"),
      (TaskState.SCHEDULED, 1.2, "dispatched to gw-proplet-1"), (TaskState.RUNNING, 1.25, "running on gw-proplet-1"),
      (TaskState.COMPLETED, 1.31, "completed on gw-proplet-1")]),
    (_task("8a2d4f10-5b6c-4d7e-8f90-a1b2c3d4e5f6", "_start", TaskState.COMPLETED, 20,
           results="Hello from Propeller!", proplet_id="gw-proplet-2", attempt=1, start_time=at(21),
           finish_time=at(21.4), image_url="https://files.lan/hello.wasm"),
     [(TaskState.PENDING, 20, "created"), (TaskState.PENDING, 20.5, "queued"),
      (TaskState.RUNNING, 21, "dispatched to gw-proplet-2"), (TaskState.COMPLETED, 21.4, "completed on gw-proplet-2")]),
    (_task("b3c4d5e6-f708-4192-a3b4-c5d6e7f80912", "resize", TaskState.FAILED, 60, inputs=["4096"],
           proplet_id="gw-proplet-1", attempt=1, start_time=at(61), finish_time=at(63.5),
           error="Task b3c4d5e6 failed: exceeded its fuel budget of 1000000. Raise the task's fuel limit."),
     [(TaskState.PENDING, 60, "created"), (TaskState.PENDING, 60.2, "queued"),
      (TaskState.RUNNING, 61, "dispatched to gw-proplet-1"), (TaskState.FAILED, 63.5, "failed on gw-proplet-1")]),
    (_task("c0ffee00-1234-4abc-9def-0123456789ab", "train", TaskState.RUNNING, 120, proplet_id="gw-proplet-2",
           attempt=1, start_time=at(121), daemon=True, image_url="registry.lan/wasm/train:v3"),
     [(TaskState.PENDING, 120, "created"), (TaskState.PENDING, 120.1, "queued"),
      (TaskState.RUNNING, 121, "dispatched to gw-proplet-2")]),
    (_task("d1e2f3a4-b5c6-4d7e-8f9a-0b1c2d3e4f5a", "loop", TaskState.INTERRUPTED, 180, proplet_id="gw-proplet-1",
           attempt=1, start_time=at(181), finish_time=at(200), error="stopped by request"),
     [(TaskState.PENDING, 180, "created"), (TaskState.PENDING, 180.1, "queued"),
      (TaskState.RUNNING, 181, "dispatched to gw-proplet-1"), (TaskState.INTERRUPTED, 200, "stopped by request")]),
    (_task("e5f6a7b8-c9d0-4e1f-8a2b-3c4d5e6f7a8b", "draft", TaskState.PENDING, 240,
           image_url="registry.lan/wasm/draft:v1"),
     [(TaskState.PENDING, 240, "created")]),
]

PROPLETS = [
    Proplet("gw-proplet-1", "brave-otter", {"os": "linux", "cpu_arch": "x86_64", "wasm_runtime": "wasmtime",
                                             "max_concurrent_tasks": 4}, "default",
            [at(300 - 2 * i) for i in range(10, 0, -1)], online=True),
    Proplet("gw-proplet-2", "calm-heron", {"os": "linux", "cpu_arch": "aarch64", "wasm_runtime": "wasmtime"},
            "default", [at(296 - 2 * i) for i in range(10, 0, -1)], online=True),
    Proplet("esp32-s3-kitchen", "keen-wren", {"os": "esp-idf", "cpu_arch": "xtensa", "wasm_runtime": "wamr"},
            "default", []),
]


async def _seed(path: Path) -> None:
    store = SqliteStore(path)
    await store.open()
    try:
        await migrate(store)
        ops = []
        for task, events in TASKS:
            ops.append(store.op_insert_task(task))
            ops += [store.op_task_event(TaskEvent(task.id, state, at(s), 1 if s > 1 or state is not TaskState.PENDING
                                                  else 0, task.proplet_id if state is not TaskState.PENDING else "",
                                                  detail)) for state, s, detail in events]
        for p in PROPLETS:
            ops.append(store.op_upsert_proplet(p, p.last_alive_at or at(0)))
        for i in range(30):
            for proplet_id, base in (("gw-proplet-1", 12.0), ("gw-proplet-2", 40.0)):
                ops.append(store.op_proplet_metrics(PropletMetrics(
                    proplet_id, "default", at(5 + 10 * i), {"percent": base + (i % 7) * 3.5},
                    {"rss_bytes": int((48 + (i % 5) * 2) * 1024 * 1024)})))
        await store.apply(ops)
    finally:
        await store.close()


def _traffic() -> list[TrafficRecord]:
    wasm = (EXAMPLES / "add.wasm").read_bytes()
    start = orjson.dumps({"id": TASKS[0][0].id, "name": "add", "state": 2, "image_url": "",
                          "file": base64.b64encode(wasm).decode(), "inputs": ["40", "2"], "cli_args": None,
                          "proplet_id": "gw-proplet-1", "attempt": 1})
    alive = orjson.dumps({"proplet_id": "gw-proplet-1", "status": "alive", "namespace": "default"})
    result = orjson.dumps({"task_id": TASKS[0][0].id, "proplet_id": "gw-proplet-1", "results": "42", "error": None})
    base = T.timestamp()
    records = []
    for i in range(12):
        records.append(TrafficRecord(base + i * 2.0, "in", PREFIX + "control/proplet/alive", len(alive), alive, 1))
    records.append(TrafficRecord(base + 1.2, "out", PREFIX + "control/manager/start", len(start), start, 1))
    records.append(TrafficRecord(base + 1.31, "in", PREFIX + "control/proplet/results", len(result), result, 1))
    return sorted(records, key=lambda r: r.at)


@pytest.fixture
def snapshot_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., ConsoleApp]:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(ROOT)
    db = tmp_path / "propeller.db"
    asyncio.run(_seed(db))

    def make(**settings: Any) -> ConsoleApp:
        manager = ManagerSettings(
            mqtt_address="mqtt://127.0.0.1:9", tenant_id="demo", entity_id="snapshot-manager", sqlite_path=db,
            http_enabled=False, liveness_timeout=1e9, mqtt_timeout=1.0)
        return ConsoleApp(settings=console_settings(**settings), manager_settings=manager,
                          clock=lambda: NOW, hostname="gateway-01")

    return make


def _ready(then: Callable[[Any], Awaitable[None]] | None = None) -> Callable[[Any], Awaitable[None]]:
    async def run_before(pilot: Any) -> None:
        app = pilot.app
        await until(pilot, lambda: app.counts_loaded and len(app.fleet.proplets) == 3)
        if then is not None:
            await then(pilot)
        await pilot.pause(0.3)

    return run_before


def test_dashboard(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def dashboard(pilot: Any) -> None:
        await until(pilot, lambda: "exceeded its fuel" in str(pilot.app.screen.query_one("#dash-failures").render()))

    assert snap_compare(snapshot_app(), run_before=_ready(dashboard), terminal_size=SIZE)


def test_tasks_table(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def tasks(pilot: Any) -> None:
        await pilot.press("2")
        await until(pilot, lambda: isinstance(pilot.app.screen, TasksScreen) and pilot.app.screen.table.row_count == 6)

    assert snap_compare(snapshot_app(), run_before=_ready(tasks), terminal_size=SIZE)


def test_tasks_table_filtered_in_the_light_theme(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def filtered(pilot: Any) -> None:
        await pilot.press("2")
        await until(pilot, lambda: isinstance(pilot.app.screen, TasksScreen) and pilot.app.screen.table.row_count == 6)
        await pilot.press("slash", *"!completed", "enter")
        await until(pilot, lambda: pilot.app.screen.table.row_count == 4)

    assert snap_compare(snapshot_app(theme="propeller-light"), run_before=_ready(filtered), terminal_size=SIZE)


def test_task_detail(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def detail(pilot: Any) -> None:
        await pilot.press("2")
        await until(pilot, lambda: isinstance(pilot.app.screen, TasksScreen) and pilot.app.screen.table.row_count == 6)
        pilot.app.screen.select(TASKS[0][0].id)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, TaskDetailScreen)
                    and pilot.app.screen.query_one("#timeline").row_count == 5)

    assert snap_compare(snapshot_app(), run_before=_ready(detail), terminal_size=SIZE)


def test_proplets_table(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def proplets(pilot: Any) -> None:
        await pilot.press("3")
        await until(pilot, lambda: isinstance(pilot.app.screen, PropletsScreen)
                    and str(pilot.app.screen.table.get_cell("gw-proplet-2", "cpu")) != "")

    assert snap_compare(snapshot_app(), run_before=_ready(proplets), terminal_size=SIZE)


def test_proplet_detail(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def detail(pilot: Any) -> None:
        await pilot.press("3")
        await until(pilot, lambda: isinstance(pilot.app.screen, PropletsScreen)
                    and pilot.app.screen.table.row_count == 3)
        table = pilot.app.screen.table
        table.move_cursor(row=table.get_row_index("gw-proplet-1"))
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, PropletDetailScreen)
                    and len(pilot.app.screen.stored_cpu) == 30)

    assert snap_compare(snapshot_app(), run_before=_ready(detail), terminal_size=SIZE)


async def _show_traffic(pilot: Any) -> None:
    """The traffic view with sample messages, the start topic's payload shown."""
    app = pilot.app
    app.traffic.ingest(_traffic())
    await pilot.press("4")
    await until(pilot, lambda: isinstance(app.screen, TrafficScreen)
                and app.screen.query_one("#traffic-log").line_count == 14)
    screen = app.screen
    tree = screen.query_one("#topics")
    tree.focus()
    tree.move_cursor(screen._topic_nodes[PREFIX + "control/manager/start"])
    await until(pilot, lambda: "not shown" in str(screen.query_one("#payload").render()))


def _traffic_app(snapshot_app: Callable[..., ConsoleApp]) -> ConsoleApp:
    # The traffic rates are computed against the wall clock: freeze them out of the status line.
    app = snapshot_app()
    app.traffic.rate_in.per_second = lambda now, window=5: 0.0  # type: ignore[method-assign]
    app.traffic.rate_out.per_second = lambda now, window=5: 0.0  # type: ignore[method-assign]
    return app


def test_traffic(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    assert snap_compare(_traffic_app(snapshot_app), run_before=_ready(_show_traffic), terminal_size=SIZE)


def test_dispatch_form_with_errors_in_place(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def dispatch(pilot: Any) -> None:
        from textual.widgets import Input

        await pilot.press("5")
        await until(pilot, lambda: isinstance(pilot.app.screen, DispatchScreen))
        screen = pilot.app.screen
        screen.query_one("#module", Input).value = "examples/add.wasm"
        await until(pilot, lambda: screen.exports == ("add",))
        screen.query_one("#name", Input).value = "mul"
        screen.query_one("#inputs", Input).value = "40 2"
        screen.query_one("#env", Input).value = "GREETING"
        await pilot.press("f5")
        await until(pilot, lambda: screen.query_one("#error-name").has_class("-shown"))

    assert snap_compare(snapshot_app(), run_before=_ready(dispatch), terminal_size=SIZE)


def test_help_for_the_tasks_view(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def help_screen(pilot: Any) -> None:
        await pilot.press("2")
        await until(pilot, lambda: isinstance(pilot.app.screen, TasksScreen) and pilot.app.screen.table.row_count == 6)
        await pilot.press("question_mark")
        await until(pilot, lambda: pilot.app.screen.__class__.__name__ == "HelpScreen")

    assert snap_compare(snapshot_app(read_only=True), run_before=_ready(help_screen), terminal_size=SIZE)


# An 80x24 terminal, the default of most terminals an operator opens over SSH on a gateway: the
# header's and footer's short forms, the two-column dashboard, the task table's first columns and
# the traffic view with room for its topics.
SMALL = (80, 24)


def test_dashboard_on_an_80x24_terminal(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def dashboard(pilot: Any) -> None:
        await until(pilot, lambda: "exceeded its fuel" in str(pilot.app.screen.query_one("#dash-failures").render()))

    assert snap_compare(snapshot_app(), run_before=_ready(dashboard), terminal_size=SMALL)


def test_tasks_table_on_an_80x24_terminal(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    async def tasks(pilot: Any) -> None:
        await pilot.press("2")
        await until(pilot, lambda: isinstance(pilot.app.screen, TasksScreen) and pilot.app.screen.table.row_count == 6)

    assert snap_compare(snapshot_app(), run_before=_ready(tasks), terminal_size=SMALL)


def test_traffic_on_an_80x24_terminal(snap_compare: Any, snapshot_app: Callable[..., ConsoleApp]) -> None:
    assert snap_compare(_traffic_app(snapshot_app), run_before=_ready(_show_traffic), terminal_size=SMALL)
