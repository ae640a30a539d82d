"""The REST API: upstream's routes and response shapes, with upstream's defects fixed.

404 for a missing id, 400 for every validation error, never 500 for bad input; errors are JSON
`{"error": "..."}`. The OpenAPI schema is served at /openapi.json and browsable at /docs.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import uvicorn
from fastapi import Body, FastAPI, File, Path, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import __version__
from core.config import ManagerSettings
from core.cron import Schedule
from core.domain import (
    ZERO_TIME,
    FLRound,
    FLUpdateRecord,
    Job,
    Proplet,
    RoundState,
    Task,
    TaskEvent,
    TaskState,
    group_state,
)
from core.errors import CoreError, InvalidRequest, NotFound, Unavailable
from core.federated import MAX_MODEL_VERSION, model_uri
from core.schemas import (
    ExperimentConfig,
    FLUpdate,
    InvokeBody,
    JobCreate,
    TaskCreate,
    TaskUpdate,
    WorkflowCreate,
    format_validation_error,
)
from core.store.base import StoreUnavailable

if TYPE_CHECKING:
    from core.service import ManagerCore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 100 * 1024 * 1024


def _body_too_large() -> str:
    """The 413's text, the same from the Content-Length check and the streamed count."""
    return f"request body over {MAX_BODY_BYTES // (1024 * 1024)} MiB"


_JSON_ROUTES = ("/tasks", "/workflows", "/jobs", "/fl/experiments")
_JSON_PATHS = frozenset({"/fl/update"})  # exact: /fl/update_cbor takes CBOR
_CBOR_TYPES = frozenset({"application/cbor", "application/cbor-seq"})


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def rfc3339(value: datetime | None) -> str:
    ts = value or ZERO_TIME
    text = ts.isoformat()
    return text.replace("+00:00", "Z")


def task_view(task: Task, schedule: Schedule | None = None) -> dict[str, Any]:
    """A task as upstream serialises it (state as a number, zero times), plus our fields."""
    return {
        "id": task.id,
        "name": task.name,
        "kind": task.kind,
        "state": int(task.state),
        "state_name": task.state.label,
        "image_url": task.image_url,
        "wasm_digest": task.wasm_digest,
        "cli_args": task.cli_args,
        "inputs": task.inputs,
        "env": task.env,
        "daemon": task.daemon,
        "latent": task.latent,
        "encrypted": task.encrypted,
        "kbs_resource_path": task.kbs_resource_path,
        "proplet_id": task.proplet_id,
        "pinned": task.pinned,
        "broadcast": task.broadcast,
        "priority": task.priority,
        "metadata": task.metadata,
        "monitoring_profile": task.monitoring_profile,
        "hal_storage_path": task.hal_storage_path,
        "mode": task.mode,
        "depends_on": task.depends_on,
        "run_if": task.run_if,
        "workflow_id": task.workflow_id,
        "job_id": task.job_id,
        "schedule": schedule.expression if schedule else "",
        "next_run": rfc3339(schedule.next_run if schedule else None),
        "is_recurring": schedule.recurring if schedule else False,
        "timezone": schedule.timezone if schedule else "",
        "limits": task.limits.to_dict(),
        "max_retries": task.max_retries,
        "attempt": task.attempt,
        "retries": task.retries,
        "results": task.results,
        "error": task.error,
        "reason": task.reason,
        "queued_at": rfc3339(task.queued_at),
        "start_time": rfc3339(task.start_time),
        "finish_time": rfc3339(task.finish_time),
        "created_at": rfc3339(task.created_at),
        "updated_at": rfc3339(task.updated_at),
    }


def group_view(tasks: list[Task], view: Callable[[Task], dict[str, Any]] = task_view) -> dict[str, Any]:
    """What a workflow or job is, from its tasks: state (upstream's rule, as a number) and times."""
    state = group_state([t.state for t in tasks])
    starts = [t.start_time for t in tasks if t.start_time is not None]
    finishes = [t.finish_time for t in tasks if t.finish_time is not None]
    return {
        "state": int(state), "state_name": state.label,
        "start_time": rfc3339(min(starts) if starts else None),
        "finish_time": rfc3339(max(finishes) if finishes and state.is_terminal else None),
        "created_at": rfc3339(min(t.created_at for t in tasks) if tasks else None),
        "tasks": [view(t) for t in tasks],
    }


