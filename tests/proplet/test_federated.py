"""Federated learning on the proplet: the rules of proplet/federated.py, then whole rounds with a real
manager, Mosquitto, wasmtime, the C client in tests/wasm/flclient.c and a real HTTP server playing
model registry, data store and coordinator."""

from __future__ import annotations

import base64
import http.server
import json
import math
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from core.domain import TaskState
from core.topics import fl_update_topic
from proplet.federated import (
    DEFAULT_FORMAT,
    FederatedClient,
    FederatedError,
    build_envelope,
    parse_update,
    sample_count,
)
from proplet.runtime import ExternalRuntime, Invocation, RuntimeConfig, WasmtimeRuntime
from tests.proplet.conftest import PropletFactory
from tests.proplet.helpers import b64, run_task
from tests.wasmfixtures import digest, wasm, wasmtime_cli
from tests.wire import WireClient, eventually

MODEL = {"version": 3, "w": [0.5, -0.25], "b": 0.125}
DATASET = {"x": [[1.0, 2.0], [2.0, 0.5], [3.0, -1.0], [-0.5, 4.0], [1.5, 1.5], [2.5, -2.0], [0.0, 1.0]],
           "y": [4.1, 4.9, 9.2, -1.3, 5.8, 11.7, -0.4]}
HYPERPARAMS = {"lr": 0.05, "epochs": 3}


# ------------------------------------------------------------------------------------- rules


def test_num_samples_setting_then_the_update_then_one() -> None:
    assert sample_count("40", {"num_samples": 7}) == 40
    assert sample_count("", {"num_samples": 7}) == 7
    assert sample_count("", {"num_samples": 7.5}) == 1, "only an integer counts"
    assert sample_count("", {"num_samples": True}) == 1, "a boolean is not a count"
    assert sample_count("", {}) == 1
    assert sample_count("", None) == 1
    with pytest.raises(ValueError, match="FL_NUM_SAMPLES='many'"):
        sample_count("many", None)


def test_update_is_a_json_object_or_nothing() -> None:
    assert parse_update(b'{"update": {"w": [1]}}\n') == {"update": {"w": [1]}}
    assert parse_update(b"[1, 2]") is None
    assert parse_update(b"loss went down\n") is None
    assert parse_update(b"") is None


def test_envelope_is_upstreams_fl_result() -> None:
    stdout = b'{"num_samples": 9, "metrics": {"loss": 0.5}, "update": {"w": [1.0]}}\n'
    envelope = build_envelope(task_id="t1", round_id="r1", proplet_id="p1", stdout=stdout,
                              update=parse_update(stdout))
    assert envelope == {"task_id": "t1", "round_id": "r1", "proplet_id": "p1", "num_samples": 9,
                        "update_b64": base64.b64encode(stdout).decode(), "format": DEFAULT_FORMAT,
                        "metrics": {"loss": 0.5}}
    plain = build_envelope(task_id="t1", round_id="r1", proplet_id="p1", stdout=b"not json", update=None,
                           num_samples_setting="12", format_setting="cbor")
    assert (plain["num_samples"], plain["format"], plain["metrics"]) == (12, "cbor", {})
    odd = build_envelope(task_id="t", round_id="r", proplet_id="p", stdout=b"{}", update={"metrics": [1]})
    assert odd["metrics"] == {}, "metrics must be an object"


# ------------------------------------------------------------------------------ HTTP services


