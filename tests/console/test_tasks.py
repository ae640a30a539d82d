"""The task table (live, in place, filter, sort, copy) and the task detail screen with its actions."""

from __future__ import annotations

from typing import Any

from console.views.tasks import TaskDetailScreen, TasksScreen
from console.widgets import ConfirmModal, FilterBar
from tests.console.conftest import add_body, open_view, table_rows, until
from tests.wire import SyntheticProplet


def fail_odd(start: dict[str, Any]) -> tuple[Any, str | None]:
    a, b = (int(x) for x in start["inputs"])
    if a % 2:
        return None, f"odd input {a} refused"
    return str(a + b), None


async def test_rows_are_updated_in_place_by_key_as_tasks_change_state(console: Any) -> None:
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "2", TasksScreen)
        table = screen.table
        rebuilds = []
        original_clear = table.clear
        table.clear = lambda *a, **k: (rebuilds.append(1), original_clear(*a, **k))[1]  # type: ignore[method-assign]
        # Running for 1.5 s: the table shows the latest state at each cadence tick (0.25 s), and a
        # loaded machine may miss a shorter one.
        async with SyntheticProplet(core.status().broker_url, core.topics, "inplace-proplet", delay=1.5,
                                    answer=fail_odd):
            ok = await core.create_task(add_body(inputs=("40", "2")))
            bad = await core.create_task(add_body(inputs=("41", "2")))
            await until(pilot, lambda: table.row_count == 2)
            assert [r[2] for r in table_rows(table)] == ["pending", "pending"]
            await core.start_task(ok.id)
            await core.start_task(bad.id)
            await until(pilot, lambda: str(table.get_cell(ok.id, "state")) == "running")
            await until(pilot, lambda: str(table.get_cell(ok.id, "state")) == "completed", timeout=10)
            await until(pilot, lambda: str(table.get_cell(bad.id, "state")) == "failed")
            await until(pilot, lambda: str(table.get_cell(ok.id, "outcome")) == "42")
            await until(pilot, lambda: "odd input 41 refused" in str(table.get_cell(bad.id, "outcome")))
            assert str(table.get_cell(ok.id, "proplet")) == "inplace-proplet"
            # The state cell carries the state's colour class (the theme decides the colour).
            assert table.get_cell(bad.id, "state").component == "state--failed"
        assert rebuilds == []
        # The dashboard lists the failure.
        await pilot.press("1")
        await until(pilot, lambda: "odd input 41 refused" in str(
            app.screen.query_one("#dash-failures").render()))


async def test_a_filter_typed_fast_fills_the_table_a_few_times_not_once_per_key(console: Any) -> None:
    # Each key filled a table of up to 1,000 rows again (0.1-0.2 s each), so fast typing fell behind.
    async with console() as (app, pilot, core):
        for i in range(30):
            await core.create_task(add_body(name=f"job-{i:02d}"))
        screen = await open_view(app, pilot, "2", TasksScreen)
        await until(pilot, lambda: screen.table.row_count == 30)
        fills = []
        original = screen._rebuild
        screen._rebuild = lambda: (fills.append(1), original())[1]  # type: ignore[method-assign]
        await pilot.press("slash")
        bar = screen.query_one(FilterBar)
        text = "job-2[0-4]"
        for n in range(1, len(text) + 1):  # keys arriving faster than a fill (a terminal's paste, fast typing)
            bar.value = text[:n]
        await until(pilot, lambda: sorted(r[1] for r in table_rows(screen.table)) == [
            "job-20", "job-21", "job-22", "job-23", "job-24"])
        assert 1 <= len(fills) <= 3, f"{len(fills)} fills for 10 keys"