def job_view(job: Job, tasks: list[Task], view: Callable[[Task], dict[str, Any]] = task_view) -> dict[str, Any]:
    return {"job_id": job.id, "name": job.name, "execution_mode": job.execution_mode, **group_view(tasks, view)}


def event_view(e: TaskEvent) -> dict[str, Any]:
    return {"state": int(e.state), "state_name": e.state.label, "at": rfc3339(e.at),
            "attempt": e.attempt, "proplet_id": e.proplet_id, "detail": e.detail}


def proplet_view(p: Proplet, running: list[str] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": p.id,
        "name": p.name,
        "task_count": p.task_count,
        "alive": p.online,
        "namespace": p.namespace,
        "metadata": p.metadata,
        "offline_reason": p.offline_reason,
        "draining": p.draining,
    }
    if p.last_alive_at is not None:
        view["last_alive_at"] = rfc3339(p.last_alive_at)
    if running is not None:
        view["running_tasks"] = running
    return view


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> ORJSONResponse:
    return ORJSONResponse({"error": message}, status_code=status, headers=headers)


def _task_id(task_id: str) -> str:
    try:
        uuid.UUID(task_id)
    except ValueError:
        raise InvalidRequest(f"invalid task id {task_id!r}: task ids are UUIDs") from None
    return task_id


# Offsets are stored and serialised as 64-bit integers (SQLite, PostgreSQL, orjson).
MAX_OFFSET = 2**63 - 1


def _page(offset: int, limit: int, *, max_limit: int) -> None:
    if offset < 0:
        raise InvalidRequest("offset must not be negative")
    if offset > MAX_OFFSET:
        raise InvalidRequest(f"offset must be at most {MAX_OFFSET}")
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"invalid limit size: limit must be between 1 and {max_limit}")


def check_bind_is_safe(settings: ManagerSettings) -> None:
    """Refuse to expose an unauthenticated API beyond this machine, unless told to."""
    if settings.http_tokens or settings.http_allow_insecure:
        return
    host = settings.http_host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise InvalidRequest(
            f"Refusing to serve the REST API on {host} without authentication. Set MANAGER_HTTP_TOKENS "
            "(bearer tokens clients must send), or MANAGER_HTTP_ALLOW_INSECURE=true if something in "
            "front of the manager authenticates requests."
        )


