"""Federated learning on the proplet's side (upstream §5.10), without upstream's silent drops.

A task whose env names `MODEL_URI` gets the global model (and, with `DATA_STORE_URL`, this
proplet's dataset) fetched over HTTP into its env before it runs: `MODEL_DATA`, `DATASET_DATA`.
A task whose env names `ROUND_ID` is a training round: after a successful run its stdout (a JSON
object) is the local update. It is POSTed to the coordinator's `/update`, or, when no coordinator
is configured or it cannot take the update, published on the unprefixed MQTT topic
`fl/rounds/<round>/updates/<proplet>`. The task's result becomes upstream's FL envelope.

Upstream drops such tasks without any result when a URL is missing; here the task fails with a
sentence saying which variable to set, and a missing coordinator falls back to MQTT.

Each variable is read from the task's env first, then from the proplet's own environment.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from core.protocol import FL_UPDATE_IN_RESULT, model_version
from core.topics import fl_update_topic
from proplet.sources.base import format_size
from proplet.sources.http import HttpSource, display_url

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

ROUND_ID = "ROUND_ID"
MODEL_URI = "MODEL_URI"
MODEL_DATA = "MODEL_DATA"
DATASET_DATA = "DATASET_DATA"
MODEL_REGISTRY_URL = "MODEL_REGISTRY_URL"
DATA_STORE_URL = "DATA_STORE_URL"
MANAGER_COORDINATOR_URL = "MANAGER_COORDINATOR_URL"
FL_NUM_SAMPLES = "FL_NUM_SAMPLES"
FL_FORMAT = "FL_FORMAT"
DEFAULT_FORMAT = "f32-delta"

# (variable, meaning) for the proplet's --help and the docs.
VARIABLES: tuple[tuple[str, str], ...] = (
    (MODEL_REGISTRY_URL, "Model registry base URL. A task naming MODEL_URI gets GET <url>/models/<N> as its "
                         "MODEL_DATA, and fails without this URL (unless its env holds MODEL_DATA)."),
    (DATA_STORE_URL, "Data store base URL: GET <url>/datasets/<proplet id> becomes DATASET_DATA."),
    (MANAGER_COORDINATOR_URL, "FL coordinator base URL: a round's update is POSTed to <url>/update; when unset "
                              "or failing, it is published on fl/rounds/<round>/updates/<proplet id>."),
    (FL_NUM_SAMPLES, "num_samples of a round's result (default: the update's own num_samples, else 1)."),
    (FL_FORMAT, f"format of a round's result (default: {DEFAULT_FORMAT})."),
)

DEFAULT_TIMEOUT_S = 30.0
# MODEL_DATA and DATASET_DATA are held in memory and copied into the guest's environment.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

# A round id is one level of fl/rounds/<round>/updates/<proplet>; MQTT refuses wildcards in a publish.
_NOT_IN_TOPIC_LEVEL = frozenset("/+#\0")

Publish = Callable[[str, bytes], None]


class FederatedError(Exception):
    """The FL preparation failed; the message is the task's error."""


def is_round_task(env: Mapping[str, str]) -> bool:
    return bool(env.get(ROUND_ID))


def needs_model(env: Mapping[str, str]) -> bool:
    return bool(env.get(MODEL_URI))


def parse_update(stdout: bytes) -> dict[str, Any] | None:
    """The update a round's module printed: its stdout as one JSON object, else None."""
    try:
        update = orjson.loads(stdout)
    except orjson.JSONDecodeError:
        return None
    return update if isinstance(update, dict) else None


def parse_sample_count(text: str) -> int:
    """FL_NUM_SAMPLES as a count; ValueError with the reason when it is not one."""
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()):
        raise ValueError(f"{FL_NUM_SAMPLES}={text!r} is not a whole number of samples")
    return int(stripped)


def sample_count(setting: str, update: Mapping[str, Any] | None) -> int:
    """FL_NUM_SAMPLES when set, else the update's integer `num_samples`, else 1."""
    if setting:
        return parse_sample_count(setting)
    value = update.get("num_samples") if update is not None else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 1