async def test_filter_with_regex_inversion_and_literal_fallback(console: Any) -> None:
    async with console() as (app, pilot, core):
        for name in ("alpha", "beta", "gamma", "delta"):
            await core.create_task(add_body(name=name))
        screen = await open_view(app, pilot, "2", TasksScreen)
        table = screen.table
        await until(pilot, lambda: table.row_count == 4)
        await pilot.press("slash", *"^(al|ga)")
        await until(pilot, lambda: sorted(r[1] for r in table_rows(table)) == ["alpha", "gamma"])
        await pilot.press("enter")  # keeps the filter, closes the bar
        assert screen.row_filter.active
        assert "matching /^(al|ga)/" in " ".join(screen.crumbs())
        await pilot.press("slash", "ctrl+u", *"!ta$")
        await until(pilot, lambda: sorted(r[1] for r in table_rows(table)) == ["alpha", "gamma"])
        await pilot.press("ctrl+u", *"!^al")
        await until(pilot, lambda: sorted(r[1] for r in table_rows(table)) == ["beta", "delta", "gamma"])
        # Not a valid regex: matched literally instead of refusing the keystroke.
        await pilot.press("ctrl+u", *"(gam")
        await until(pilot, lambda: table.row_count == 0)
        assert screen.row_filter.literal
        # A task created while filtered appears only if it matches.
        await pilot.press("ctrl+u", *"gam")
        await until(pilot, lambda: table.row_count == 1)
        await core.create_task(add_body(name="gamma-two"))
        await core.create_task(add_body(name="epsilon"))
        await until(pilot, lambda: sorted(r[1] for r in table_rows(table)) == ["gamma", "gamma-two"])
        await pilot.press("escape")  # Esc in the filter bar clears it
        await until(pilot, lambda: table.row_count == 6)
        assert not screen.row_filter.active


async def test_sort_by_name_state_and_age(console: Any) -> None:
    async with console() as (app, pilot, core):
        names = ["delta", "alpha", "charlie", "bravo"]
        for name in names:
            await core.create_task(add_body(name=name))
        screen = await open_view(app, pilot, "2", TasksScreen)
        table = screen.table
        await until(pilot, lambda: table.row_count == 4)
        # Newest first by default.
        assert [r[1] for r in table_rows(table)] == names[::-1]
        await pilot.press("N")
        await until(pilot, lambda: [r[1] for r in table_rows(table)] == sorted(names))
        await pilot.press("N")
        await until(pilot, lambda: [r[1] for r in table_rows(table)] == sorted(names, reverse=True))
        await pilot.press("A")
        await until(pilot, lambda: [r[1] for r in table_rows(table)] == names[::-1])
        # A new row lands where the sort puts it.
        await pilot.press("N")
        await core.create_task(add_body(name="aardvark"))
        await until(pilot, lambda: next(r[1] for r in table_rows(table)) == "aardvark")


async def test_a_large_result_is_kept_and_shown_in_part_and_copied_whole(console: Any) -> None:
    """Before: each task row kept its whole result (1,000 rows of 1 MiB results: 1 GB in the
    console), turned it to text and searched it again for every redraw and filter, and the detail
    screen laid out all of it. Now a row keeps the beginning, the detail shows the first part and
    says how much there is, and `c` still copies the whole result."""
    big = "0123456789abcdef" * 65536  # 1 MiB

    def answer(start: dict[str, Any]) -> tuple[Any, str | None]:
        return big, None

    async with console() as (app, pilot, core):
        async with SyntheticProplet(core.status().broker_url, core.topics, "big-proplet", answer=answer):
            task = await core.create_task(add_body())
            await core.start_task(task.id)
            screen = await open_view(app, pilot, "2", TasksScreen)
            await until(pilot, lambda: (row := app.fleet.tasks.get(task.id)) is not None and row.results)
        row = app.fleet.tasks[task.id]
        assert big.startswith(row.results.rstrip("…")) and len(row.results) <= 1001
        await until(pilot, lambda: screen.table.row_count == 1)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen) and app.screen.task_data is not None)
        shown = str(app.screen.query_one("#task-output").render())
        assert len(shown) < 20_000 and "1.0 MiB in all" in shown and "c copies" in shown, shown[-300:]
        await pilot.press("c")
        assert app.clipboard == big


async def test_copy_task_id_to_the_clipboard(console: Any) -> None:
    async with console() as (app, pilot, core):
        task = await core.create_task(add_body())
        screen = await open_view(app, pilot, "2", TasksScreen)
        await until(pilot, lambda: screen.table.row_count == 1)
        await pilot.press("y")
        assert app.clipboard == task.id


