"""Helpers for the proplet tests: run tasks through a manager and wait for their end."""

from __future__ import annotations

import base64
from typing import Any

from core.schemas import TaskCreate
from tests.wire import eventually


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def run_task(core: Any, timeout: float = 15.0, **body: Any) -> Any:
    task = await core.create_task(TaskCreate.model_validate(body))
    await core.start_task(task.id)
    return await run_to_end(core, task.id, timeout)


async def run_to_end(core: Any, task_id: str, timeout: float = 15.0) -> Any:
    async def finished() -> Any:
        current = await core.get_task(task_id)
        return current if current.state.is_terminal else None

    return await eventually(finished, timeout)
