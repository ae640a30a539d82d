"""The in-process broker that `propeller serve` starts when no broker listens, with real proplet processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_serve import PROPELLER, Serve
from tests.services import free_port
from tests.wire import eventually

pytestmark = pytest.mark.serial


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


@pytest.fixture
def proplet(serve: Serve, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real `propeller proplet` on the in-process broker, with a 2 s keep-alive (heartbeats every
    10 s, so the manager's liveness timeout is 30 s and only the Last Will can mark it offline sooner)."""
    serve.start()
    port = serve.env["MANAGER_DEFAULT_BROKER_PORT"]
    env = dict(serve.env, PROPLET_MQTT_ADDRESS=f"mqtt://127.0.0.1:{port}", PROPLET_ENTITY_ID="edge-1",
               PROPLET_MQTT_KEEP_ALIVE="2")
    proc = subprocess.Popen([*PROPELLER, "proplet"], env=env, stdout=(tmp_path / "proplet.log").open("ab"),
                            stderr=subprocess.STDOUT)
    yield proc
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
    serve: Serve, proplet: subprocess.Popen[bytes], sig: signal.Signals
) -> None:
    async with httpx.AsyncClient(base_url=serve.url) as api:
        await eventually(lambda: _alive(api, True), timeout=15)
        proplet.send_signal(sig)
        lost = time.monotonic()
        # A killed proplet's socket closes at once; a frozen one keeps it open and only stops
        # talking, so the broker must drop it after 1.5 x its 2 s keep-alive (MQTT-3.1.2-24).
        p = await eventually(lambda: _alive(api, False), timeout=8, interval=0.1)
        print(f"offline {time.monotonic() - lost:.1f}s after {sig.name}")
    assert "Last Will" in p["offline_reason"], p