class FlServices:
    """Model registry, data store and coordinator in one stdlib HTTP server on 127.0.0.1:0."""

    def __init__(self, *, models: dict[int, Any] | None = None, datasets: dict[str, Any] | None = None,
                 update_status: int = 200) -> None:
        self.models = {n: json.dumps(m).encode() for n, m in (models or {}).items()}
        self.datasets = {p: json.dumps(d).encode() for p, d in (datasets or {}).items()}
        self.update_status = update_status
        self.requests: list[tuple[str, str]] = []
        self.updates: list[bytes] = []
        services = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                services.requests.append(("GET", self.path))
                kind, _, key = self.path.strip("/").partition("/")
                found = (services.models.get(int(key)) if kind == "models" and key.isdigit()
                         else services.datasets.get(key) if kind == "datasets" else None)
                self._answer(200 if found is not None else 404, found or b"not here")

            def do_POST(self) -> None:
                services.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path == "/update":
                    services.updates.append(body)
                self._answer(services.update_status if self.path == "/update" else 404, b"{}")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[FlServices]:
        thread = threading.Thread(target=self._server.serve_forever, name="fl-services", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join(5)


def train(model: dict[str, Any], dataset: dict[str, Any], lr: float, epochs: int) -> tuple[list[float], float, float]:
    """flclient.c's arithmetic in Python, in the same order: (w, b, loss before training)."""
    w, b = list(model["w"]), float(model["b"])
    xs, ys = dataset["x"], dataset["y"]
    n = len(xs)

    def predict(row: list[float]) -> float:
        total = 0.0
        for wj, xj in zip(w, row, strict=True):
            total += wj * xj
        return total + b

    loss = 0.0
    for row, y in zip(xs, ys, strict=True):
        err = predict(row) - y
        loss += err * err
    loss /= n
    for _ in range(epochs):
        grad_w, grad_b = [0.0] * len(w), 0.0
        for row, y in zip(xs, ys, strict=True):
            err = predict(row) - y
            for j, xj in enumerate(row):
                grad_w[j] += err * xj
            grad_b += err
        w = [wj - lr * (2.0 / n) * g for wj, g in zip(w, grad_w, strict=True)]
        b -= lr * (2.0 / n) * grad_b
    return w, b, loss


def assert_trained_like_python(update: dict[str, Any]) -> None:
    w, b, loss = train(MODEL, DATASET, HYPERPARAMS["lr"], HYPERPARAMS["epochs"])
    assert all(math.isclose(got, want, rel_tol=1e-12) for got, want in zip(update["update"]["w"], w, strict=True))
    assert math.isclose(update["update"]["b"], b, rel_tol=1e-12)
    assert math.isclose(update["metrics"]["loss"], loss, rel_tol=1e-12)
    assert update["num_samples"] == len(DATASET["y"])


def round_env(round_id: str, **more: str) -> dict[str, str]:
    return {"ROUND_ID": round_id, "MODEL_URI": "fl/models/global_model_v3",
            "HYPERPARAMS": json.dumps(HYPERPARAMS), **more}


def new_round() -> str:
    # The fallback topic has no domain prefix: rounds of different tests must not share a name.
    return f"r-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------- FederatedClient over HTTP


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.messages.append((topic, payload))


async def test_prepare_fetches_model_and_dataset_with_task_env_before_process_env() -> None:
    with FlServices(models={3: MODEL}, datasets={"p-1": DATASET}).running() as services:
        client = FederatedClient("p-1", Published(), process_env={"MODEL_REGISTRY_URL": "http://127.0.0.1:9/nowhere"})
        try:
            env = await client.prepare("t1", {"MODEL_URI": "global_model_v3", "MODEL_REGISTRY_URL": services.url,
                                              "DATA_STORE_URL": services.url + "/"})
        finally:
            await client.aclose()
    assert services.requests == [("GET", "/models/3"), ("GET", "/datasets/p-1")]
    assert json.loads(env["MODEL_DATA"]) == MODEL and json.loads(env["DATASET_DATA"]) == DATASET


async def test_prepare_keeps_inlined_model_data_and_fetches_nothing() -> None:
    with FlServices(models={3: MODEL}).running() as services:
        client = FederatedClient("p-1", Published(), process_env={"MODEL_REGISTRY_URL": services.url})
        try:
            env = await client.prepare("t1", {"MODEL_URI": "global_model_v3", "MODEL_DATA": '{"w":[1],"b":0}'})
        finally:
            await client.aclose()
    assert services.requests == [] and env["MODEL_DATA"] == '{"w":[1],"b":0}'


async def test_prepare_failures_name_the_url_the_status_and_the_variable() -> None:
    with FlServices(models={3: {"w": [0.0] * 5000}}).running() as services:
        client = FederatedClient("p-1", Published(), process_env={}, max_body_bytes=1024)
        try:
            with pytest.raises(FederatedError, match=r"no MODEL_REGISTRY_URL is set \(in the task's env or the "
                                                     r"proplet's environment\)"):
                await client.prepare("t1", {"MODEL_URI": "m1"})
            with pytest.raises(FederatedError, match=rf"{services.url}/models/4 failed: the server answered HTTP "
                                                     r"404 Not Found\..*MODEL_REGISTRY_URL"):
                await client.prepare("t2", {"MODEL_URI": "global_model_v4", "MODEL_REGISTRY_URL": services.url})
            with pytest.raises(FederatedError, match="larger than the 1 KiB a proplet accepts"):
                await client.prepare("t3", {"MODEL_URI": "global_model_v3", "MODEL_REGISTRY_URL": services.url})
            with pytest.raises(FederatedError, match=r"datasets/p-1 failed: the server answered HTTP 404.*"
                                                     "DATA_STORE_URL"):
                await client.prepare("t4", {"MODEL_URI": "m", "MODEL_DATA": "{}", "DATA_STORE_URL": services.url})
            with pytest.raises(FederatedError, match="FL_NUM_SAMPLES='lots' is not a whole number"):
                await client.prepare("t5", {"ROUND_ID": "r", "FL_NUM_SAMPLES": "lots"})
            with pytest.raises(FederatedError, match=r"ROUND_ID='r/1' cannot be a level of the MQTT topic"):
                await client.prepare("t5", {"ROUND_ID": "r/1"})
        finally:
            await client.aclose()
    closed = services.url  # nothing listens there any more
    client = FederatedClient("p-1", Published(), process_env={})
    try:
        with pytest.raises(FederatedError, match=rf"fetching the model from {closed}/models/0 failed: .*"
                                                 "Check MODEL_REGISTRY_URL"):
            await client.prepare("t6", {"MODEL_URI": "latest", "MODEL_REGISTRY_URL": closed})
    finally:
        await client.aclose()


async def test_report_posts_json_falls_back_to_mqtt_and_skips_non_json() -> None:
    stdout = b'{"num_samples": 4, "metrics": {"loss": 1.5}, "update": {"w": [0.25]}}\n'
    published = Published()
    with FlServices(update_status=503).running() as failing, FlServices().running() as coordinator:
        client = FederatedClient("p-1", published, process_env={"MANAGER_COORDINATOR_URL": coordinator.url})
        try:
            envelope = client.report("t1", {"ROUND_ID": "r1"}, stdout)
            assert coordinator.updates == [], "the result does not wait for the delivery"
            await client.flush()
            assert coordinator.updates == [stdout.strip()] and published.messages == []
            client.report("t2", {"ROUND_ID": "r1", "MANAGER_COORDINATOR_URL": failing.url}, stdout)
            await client.flush()
            assert failing.updates == [stdout.strip()], "the task's env wins over the proplet's"
            assert published.messages == [("fl/rounds/r1/updates/p-1", stdout.strip())]
            plain = client.report("t3", {"ROUND_ID": "r1"}, b"training done\n")
        finally:
            await client.aclose()
    assert len(coordinator.updates) == 1 and len(published.messages) == 1, "non-JSON stdout is sent nowhere"
    assert (envelope["num_samples"], envelope["metrics"]) == (4, {"loss": 1.5})
    assert base64.b64decode(plain["update_b64"]) == b"training done\n" and plain["num_samples"] == 1


# ------------------------------------------------------------------- whole rounds on a proplet


async def test_a_round_fetches_trains_posts_and_returns_the_envelope(
        manager: Any, proplet_factory: PropletFactory) -> None:
    round_id = new_round()
    with FlServices(models={3: MODEL}, datasets={"p-fl": DATASET}).running() as services:
        async with proplet_factory(manager, "p-fl") as agent:
            done = await run_task(manager, name=f"fl-round-{round_id}-p-fl", file=b64(wasm("flclient")),
                                  env=round_env(round_id, MODEL_REGISTRY_URL=services.url,
                                                DATA_STORE_URL=services.url, MANAGER_COORDINATOR_URL=services.url))
    assert done.state is TaskState.COMPLETED, done.error
    assert ("GET", "/models/3") in services.requests and ("GET", "/datasets/p-fl") in services.requests
    assert len(services.updates) == 1 and agent.federated is not None and agent.federated.updates_published == 0
    posted = json.loads(services.updates[0])
    assert_trained_like_python(posted)
    assert (posted["round_id"], posted["proplet_id"], posted["base_model_uri"]) == (
        round_id, "p-fl", "fl/models/global_model_v3")
    envelope = done.results
    assert set(envelope) == {"task_id", "round_id", "proplet_id", "num_samples", "update_b64", "format", "metrics"}
    assert (envelope["task_id"], envelope["round_id"], envelope["proplet_id"]) == (done.id, round_id, "p-fl")
    assert json.loads(base64.b64decode(envelope["update_b64"])) == posted
    assert envelope["num_samples"] == len(DATASET["y"]) and envelope["format"] == DEFAULT_FORMAT
    assert envelope["metrics"] == posted["metrics"]


async def test_without_a_coordinator_the_update_goes_to_the_unprefixed_topic(
        manager: Any, proplet_factory: PropletFactory, broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    round_id = new_round()
    topic = fl_update_topic(round_id, "p-flb")
    with FlServices(models={3: MODEL}, datasets={"p-flb": DATASET}).running() as services:
        # The registry and data store from the proplet's own environment, as upstream's compose sets them.
        monkeypatch.setenv("MODEL_REGISTRY_URL", services.url)
        monkeypatch.setenv("DATA_STORE_URL", services.url)
        async with proplet_factory(manager, "p-flb"), WireClient(broker.url, manager.topics) as spy:
            assert spy.client is not None
            await spy.client.subscribe(topic, qos=1)
            done = await run_task(manager, name="_start", file=b64(wasm("flclient")),
                                  env=round_env(round_id, FL_NUM_SAMPLES="100", FL_FORMAT="json"))
            update = await spy.expect(topic)
    assert done.state is TaskState.COMPLETED, done.error
    assert_trained_like_python(update)
    assert services.updates == [] and ("GET", "/models/3") in services.requests
    assert json.loads(base64.b64decode(done.results["update_b64"])) == update
    assert (done.results["num_samples"], done.results["format"]) == (100, "json"), "the task's settings win"


async def test_a_failing_coordinator_falls_back_to_the_topic(
        manager: Any, proplet_factory: PropletFactory, broker: Any) -> None:
    round_id = new_round()
    topic = fl_update_topic(round_id, "p-flc")
    with FlServices(models={3: MODEL}, datasets={"p-flc": DATASET}, update_status=500).running() as services:
        async with proplet_factory(manager, "p-flc"), WireClient(broker.url, manager.topics) as spy:
            assert spy.client is not None
            await spy.client.subscribe(topic, qos=1)
            done = await run_task(manager, name="_start", file=b64(wasm("flclient")),
                                  env=round_env(round_id, MODEL_REGISTRY_URL=services.url,
                                                DATA_STORE_URL=services.url, MANAGER_COORDINATOR_URL=services.url))
            update = await spy.expect(topic)
    assert done.state is TaskState.COMPLETED, done.error
    assert len(services.updates) == 1 and json.loads(services.updates[0]) == update, "tried the coordinator first"
    assert_trained_like_python(update)
    assert done.results["round_id"] == round_id


async def test_model_uri_without_a_registry_fails_the_task_and_the_proplet_goes_on(
        manager: Any, proplet_factory: PropletFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_REGISTRY_URL", raising=False)
    async with proplet_factory(manager, "p-fld") as agent:
        failed = await run_task(manager, name="_start", file=b64(wasm("flclient")), env=round_env(new_round()))
        assert failed.state is TaskState.FAILED
        assert failed.error == (f"task {failed.id} names MODEL_URI=fl/models/global_model_v3 but no "
                                "MODEL_REGISTRY_URL is set (in the task's env or the proplet's environment). Set "
                                "it to the model registry's base URL.")
        after = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[2, 3])
        assert (after.state, after.results) == (TaskState.COMPLETED, "5")
        assert agent.counters.failed == 1 and agent.counters.completed == 1


async def test_a_failed_round_is_a_plain_failure_with_no_update(
        manager: Any, proplet_factory: PropletFactory) -> None:
    round_id = new_round()
    # Rows of different lengths: flclient exits 2 with a reason on stderr.
    bad_dataset = {"x": [[1.0], [1.0, 2.0]], "y": [1.0, 2.0]}
    with FlServices(models={3: MODEL}, datasets={"p-flf": bad_dataset}).running() as services:
        async with proplet_factory(manager, "p-flf") as agent:
            done = await run_task(manager, name="_start", file=b64(wasm("flclient")),
                                  env=round_env(round_id, DATA_STORE_URL=services.url,
                                                MODEL_REGISTRY_URL=services.url, MANAGER_COORDINATOR_URL=services.url))
    assert done.state is TaskState.FAILED and "rows of different lengths" in done.error
    assert services.updates == [] and agent.federated is not None and agent.federated.updates_published == 0


async def test_an_fl_round_task_name_runs_start(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-fle"):
        done = await run_task(manager, name="fl-round-r1-p-fle", file=b64(wasm("hello")), inputs=["x"])
    assert done.state is TaskState.COMPLETED, done.error
    assert done.results.startswith("argv: [fl-round-r1-p-fle] [x]\n"), "a plain command result without ROUND_ID"


@pytest.mark.parametrize("fixture", ["hello", "hello-component"])
@pytest.mark.parametrize("kind", ["internal", "external"])
async def test_both_runtimes_run_start_for_fl_round_names(kind: str, fixture: str, tmp_path: Path) -> None:
    config = RuntimeConfig(max_concurrent=1, cache_dir=tmp_path / "cache", default_timeout_s=30)
    runtime = WasmtimeRuntime(config) if kind == "internal" else ExternalRuntime(wasmtime_cli(), config)
    try:
        module = wasm(fixture)
        await runtime.load(digest(module), module)
        outcome = await runtime.run(digest(module), Invocation("t-fl", "fl-round-r1-p1", ("a",), {"GREETING": "fl"}))
    finally:
        await runtime.close()
    assert outcome.ok, outcome.error
    assert outcome.stdout.endswith(b" [a]\nGREETING=fl\n")


async def test_the_external_runtime_refuses_env_beyond_one_argument_clearly(tmp_path: Path) -> None:
    runtime = ExternalRuntime(wasmtime_cli(), RuntimeConfig(max_concurrent=1, cache_dir=tmp_path / "cache"))
    try:
        module = wasm("flclient")
        await runtime.load(digest(module), module)
        outcome = await runtime.run(digest(module), Invocation("t-big", "_start", env={"MODEL_DATA": "0" * 200_000}))
    finally:
        await runtime.close()
    assert "MODEL_DATA holds 200000 bytes" in outcome.error and "internal runtime" in outcome.error


# ------------------------------------------------- rounds coordinated by the manager, end to end


def averaged(parts: list[tuple[int, list[float], float]]) -> tuple[list[float], float]:
    total = sum(n for n, _, _ in parts)
    w = [sum(n * ws[j] for n, ws, _ in parts) / total for j in range(len(parts[0][1]))]
    return w, sum(n * b for n, _, b in parts) / total


async def test_the_manager_runs_rounds_on_real_proplets_and_the_model_improves(
        manager: Any, proplet_factory: PropletFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two proplets train flclient on their own data (fetched from a data store), the manager averages
    their updates into model 1, and a second round that starts from model 1 begins at a lower loss."""
    import httpx

    half = len(DATASET["y"]) // 2
    datasets = {"p-fed-a": {"x": DATASET["x"][:half], "y": DATASET["y"][:half]},
                "p-fed-b": {"x": DATASET["x"][half:], "y": DATASET["y"][half:]}}
    hyper = {"lr": 0.02, "epochs": 5}
    with FlServices(datasets=datasets).running() as services:
        monkeypatch.setenv("DATA_STORE_URL", services.url)  # the proplets' own environment
        async with proplet_factory(manager, "p-fed-a"), proplet_factory(manager, "p-fed-b"), \
                httpx.AsyncClient(base_url=manager.api_url, timeout=10) as api:

            async def run_round(round_id: str, model_ref: str) -> dict[str, Any]:
                response = await api.post("/fl/experiments", json={
                    "round_id": round_id, "model_ref": model_ref, "participants": list(datasets),
                    "hyperparams": hyper, "task_wasm_file": b64(wasm("flclient"))})
                assert response.status_code == 200, response.text

                async def ended() -> dict[str, Any] | None:
                    status = (await api.get(f"/fl/rounds/{round_id}/complete")).json()["status"]
                    return status if status["state"] != "running" else None

                return await eventually(ended, 30, interval=0.05)

            first = await run_round(new_round(), "global_model_v0")
            assert first["state"] == "completed" and first["num_updates"] == 2, first
            # The manager asked for the update in the result only (FL_UPDATE_IN_RESULT): no POST, no
            # fallback message, though the env names MANAGER_COORDINATOR_URL for upstream proplets.
            assert {u["source"] for u in first["updates"]} == {"result"}
            counters = manager.federated.counters
            assert (counters.updates_accepted, counters.updates_refused, counters.updates_repeated) == (2, 0, 0)
            model_1 = (await api.get(f"/fl/models/{first['model_version']}")).json()
            zero = {"w": [0.0, 0.0], "b": 0.0}
            local = [train(zero, d, hyper["lr"], hyper["epochs"]) for d in datasets.values()]
            want_w, want_b = averaged([(len(d["y"]), w, b) for d, (w, b, _) in zip(datasets.values(), local,
                                                                                   strict=True)])
            assert all(math.isclose(g, e, rel_tol=1e-9) for g, e in zip(model_1["w"], want_w, strict=True))
            assert math.isclose(model_1["b"], want_b, rel_tol=1e-9)

            second = await run_round(new_round(), first["model_uri"])
            assert second["state"] == "completed" and second["model_version"] == first["model_version"] + 1
    loss = {r: sum(u["metrics"]["loss"] for u in s["updates"]) for r, s in (("first", first), ("second", second))}
    assert loss["second"] < loss["first"], loss
    assert ("GET", "/datasets/p-fed-a") in services.requests and ("GET", "/datasets/p-fed-b") in services.requests