def build_envelope(*, task_id: str, round_id: str, proplet_id: str, stdout: bytes,
                   update: Mapping[str, Any] | None, num_samples_setting: str = "",
                   format_setting: str = "") -> dict[str, Any]:
    """Upstream's FL result (§3.6): the update travels base64-encoded, exactly as printed."""
    metrics = update.get("metrics") if update is not None else None
    return {
        "task_id": task_id,
        "round_id": round_id,
        "proplet_id": proplet_id,
        "num_samples": sample_count(num_samples_setting, update),
        "update_b64": base64.b64encode(stdout).decode("ascii"),
        "format": format_setting or DEFAULT_FORMAT,
        "metrics": metrics if isinstance(metrics, dict) else {},
    }


class FederatedClient:
    """The HTTP side of FL for one proplet, and the MQTT fallback through the agent's `publish`."""

    def __init__(self, proplet_id: str, publish: Publish, http: HttpSource | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 process_env: Mapping[str, str] | None = None) -> None:
        self.proplet_id = proplet_id
        self.timeout = timeout
        self.max_body_bytes = max_body_bytes
        self._publish = publish
        self._process_env = process_env
        # The agent's module fetcher lends its HTTP client (its TLS settings, one connection pool).
        self._owns_http = http is None
        self._http_source = http or HttpSource()
        self.updates_published = 0
        # Updates on their way to the coordinator: one per round task that just finished, so at most
        # the proplet's task slots' worth, each bounded by the HTTP timeout.
        self._deliveries: set[asyncio.Future[None]] = set()

    def setting(self, name: str, env: Mapping[str, str]) -> str:
        """A variable from the task's env, else from the proplet's environment ("" when unset)."""
        process_env = os.environ if self._process_env is None else self._process_env
        return env.get(name) or process_env.get(name) or ""

    @staticmethod
    def applies(env: Mapping[str, str]) -> bool:
        return needs_model(env) or is_round_task(env)

    async def prepare(self, task_id: str, env: Mapping[str, str]) -> dict[str, str]:
        """The env the module runs with: MODEL_DATA and DATASET_DATA fetched when the task needs them.
        Raises FederatedError saying what to fix."""
        prepared = dict(env)
        if is_round_task(env):
            # Checked before the run: a mistake here would otherwise fail a round that already trained.
            round_id = env[ROUND_ID]
            if any(c in round_id for c in _NOT_IN_TOPIC_LEVEL):
                raise FederatedError(f"task {task_id}: ROUND_ID={round_id!r} cannot be a level of the MQTT topic "
                                     "its update may go to (it holds '/', '+' or '#'). Use a round id without them.")
            try:
                sample_count(self.setting(FL_NUM_SAMPLES, env), None)
            except ValueError as exc:
                raise FederatedError(f"task {task_id}: {exc}. Set it to the number of training samples, "
                                     "or leave it unset.") from None
        if not needs_model(env):
            return prepared
        model_uri = env[MODEL_URI]
        if not prepared.get(MODEL_DATA):
            registry = self.setting(MODEL_REGISTRY_URL, env)
            if not registry:
                raise FederatedError(
                    f"task {task_id} names MODEL_URI={model_uri} but no {MODEL_REGISTRY_URL} is set (in the "
                    "task's env or the proplet's environment). Set it to the model registry's base URL.")
            url = f"{registry.rstrip('/')}/models/{model_version(model_uri)}"
            prepared[MODEL_DATA] = await self._get_text(task_id, "model", url, MODEL_REGISTRY_URL)
        data_store = self.setting(DATA_STORE_URL, env)
        if data_store and not prepared.get(DATASET_DATA):
            url = f"{data_store.rstrip('/')}/datasets/{self.proplet_id}"
            prepared[DATASET_DATA] = await self._get_text(task_id, "dataset", url, DATA_STORE_URL)
        return prepared

    def report(self, task_id: str, env: Mapping[str, str], stdout: bytes) -> dict[str, Any]:
        """After a successful round: start delivering the update, return the FL envelope (the task's
        result). The result does not wait for the delivery: the envelope carries the update too (a
        manager of ours takes it from there), and waiting for the coordinator to store it put an HTTP
        round trip and a commit on every round's path. `aclose()` waits for deliveries under way."""
        round_id = env[ROUND_ID]
        update = parse_update(stdout)
        if update is None:
            log.warning("task %s (round %s) printed no JSON object on stdout; no update is sent to the "
                        "coordinator or over MQTT", task_id, round_id)
        elif env.get(FL_UPDATE_IN_RESULT) == "1":
            log.debug("task %s (round %s): the manager takes the update from the result", task_id, round_id)
        else:
            delivery = asyncio.ensure_future(self._deliver(task_id, round_id, env, stdout.strip()))
            self._deliveries.add(delivery)
            delivery.add_done_callback(self._delivered)
        return build_envelope(task_id=task_id, round_id=round_id, proplet_id=self.proplet_id, stdout=stdout,
                              update=update, num_samples_setting=self.setting(FL_NUM_SAMPLES, env),
                              format_setting=self.setting(FL_FORMAT, env))

    def _delivered(self, delivery: asyncio.Future[None]) -> None:
        self._deliveries.discard(delivery)
        if not delivery.cancelled() and delivery.exception() is not None:
            log.error("delivering a round's update failed", exc_info=delivery.exception())

    async def flush(self) -> None:
        """Wait for the updates being delivered (each is bounded by the HTTP timeout)."""
        if self._deliveries:
            await asyncio.wait(list(self._deliveries))

    async def aclose(self) -> None:
        await self.flush()
        if self._owns_http:
            await self._http_source.aclose()

    # ------------------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        return self._http_source.client()

    async def _deliver(self, task_id: str, round_id: str, env: Mapping[str, str], payload: bytes) -> None:
        """POST the update as printed (upstream forwards the module's JSON); MQTT when that fails."""
        coordinator = self.setting(MANAGER_COORDINATOR_URL, env)
        if coordinator:
            url = f"{coordinator.rstrip('/')}/update"
            problem = await self._post(url, payload)
            if not problem:
                return
            log.warning("task %s (round %s): the coordinator did not take the update (%s); publishing it on "
                        "MQTT instead", task_id, round_id, problem)
        else:
            log.info("task %s (round %s): no %s is set; publishing the update on MQTT", task_id, round_id,
                     MANAGER_COORDINATOR_URL)
        topic = fl_update_topic(round_id, self.proplet_id)
        self._publish(topic, payload)
        self.updates_published += 1

    async def _post(self, url: str, payload: bytes) -> str:
        """"" when the coordinator accepted the update, else why not."""
        import httpx

        shown = display_url(url)
        try:
            async with asyncio.timeout(self.timeout), self._http().stream(
                    "POST", url, content=payload, headers={"content-type": "application/json"}) as response:
                # The body is not read: the status says all, and an endless body must not hold the task.
                if response.is_success:
                    return ""
                return f"POST {shown} answered HTTP {response.status_code} {response.reason_phrase}"
        except TimeoutError:
            return f"POST {shown} took longer than {self.timeout:g} s"
        except httpx.HTTPError as exc:
            return f"POST {shown} failed: {exc or type(exc).__name__}"

    async def _get_text(self, task_id: str, what: str, url: str, variable: str) -> str:
        import httpx

        shown = display_url(url)
        failed = f"task {task_id}: fetching the {what} from {shown} failed"
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._download(url, failed, variable)
        except TimeoutError:
            raise FederatedError(f"{failed}: no complete answer within {self.timeout:g} s. Check that the "
                                 f"server at {variable} is up and healthy.") from None
        except httpx.HTTPError as exc:
            raise FederatedError(f"{failed}: {exc or type(exc).__name__}. Check {variable} and that the server "
                                 "is reachable from this proplet.") from None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise FederatedError(f"{failed}: the answer is not UTF-8 text, so it cannot go into the task's "
                                 "environment. Serve it as JSON or other text.") from None
        if "\0" in text:
            raise FederatedError(f"{failed}: the answer contains a NUL character, which an environment "
                                 "variable cannot hold. Serve it as JSON or other text.")
        return text

    async def _download(self, url: str, failed: str, variable: str) -> bytes:
        limit = self.max_body_bytes
        too_big = (f"{failed}: the answer is larger than the {format_size(limit)} a proplet accepts for the "
                   "task's environment. Serve a smaller one.")
        async with self._http().stream("GET", url) as response:
            if not response.is_success:
                hint = " Check that it is published there." if response.status_code == 404 else ""
                raise FederatedError(f"{failed}: the server answered HTTP {response.status_code} "
                                     f"{response.reason_phrase}.{hint} Check {variable}.")
            declared = response.headers.get("content-length", "").strip()
            if declared.isdigit() and int(declared) > limit:
                raise FederatedError(too_big)
            body = bytearray()
            async for piece in response.aiter_bytes():
                if len(body) + len(piece) > limit:
                    raise FederatedError(too_big)
                body += piece
        return bytes(body)
