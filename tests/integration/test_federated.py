"""Federated learning over the REST API and MQTT, against a running manager (SQLite and PostgreSQL)
and a real Mosquitto. The participants are synthetic proplets that answer a round's task with the
result envelope upstream's Rust proplet sends (reference §3.6), so what is tested here is the
manager's side: rounds, the paths updates take, averaging, deadlines, restarts, and the relay to an
external coordinator. tests/proplet/test_federated.py runs real training modules on real proplets.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import aiomqtt
import cbor2
import httpx
import orjson
import pytest

from tests.conftest import unique
from tests.services import Mosquitto
from tests.wire import SyntheticProplet, WireClient, eventually

pytestmark = pytest.mark.timeout(60)

B64 = base64.b64encode(b"\0asm\x01\0\0\0").decode()


def trained(weights: dict[str, Any], samples: int) -> Callable[[dict[str, Any]], tuple[Any, str | None]]:
    """A participant that answers its round task as upstream's proplet does: the FL envelope, whose
    update_b64 is the training module's stdout (an FLUpdate)."""

    def answer(start: dict[str, Any]) -> tuple[Any, str | None]:
        env = start.get("env") or {}
        stdout = orjson.dumps({"round_id": env["ROUND_ID"], "num_samples": samples, "metrics": {"loss": 0.5},
                               "update": weights})
        return {"task_id": start["id"], "round_id": env["ROUND_ID"], "proplet_id": "", "num_samples": 1,
                "update_b64": base64.b64encode(stdout).decode(), "format": "json", "metrics": {}}, None

    return answer


def failing(start: dict[str, Any]) -> tuple[Any, str | None]:
    return "", "the training module trapped"


class Fleet:
    """A manager (one backend at a time) and the synthetic participants of a test."""

    def __init__(self, managers: Any, broker: Mosquitto) -> None:
        self.managers = managers
        self.broker = broker
        self.stack = AsyncExitStack()
        # Participants outlive a manager restart (stop_manager, start_manager).
        self.participants = AsyncExitStack()
        self.core: Any = None
        self.api: httpx.AsyncClient | None = None
        self.proplets: dict[str, SyntheticProplet] = {}

    async def start_manager(self) -> Any:
        self.core = await self.stack.enter_async_context(self.managers())
        self.api = await self.stack.enter_async_context(httpx.AsyncClient(base_url=self.core.api_url, timeout=10))
        return self.core

    async def stop_manager(self) -> None:
        await self.stack.aclose()
        self.stack = AsyncExitStack()

    async def close(self) -> None:
        await self.participants.aclose()
        await self.stop_manager()

    async def participant(self, answer: Any = None) -> str:
        proplet = await self.participants.enter_async_context(
            SyntheticProplet(self.broker.url, self.core.topics, unique("fl-p"), answer=answer))
        await eventually(lambda: proplet.proplet_id in self.core.proplets and
                         self.core.proplets[proplet.proplet_id].online)
        self.proplets[proplet.proplet_id] = proplet
        return proplet.proplet_id

    async def status(self, round_id: str) -> dict[str, Any]:
        assert self.api is not None
        response = await self.api.get(f"/fl/rounds/{round_id}/complete")
        assert response.status_code == 200, response.text
        return response.json()["status"]

    async def ended(self, round_id: str, timeout: float = 10) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            status = await self.status(round_id)
            return status if status["state"] != "running" else None

        return await eventually(done, timeout, interval=0.05)


@pytest.fixture
async def fleet(managers_on_each_backend: Any, broker: Mosquitto) -> AsyncIterator[Fleet]:
    fleet = Fleet(managers_on_each_backend, broker)
    await fleet.start_manager()
    try:
        yield fleet
    finally:
        await fleet.close()


def experiment(round_id: str, participants: list[str], **extra: Any) -> dict[str, Any]:
    return {"experiment_id": "exp", "round_id": round_id, "model_ref": "global_model_v0",
            "participants": participants, "task_wasm_file": B64, "hyperparams": {"lr": 0.5}, **extra}


