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


def terminal_output(app: Any) -> str:
    """What the console writes to the terminal for a full redraw of the current screen."""
    return app.screen._compositor.render_update(full=True).render_segments(app.console)


async def test_control_characters_from_the_network_never_reach_the_terminal(console: Any) -> None:
    # ESC passes through Rich and Textual text (they strip only BEL, BS, VT, FF and CR; Log only up to
    # U+0014): a task name, a proplet id or an MQTT payload with `ESC [2J` cleared the operator's screen,
    # and OSC 52 could set the operator's clipboard.
    import aiomqtt

    from console.views.tasks import TaskDetailScreen
    from console.views.traffic import TrafficScreen

    clear_screen, set_clipboard = "\x1b[2J", "\x1b]52;c;ZXZpbA==\x07"
    async with console() as (app, pilot, core):
        task = await core.create_task(add_body(name=f"evil{clear_screen}name"))
        proplet = SyntheticProplet(core.status().broker_url, core.topics, "control-proplet", heartbeat=0.2)
        proplet.proplet_id = f"p{clear_screen}{set_clipboard}"
        async with proplet:
            screen = await open_view(app, pilot, "2", TasksScreen)
            await until(pilot, lambda: task.id in screen._shown)
            seen = {"tasks": terminal_output(app)}
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen) and app.screen.task_data is not None)
            seen["task detail"] = terminal_output(app)
            proplets = await open_view(app, pilot, "3", PropletsScreen)
            await until(pilot, lambda: proplets.table.row_count == 1)
            seen["proplets"] = terminal_output(app)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, PropletDetailScreen))
            await pilot.pause(0.2)
            seen["proplet detail"] = terminal_output(app)
            traffic = await open_view(app, pilot, "4", TrafficScreen)
            host, port = core.status().broker_url.rsplit("/", 1)[-1].rsplit(":", 1)
            async with aiomqtt.Client(host, int(port)) as client:
                await client.publish(core.topics.alive, f"not json {clear_screen}".encode(), qos=1)
            await until(pilot, lambda: any("not json" in line for line in traffic.log_widget.lines))
            seen["traffic"] = terminal_output(app)
            await pilot.press("1")
            await pilot.pause(0.3)
            seen["dashboard"] = terminal_output(app)
        for view, output in seen.items():
            assert clear_screen not in output, view
            assert "\x1b]52" not in output, view
        # The rest of the text is still shown.
        assert "evil[2Jname" in seen["tasks"]


async def test_a_topic_level_with_markup_is_shown_as_sent_in_the_topic_tree(console: Any) -> None:
    # The manager subscribes to fl/rounds/+/updates/+, so two levels of those topics are anyone's;
    # Tree reads a str label as markup.
    from console.views.traffic import TrafficScreen
    from tests.wire import WireClient

    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "4", TrafficScreen)
        async with WireClient(core.status().broker_url, core.topics) as client:
            # (a level holds no `/`, so no closing tag; opening tags and actions fit)
            topic = "fl/rounds/[b]r1/updates/[@click=app.quit]p1"  # upstream's FL topics have no prefix
            await client.publish(topic, {"round_id": "r1"}, raw_topic=True)
            await until(pilot, lambda: topic in screen._topic_nodes)
        assert app.is_running
        assert str(screen._topic_nodes[topic].label) == "[@click=app.quit]p1 (1)"
        assert str(screen._topic_nodes[topic].parent.parent.label) == "[b]r1"
