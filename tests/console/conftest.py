"""Console fixtures: a ConsoleApp on a real in-process manager (session Mosquitto), driven by Pilot."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from console.app import ConsoleApp
from console.settings import ConsoleSettings
from tests.wire import eventually

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SIZE = (140, 40)


def console_settings(**overrides: Any) -> ConsoleSettings:
    """Settings as the test states them (environment and config file are isolated by tests/conftest.py),
    with the cursor not blinking and a fast cadence so tests do not wait for frames."""
    values: dict[str, Any] = {"cursor_blink": False, "refresh_interval": 0.1}
    values.update(overrides)
    return ConsoleSettings(**values)


@pytest.fixture
def console(manager_factory: Any) -> Callable[..., Any]:
    """`async with console(**console_settings) as (app, pilot, core)`: the console on a fresh manager."""

    @asynccontextmanager
    async def factory(*, manager: dict[str, Any] | None = None, app_kwargs: dict[str, Any] | None = None,
                      size: tuple[int, int] = SIZE, settings: ConsoleSettings | None = None,
                      **overrides: Any) -> AsyncIterator[tuple[ConsoleApp, Any, Any]]:
        async with manager_factory(**(manager or {})) as core:
            app = ConsoleApp(core, settings or console_settings(**overrides), **(app_kwargs or {}))
            async with app.run_test(size=size) as pilot:
                await eventually(lambda: app.counts_loaded, timeout=10)
                await pilot.pause()
                yield app, pilot, core

    return factory


async def until(pilot: Any, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll widget or app state, letting the app process messages between polls, until `check` is truthy.
    A lookup of something not there yet (a task row before its event was applied) counts as not yet."""

    async def probe() -> Any:
        await pilot.pause()
        try:
            return check()
        except LookupError:
            return None

    return await eventually(probe, timeout=timeout, interval=0.02)

ViewT = TypeVar("ViewT")


async def open_view(app: Any, pilot: Any, key: str, view: type[ViewT]) -> ViewT:
    """Press a view's key and return the view once it is the current screen."""
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, view))
    screen = app.screen
    assert isinstance(screen, view)
    return screen


async def command(pilot: Any, text: str) -> None:
    """Type a `:` command as a user would."""
    await pilot.press("colon", *text, "enter")


def add_body(name: str = "add", inputs: tuple[str, ...] = ("40", "2"), **extra: Any) -> Any:
    from core.schemas import parse_task_create

    wasm = (EXAMPLES / "add.wasm").read_bytes()
    return parse_task_create({"name": name, "file": base64.b64encode(wasm).decode(), "inputs": list(inputs),
                              **extra})


def table_rows(table: Any) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
