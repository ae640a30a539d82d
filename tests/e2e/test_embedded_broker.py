"""The in-process broker that `propeller serve` starts when no broker listens, with real proplet processes."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_serve import PROPELLER, Serve, _results
from tests.services import create_database, drop_database, free_port
from tests.wire import eventually

pytestmark = pytest.mark.serial

ADD_WASM = Path(__file__).parents[2] / "examples" / "add.wasm"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    env = dict(os.environ)
    env["MANAGER_HTTP_PORT"] = str(free_port())
    # Nothing listens on this port, so serve starts its in-process broker there.
    env["MANAGER_DEFAULT_BROKER_PORT"] = str(free_port())
    server = Serve(env, tmp_path / "serve.log")
    yield server
    if server.proc is not None:
        server.proc.kill()
        server.proc.wait()


class Proplets:
    """Real `propeller proplet` processes called edge-1 on the in-process broker of `serve`."""

    def __init__(self, serve: Serve, tmp_path: Path) -> None:
        self.serve = serve
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, keep_alive: int) -> subprocess.Popen[bytes]:
        port = self.serve.env["MANAGER_DEFAULT_BROKER_PORT"]
        # A state directory per process: a process stands for a device, and the frozen one still holds
        # the id's lock where a device back from a power cut would not.
        env = dict(self.serve.env, PROPLET_MQTT_ADDRESS=f"mqtt://127.0.0.1:{port}", PROPLET_ENTITY_ID="edge-1",
                   PROPLET_MQTT_KEEP_ALIVE=str(keep_alive),
                   PROPLET_STATE_DIR=str(self.tmp_path / f"proplet-{len(self.procs)}-state"))
        log = (self.tmp_path / f"proplet-{len(self.procs)}.log").open("ab")
        proc = subprocess.Popen([*PROPELLER, "proplet"], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc


@pytest.fixture
def proplets(serve: Serve, tmp_path: Path) -> Iterator[Proplets]:
    serve.start()
    started = Proplets(serve, tmp_path)
    yield started
    for proc in started.procs:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


async def _edge_1(api: httpx.AsyncClient) -> dict[str, Any] | None:
    return next((p for p in (await api.get("/proplets")).json()["proplets"] if p["id"] == "edge-1"), None)


async def _alive(api: httpx.AsyncClient, alive: bool) -> dict[str, Any] | None:
    p = await _edge_1(api)
    return p if p is not None and p["alive"] is alive else None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
async def test_a_proplet_that_dies_or_goes_silent_is_offline_by_its_last_will(
    serve: Serve, proplets: Proplets, sig: signal.Signals
) -> None:
    # Heartbeats every 10 s: the manager's liveness timeout is 30 s, so only the Last Will can
    # mark the proplet offline sooner.
    proplet = proplets.start(keep_alive=2)
    async with httpx.AsyncClient(base_url=serve.url) as api:
        await eventually(lambda: _alive(api, True), timeout=15)
        proplet.send_signal(sig)
        lost = time.monotonic()
        # A killed proplet's socket closes at once; a frozen one keeps it open and only stops
        # talking, so the broker must drop it after 1.5 x its 2 s keep-alive (MQTT-3.1.2-24).
        p = await eventually(lambda: _alive(api, False), timeout=8, interval=0.1)
        print(f"offline {time.monotonic() - lost:.1f}s after {sig.name}")
    assert "Last Will" in p["offline_reason"], p


async def test_a_proplet_that_comes_back_while_the_broker_holds_its_old_connection_gets_its_tasks(
    serve: Serve, proplets: Proplets
) -> None:
    # A device that lost power or its link comes back under the same id before the broker noticed
    # (keep-alive 30 s): the broker takes the session over from the old connection.
    old = proplets.start(keep_alive=30)
    async with httpx.AsyncClient(base_url=serve.url) as api:
        await eventually(lambda: _alive(api, True), timeout=15)
        old.send_signal(signal.SIGSTOP)
        proplets.start(keep_alive=30)
        await asyncio.sleep(3)  # the new one connects and announces itself
        created = await api.post("/tasks", json={"name": "add", "inputs": [40, 2], "proplet_id": "edge-1",
                                                 "file": base64.b64encode(ADD_WASM.read_bytes()).decode()})
        assert created.status_code == 201, created.text
        tid = created.json()["id"]
        assert (await api.post(f"/tasks/{tid}/start")).json() == {"started": True}
        body = await eventually(lambda: _results(api, tid), timeout=10, interval=0.1)
    assert body["results"] == "42", body


def test_probing_the_in_process_broker_logs_no_error(serve: Serve) -> None:
    # `propeller info` and a second manager check whether something listens on the port by
    # connecting and closing: amqtt logged each check as an ERROR in the serving manager's log.
    serve.start()
    info = subprocess.run([*PROPELLER, "info"], env=serve.env, capture_output=True, text=True, timeout=30)
    port = serve.env["MANAGER_DEFAULT_BROKER_PORT"]
    assert f"broker        the one listening on 127.0.0.1:{port}" in info.stdout
    time.sleep(0.5)
    assert serve.stop() == 0
    log = serve.log.read_text()
    assert "ERROR" not in log and "Failed to initialize client session" not in log, log


def _second_serve(serve: Serve, **env: str) -> subprocess.CompletedProcess[str]:
    """Another `propeller serve` on the same machine and defaults as `serve`, which must end by itself."""
    return subprocess.run([*PROPELLER, "serve"], env=dict(serve.env, **env), capture_output=True, text=True,
                          timeout=20)


def _first_kept_its_session(serve: Serve) -> None:
    health = httpx.get(serve.url + "/health", timeout=5).json()
    assert health["broker"]["connected"] and health["broker"]["embedded"], health
    log = serve.log.read_text()
    assert "take-over" not in log and "lost the broker" not in log, log


def test_a_second_manager_on_the_same_database_refuses_to_start_naming_the_first(serve: Serve) -> None:
    # Another API port, so only the database is shared: the second manager used to run, connect to
    # the first one's in-process broker with the same client id, and the two took the MQTT session
    # from each other ten times a second.
    serve.start()
    second = _second_serve(serve, MANAGER_HTTP_PORT=str(free_port()))
    assert second.returncode == 1, second.stderr
    assert "Another Propeller manager is using the database" in second.stderr, second.stderr
    assert f"pid {serve.proc.pid} on {socket.gethostname()} (propeller serve)" in second.stderr, second.stderr
    _first_kept_its_session(serve)


async def test_a_second_manager_on_the_same_postgres_database_refuses_to_start_naming_the_first(serve: Serve) -> None:
    # Its own API port and entity id, as a manager on another host would have: before, both ran on the
    # database, and each recovered and dispatched the same queued tasks.
    db = await create_database()
    try:
        serve.env.update(MANAGER_STORAGE_TYPE="postgres", MANAGER_POSTGRES_HOST="127.0.0.1",
                         MANAGER_POSTGRES_PORT="5432", MANAGER_POSTGRES_USER="postgres", MANAGER_POSTGRES_PASS="",
                         MANAGER_POSTGRES_DB=db.name, MANAGER_POSTGRES_SSLMODE="disable")
        await asyncio.to_thread(serve.start)
        second = await asyncio.to_thread(_second_serve, serve, MANAGER_HTTP_PORT=str(free_port()),
                                         MANAGER_ENTITY_ID="second-manager")
        assert second.returncode == 1, second.stderr
        assert "Another Propeller manager is using the database (postgres postgresql://postgres:***@" in \
            second.stderr, second.stderr
        assert f"pid {serve.proc.pid} on {socket.gethostname()} (propeller serve)" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        _first_kept_its_session(serve)
        assert await asyncio.to_thread(serve.stop) == 0
    finally:
        await drop_database(db)


def test_a_second_manager_whose_api_port_is_taken_exits_saying_so_before_it_connects(
    serve: Serve, tmp_path: Path
) -> None:
    # A database of its own, the first manager's API port: uvicorn's sys.exit on the failed bind left
    # the second hung on its open database, after it had taken over the first one's MQTT session.
    serve.start()
    second = _second_serve(serve, MANAGER_SQLITE_PATH=str(tmp_path / "second.db"))
    assert second.returncode == 1, second.stderr
    assert f"The REST API cannot listen on 127.0.0.1:{serve.port} (Address already in use)" in second.stderr
    assert "Another Propeller manager (`propeller serve` or the console)" in second.stderr
    assert "Traceback" not in second.stderr, second.stderr
    _first_kept_its_session(serve)


def test_a_manager_whose_broker_port_holds_something_else_exits_saying_how_to_go_on(serve: Serve) -> None:
    # Nothing configured, and a program that is not a broker on the port: the manager used to take it
    # for its broker, say "ready" and wait for a CONNACK forever, and proplets found nothing there.
    port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    with socket.create_server(("127.0.0.1", port)):  # accepts connections, never answers
        out = subprocess.run([*PROPELLER, "serve"], env=serve.env, capture_output=True, text=True, timeout=20)
        info = subprocess.run([*PROPELLER, "info"], env=serve.env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 1, out.stderr
    assert f"Something that is not an MQTT broker listens on 127.0.0.1:{port}" in out.stderr, out.stderr
    assert "set MANAGER_MQTT_ADDRESS to your broker" in out.stderr
    assert "PROPLET_MQTT_ADDRESS=mqtt://127.0.0.1:<that port>" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"broker        none: something that is not an MQTT broker listens on 127.0.0.1:{port}" in info.stdout


def test_a_second_proplet_with_the_generated_id_refuses_to_start_naming_the_first(
    serve: Serve, tmp_path: Path
) -> None:
    # Two `propeller proplet` on one machine, neither given an id: both took the id generated and kept
    # for the machine, and took the broker session from each other twenty times a second.
    serve.start()
    env = dict(serve.env, PROPLET_MQTT_ADDRESS=f"mqtt://127.0.0.1:{serve.env['MANAGER_DEFAULT_BROKER_PORT']}")
    log = tmp_path / "first-proplet.log"
    first = subprocess.Popen([*PROPELLER, "proplet"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        eventually_sync(lambda: "connected to" in log.read_text(), timeout=15)
        second = subprocess.run([*PROPELLER, "proplet"], env=env, capture_output=True, text=True, timeout=20)
        time.sleep(1)  # a take-over would show in the first one's log by now
        assert first.poll() is None, log.read_text()
    finally:
        first.terminate()
        first.wait(15)
    assert second.returncode == 1, second.stderr
    proplet_id = log.read_text().split("proplet ", 1)[1].split(":", 1)[0]
    assert (f"Another proplet runs as {proplet_id} on this machine: pid {first.pid} on {socket.gethostname()} "
            "(propeller proplet)") in second.stderr, second.stderr
    assert "PROPLET_ENTITY_ID=<id>" in second.stderr and "Traceback" not in second.stderr
    assert "lost the broker" not in log.read_text(), log.read_text()


def eventually_sync(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