async def test_detail_shows_the_lifecycle_and_its_actions_work_with_confirmation(console: Any) -> None:
    async with console() as (app, pilot, core):
        async with SyntheticProplet(core.status().broker_url, core.topics, "detail-proplet", delay=0.2):
            task = await core.create_task(add_body(env={"GREETING": "hi"}, limits={"timeout_s": 5}))
            await core.start_task(task.id)
            screen = await open_view(app, pilot, "2", TasksScreen)
            await until(pilot, lambda: app.fleet.tasks[task.id].results == "42")
            await until(pilot, lambda: screen.table.row_count == 1)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen))
            detail = app.screen
            assert isinstance(detail, TaskDetailScreen)
            timeline = detail.query_one("#timeline")
            await until(pilot, lambda: timeline.row_count >= 3)
            states = [r[1] for r in table_rows(timeline)]
            assert states[0] == "pending" and states[-1] == "completed" and "running" in states
            rows = table_rows(timeline)
            assert all(r[2] for r in rows[:-1]), rows  # each transition but the last has a duration
            assert rows[-1][4] == "detail-proplet"
            fields = str(detail.query_one("#task-fields").render())
            assert "GREETING=hi" in fields and "timeout_s=5" in fields and "40 2" in fields
            assert "42" in str(detail.query_one("#task-output").render())
            await pilot.press("c")
            assert app.clipboard == "42"
            # Re-run: a new attempt that completes again.
            await pilot.press("s")
            await until(pilot, lambda: detail.task_data is not None and detail.task_data.attempt == 2
                        and detail.task_data.state.label == "completed")
            await until(pilot, lambda: [r[1] for r in table_rows(timeline)].count("completed") == 2)
        # Stop a queued task: confirm first, No keeps it.
        queued = await core.create_task(add_body(name="waits", proplet_id="nobody"))
        await core.start_task(queued.id)
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))
        screen = app.screen
        assert isinstance(screen, TasksScreen)
        await until(pilot, lambda: queued.id in screen._shown)
        screen.select(queued.id)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen) and app.screen.task_id == queued.id)
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen))
        assert (await core.get_task(queued.id)).state.label == "pending"
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await until(pilot, lambda: app.fleet.tasks[queued.id].state.label == "interrupted")
        # Delete: confirm, then the detail closes and the row goes.
        await pilot.press("D")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen))
        await pilot.press("D")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))
        await until(pilot, lambda: queued.id not in app.screen._shown)
        assert [t.id for t in (await core.list_tasks()).items] == [task.id]


async def test_actions_that_the_core_refuses_say_why(console: Any) -> None:
    async with console() as (app, pilot, core):
        task = await core.create_task(add_body(proplet_id="nobody"))
        await core.start_task(task.id)
        screen = await open_view(app, pilot, "2", TasksScreen)
        await until(pilot, lambda: screen.table.row_count == 1)
        await pilot.press("s")  # already queued
        await until(pilot, lambda: any("already queued" in n.message and "stop it first" in n.message
                                       for n in app._notifications))


async def test_tasks_created_elsewhere_appear_with_their_details(console: Any) -> None:
    async with console(task_rows=10) as (app, pilot, core):
        screen = await open_view(app, pilot, "2", TasksScreen)
        ids = [(await core.create_task(add_body(name=f"t{i}"))).id for i in range(14)]
        # Bounded: the oldest leave the table.
        await until(pilot, lambda: screen.table.row_count == 10 and ids[-1] in screen._shown)
        assert ids[0] not in screen._shown


async def test_detail_shows_the_workflow_and_dependencies_of_a_task(console: Any) -> None:
    import uuid

    from core.schemas import WorkflowCreate

    async with console() as (app, pilot, core):
        root = add_body(id=str(uuid.uuid4()))
        dependent = add_body(name="after", id=str(uuid.uuid4()), depends_on=[root.id], run_if="failure")
        tasks = await core.create_workflow(WorkflowCreate(tasks=[root, dependent]))
        screen = await open_view(app, pilot, "2", TasksScreen)
        await until(pilot, lambda: dependent.id in screen._shown)
        screen.select(dependent.id)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen) and app.screen.task_data is not None)
        fields = str(app.screen.query_one("#task-fields").render())
        assert f"workflow {tasks[0].workflow_id}" in fields
        assert f"after      {root.id}   run_if failure" in fields


