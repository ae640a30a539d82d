"""The new-user flow (launch local proplets, dispatch the example through the form, watch it complete),
the form's validation in place, the file picker, and local proplet management."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Log, Select, Static

from console.views.dispatch import DispatchScreen, FilePicker
from console.views.local import LocalScreen
from console.views.tasks import TaskDetailScreen, TasksScreen
from console.widgets import ConfirmModal, PromptModal
from core.schemas import TaskCreate
from tests.console.conftest import EXAMPLES, open_view, table_rows, until
from tests.wasmfixtures import wasm

pytestmark = pytest.mark.slow


def _error(screen: DispatchScreen, field: str) -> str:
    label = screen.query_one(f"#error-{field}")
    return str(label.render()) if label.has_class("-shown") else ""


async def test_new_user_flow_two_local_proplets_dispatch_the_example_and_watch_it_complete(console: Any) -> None:
    async with console() as (app, pilot, _core):
        # Launch two local proplets (real `propeller proplet` processes) with the n key.
        await pilot.press("6")
        await until(pilot, lambda: isinstance(app.screen, LocalScreen))
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, PromptModal))
        await pilot.press("enter")  # the default answer is 2
        await until(pilot, lambda: sum(p.online for p in app.fleet.proplets.values()) == 2, timeout=40)
        local_ids = sorted(app.local.proplets)
        assert len(local_ids) == 2 and all(pid in app.fleet.proplets for pid in local_ids)
        local = app.screen
        assert isinstance(local, LocalScreen)
        await until(pilot, lambda: local.query_one("#local-output", Log).line_count > 0)
        # The table catches up with the fleet at the console's next refresh.
        await until(pilot, lambda: [r[3] for r in table_rows(local.table)] == ["online", "online"])
        # Dispatch the example module through the form, typing as a user would.
        screen = await open_view(app, pilot, "5", DispatchScreen)
        await pilot.press(*"examples/add.wasm")
        await until(pilot, lambda: screen.exports == ("add",))
        await until(pilot, lambda: screen.query_one("#name", Input).value == "add")  # the only export
        await pilot.press("tab", "tab", *"40 2", "enter")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))
        tasks = app.screen
        assert isinstance(tasks, TasksScreen)
        await until(pilot, lambda: any(r[2] == "completed" and r[6] == "42" for r in table_rows(tasks.table)),
                    timeout=30)
        row = next(r for r in table_rows(tasks.table) if r[6] == "42")
        assert row[1] == "add" and row[3] in local_ids
        # The messages are in the traffic view.
        await pilot.press("4")
        await until(pilot, lambda: app.current_mode == "traffic")
        log = app.screen.query_one("#traffic-log", Log)
        await until(pilot, lambda: any("control/manager/start" in line for line in log.lines))
        assert any("control/proplet/results" in line for line in log.lines)
        processes = [p.process for p in app.local.proplets.values()]
    # Closing the console stops its local proplets.
    assert all(p is not None and p.returncode is not None for p in processes)


async def test_form_shows_validation_errors_next_to_the_fields(console: Any, tmp_path: Path) -> None:
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        await pilot.press("f5")
        await until(pilot, lambda: "Choose a module" in _error(screen, "module"))
        module = screen.query_one("#module", Input)
        module.value = str(tmp_path / "missing.wasm")
        await pilot.press("f5")
        await until(pilot, lambda: "No file" in _error(screen, "module"))
        module.value = str(EXAMPLES / "add.wasm")
        await until(pilot, lambda: screen.exports == ("add",))
        screen.query_one("#name", Input).value = "mul"
        await pilot.press("f5")
        await until(pilot, lambda: "no function 'mul'" in _error(screen, "name") and "add" in _error(screen, "name"))
        assert _error(screen, "module") == ""
        screen.query_one("#name", Input).value = "add"
        screen.query_one("#env", Input).value = "GREETING"
        await pilot.press("f5")
        await until(pilot, lambda: "KEY=VALUE" in _error(screen, "env"))
        screen.query_one("#env", Input).value = ""
        screen.query_one("#target", Select).value = "pinned"
        await pilot.press("f5")
        await until(pilot, lambda: "pin the task" in _error(screen, "proplet"))
        screen.query_one("#target", Select).value = "any"
        screen.query_one("#priority", Input).value = "500"
        await pilot.press("f5")
        await until(pilot, lambda: "0 to 100" in _error(screen, "priority"))
        # Nothing was created by the invalid submissions.
        assert (await core.list_tasks()).total == 0


async def test_changing_the_module_replaces_the_function_the_form_filled_in(console: Any) -> None:
    """add.wasm fills in `add`; hello.wasm then must not keep it (the task failed: no export `add`),
    while a function the user typed stays."""
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        module, name = screen.query_one("#module", Input), screen.query_one("#name", Input)
        module.value = str(EXAMPLES / "add.wasm")
        await until(pilot, lambda: name.value == "add")
        module.value = str(EXAMPLES / "hello.wasm")
        await until(pilot, lambda: screen.exports == ("_start",))
        await until(pilot, lambda: name.value == "_start")
        name.value = "main"
        module.value = str(EXAMPLES / "add.wasm")
        await until(pilot, lambda: screen.exports == ("add",))
        await pilot.pause(0.1)
        assert name.value == "main"


async def test_the_module_hint_goes_when_the_field_no_longer_names_a_readable_module(console: Any) -> None:
    """"169 bytes; exports: _start" stayed under an emptied Module field, and under a path to nothing."""
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        hint = screen.query_one("#dispatch-hint", Static)
        await pilot.press(*"examples/hello.wasm")
        await until(pilot, lambda: "exports: _start" in str(hint.render()))
        await pilot.press(*["backspace"] * len("examples/hello.wasm"))
        await until(pilot, lambda: screen.query_one("#module", Input).value == "")
        await until(pilot, lambda: str(hint.render()).strip() == "")
        assert screen.exports == ()
        await pilot.press(*"examples/hello.wasm")
        await until(pilot, lambda: "exports: _start" in str(hint.render()))
        await pilot.press("backspace")  # examples/hello.was: no such file
        await until(pilot, lambda: "exports" not in str(hint.render()))
        await pilot.pause(0.3)  # a probe of the earlier text, finishing late, does not bring it back
        assert "exports" not in str(hint.render()) and screen.exports == ()



async def test_the_module_hint_says_a_component_is_not_for_the_boards(console: Any) -> None:
    # The manager sends a component to no embedded proplet: the form says so before the task waits.
    from tests.wasmfixtures import wasm_path

    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        hint = screen.query_one("#dispatch-hint", Static)
        module = screen.query_one("#module", Input)
        module.value = str(wasm_path("greeter-component"))
        await until(pilot, lambda: "a component: for proplets that run components, not the boards" in str(
            hint.render()))
        module.value = str(EXAMPLES / "hello.wasm")
        await until(pilot, lambda: "exports: _start" in str(hint.render()))
        assert "component" not in str(hint.render())


async def test_after_a_dispatch_the_form_reopens_on_the_module_ready_to_be_replaced(console: Any) -> None:
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        screen.query_one("#start-now").value = False
        await pilot.press(*"examples/add.wasm")
        await until(pilot, lambda: screen.query_one("#name", Input).value == "add")
        await pilot.press("tab", "tab", *"40 2", "enter")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))
        await open_view(app, pilot, "5", DispatchScreen)
        await pilot.press(*"examples/hello.wasm")
        await until(pilot, lambda: screen.query_one("#name", Input).value == "_start")
        assert screen.query_one("#module", Input).value == "examples/hello.wasm"
        assert screen.query_one("#inputs", Input).value == "40 2"
        assert (await core.list_tasks()).total == 1


async def test_wat_files_compile_and_urls_and_oci_references_are_accepted(console: Any, tmp_path: Path) -> None:
    broken = tmp_path / "broken.wat"
    broken.write_text("(module (func (export \"f\") (result i32) i32.add))")
    garbled = tmp_path / "garbled.wat"
    garbled.write_text("(module (func $f (export \"f\")")
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        screen.query_one("#start-now").value = False
        module = screen.query_one("#module", Input)
        module.value = str(broken)
        screen.query_one("#name", Input).value = "f"
        await pilot.press("f5")
        await until(pilot, lambda: "not a valid WebAssembly module" in _error(screen, "module")
                    and "type mismatch" in _error(screen, "module"))
        module.value = str(garbled)
        await pilot.press("f5")
        await until(pilot, lambda: "not valid WebAssembly text" in _error(screen, "module"))
        module.value = str(EXAMPLES / "hello.wat")
        await until(pilot, lambda: "_start" in screen.exports)
        screen.query_one("#name", Input).value = "_start"
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))
        created = (await core.list_tasks()).items[0]
        assert created.name == "_start" and created.wasm_digest.startswith("sha256:")
        assert created.state.label == "pending"
        screen = await open_view(app, pilot, "5", DispatchScreen)
        for source in ("https://example.org/modules/add.wasm", "registry.lan:5000/wasm/add:v1"):
            screen.query_one("#module", Input).value = source
            screen.query_one("#name", Input).value = "add"
            await pilot.press("f5")
            await until(pilot, lambda: isinstance(app.screen, TasksScreen))
            await until(pilot, lambda source=source: any(r.source == source for r in app.fleet.tasks.values()))
            screen = await open_view(app, pilot, "5", DispatchScreen)


async def test_file_picker_fills_the_module_field(console: Any) -> None:
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        screen.query_one("#module", Input).value = str(EXAMPLES / "nothing-here")
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, FilePicker))
        picker = app.screen
        tree = picker.query_one("#picker-tree")
        await until(pilot, lambda: len(tree.root.children) >= 4)
        names = [str(node.label) for node in tree.root.children]
        assert "add.wasm" in names and "hello.wat" in names and "add.wat" in names
        index = names.index("add.wasm")
        tree.move_cursor(tree.root.children[index])
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DispatchScreen))
        assert screen.query_one("#module", Input).value == str(EXAMPLES / "add.wasm")
        await until(pilot, lambda: screen.exports == ("add",))


async def test_local_proplets_output_stop_and_cleanup(console: Any) -> None:
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "6", LocalScreen)
        await pilot.press("a", "a")
        await until(pilot, lambda: len(app.local.proplets) == 2)
        first, second = sorted(app.local.proplets)
        assert first != second
        await until(pilot, lambda: all(app.fleet.proplets.get(p) and app.fleet.proplets[p].online
                                       for p in (first, second)), timeout=40)
        log = screen.query_one("#local-output", Log)
        await until(pilot, lambda: log.line_count > 0)
        # Stop the selected one, after confirming.
        screen.table.move_cursor(row=screen.table.get_row_index(first))
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await until(pilot, lambda: not app.local.proplets[first].running, timeout=15)
        await until(pilot, lambda: not app.fleet.proplets[first].online, timeout=15)
        assert app.local.proplets[second].running
        await until(pilot, lambda: "stopped" in [r[2] for r in table_rows(screen.table)])
        pid = app.local.proplets[second].pid
    # The console's exit stopped the other one.
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_broken_local_proplet_command_is_reported(console: Any) -> None:
    async with console(local_proplet_command="/nonexistent/propeller-proplet --id {id}") as (app, pilot, _core):
        await pilot.press("6")
        await until(pilot, lambda: isinstance(app.screen, LocalScreen))
        await pilot.press("a")
        await until(pilot, lambda: any("was not found" in n.message and "local_proplet_command" in n.message
                                       for n in app._notifications))


async def test_a_running_tasks_detail_shows_its_cpu_and_memory_from_its_proplet(console: Any) -> None:
    async with console() as (app, pilot, core):
        await app.local.launch(1)
        await until(pilot, lambda: sum(p.online for p in app.fleet.proplets.values()) == 1, timeout=40)
        task = await core.create_task(TaskCreate(
            name="_start", file=base64.b64encode(wasm("busy")).decode(), inputs=["20000"],
            monitoring_profile={"interval": 0.3}))
        await core.start_task(task.id)
        await app.push_screen(TaskDetailScreen(task.id))
        fields = app.screen.query_one("#task-fields", Static)
        # The guest spins a core (as much of one as a loaded machine leaves it): its own CPU, and
        # its linear memory, refreshed while it runs.
        shown = await until(pilot, lambda: re.search(r"usage      cpu (\d+)\.\d% {2}memory \d+\.\d KiB  "
                                                     r"\((\d+) samples", str(fields.render())), timeout=20)
        assert int(shown[1]) >= 20, shown[0]
        first = int(re.search(r"\((\d+) samples", str(fields.render()))[1])  # type: ignore[index]
        await until(pilot, lambda: int(re.search(r"\((\d+) samples", str(fields.render()))[1]) > first + 1)  # type: ignore[index]
        await core.stop_task(task.id)
