"""A small synchronous client of the manager's REST API, used by the CLI."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx


class ApiError(Exception):
    """The manager answered with an error, or could not be reached. The message is for the user;
    `status` is the HTTP status of the answer (None when there was none)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ManagerClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ManagerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ApiError(
                f"Cannot reach the manager at {self.base_url} ({exc}). Start it with `propeller serve` "
                "or point --manager-url (PROPELLER_MANAGER_URL) at a running manager."
            ) from None
        except httpx.TimeoutException:
            raise ApiError(f"The manager at {self.base_url} did not answer in time.") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text or response.reason_phrase
            raise ApiError(f"{response.status_code} {response.reason_phrase}: {message}", response.status_code)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # tasks

    def create_task(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/tasks", json=body)

    def list_tasks(self, offset: int = 0, limit: int = 100, state: str | None = None,
                   id_prefix: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state:
            params["state"] = state
        if id_prefix:
            params["id_prefix"] = id_prefix
        return self.request("GET", "/tasks", params=params)

    def get_task(self, task_id: str) -> dict[str, Any]:
        return self.request("GET", f"/tasks/{task_id}")

    def start_task(self, task_id: str) -> dict[str, Any]:
        return self.request("POST", f"/tasks/{task_id}/start")

    def stop_task(self, task_id: str) -> dict[str, Any]:
        return self.request("POST", f"/tasks/{task_id}/stop")

    def delete_task(self, task_id: str) -> None:
        self.request("DELETE", f"/tasks/{task_id}")

    def invoke(self, task_id: str, inputs: list[str], env: dict[str, str], wait_s: float) -> dict[str, Any]:
        """Call a deployed latent task; the manager answers within `wait_s` (its own limit)."""
        return self.request("POST", f"/tasks/{task_id}/invoke", json={"inputs": inputs, "env": env},
                            timeout=httpx.Timeout(self._http.timeout.connect, read=wait_s + 10))

    def results(self, task_id: str) -> dict[str, Any]:
        return self.request("GET", f"/tasks/{task_id}/results")

    def events(self, task_id: str) -> dict[str, Any]:
        return self.request("GET", f"/tasks/{task_id}/events")

    # workflows and jobs

    def create_workflow(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/workflows", json=body)

    def get_workflow(self, workflow_id: str) -> dict[str, Any]:
        return self.request("GET", f"/workflows/{workflow_id}")

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/jobs", json=body)

    def list_jobs(self, offset: int = 0, limit: int = 100, status: str | None = None,
                  id_prefix: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if status:
            params["status"] = status
        if id_prefix:
            params["id_prefix"] = id_prefix
        return self.request("GET", "/jobs", params=params)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}")

    def start_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/start")

    def stop_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/stop")

    # federated learning

    def start_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/fl/experiments", json=body)

    def round_status(self, round_id: str) -> dict[str, Any]:
        return self.request("GET", f"/fl/rounds/{round_id}/complete")

    def list_rounds(self, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self.request("GET", "/fl/rounds", params={"offset": offset, "limit": limit})

    def list_models(self) -> dict[str, Any]:
        return self.request("GET", "/fl/models")

    def get_model(self, version: int) -> dict[str, Any]:
        return self.request("GET", f"/fl/models/{version}")

    # proplets

    def list_proplets(self, status: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/proplets", params={"status": status} if status else None)

    def get_proplet(self, proplet_id: str) -> dict[str, Any]:
        return self.request("GET", f"/proplets/{proplet_id}")


def module_fields(source: str, relative_to: Path | None = None) -> dict[str, str]:
    """Task fields for a module given as a local .wasm or .wat path, an http(s) URL or an OCI reference.
    A relative path is read from `relative_to` (the folder of the JSON file that names it), else
    from the current directory."""
    if source.startswith(("http://", "https://")):
        return {"image_url": source}
    path = Path(source).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.exists():
        # As the console's dispatch form reads a file: WebAssembly text is compiled here.
        from console.modules import FieldError, module_bytes

        try:
            data = module_bytes(path)
        except FieldError as exc:
            raise ApiError(str(exc)) from None
        return {"file": base64.b64encode(data).decode("ascii")}
    # An OCI reference is host/repository[:tag|@digest]; anything shaped like a path, or naming a
    # .wasm/.wat file (as the console's dispatch form reads it), is a file.
    if source.startswith(("/", "./", "../", "~")) or source.endswith((".wasm", ".wat")):
        where = "" if Path(source).expanduser().is_absolute() else f" (looked in {relative_to or Path.cwd()})"
        raise ApiError(f"{source}: no such file{where}")
    return {"image_url": source}