async def test_a_round_averages_its_participants_updates_into_the_next_model(fleet: Fleet) -> None:
    p1 = await fleet.participant(trained({"w": [1.0, 2.0], "b": 0.0}, samples=1))
    p2 = await fleet.participant(trained({"w": [5.0, 6.0], "b": 4.0}, samples=3))
    assert fleet.api is not None
    async with WireClient(fleet.broker.url, fleet.core.topics) as watcher:
        assert watcher.client is not None
        await watcher.client.subscribe("fl/rounds/next", qos=1)
        response = await fleet.api.post("/fl/experiments", json=experiment("r1", [p1, p2]))
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "configured"
        assert sorted(response.json()["participants_started"]) == sorted([p1, p2])
        status = await fleet.ended("r1")
        announced = await watcher.expect("fl/rounds/next", lambda m: m["round_id"] == "r1")

    assert status["completed"] is True and status["state"] == "completed", status
    assert (status["num_updates"], status["k_of_n"], status["model_version"]) == (2, 2, 1)
    assert {u["source"] for u in status["updates"]} == {"result"}
    assert announced["model_uri"] == "global_model_v1"
    model = (await fleet.api.get("/fl/models/1")).json()
    assert model == {"w": [4.0, 5.0], "b": 3.0}  # weighted by num_samples 1 and 3

    # Each participant got upstream's task: its name, pinned, with the round's env.
    start = fleet.proplets[p1].starts[0]
    assert start["name"] == f"fl-round-r1-{p1}" and start["proplet_id"] == p1
    env = start["env"]
    assert (env["ROUND_ID"], env["MODEL_URI"], json.loads(env["HYPERPARAMS"])) == ("r1", "global_model_v0", {"lr": 0.5})
    assert env["MODEL_DATA"] == "{}"
    assert env["MODEL_REGISTRY_URL"] == env["MANAGER_COORDINATOR_URL"] == fleet.core.api_url + "/fl"

    # The next round starts from model 1, given inline and served where upstream proplets look.
    response = await fleet.api.post("/fl/experiments", json=experiment("r2", [p1, p2], model_ref="global_model_v1"))
    assert response.status_code == 200, response.text
    await fleet.ended("r2")
    r2_env = fleet.proplets[p1].starts[-1]["env"]
    assert json.loads(r2_env["MODEL_DATA"]) == model
    models = (await fleet.api.get("/fl/models")).json()["models"]
    assert [m["version"] for m in models] == [2, 1, 0]
    rounds = (await fleet.api.get("/fl/rounds")).json()
    assert rounds["total"] == 2 and [r["round_id"] for r in rounds["rounds"]] == ["r2", "r1"]
    # The console's listing: stored rounds with their update counts, read in one query.
    total, summaries = await fleet.core.federated.round_summaries(10)
    assert total == 2 and [(r.round_id, n, r.model_version) for r, n in summaries] == [("r2", 2, 2), ("r1", 2, 1)]
    task = (await fleet.api.get("/fl/task", params={"round_id": "r2", "proplet_id": p1})).json()["task"]
    assert task["model_ref"] == "global_model_v1" and task["hyperparams"] == {"lr": 0.5}


