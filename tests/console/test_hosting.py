"""The console hosts the manager: entering it before the UI, leaving it on quit; the database keeps the
fleet, so reopening shows the same tasks and proplets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console.app import ConsoleApp
from console.views.proplets import PropletsScreen
from console.views.tasks import TasksScreen
from core.config import ManagerSettings
from core.domain import TaskState
from tests.console.conftest import add_body, command, console_settings, table_rows, until
from tests.services import Mosquitto
from tests.wire import SyntheticProplet


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel completes the handshakes) and never answers:
    a PostgreSQL host that hangs."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield silent.getsockname()[1]


def _manager(broker: Mosquitto, db: Path, tenant: str) -> ManagerSettings:
    return ManagerSettings(mqtt_address=broker.url, tenant_id=tenant, entity_id=f"console-{tenant}",
                           sqlite_path=db, http_enabled=False, mqtt_timeout=5.0)


async def test_quitting_stops_the_hosted_manager_and_reopening_shows_the_same_fleet(broker: Mosquitto,
                                                                                     tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    tenant = f"reopen-{uuid.uuid4().hex[:6]}"
    seen: dict[str, Any] = {}

    async def first_session(pilot: Any) -> None:
        app = pilot.app
        await until(pilot, lambda: app.counts_loaded)
        manager = app.manager
        # The hosted core runs on its own thread and loop: reach it through the console's link.
        assert manager.threaded
        assert manager.core.bus is not None
        await manager.on_core(manager.core.bus.wait_connected, 10)
        async with SyntheticProplet(broker.url, manager.topics, "reopen-proplet"):
            task = await manager.create_task(add_body())
            await manager.start_task(task.id)
            await until(pilot, lambda: app.fleet.tasks.get(task.id) is not None
                        and app.fleet.tasks[task.id].results == "42")
        seen["task"] = task.id
        seen["core"] = manager.core
        await command(pilot, "q")

    app = ConsoleApp(settings=console_settings(), manager_settings=_manager(broker, db, tenant))
    await app.run_async(headless=True, size=(140, 40), auto_pilot=first_session)
    # The hosted core was left: it shut down cleanly, and its thread ended.
    assert seen["core"]._shutdown.is_set()
    assert not [t for t in threading.enumerate() if t.name == "propeller-core"]

    async def second_session(pilot: Any) -> None:
        app = pilot.app
        await until(pilot, lambda: app.counts_loaded)
        await pilot.press("2")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))
        table = app.screen.table
        await until(pilot, lambda: table.row_count == 1)
        row = table_rows(table)[0]
        assert row[0] == seen["task"][:8] and row[2] == "completed" and row[6] == "42"
        assert app.fleet.counts.get(TaskState.COMPLETED) == 1
        await pilot.press("3")
        await until(pilot, lambda: isinstance(app.screen, PropletsScreen))
        await until(pilot, lambda: "reopen-proplet" in [r[0] for r in table_rows(app.screen.table)])
        seen["second"] = True
        app.exit()

    again = ConsoleApp(settings=console_settings(), manager_settings=_manager(broker, db, tenant))
    await again.run_async(headless=True, size=(140, 40), auto_pilot=second_session)
    assert seen.get("second")


async def test_a_hosted_core_that_cannot_start_is_reported_and_leaves_no_thread(tmp_path: Path) -> None:
    from core.store import StoreError
    from tests.services import free_port

    manager = ManagerSettings(storage_type="postgres", postgres_host="127.0.0.1", postgres_port=free_port(),
                              mqtt_address="mqtt://127.0.0.1:9", http_enabled=False, _env_file=None)
    app = ConsoleApp(settings=console_settings(), manager_settings=manager)
    with pytest.raises(StoreError, match="Cannot connect to PostgreSQL"):
        await app.run_async(headless=True, size=(140, 40))
    assert not [t for t in threading.enumerate() if t.name == "propeller-core"]


async def test_a_hosted_core_that_shuts_itself_down_closes_the_console_with_an_error(broker: Mosquitto,
                                                                                      tmp_path: Path) -> None:
    tenant = f"fatal-{uuid.uuid4().hex[:6]}"

    async def fail_the_core(pilot: Any) -> None:
        app = pilot.app
        await until(pilot, lambda: app.counts_loaded)

        async def fatal(core: Any) -> None:
            core.request_shutdown()  # what a failing background loop of the core does

        await app.manager.on_core(fatal, app.manager.core)
        for _ in range(100):  # the console closes by itself, within 5 s
            if app.return_code is not None:
                return
            await asyncio.sleep(0.05)
        app.exit()  # it did not: end the test with a failure rather than a hang

    app = ConsoleApp(settings=console_settings(), manager_settings=_manager(broker, tmp_path / "f.db", tenant))
    started = asyncio.get_running_loop().time()
    await app.run_async(headless=True, size=(140, 40), auto_pilot=fail_the_core)
    assert asyncio.get_running_loop().time() - started < 8
    assert app.return_code == 1
    assert not [t for t in threading.enumerate() if t.name == "propeller-core"]


async def test_interrupting_a_core_that_is_still_starting_stops_it_at_once(tmp_path: Path) -> None:
    """Ctrl+C while the core is still starting (a PostgreSQL host that accepts the connection and never
    answers keeps asyncpg waiting 60 s) ends the start at once, leaving no core thread behind: the
    interrupt cancelled the console's wait, but the core went on starting, and the console waited for
    it, so Ctrl+C was ignored for a minute of blank screen."""
    from console.hosting import CoreThread

    with silent_server() as port:
        manager = ManagerSettings(storage_type="postgres", postgres_host="127.0.0.1",
                                  postgres_port=port, mqtt_address="mqtt://127.0.0.1:9",
                                  http_enabled=False, _env_file=None)
        entered = asyncio.ensure_future(CoreThread(manager).__aenter__())
        await asyncio.sleep(0.5)  # the core is waiting for PostgreSQL by now
        assert not entered.done()
        started = asyncio.get_running_loop().time()
        entered.cancel()  # what asyncio.run does with the main task on Ctrl+C
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(entered, 20)
        assert asyncio.get_running_loop().time() - started < 10
        for _ in range(100):
            if not [t for t in threading.enumerate() if t.name == "propeller-core"]:
                break
            await asyncio.sleep(0.05)
        assert not [t for t in threading.enumerate() if t.name == "propeller-core"]


async def test_a_database_that_never_answers_is_reported_with_the_reason(tmp_path: Path) -> None:
    """asyncpg gives up on a server that accepts the connection and never answers (after 60 s, here
    after the DSN's 0.5 s) with a TimeoutError whose text is empty: the console closed with
    `Cannot connect to PostgreSQL (...): .`, naming no reason."""
    from core.store import StoreError
    from core.store.postgres import PostgresStore

    with silent_server() as port, pytest.raises(StoreError) as raised:
        await PostgresStore(f"postgresql://u@127.0.0.1:{port}/db?connect_timeout=0.5").open()
    assert "): ." not in str(raised.value)
    assert "did not answer" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("where", ["a directory", "under a file"])
async def test_a_sqlite_path_that_cannot_be_a_database_is_reported_without_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """MANAGER_SQLITE_PATH naming a directory: aiosqlite's worker thread, stopped after the failed
    open, answered on the core's loop after that loop had closed, and its traceback (RuntimeError:
    Event loop is closed) was printed on the terminal above the error. A path under a regular file
    ended with `[Errno 17] File exists: '...'`, naming neither SQLite nor what to do."""
    failures: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(f"{args.exc_type.__name__}: "
                                                                              f"{args.exc_value}"))
    import time

    import aiosqlite

    stop = aiosqlite.Connection.stop

    def stop_slowly(self: Any) -> Any:
        # The worker takes its stop a little late, as on a loaded machine (a race otherwise).
        self._tx.put_nowait((None, lambda: time.sleep(0.3)))
        return stop(self)

    monkeypatch.setattr(aiosqlite.Connection, "stop", stop_slowly)
    (tmp_path / "file").write_text("")
    path = tmp_path if where == "a directory" else tmp_path / "file" / "p.db"
    manager = ManagerSettings(sqlite_path=path, mqtt_address="mqtt://127.0.0.1:9", http_enabled=False,
                              _env_file=None)
    app = ConsoleApp(settings=console_settings(), manager_settings=manager)
    from core.store import StoreError

    before = set(threading.enumerate())
    with pytest.raises(StoreError, match="Cannot open the SQLite database"):
        await app.run_async(headless=True, size=(140, 40))
    for thread in set(threading.enumerate()) - before:  # aiosqlite's worker, if still there
        await asyncio.to_thread(thread.join, 5)
    assert not failures


async def test_an_unreachable_broker_is_explained_on_the_dashboard(tmp_path: Path) -> None:
    """A configured broker that refuses connections: the manager retries (the broker may come up later)
    and the console opens, but it said only `not connected`; why, and what to do, were in the log file,
    which the console's own screen hides. The dashboard now shows the manager's reason."""
    from textual.widgets import Static

    from tests.services import free_port

    manager = ManagerSettings(sqlite_path=tmp_path / "b.db", mqtt_address=f"mqtt://127.0.0.1:{free_port()}",
                              http_enabled=False, _env_file=None)
    seen: dict[str, str] = {}

    async def read_the_dashboard(pilot: Any) -> None:
        app = pilot.app

        def services() -> str:
            seen["text"] = " ".join(str(app.screen.query_one("#dash-services", Static).render()).split())
            return seen["text"] if "connection refused" in seen["text"] else ""

        try:
            await until(pilot, services)
        finally:
            app.exit()

    app = ConsoleApp(settings=console_settings(), manager_settings=manager)
    await app.run_async(headless=True, size=(140, 40), auto_pilot=read_the_dashboard)
    assert "Cannot reach the MQTT broker" in seen["text"], seen.get("text")


async def test_a_slow_start_says_what_it_waits_for_and_how_to_cancel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The core starts before the console draws anything: a database that does not answer kept the
    terminal blank for a minute (asyncpg's connect timeout), with no word of what it waited for."""
    import console.app

    monkeypatch.setattr(console.app, "SLOW_START_S", 0.2)
    with silent_server() as port:
        manager = ManagerSettings(storage_type="postgres", postgres_host="127.0.0.1", postgres_port=port,
                                  mqtt_address="mqtt://127.0.0.1:9", http_enabled=False, _env_file=None)
        app = ConsoleApp(settings=console_settings(), manager_settings=manager)
        running = asyncio.ensure_future(app.run_async(headless=True, size=(140, 40)))
        said = ""
        for _ in range(100):
            said += capsys.readouterr().err
            if "Ctrl+C" in said:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("nothing was said while the manager was starting")
        assert f"PostgreSQL at 127.0.0.1:{port}" in said, said
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, 20)