def create_app(core: ManagerCore) -> FastAPI:
    app = FastAPI(
        title="Propeller manager",
        version=__version__,
        description="Tasks and proplets of a Propeller fleet (upstream-compatible routes).",
        default_response_class=ORJSONResponse,
    )
    tokens = [t.encode() for t in core.settings.http_tokens]
    metrics = core.metrics

    def view(task: Task) -> dict[str, Any]:
        return task_view(task, core.cron.get(task.id))

    @app.exception_handler(CoreError)
    async def _core_error(request: Request, exc: CoreError) -> Response:
        return _error(exc.status, str(exc))

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, exc: StoreUnavailable) -> Response:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(400, format_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the manager log")

    app.add_middleware(_BodyLimit)

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        path = request.url.path
        if tokens and path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(given.encode(), t) for t in tokens):
                return _error(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                              {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(413, _body_too_large())
        if (request.method in ("POST", "PUT") and (path.startswith(_JSON_ROUTES) or path in _JSON_PATHS)
                and not path.endswith("/upload") and length not in (None, "0")
                and "application/json" not in request.headers.get("content-type", "")):
            return _error(400, "unsupported content type: send JSON with 'Content-Type: application/json'")
        response: Response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "name", None) or "unmatched"
        metrics.api_requests.labels(name).inc()
        metrics.api_latency.labels(name).observe(time.perf_counter() - started)
        return response

    # ---- service ------------------------------------------------------------------------

    @app.get("/health", name="health")
    async def health() -> dict[str, Any]:
        status = core.status()
        return {
            "status": "pass", "version": __version__, "commit": "none", "description": "manager service",
            "build_time": "unknown", "instance_id": core.settings.entity_id,
            "broker": {"url": status.broker_url, "connected": status.broker_connected,
                       "embedded": status.broker_embedded},
            "store": status.store,
            # Writes wait (and API writes give up after a while) while the database is unreachable.
            "store_connected": status.store_connected,
            "store_error": status.store_error,
            # MANAGER_OCI_PROXY: what the hosted proxy has answered; null when it is not hosted.
            "oci_proxy": None if core.oci_artifacts is None else {
                name: getattr(core.oci_artifacts.counters, name) for name in ("requests", "pulls", "cache_hits",
                                                                              "errors")},
        }

    @app.get("/metrics", name="metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    # ---- tasks --------------------------------------------------------------------------

    @app.post("/tasks", name="create-task", status_code=201)
    async def create_task(body: Annotated[TaskCreate, Body()], response: Response) -> dict[str, Any]:
        task = await core.create_task(body)
        response.headers["Location"] = f"/tasks/{task.id}"
        return view(task)

    @app.get("/tasks", name="list-tasks")
    async def list_tasks(
        offset: int = 0,
        limit: int = 100,
        metadata: Annotated[str | None, Query(description="JSON object the task metadata must contain")] = None,
        state: Annotated[str | None, Query(description="Comma-separated states (names or numbers)")] = None,
        proplet_id: str | None = None,
        id_prefix: Annotated[str | None, Query(
            description="Tasks whose id starts with this (hex digits and '-', e.g. the 8 characters the "
                        "console shows); answered from the primary key's index")] = None,
    ) -> dict[str, Any]:
        _page(offset, limit, max_limit=100)
        meta = None
        if metadata is not None:
            try:
                meta = orjson.loads(metadata)
            except orjson.JSONDecodeError:
                raise InvalidRequest("metadata must be a JSON object, e.g. {\"site\":\"a\"}") from None
            if not isinstance(meta, dict):
                raise InvalidRequest("metadata must be a JSON object, e.g. {\"site\":\"a\"}")
        states = None
        if state:
            try:
                states = [TaskState.parse(s) for s in state.split(",") if s.strip()]
            except (KeyError, ValueError):
                raise InvalidRequest(
                    f"unknown state in {state!r}: use {', '.join(s.label for s in TaskState)}") from None
        page = await core.list_tasks(offset=offset, limit=limit, metadata=meta, states=states,
                                     proplet_id=proplet_id, id_prefix=id_prefix)
        return {"offset": offset, "limit": limit, "total": page.total,
                "tasks": [view(t) for t in page.items]}

    @app.get("/tasks/{task_id}", name="get-task")
    async def get_task(task_id: str) -> dict[str, Any]:
        return view(await core.get_task(_task_id(task_id)))

    @app.put("/tasks/{task_id}", name="update-task")
    async def update_task(task_id: str, body: Annotated[TaskUpdate, Body()]) -> dict[str, Any]:
        return view(await core.update_task(_task_id(task_id), body))

    @app.put("/tasks/{task_id}/upload", name="upload-task-file")
    async def upload(task_id: str, file: Annotated[UploadFile, File(description="a .wasm module")]) -> dict[str, Any]:
        data = await file.read()
        return view(await core.upload_file(_task_id(task_id), file.filename or "", data))

    @app.delete("/tasks/{task_id}", name="delete-task", status_code=204, response_class=Response)
    async def delete_task(task_id: str) -> Response:
        await core.delete_task(_task_id(task_id))
        return Response(status_code=204)

    @app.post("/tasks/{task_id}/start", name="start-task")
    async def start_task(task_id: str) -> dict[str, Any]:
        await core.start_task(_task_id(task_id))
        return {"started": True}

    @app.post("/tasks/{task_id}/stop", name="stop-task")
    async def stop_task(task_id: str) -> dict[str, Any]:
        await core.stop_task(_task_id(task_id))
        return {"stopped": True}

    @app.post("/tasks/{task_id}/invoke", name="invoke-task")
    async def invoke_task(task_id: str, body: Annotated[InvokeBody | None, Body()] = None) -> dict[str, Any]:
        body = body or InvokeBody()
        results = await core.invoke_task(_task_id(task_id), body.inputs, body.env)
        return {"invoked": True, "results": results}

    @app.get("/tasks/{task_id}/results", name="get-task-results")
    async def task_results(task_id: str) -> dict[str, Any]:
        task = await core.get_task(_task_id(task_id))
        # Upstream answers an empty body when there is no result yet; we answer null.
        return {"results": task.results, "error": task.error or None, "state": int(task.state)}

    @app.get("/tasks/{task_id}/events", name="get-task-events")
    async def task_events(task_id: str) -> dict[str, Any]:
        events = await core.task_events(_task_id(task_id))
        return {"events": [event_view(e) for e in events]}

    @app.get("/tasks/{task_id}/metrics", name="get-task-metrics")
    async def task_metrics(task_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        _page(offset, limit, max_limit=1000)
        page = await core.task_metrics(_task_id(task_id), offset, limit)
        return {"offset": offset, "limit": limit, "total": page.total, "metrics": [
            {"task_id": m.task_id, "proplet_id": m.proplet_id, "metrics": m.metrics,
             "aggregated": m.aggregated, "timestamp": rfc3339(m.timestamp)} for m in page.items]}

    # ---- workflows and jobs (core/workflows.py) ------------------------------------------

    @app.post("/workflows", name="create-workflow", status_code=201)
    async def create_workflow(body: Annotated[WorkflowCreate, Body()], response: Response) -> dict[str, Any]:
        tasks = await core.create_workflow(body)
        response.headers["Location"] = f"/workflows/{tasks[0].workflow_id}"
        return {"workflow_id": tasks[0].workflow_id, **group_view(tasks, view)}

    @app.get("/workflows/{workflow_id}", name="get-workflow")
    async def get_workflow(workflow_id: str) -> dict[str, Any]:
        tasks = await core.group_tasks(workflow_id=workflow_id)
        if not tasks:
            raise NotFound(f"workflow {workflow_id} not found")
        return {"workflow_id": workflow_id, **group_view(tasks, view)}

    @app.post("/jobs", name="create-job", status_code=201)
    async def create_job(body: Annotated[JobCreate, Body()], response: Response) -> dict[str, Any]:
        job, tasks = await core.create_job(body)
        response.headers["Location"] = f"/jobs/{job.id}"
        return job_view(job, tasks, view)

    @app.get("/jobs", name="list-jobs")
    async def list_jobs(
        offset: int = 0,
        limit: int = 100,
        status: Annotated[str | None, Query(description="pending, running, completed or failed")] = None,
        id_prefix: Annotated[str | None, Query(
            description="Jobs whose id starts with this (hex digits and '-'); answered from the primary "
                        "key's index")] = None,
    ) -> dict[str, Any]:
        _page(offset, limit, max_limit=1000)
        states = {"pending": TaskState.PENDING, "running": TaskState.RUNNING,
                  "completed": TaskState.COMPLETED, "failed": TaskState.FAILED}
        if status is not None and status not in states:
            raise InvalidRequest("status must be pending, running, completed or failed")
        page = await core.list_jobs(offset=offset, limit=limit, state=states.get(status or ""),
                                    id_prefix=id_prefix)
        return {"offset": offset, "limit": limit, "total": page.total,
                "jobs": [job_view(job, tasks, view) for job, tasks in page.items]}

    @app.get("/jobs/{job_id}", name="get-job")
    async def get_job(job_id: str) -> dict[str, Any]:
        return job_view(*await core.get_job(job_id), view)

    @app.post("/jobs/{job_id}/start", name="start-job")
    async def start_job(job_id: str) -> dict[str, Any]:
        await core.start_job(job_id)
        return {"message": "job started", "job_id": job_id}

    @app.post("/jobs/{job_id}/stop", name="stop-job")
    async def stop_job(job_id: str) -> dict[str, Any]:
        await core.stop_job(job_id)
        return {"message": "job stopped", "job_id": job_id}

    # ---- federated learning (core/federated.py) ------------------------------------------

    fl = core.federated

    @app.post("/fl/experiments", name="configure-experiment")
    async def configure_experiment(body: Annotated[ExperimentConfig, Body()]) -> dict[str, Any]:
        return await fl.configure(body)

    @app.get("/fl/task", name="get-fl-task")
    async def get_fl_task(round_id: str = "", proplet_id: str = "") -> dict[str, Any]:
        if not round_id:
            raise InvalidRequest("round_id is required (GET /fl/task?round_id=...&proplet_id=...)")
        return await fl.task_for(round_id, proplet_id)

    @app.post("/fl/update", name="post-fl-update")
    async def post_fl_update(body: Annotated[FLUpdate, Body()]) -> dict[str, Any]:
        return await fl.accept_update(body, "rest")

    @app.post("/fl/update_cbor", name="post-fl-update-cbor")
    async def post_fl_update_cbor(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in _CBOR_TYPES:
            raise InvalidRequest("unsupported content type: send CBOR with 'Content-Type: application/cbor' "
                                 "(or application/cbor-seq)")
        answer: dict[str, Any] = {}
        for item in _cbor_items(await request.body(), sequence=content_type == "application/cbor-seq"):
            if not isinstance(item, dict):
                raise InvalidRequest("the CBOR body must be a map (an FLUpdate)")
            try:
                update = FLUpdate.model_validate(item)
            except ValidationError as exc:
                raise InvalidRequest(format_validation_error(exc)) from None
            answer = await fl.accept_update(update, "cbor")
        return answer

    @app.get("/fl/rounds", name="list-fl-rounds")
    async def list_fl_rounds(offset: int = 0, limit: int = 100) -> dict[str, Any]:
        _page(offset, limit, max_limit=1000)
        total, rounds = await fl.list_rounds(offset, limit)
        return {"offset": offset, "limit": limit, "total": total, "rounds": [
            {"round_id": r.round_id, "k_of_n": r.k_of_n, "model_version": r.model_version,
             "num_updates": len(updates), **round_view(r, updates)} for r, updates in rounds]}

    @app.get("/fl/rounds/{round_id}/complete", name="get-round-status")
    async def get_round_status(round_id: str) -> dict[str, Any]:
        if fl.remote is not None:
            return await fl.remote.call("GET", f"/rounds/{round_id}/complete")
        r, updates = await fl.get_round(round_id)
        # Upstream's fields, then ours.
        return {"status": {
            "round_id": r.round_id, "completed": r.state is RoundState.COMPLETED, "num_updates": len(updates),
            "k_of_n": r.k_of_n, "model_version": r.model_version, **round_view(r, updates)}}

    @app.get("/fl/models", name="list-fl-models")
    async def list_fl_models() -> dict[str, Any]:
        return {"models": [{"version": v, "model_uri": model_uri(v), "round_id": round_id,
                            "created_at": rfc3339(at)} for v, round_id, at in await fl.models()]}

    @app.get("/fl/models/{version}", name="get-fl-model")
    async def get_fl_model(version: Annotated[int, Path(ge=0, le=MAX_MODEL_VERSION)]) -> dict[str, Any]:
        return await fl.model(version)

    # ---- proplets -----------------------------------------------------------------------

    @app.get("/proplets", name="list-proplets")
    async def list_proplets(
        offset: int = 0,
        limit: int = 100,
        status: Annotated[str | None, Query(description="active or inactive")] = None,
    ) -> dict[str, Any]:
        _page(offset, limit, max_limit=1000)
        if status not in (None, "active", "inactive"):
            raise InvalidRequest("status must be 'active' or 'inactive'")
        online = None if status is None else status == "active"
        items = core.list_proplets(online=online)
        return {"offset": offset, "limit": limit, "total": len(items),
                "proplets": [proplet_view(p) for p in items[offset:offset + limit]]}

    @app.get("/proplets/{proplet_id}", name="get-proplet")
    async def get_proplet(proplet_id: str) -> dict[str, Any]:
        p = core.get_proplet(proplet_id)
        return proplet_view(p, core.running_tasks(proplet_id))

    @app.delete("/proplets/{proplet_id}", name="delete-proplet", status_code=204, response_class=Response)
    async def delete_proplet(proplet_id: str) -> Response:
        await core.delete_proplet(proplet_id)
        return Response(status_code=204)

    @app.get("/proplets/{proplet_id}/sdf", name="get-proplet-sdf")
    async def proplet_sdf_document(proplet_id: str) -> dict[str, Any]:
        from core.sdf import proplet_sdf

        return proplet_sdf(core.get_proplet(proplet_id))

    @app.get("/proplets/{proplet_id}/metrics", name="get-proplet-metrics")
    async def proplet_metrics(proplet_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        _page(offset, limit, max_limit=1000)
        page = await core.proplet_metrics(proplet_id, offset, limit)
        return {"offset": offset, "limit": limit, "total": page.total, "metrics": [
            {"proplet_id": m.proplet_id, "namespace": m.namespace, "timestamp": rfc3339(m.timestamp),
             "cpu_metrics": m.cpu_metrics, "memory_metrics": m.memory_metrics} for m in page.items]}

    @app.get("/proplets/{proplet_id}/alive-history", name="get-proplet-alive-history")
    async def alive_history(proplet_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        _page(offset, limit, max_limit=10_000)
        history = core.get_proplet(proplet_id).alive_history
        return {"offset": offset, "limit": limit, "total": len(history),
                "history": [rfc3339(t) for t in history[offset:offset + limit]]}

    return app


class _BodyLimit:
    """Refuses a request body over MAX_BODY_BYTES as it arrives.

    _guard checks Content-Length, but a chunked body has none: it was read whole into memory and
    parsed whatever its size. Here each chunk is counted as the route reads it, and the read that
    passes the limit raises a 413 (answered as every HTTP error, by _http_error). Starlette's own
    limit (FastAPI's max_body_size) is not used: it answers in plain text and replaces _guard's
    JSON 413.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_BODY_BYTES  # read per request: tests lower it
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, _body_too_large())
            return message

        await self.app(scope, counted, send)


def listen_for_api(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for the REST API on every address `host` names (one port for all of them).

    The manager binds them itself, before it connects to the broker: uvicorn ends the process with
    sys.exit when it cannot bind, which left the manager hung on its open database instead of saying
    why, after it had already taken over the MQTT session of whatever manager held the port."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise InvalidRequest(f"The REST API address {host!r} does not resolve ({exc}). "
                             "Set MANAGER_HTTP_HOST to an address of this machine.") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((a[0], a[1], a[2], a[3], a[4]) for a in addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if sockets[0] is not sock:  # port 0: the others take the port the first was given
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(2048)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        advice = "Set MANAGER_HTTP_PORT (or --port) to a free port."
        if exc.errno == errno.EADDRINUSE:
            advice = ("Another Propeller manager (`propeller serve` or the console) or another program listens "
                      "there: stop it, or set MANAGER_HTTP_PORT (or --port) to a free port.")
        raise Unavailable(f"The REST API cannot listen on {host}:{port} ({exc.strerror or exc}). {advice}") from None
    return sockets


class ApiServer(uvicorn.Server):
    """uvicorn on sockets the manager bound (listen_for_api), without its signal handlers: the process
    entry point owns signals."""

    def __init__(self, app: FastAPI, sockets: list[socket.socket]) -> None:
        host, port = sockets[0].getsockname()[:2]
        super().__init__(uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=5,
            # Longer than clients keep an idle connection (httpx 5 s, the console and CLI included):
            # with uvicorn's 5 s both ends dropped it at once, and a request sent on it as the
            # server closed it failed with a ReadError (seen in the broker-kill fault test).
            timeout_keep_alive=75,
        ))
        self.sockets = sockets

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        await super().serve(sockets=sockets or self.sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def url(self) -> str:
        sock = self.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"


__all__ = ["ApiServer", "check_bind_is_safe", "create_app", "listen_for_api", "proplet_view", "task_view"]


def round_view(r: FLRound, updates: list[FLUpdateRecord]) -> dict[str, Any]:
    """A federated-learning round beyond upstream's status fields."""
    return {
        "state": str(r.state), "reason": r.reason, "experiment_id": r.experiment_id, "model_ref": r.model_ref,
        "model_uri": model_uri(r.model_version) if r.model_version is not None else "",
        "participants": r.participants, "started": r.started,
        "updates": [{"proplet_id": u.proplet_id, "num_samples": u.num_samples, "source": u.source,
                     "metrics": u.body.get("metrics") or {}, "received_at": rfc3339(u.received_at)} for u in updates],
        "created_at": rfc3339(r.created_at), "deadline": rfc3339(r.deadline),
        "completed_at": rfc3339(r.completed_at) if r.completed_at else None,
    }


def _cbor_items(body: bytes, *, sequence: bool) -> list[Any]:
    """The CBOR body's item (or, for application/cbor-seq, each of its items)."""
    import io

    import cbor2

    stream = io.BytesIO(body)
    items = []
    try:
        while True:
            items.append(cbor2.CBORDecoder(stream).decode())
            if not sequence or stream.tell() >= len(body):
                break
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid CBOR: {exc}") from None
    if not sequence and stream.tell() != len(body):
        raise InvalidRequest("the CBOR body holds more than one item: send application/cbor-seq for several")
    return items
