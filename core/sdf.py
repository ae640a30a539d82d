"""A proplet described in the One Data Model's SDF (Semantic Definition Format, RFC 9880), served at
GET /proplets/{id}/sdf as upstream does (reference §6.9).

Upstream's document misdescribes the heartbeat and gives `results` an object type, so it cannot
serve as a contract for the wire (its defect 54). This one describes the messages as they are sent
(docs/protocol.md): the heartbeat's `proplet_id`, `status` and `namespace`, results of any JSON type
with an `error`, and the start's and stop's fields, this implementation's extensions marked optional.
"""

from __future__ import annotations

from typing import Any

from core.domain import Proplet

_STRING = {"type": "string"}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_ANY = {"description": "Any JSON value"}


def _object(properties: dict[str, Any], required: list[str], description: str) -> dict[str, Any]:
    return {"description": description, "type": "object", "properties": properties, "required": required}


def proplet_sdf(p: Proplet) -> dict[str, Any]:
    metadata: dict[str, Any] = {key: _STRING for key in (
        "os", "hostname", "cpu_arch", "ip", "wasm_runtime", "proplet_version", "environment", "description",
        "location")}
    metadata.update({key: {"type": "integer"} for key in (
        "total_memory_bytes", "max_concurrent_tasks", "max_queued_tasks")})
    metadata.update({"heartbeat_interval": {"type": "number", "description": "Seconds"},
                     "tags": _STRINGS, "capabilities": _STRINGS})
    return {
        "info": {"title": f"Propeller Proplet: {p.name} ({p.id})", "version": "1.0", "license": "Apache-2.0"},
        "namespace": {"propeller": "https://github.com/absmach/propeller"},
        "defaultNamespace": "propeller",
        "sdfThing": {"Proplet": {
            "description": "A Propeller execution agent: runs WebAssembly tasks dispatched over MQTT",
            "sdfProperty": {
                "id": {**_STRING, "const": p.id, "readOnly": True},
                "name": {**_STRING, "const": p.name, "readOnly": True},
                "alive": {"type": "boolean", "readOnly": True,
                          "description": "A heartbeat arrived within the liveness timeout"},
                "task_count": {"type": "integer", "minimum": 0, "readOnly": True},
                "metadata": {"sdfRef": "#/sdfData/PropletMetadata"},
            },
            "sdfAction": {
                "start_task": {"description": "m/{domain}/c/{channel}/control/manager/start",
                               "sdfInputData": {"sdfRef": "#/sdfData/TaskDispatch"}},
                "stop_task": {"description": "m/{domain}/c/{channel}/control/manager/stop",
                              "sdfInputData": {"sdfRef": "#/sdfData/TaskStop"}},
            },
            "sdfEvent": {
                "heartbeat": {"description": "m/{domain}/c/{channel}/control/proplet/alive; also its Last Will",
                              "sdfOutputData": {"sdfRef": "#/sdfData/Heartbeat"}},
                "task_result": {"description": "m/{domain}/c/{channel}/control/proplet/results",
                                "sdfOutputData": {"sdfRef": "#/sdfData/TaskResult"}},
            },
        }},
        "sdfData": {
            "PropletMetadata": _object(metadata, [], "What the proplet announced on control/proplet/create"),
            "Heartbeat": _object({
                "proplet_id": _STRING, "namespace": _STRING,
                "status": {**_STRING, "enum": ["alive", "offline"]},
                "running": {**_STRINGS, "description": "Extension: ids of the tasks it runs now"},
                "draining": {"type": "boolean", "description": "Extension: shutting down; it finishes what it "
                             "runs, takes no new task and gives back the rest"},
            }, ["proplet_id", "status"], "Sent every PROPLET_LIVELINESS_INTERVAL seconds"),
            "TaskDispatch": _object({
                "id": _STRING, "name": {**_STRING, "description": "The export to call"},
                "image_url": _STRING, "file": {**_STRING, "contentEncoding": "base64"},
                "inputs": _STRINGS, "env": {"type": "object", "additionalProperties": _STRING},
                "cli_args": {"type": ["array", "null"], "items": _STRING}, "daemon": {"type": "boolean"},
                "latent": {"type": "boolean"}, "broadcast": {"type": "boolean"}, "proplet_id": _STRING,
                "wasm_digest": {**_STRING, "description": "Extension: sha256:<hex> of the module"},
                "limits": {"type": "object", "description": "Extension: timeout_s, fuel, memory_bytes"},
                "attempt": {"type": "integer", "description": "Extension: the dispatch number"},
            }, ["id", "name"], "A task to run"),
            "TaskStop": _object({"id": _STRING, "proplet_id": _STRING, "broadcast": {"type": "boolean"}},
                                ["id"], "Stop a running task"),
            "TaskResult": _object({
                "task_id": _STRING, "proplet_id": _STRING, "results": _ANY,
                "error": {"type": ["string", "null"]},
                "attempt": {"type": "integer", "description": "Extension: the attempt this answers"},
            }, ["task_id", "proplet_id"], "A finished task's results or error"),
        },
    }