async def test_updates_by_rest_cbor_and_mqtt_count_once_per_participant(fleet: Fleet) -> None:
    p1, p2, p3 = [await fleet.participant(answer=None) for _ in range(3)]
    assert fleet.api is not None
    response = await fleet.api.post("/fl/experiments", json=experiment("r-paths", [p1, p2, p3]))
    assert response.status_code == 200, response.text

    def update(proplet: str, w: float, samples: int = 1) -> dict[str, Any]:
        return {"round_id": "r-paths", "proplet_id": proplet, "num_samples": samples, "update": {"w": [w]}}

    first = await fleet.api.post("/fl/update", json=update(p1, 1.0))
    assert first.status_code == 200 and first.json()["counted"] is True, first.text
    again = await fleet.api.post("/fl/update", json=update(p1, 100.0))
    assert again.status_code == 200 and again.json()["counted"] is False
    stranger = await fleet.api.post("/fl/update", json=update("not-a-participant", 1.0))
    assert stranger.status_code == 409 and "not a participant" in stranger.json()["error"]
    misshapen = await fleet.api.post("/fl/update", json={**update(p2, 1.0), "update": {"w": [1.0, 2.0]}})
    assert misshapen.status_code == 400 and "cannot be averaged" in misshapen.json()["error"]

    cbor = await fleet.api.post("/fl/update_cbor", content=cbor2.dumps(update(p2, 2.0, samples=2)),
                                headers={"content-type": "application/cbor"})
    assert cbor.status_code == 200 and cbor.json()["num_updates"] == 2, cbor.text
    assert (await fleet.status("r-paths"))["state"] == "running"

    async with aiomqtt.Client("127.0.0.1", fleet.broker.port) as client:
        # Upstream's fallback topic is outside the manager's prefix. Its embedded proplet sends the FL
        # envelope there, the Rust one the module's output: both are read. Junk is refused and counted.
        # Another manager's round (the topic has no tenant prefix): not ours, ignored, not counted.
        await client.publish("fl/rounds/someone-elses/updates/x", orjson.dumps(update("x", 1.0)), qos=1)
        await client.publish(f"fl/rounds/r-paths/updates/{p3}", b"[1, 2", qos=1)
        await client.publish(f"fl/rounds/r-paths/updates/{p3}", orjson.dumps(
            {"task_id": "t", "update_b64": base64.b64encode(b"\x00\x00\x80\x3f").decode(), "format": "f32-delta"}),
            qos=1)
        await eventually(lambda: fleet.core.federated.counters.updates_refused == 4)
        await client.publish(f"fl/rounds/r-paths/updates/{p3}", orjson.dumps(
            {"task_id": "t", "round_id": "r-paths", "num_samples": 1, "format": "json",
             "update_b64": base64.b64encode(orjson.dumps(update(p3, 6.0, samples=1))).decode()}), qos=1)
    status = await fleet.ended("r-paths")
    assert status["state"] == "completed" and status["num_updates"] == 3
    assert sorted(u["source"] for u in status["updates"]) == ["cbor", "mqtt", "rest"]
    assert (await fleet.api.get("/fl/models/1")).json() == {"w": [(1.0 + 2 * 2.0 + 6.0) / 4]}

    late = await fleet.api.post("/fl/update", json=update(p3, 1.0))  # its update came already
    assert late.status_code == 200 and late.json()["counted"] is False
    unknown = await fleet.api.post("/fl/update", json={**update(p1, 1.0), "round_id": "nope"})
    assert unknown.status_code == 404
    assert fleet.core.federated.counters.updates_repeated == 2
    # The stranger, the misshapen update, the two bad MQTT messages and the unknown round; not the
    # other manager's round.
    assert fleet.core.federated.counters.updates_refused == 5


