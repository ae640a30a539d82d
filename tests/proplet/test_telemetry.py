"""The proplet's Prometheus endpoint and health check, as upstream's proplet serves them on :9092
(`PROPLET_METRICS_ENABLED`, `PROPLET_METRICS_PORT`): a real agent, manager, Mosquitto and wasm,
scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.domain import TaskState
from core.schemas import TaskCreate
from proplet.config import PropletSettings
from tests.proplet.conftest import PropletFactory
from tests.proplet.helpers import b64, run_task
from tests.services import free_port
from tests.wasmfixtures import wasm
from tests.wire import eventually


async def scrape(port: int) -> dict[str, float]:
    """Each sample of /metrics by name (labels left out: every proplet metric has only proplet_id)."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {sample.name: sample.value for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


async def health(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/health")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return dict(response.json())


async def test_metrics_and_health_follow_the_tasks_with_upstreams_names(
        manager: Any, proplet_factory: PropletFactory) -> None:
    port = free_port()
    async with proplet_factory(manager, "p-prom", metrics_enabled=True, metrics_port=port,
                               metrics_host="127.0.0.1") as agent:
        first = await scrape(port)
        # Upstream's names, as Prometheus reads them (counters with _total).
        assert {"proplet_tasks_started_total", "proplet_tasks_completed_total", "proplet_tasks_failed_total",
                "proplet_tasks_running", "proplet_mqtt_reconnects_total", "proplet_wasm_fetch_bytes_total",
                "proplet_cpu_usage_ratio", "proplet_cpu_user_seconds", "proplet_cpu_system_seconds",
                "proplet_memory_rss_bytes"} <= set(first)
        assert (first["proplet_tasks_started_total"], first["proplet_tasks_running"],
                first["proplet_mqtt_reconnects_total"], first["proplet_mqtt_connected"]) == (0, 0, 0, 1)
        assert 10_000_000 < first["proplet_memory_rss_bytes"] < 2_000_000_000
        assert await health(port) == {"status": "ok", "running_tasks": 0, "proplet_id": "p-prom",
                                      "mqtt_connected": True, "draining": False}
        # Announced in discovery, so the manager (and its console) can name the scrape target.
        assert manager.proplets["p-prom"].metadata["metrics_port"] == port

        done = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[40, 2])
        failed = await run_task(manager, name="boom", file=b64(wasm("traps")))
        assert (done.state, failed.state) == (TaskState.COMPLETED, TaskState.FAILED)
        spin = await manager.create_task(TaskCreate(name="spin", file=b64(wasm("spin")), limits={"timeout_s": 30}))
        await manager.start_task(spin.id)
        await eventually(lambda: spin.id in agent.running and agent.running[spin.id].executing)
        busy = await scrape(port)
        assert (busy["proplet_tasks_started_total"], busy["proplet_tasks_completed_total"],
                busy["proplet_tasks_failed_total"], busy["proplet_tasks_running"]) == (3, 1, 1, 1)
        assert (await health(port))["running_tasks"] == 1
        # A spinning guest keeps a core busy (as much of one as a loaded machine leaves it): the
        # ratio is over the time since the last scrape.
        await asyncio.sleep(0.5)
        assert (await scrape(port))["proplet_cpu_usage_ratio"] > 0.2
        await manager.stop_task(spin.id)
        await eventually(lambda: spin.id not in agent.running)
        assert (await scrape(port))["proplet_tasks_running"] == 0
    # Closed with the proplet: nothing answers there, and the next proplet can listen there.
    with pytest.raises(httpx.ConnectError):
        await scrape(port)
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do (scrapes left TIME_WAITs)
        again.bind(("127.0.0.1", port))


async def test_a_port_in_use_leaves_the_proplet_running_without_the_endpoint(
        manager: Any, proplet_factory: PropletFactory, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with proplet_factory(manager, "p-busy-port", metrics_enabled=True, metrics_port=port,
                                   metrics_host="127.0.0.1") as agent:
            assert agent.metrics_server is None
            done = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[1, 2])
            assert done.results == "3"
    assert any(f"cannot listen on 127.0.0.1:{port}" in r.getMessage() and "PROPLET_METRICS_PORT" in r.getMessage()
               for r in caplog.records)


async def test_disabled_it_listens_nowhere(manager: Any, proplet_factory: PropletFactory) -> None:
    port = free_port()
    async with proplet_factory(manager, "p-no-prom", metrics_port=port) as agent:  # the factory disables it
        assert agent.metrics_server is None and "metrics_port" not in manager.proplets["p-no-prom"].metadata
        with pytest.raises(httpx.ConnectError):
            await scrape(port)


def test_upstreams_variables_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (PropletSettings.load().metrics_enabled, PropletSettings.load().metrics_port) == (True, 9092)
    monkeypatch.setenv("PROPLET_METRICS_ENABLED", "false")
    monkeypatch.setenv("PROPLET_METRICS_PORT", "9393")
    settings = PropletSettings.load()
    assert (settings.metrics_enabled, settings.metrics_port, settings.metrics_host) == (False, 9393, "0.0.0.0")
    monkeypatch.setenv("PROPLET_METRICS_PORT", "0")
    with pytest.raises(ValueError, match="PROPLET_METRICS_PORT"):
        PropletSettings.load()
