"""Keys that arrive in one burst (fast typing, a paste of keystrokes, keys batched by an SSH link) are
applied in order to the field or view they were typed for, as if they had been typed slowly.

Each test posts every key to the app at once, the way the terminal driver does when it reads them in
one go, then looks at where they landed."""

from __future__ import annotations

from typing import Any

import pytest
from textual import events
from textual.keys import _character_to_key
from textual.widgets import Input

from console.views.dispatch import DispatchScreen
from console.views.traffic import TrafficScreen
from tests.console.conftest import open_view, until

pytestmark = pytest.mark.slow

SPECIAL = {"\t": ("tab", None), "\r": ("enter", None), "\b": ("backspace", None), "\x1b": ("escape", None)}


def burst(app: Any, text: str) -> None:
    for ch in text:
        key, character = SPECIAL.get(ch, (_character_to_key(ch), ch))
        app.post_message(events.Key(key, character))


def fields(screen: DispatchScreen) -> dict[str, str]:
    return {name: screen.query_one(f"#{name}", Input).value for name in ("module", "name", "inputs", "env")}


FORM = {"module": "examples/add.wasm", "name": "add", "inputs": "40 2", "env": ""}


@pytest.mark.parametrize("opening", ["5", ":dispatch\r"], ids=["view-key", "command"])
async def test_a_burst_that_opens_the_form_fills_it_field_by_field(console: Any, opening: str) -> None:
    # The form has never been shown: the keys wait while it is composed and takes focus.
    async with console() as (app, pilot, _core):
        burst(app, opening + "examples/add.wasm\tadd\t40 2")
        await until(pilot, lambda: isinstance(app.screen, DispatchScreen) and fields(app.screen) == FORM)
        assert app.focused is app.screen.query_one("#inputs", Input)


async def test_tab_and_backspace_in_a_burst_apply_where_they_were_typed(console: Any) -> None:
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        # Backspace is a binding, run when the key has bubbled back to the app: without care "c"
        # is inserted before it and deleted instead of "x".
        burst(app, "examples/add.wasmx\b\tadd\t40 2\tA=1\b2")
        await until(pilot, lambda: fields(screen) == {**FORM, "env": "A=2"})
        # Shift+Tab goes back just as promptly (a field selects its text when focused: typing replaces it).
        app.post_message(events.Key("shift+tab", None))
        burst(app, "7 8")
        await until(pilot, lambda: screen.query_one("#inputs", Input).value == "7 8")
        assert fields(screen)["env"] == "A=2"


async def test_a_view_key_and_that_views_key_in_one_burst(console: Any) -> None:
    # "4p": open the traffic view and pause it. "p" must not go to the view that was showing before.
    async with console() as (app, pilot, _core):
        burst(app, "4p")
        await until(pilot, lambda: isinstance(app.screen, TrafficScreen) and app.screen.paused)
        traffic = app.screen
        burst(app, "p2")
        await until(pilot, lambda: app.current_mode == "tasks")
        assert not traffic.paused


async def test_tab_completes_the_function_and_proplet_fields_then_moves_on(console: Any) -> None:
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        burst(app, "examples/add.wasm\t")
        await until(pilot, lambda: screen.exports == ("add",))
        name = screen.query_one("#name", Input)
        name.value = ""
        burst(app, "a")
        await until(pilot, lambda: name._suggestion == "add")  # ghost text from the module's exports
        burst(app, "\t")  # takes the suggestion and stays
        await until(pilot, lambda: name.value == "add")
        assert app.focused is name
        burst(app, "\t4")  # nothing left to complete: on to the inputs
        await until(pilot, lambda: screen.query_one("#inputs", Input).value == "4")