async def test_a_task_never_started_says_so_in_the_table_and_the_detail_until_it_is_started(console: Any) -> None:
    # Created and not started looked like queued: pending, nothing said.
    async with console() as (app, pilot, core):
        before = await core.create_task(add_body(name="before", proplet_id="nobody"))
        screen = await open_view(app, pilot, "2", TasksScreen)
        during = await core.create_task(add_body(name="during", proplet_id="nobody"))
        await until(pilot, lambda: screen.table.row_count == 2)
        for task in (before, during):
            await until(pilot, lambda t=task: str(screen.table.get_cell(t.id, "outcome")).startswith(
                "not started: start it (s in the console"))
        screen.select(during.id)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen) and app.screen.task_data is not None)
        detail = app.screen
        assert "not started: start it (s in the console" in str(detail.query_one("#task-fields").render())
        await pilot.press("s")
        await until(pilot, lambda: detail.task_data is not None and detail.task_data.queued_at is not None)
        await until(pilot, lambda: "not started" not in str(detail.query_one("#task-fields").render())
                    and "proplet nobody" in str(detail.query_one("#task-fields").render()))
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))
        await until(pilot, lambda: "not started" not in str(screen.table.get_cell(during.id, "outcome")))


async def test_a_latent_task_dispatched_from_the_form_is_called_with_i_on_a_real_proplet(
        console: Any, tmp_path: Any) -> None:
    """The FaaS path in the console: the form's latent box deploys the module on a real proplet, `i`
    in the table or the detail asks for inputs and calls it, and the result is told (and shown in the
    detail as its last call); a call that fails, or of a task that is not latent, says why."""
    from textual.widgets import Checkbox, Input, Static

    from console.views.dispatch import DispatchScreen
    from console.widgets import PromptModal
    from proplet.agent import PropletAgent
    from proplet.config import PropletSettings
    from tests.console.conftest import EXAMPLES

    async with console() as (app, pilot, core):
        settings = PropletSettings.load(mqtt_address=core.status().broker_url, tenant_id=core.topics.domain,
                                        channel_id=core.topics.channel, entity_id="faas-console",
                                        cache_dir=tmp_path / "cache", state_dir=tmp_path / "state",
                                        metrics_enabled=False)
        async with PropletAgent(settings):
            await until(pilot, lambda: "faas-console" in app.fleet.proplets and app.fleet.proplets[
                "faas-console"].online, timeout=15)
            form = await open_view(app, pilot, "5", DispatchScreen)
            await pilot.press(*str(EXAMPLES / "add.wasm"))
            await until(pilot, lambda: form.query_one("#name", Input).value == "add")
            form.query_one("#inputs", Input).value = "1 2"
            form.query_one("#latent", Checkbox).value = True
            await pilot.press("f5")
            tasks = await until(pilot, lambda: app.screen if isinstance(app.screen, TasksScreen) else None)
            await until(pilot, lambda: any(r[2] == "running" for r in table_rows(tasks.table)), timeout=15)
            task_id = tasks.selected_id()  # the table selects the task just dispatched
            assert task_id is not None and (await core.get_task(task_id)).latent

            await pilot.press("i")
            prompt = await until(pilot, lambda: app.screen if isinstance(app.screen, PromptModal) else None)
            answer = prompt.query_one("#answer", Input)
            assert answer.value == "1 2"  # its own inputs, to edit
            answer.value = "40 2"
            await pilot.press("enter")
            await until(pilot, lambda: any(f"Task {task_id[:8]} returned 42 in" in n.message
                                           for n in app._notifications), timeout=15)

            await pilot.press("enter")  # the detail
            detail = await until(pilot, lambda: app.screen if isinstance(app.screen, TaskDetailScreen) else None)
            fields = detail.query_one("#task-fields", Static)
            await until(pilot, lambda: "latent     yes" in str(fields.render()))
            await pilot.press("i")
            prompt = await until(pilot, lambda: app.screen if isinstance(app.screen, PromptModal) else None)
            prompt.query_one("#answer", Input).value = "5, 6"
            await pilot.press("enter")
            await until(pilot, lambda: "last call  5 6 → 11" in str(fields.render()), timeout=15)
            await pilot.press("i")
            prompt = await until(pilot, lambda: app.screen if isinstance(app.screen, PromptModal) else None)
            prompt.query_one("#answer", Input).value = "x"
            await pilot.press("enter")
            await until(pilot, lambda: any("failed on faas-console" in n.message and n.severity == "error"
                                           for n in app._notifications), timeout=15)

            plain = await core.create_task(add_body())
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, TasksScreen))
            await until(pilot, lambda: plain.id in tasks._shown)
            tasks.select(plain.id)
            await pilot.press("i")
            await until(pilot, lambda: any(f"Task {plain.id[:8]} is not latent" in n.message
                                           for n in app._notifications))
            assert not isinstance(app.screen, PromptModal)
            await core.stop_task(task_id)
