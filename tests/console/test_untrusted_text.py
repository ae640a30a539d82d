"""Text the console does not write itself (filters typed, task names, proplet ids, MQTT payloads, error
messages) is shown as typed or sent: never read as markup, never passed to the terminal as control codes."""

from __future__ import annotations

from typing import Any

from console.views.proplets import PropletDetailScreen, PropletsScreen
from console.views.tasks import TasksScreen
from console.widgets import FleetHeader
from tests.console.conftest import add_body, open_view, until
from tests.wire import SyntheticProplet


async def test_a_filter_with_square_brackets_is_shown_as_typed_in_the_header(console: Any) -> None:
    # `[` alone is not a valid regex, so it is matched literally; `[/]` is a valid one. Both used to
    # reach the header's markup: the first closed the console with a MarkupError, the second vanished.
    async with console() as (app, pilot, core):
        await core.create_task(add_body(name="a[b"))
        screen = await open_view(app, pilot, "2", TasksScreen)
        await until(pilot, lambda: screen.table.row_count == 1)
        await pilot.press("slash", "[")
        await until(pilot, lambda: screen.row_filter.text == "[")
        assert app.is_running
        header = screen.query_one(FleetHeader)
        assert "matching /[/ (literal: not a valid regex)" in header.text
        assert screen.table.row_count == 1
        await pilot.press("backspace", *"[a-z]+", "enter")
        await until(pilot, lambda: "matching /[a-z]+/" in header.text)


async def test_a_proplet_id_with_markup_is_shown_as_sent_in_the_detail_header(console: Any) -> None:
    async with console() as (app, pilot, core):
        proplet = SyntheticProplet(core.status().broker_url, core.topics, "markup-proplet", heartbeat=0.2)
        proplet.proplet_id = "[b]bold[/b]-proplet"
        async with proplet:
            screen = await open_view(app, pilot, "3", PropletsScreen)
            await until(pilot, lambda: screen.table.row_count == 1)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, PropletDetailScreen))
            header = app.screen.query_one(FleetHeader)
            await until(pilot, lambda: "Proplets › [b]bold[/b]-proplet" in header.text)


async def test_an_unterminated_bracket_in_a_task_name_keeps_the_task_detail_open(console: Any) -> None:
    # textual.markup.escape leaves `[/` without a `]` as it is; followed by the view's own `[/b]` it made
    # one closing tag that matched nothing (a MarkupError that closed the console).
    from console.views.tasks import TaskDetailScreen

    async with console() as (app, pilot, core):
        task = await core.create_task(add_body(name="half [/ bracket\\"))
        screen = await open_view(app, pilot, "2", TasksScreen)
        await until(pilot, lambda: screen.table.row_count == 1)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen) and app.screen.task_data is not None)
        fields = app.screen.query_one("#task-fields")
        await until(pilot, lambda: str(fields.render()).startswith(f"half [/ bracket\\\u200b  {task.id}"))
        assert app.is_running


def toast_text(notification: Any) -> str:
    """What the toast of a notification shows (tests run with toasts off, so render one here)."""
    from textual.widgets._toast import Toast

    return Toast(notification).render().plain


async def test_notifications_show_ids_and_typed_text_as_they_are(console: Any) -> None:
    # Notifications are markup by default in Textual: a proplet id such as `[/]x` (copied, forgotten) or
    # an unknown command typed as `:[/]` made the toast raise a MarkupError as it was drawn.
    async with console() as (app, pilot, core):
        proplet = SyntheticProplet(core.status().broker_url, core.topics, "notified-proplet", heartbeat=0.2)
        proplet.proplet_id = "[b]x[/b][/]"
        async with proplet:
            screen = await open_view(app, pilot, "3", PropletsScreen)
            await until(pilot, lambda: screen.table.row_count == 1)
            await pilot.press("y")
            await until(pilot, lambda: app.clipboard == "[b]x[/b][/]")
        await pilot.press("colon", *"[/]", "enter")
        await until(pilot, lambda: len(app._notifications) == 2)
        shown = [toast_text(n) for n in app._notifications]
        assert shown[0] == "Copied proplet id [b]x[/b][/]"
        assert shown[1].startswith("Unknown command ':[/]'.")