@pytest.mark.parametrize(("path", "body", "headers", "message"), [
    ("/fl/experiments", {"round_id": "x", "participants": ["p"], "task_wasm_file": B64}, None, "model_ref"),
    ("/fl/experiments", experiment("x", ["p"], k_of_n=2), None, "only 1 participants"),
    ("/fl/experiments", experiment("x", ["p"], task_wasm_image="r/x:1"), None, "one of the two"),
    ("/fl/experiments", experiment("x", ["p"], model_ref="global_model_v9"), None, "model version 9"),
    ("/fl/experiments", b"{}", {"content-type": "text/plain"}, "content type"),
    ("/fl/update", {"round_id": "x", "proplet_id": "p", "update": {}}, None, "empty"),
    ("/fl/update", b'{"round_id": "x"', {"content-type": "application/json"}, "JSON"),
    ("/fl/update_cbor", b"\xff\xfe", {"content-type": "application/cbor"}, "not valid CBOR"),
    ("/fl/update_cbor", cbor2.dumps([1, 2]), {"content-type": "application/cbor"}, "must be a map"),
    ("/fl/update_cbor", cbor2.dumps({"round_id": "x"}), {"content-type": "application/json"}, "content type"),
])
async def test_bad_fl_requests_are_a_400_that_says_why(fleet: Fleet, path: str, body: Any,
                                                       headers: dict[str, str] | None, message: str) -> None:
    assert fleet.api is not None
    if isinstance(body, bytes):
        response = await fleet.api.post(path, content=body, headers=headers or {})
    else:
        response = await fleet.api.post(path, json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert (await fleet.api.get("/fl/task")).status_code == 400


async def test_a_round_needs_an_online_participant_and_a_new_id(fleet: Fleet) -> None:
    assert fleet.api is not None
    offline = await fleet.api.post("/fl/experiments", json=experiment("r-off", ["nobody-here"]))
    assert offline.status_code == 409 and "online" in offline.json()["error"]
    p1 = await fleet.participant(answer=None)
    assert (await fleet.api.post("/fl/experiments", json=experiment("r-twice", [p1]))).status_code == 200
    twice = await fleet.api.post("/fl/experiments", json=experiment("r-twice", [p1]))
    assert twice.status_code == 409 and "exists" in twice.json()["error"]
    assert (await fleet.api.get("/fl/rounds/r-off/complete")).status_code == 404


async def test_a_round_whose_time_runs_out_aggregates_what_it_has(fleet: Fleet) -> None:
    p1, p2 = await fleet.participant(answer=None), await fleet.participant(answer=None)
    assert fleet.api is not None
    # The update goes in right after its round starts, with 3 s to spare: with 1 s, and the second
    # round created in between, a loaded CI machine on PostgreSQL let the deadline pass first.
    await fleet.api.post("/fl/experiments", json=experiment("r-late", [p1, p2], timeout_s=3))
    await fleet.api.post("/fl/update", json={"round_id": "r-late", "proplet_id": p1, "update": {"b": 7}})
    await fleet.api.post("/fl/experiments", json=experiment("r-silent", [p1, p2], timeout_s=1))
    late = await fleet.ended("r-late")
    assert late["state"] == "completed" and late["num_updates"] == 1 and "1 of the 2" in late["reason"]
    too_late = await fleet.api.post("/fl/update", json={"round_id": "r-late", "proplet_id": p2, "update": {"b": 1}})
    assert too_late.status_code == 409 and "has completed" in too_late.json()["error"]
    assert (await fleet.api.get(f"/fl/models/{late['model_version']}")).json() == {"b": 7.0}
    silent = await fleet.ended("r-silent")
    assert silent["state"] == "failed" and "no update" in silent["reason"] and silent["model_version"] is None


async def test_averaging_large_finite_weights_stays_finite(fleet: Fleet) -> None:
    """The average of finite weights lies between them: 1.5e308 and 1.7e308 (each a valid float)
    average to 1.6e308. Summing n * v before dividing overflowed to infinity, and the model stored
    a weight no JSON reader takes back."""
    p1 = await fleet.participant(trained({"w": [1.5e308, -1.0], "b": 1.7e308}, samples=1))
    p2 = await fleet.participant(trained({"w": [1.7e308, 3.0], "b": 1.5e308}, samples=3))
    assert fleet.api is not None
    response = await fleet.api.post("/fl/experiments", json=experiment("r-big", [p1, p2]))
    assert response.status_code == 200, response.text
    status = await fleet.ended("r-big")
    assert status["state"] == "completed", status
    model = (await fleet.api.get(f"/fl/models/{status['model_version']}")).json()
    assert model == {"w": [pytest.approx(1.65e308), 2.0], "b": pytest.approx(1.55e308)}


async def test_a_round_ends_once_every_started_task_has(fleet: Fleet) -> None:
    p1 = await fleet.participant(trained({"b": 1.0}, samples=1))
    p2 = await fleet.participant(failing)
    assert fleet.api is not None
    await fleet.api.post("/fl/experiments", json=experiment("r-fail", [p1, p2], timeout_s=600))
    status = await fleet.ended("r-fail")
    assert status["state"] == "completed" and status["num_updates"] == 1
    assert "every started task ended" in status["reason"]


def printed(text: bytes) -> Callable[[dict[str, Any]], tuple[Any, str | None]]:
    """A participant whose training module printed `text`, in upstream's FL envelope."""

    def answer(start: dict[str, Any]) -> tuple[Any, str | None]:
        env = start.get("env") or {}
        return {"task_id": start["id"], "round_id": env["ROUND_ID"], "proplet_id": "", "num_samples": 1,
                "update_b64": base64.b64encode(text).decode(), "format": "f32-delta", "metrics": {}}, None

    return answer


async def test_a_round_without_updates_says_why_each_participant_brought_none(fleet: Fleet) -> None:
    # The round said only 'no update arrived before every started task ended': an operator who ran a
    # module that prints something else (README's hello.wasm) had to dig the tasks' results out.
    chatty = await fleet.participant(printed(b"Hello from Propeller!\n"))
    broken = await fleet.participant(failing)
    assert fleet.api is not None
    await fleet.api.post("/fl/experiments", json=experiment("r-none", [chatty, broken], timeout_s=600))
    status = await fleet.ended("r-none")
    assert status["state"] == "failed"
    assert status["reason"].startswith("no update arrived before every started task ended: ")
    assert (f"{chatty}: its task's output is not an update (the envelope's update_b64 holds no JSON object"
            in status["reason"])
    assert f"{broken}: its task failed: the training module trapped" in status["reason"]


async def test_a_participant_that_goes_offline_does_not_hold_its_round_until_the_deadline(fleet: Fleet) -> None:
    p1 = await fleet.participant(trained({"b": 1.0}, samples=1))
    assert fleet.api is not None
    # Takes its task and never answers; leaving, it says it is offline, and its running task fails.
    async with SyntheticProplet(fleet.broker.url, fleet.core.topics, unique("fl-gone"), answer=None) as gone:
        await eventually(lambda: gone.proplet_id in fleet.core.proplets and fleet.core.proplets[gone.proplet_id].online)
        await fleet.api.post("/fl/experiments", json=experiment("r-gone", [p1, gone.proplet_id], timeout_s=600))
        await eventually(lambda: gone.starts)
    status = await fleet.ended("r-gone")
    assert status["state"] == "completed" and status["num_updates"] == 1
    assert "every started task ended" in status["reason"]


async def test_a_running_round_and_its_updates_survive_a_manager_restart(fleet: Fleet) -> None:
    p1, p2 = await fleet.participant(answer=None), await fleet.participant(answer=None)
    assert fleet.api is not None
    await fleet.api.post("/fl/experiments", json=experiment("r-restart", [p1, p2], timeout_s=600))
    await fleet.api.post("/fl/update", json={"round_id": "r-restart", "proplet_id": p1, "update": {"b": 1}})
    await fleet.stop_manager()

    await fleet.start_manager()
    assert fleet.api is not None
    status = await fleet.status("r-restart")
    assert status["state"] == "running" and status["num_updates"] == 1
    repeat = await fleet.api.post("/fl/update", json={"round_id": "r-restart", "proplet_id": p1, "update": {"b": 9}})
    assert repeat.json()["counted"] is False
    await fleet.api.post("/fl/update", json={"round_id": "r-restart", "proplet_id": p2, "update": {"b": 3}})
    status = await fleet.ended("r-restart")
    assert status["state"] == "completed"
    assert (await fleet.api.get(f"/fl/models/{status['model_version']}")).json() == {"b": 2.0}


async def test_a_round_announced_on_mqtt_starts_its_tasks_once(fleet: Fleet) -> None:
    p1 = await fleet.participant(answer=None)
    announcement = {"round_id": "r-mqtt", "model_uri": "global_model_v0", "task_wasm_image": "",
                    "participants": [p1], "hyperparams": {"epochs": 2}}
    async with WireClient(fleet.broker.url, fleet.core.topics) as client:
        # Without a module the round cannot start: refused and counted, the manager carries on.
        await client.publish("fl/rounds/start", announcement)
        rejections = fleet.core.metrics.rejections
        await eventually(lambda: rejections[("fl/rounds/start", "malformed")] == 1)
        announcement["task_wasm_image"] = "http://127.0.0.1:9/train.wasm"
        await client.publish("fl/rounds/start", announcement)
        await client.publish("fl/rounds/start", announcement)  # upstream's double subscription
        await client.publish("fl/rounds/start", b"not json")
    await eventually(lambda: len(fleet.proplets[p1].starts) >= 1 and rejections[("fl/rounds/start", "malformed")] == 2)
    await asyncio.sleep(0.5)
    assert len(fleet.proplets[p1].starts) == 1
    assert fleet.proplets[p1].starts[0]["env"]["HYPERPARAMS"] == '{"epochs":2}'
    assert (await fleet.status("r-mqtt"))["state"] == "running"


# ---- upstream's mode: an external coordinator ---------------------------------------------------


class Coordinator(http.server.ThreadingHTTPServer):
    """A stand-in for upstream's example coordinator: records what it is sent, answers as it does."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.fail = False
        coordinator = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: Any) -> None:
                length = int(self.headers.get("content-length") or 0)
                sent = json.loads(self.rfile.read(length)) if length else None
                coordinator.requests.append((self.command, self.path, sent))
                data = json.dumps(body).encode()
                self.send_response(500 if coordinator.fail else 200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # http.server's method names
                self._answer({"status": "ok"})

            def do_GET(self) -> None:
                self._answer({"status": {"round_id": "r-remote", "completed": False, "num_updates": 0,
                                         "k_of_n": 3, "model_version": 0}})

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    server = Coordinator()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def test_with_a_coordinator_url_the_manager_relays_as_upstream_does(
        manager_factory: Any, broker: Mosquitto, coordinator: Coordinator) -> None:
    async with manager_factory(coordinator_url=coordinator.url) as core, \
            SyntheticProplet(broker.url, core.topics, unique("fl-p"), answer=None) as proplet, \
            httpx.AsyncClient(base_url=core.api_url, timeout=10) as api:
        await eventually(lambda: proplet.proplet_id in core.proplets)
        response = await api.post("/fl/experiments", json=experiment("r-remote", [proplet.proplet_id]))
        assert response.status_code == 200, response.text
        method, path, sent = coordinator.requests[0]
        assert (method, path, sent["round_id"], sent["participants"]) == (
            "POST", "/experiments", "r-remote", [proplet.proplet_id])
        await eventually(lambda: proplet.starts)
        assert proplet.starts[0]["env"]["MANAGER_COORDINATOR_URL"] == coordinator.url

        update = {"round_id": "r-remote", "proplet_id": proplet.proplet_id, "update": {"w": [1]}}
        assert (await api.post("/fl/update", json=update)).json() == {"status": "accepted"}
        assert coordinator.requests[-1][:2] == ("POST", "/update")
        status = await api.get("/fl/rounds/r-remote/complete")
        assert status.json()["status"]["k_of_n"] == 3 and coordinator.requests[-1][:2] == (
            "GET", "/rounds/r-remote/complete")

        coordinator.fail = True
        failed = await api.post("/fl/update", json=update)
        assert failed.status_code == 502 and "answered 500" in failed.json()["error"]
        coordinator.shutdown()
        coordinator.server_close()
        unreachable = await api.get("/fl/task", params={"round_id": "r-remote"})
        assert unreachable.status_code == 503 and "cannot be reached" in unreachable.json()["error"]
