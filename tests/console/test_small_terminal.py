"""The console on a small terminal: 80x24 is the default of most terminals an operator opens over SSH on
a gateway, and 60x15 a split pane. What matters stays in view there, dialogs fit, and a resize while a
view is shown keeps it working."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from textual.widgets import Static

from console.views.federated import FederatedScreen, StartRoundModal
from console.views.firmware import ProvisionModal
from console.views.local import LocalScreen
from console.views.proplets import PropletsScreen
from console.views.tasks import TasksScreen
from console.views.traffic import COMPACT_BELOW, TrafficScreen
from console.widgets import ConfirmModal, FleetHeader, KeyHints
from tests.console.conftest import add_body, console_settings, open_view, until

SMALL = (80, 24)
TINY = (60, 15)


def shown(widget: Any) -> list[str]:
    """The lines a one- or two-line widget draws, cut at its width as the terminal cuts them."""
    return [line[: widget.content_size.width] for line in str(widget.render()).split("\n")]


async def test_the_header_keeps_the_broker_and_database_state_in_view_on_a_narrow_terminal(console: Any) -> None:
    # At 80 columns the first line was cut after "db sqli…", so "○ unreachable" was never seen; at 60
    # after the broker's URL, so its state was not either. The counts' line lost "failed" at 80.
    async with console(size=SMALL) as (app, pilot, _core):
        await open_view(app, pilot, "6", LocalScreen)
        header = app.screen.query_one(FleetHeader)
        await until(pilot, lambda: "connected" in header.text)
        where, counts = shown(header)
        assert "● connected" in where and "db sqlite" in where, where
        assert "failed 0" in counts and "Local proplets" in counts, counts

        # The database goes away (as test_database_outage has it on PostgreSQL): every status says so.
        take_snapshot = app._take_snapshot

        def store_down(snapshot: Any) -> None:
            take_snapshot(dataclasses.replace(snapshot, status=dataclasses.replace(snapshot.status,
                                                                                   store_connected=False)))

        app._take_snapshot = store_down
        await until(pilot, lambda: "unreachable" in header.text)
        where, _ = shown(header)
        assert "○ unreachable" in where and "● connected" in where, where

        await pilot.resize_terminal(*TINY)
        await until(pilot, lambda: header.content_size.width == TINY[0] - 2)
        where, counts = shown(header)
        assert "● connected" in where and "○ unreachable" in where, where
        assert "failed 0" in counts, counts
        # Everything is still said where there is room for it.
        assert app.core_status.broker_url in header.text and "sqlite " in header.text


async def test_the_footer_keeps_the_command_and_help_keys_at_80_columns(console: Any) -> None:
    # The task views' keys filled the line and `? Help`, the key that lists the others, was cut off.
    async with console(size=SMALL) as (app, pilot, _core):
        screen = await open_view(app, pilot, "2", TasksScreen)
        footer = screen.query_one(KeyHints)
        await until(pilot, lambda: "d Describe" in shown(footer)[0])
        line = shown(footer)[0]
        assert ": Command" in line and "? Help" in line, line
        assert "…" not in line
        # A key that did not fit is not offered to a click either.
        assert all(hint.end <= footer.size.width for hint in footer._hints)
        await pilot.press("7")
        await until(pilot, lambda: "r Ports" in shown(app.screen.query_one(KeyHints))[0])
        assert "? Help" in shown(app.screen.query_one(KeyHints))[0]


def _fits(app: Any, box: Any) -> bool:
    region = box.region
    return region.x >= 0 and region.y >= 0 and region.right <= app.size.width and region.bottom <= app.size.height


async def test_dialogs_fit_a_small_terminal(console: Any) -> None:
    # The confirm dialog (64 wide) lost its right border and half its "No" button at 60 columns, the
    # round form (96 wide) its right part at 80, and the provisioning dialog its last two fields (the
    # one Enter sends from among them) below the 24th row.
    async with console(size=TINY) as (app, pilot, _core):
        app.push_screen(ConfirmModal("Delete task 96bf4ade and its history? A running task is stopped first."))
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.pause()
        box = app.screen.query_one("Vertical")
        assert _fits(app, box), box.region
        assert _fits(app, app.screen.query_one("#no")), app.screen.query_one("#no").region
        await pilot.press("n")

        await pilot.resize_terminal(*SMALL)
        await open_view(app, pilot, "8", FederatedScreen)
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, StartRoundModal))
        await pilot.pause()
        assert _fits(app, app.screen.query_one("VerticalScroll")), app.screen.query_one("VerticalScroll").region
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, FederatedScreen))

        app.push_screen(ProvisionModal({"mqtt_url": "mqtt://192.0.2.2:1883", "channel": "default"}))
        await until(pilot, lambda: isinstance(app.screen, ProvisionModal))
        await pilot.pause()
        assert _fits(app, app.screen.query_one("Vertical")), app.screen.query_one("Vertical").region
        assert _fits(app, app.screen.query_one("#prov-channel")), app.screen.query_one("#prov-channel").region
        # Borderless, an empty field must still show where it is: not the dialog's own background.
        box, field = app.screen.query_one("Vertical"), app.screen.query_one("#prov-wifi_ssid")
        field.blur()
        await pilot.pause()
        assert field.styles.background != box.styles.background


def _heartbeats(app: Any, n: int, start: float = 0.0) -> list[Any]:
    from core.mqtt import TrafficRecord

    alive = b'{"proplet_id":"gw-proplet-1","status":"alive","namespace":"default"}'
    topic = app.traffic.prefix + "control/proplet/alive"
    return [TrafficRecord(1_767_600_000.0 + start + i, "in", topic, len(alive), alive, 1) for i in range(n)]


async def test_the_traffic_stream_has_room_for_its_topics_and_keeps_following_through_a_resize(
        console: Any) -> None:
    # At 80 columns the topic tree kept its 38 columns and the stream's topics were cut to
    # "control/proplet/ali"; at 60 no topic showed at all. Made smaller, the stream stopped following
    # ("12 new ↓") though the operator had not scrolled: the bottom had moved away from under it.
    async with console(size=SMALL) as (app, pilot, _core):
        screen = await open_view(app, pilot, "4", TrafficScreen)
        log = screen.log_widget
        app.traffic.ingest(_heartbeats(app, 40))
        await until(pilot, lambda: log.line_count >= 40)
        line = next(line for line in log.lines if "alive" in line)
        assert line.index("alive") + len("alive") <= log.content_size.width, (line, log.content_size.width)
        await until(pilot, lambda: log.scroll_y == log.max_scroll_y > 0)

        await pilot.resize_terminal(*TINY)
        await pilot.pause()
        app.traffic.ingest(_heartbeats(app, 5, start=40))
        await until(pilot, lambda: log.line_count >= 45)
        await pilot.pause(0.3)
        assert screen.pending_below == 0 and log.scroll_y == log.max_scroll_y, (screen.pending_below, log.scroll_y)
        assert "new ↓" not in str(screen.query_one("#traffic-status").render())
        # Written at 60 columns, a line is shorter in front (no milliseconds, no QoS): the topic's
        # last level shows (it was cut at "control/proplet/").
        line = log.lines[-1]
        assert line.index("alive") + len("alive") <= log.content_size.width, (line, log.content_size.width)


async def test_traffic_that_arrived_before_the_view_was_first_shown_is_listed_for_its_width(console: Any) -> None:
    # The view's first show lists the traffic so far before its first layout, when the stream has no
    # width yet: those lines took the full form (milliseconds, "← in  q1") and kept it, so at 80
    # columns the first screenful showed less of each payload than the lines below it.
    async with console(size=SMALL) as (app, pilot, _core):
        app.traffic.ingest(_heartbeats(app, 30))
        screen = await open_view(app, pilot, "4", TrafficScreen)
        log = screen.log_widget
        await until(pilot, lambda: log.line_count >= 30 and log.content_size.width > 0)
        app.traffic.ingest(_heartbeats(app, 5, start=30))
        await until(pilot, lambda: log.line_count >= 35)
        assert log.content_size.width < COMPACT_BELOW
        full_form = [line for line in log.lines if not re.match(r"\d\d:\d\d:\d\d [←→] control/", line)]
        assert not full_form, (len(full_form), full_form[:2])


async def test_scrolled_to_its_last_columns_a_table_keeps_what_names_each_row(console: Any) -> None:
    # At 80 columns the task table's RESULT / REASON is past the right edge; scrolling right to read
    # it took the ID off the left, so the result was nobody's. The same with a proplet's metrics.
    async with console(size=SMALL) as (app, pilot, core):
        task = await core.create_task(add_body())
        screen = await open_view(app, pilot, "2", TasksScreen)
        await until(pilot, lambda: screen.table.row_count == 1)
        for size in (SMALL, TINY):
            await pilot.resize_terminal(*size)
            await pilot.pause()
            table = screen.table
            assert table.max_scroll_x > 0
            table.scroll_to(x=table.max_scroll_x, animate=False, immediate=True)
            await pilot.pause()
            header, row = table.render_line(0).text, table.render_line(1).text
            assert header.lstrip().startswith("ID") and "RESULT / REASON" in header, header
            assert row.lstrip().startswith(task.id[:8]), row

        screen = await open_view(app, pilot, "3", PropletsScreen)
        table = screen.table
        await pilot.resize_terminal(*SMALL)
        await pilot.pause()
        table.scroll_to(x=table.max_scroll_x, animate=False, immediate=True)
        await pilot.pause()
        header = table.render_line(0).text
        assert header.lstrip().startswith("ID") and "OS/ARCH" in header, header


async def test_the_dashboard_shows_why_the_broker_is_unreachable_on_an_80x24_terminal(tmp_path: Path) -> None:
    # The reason and what to do came under the broker's, topics', database's and API's lines, and the
    # panel shows five lines at 80x24: the operator saw "not connected" and nothing of why.
    from console.app import ConsoleApp
    from core.config import ManagerSettings

    manager = ManagerSettings(mqtt_address="mqtt://127.0.0.1:9", tenant_id="small", entity_id="small-manager",
                              sqlite_path=tmp_path / "propeller.db", http_enabled=False, mqtt_timeout=1.0)
    app = ConsoleApp(settings=console_settings(), manager_settings=manager)
    seen: dict[str, list[str]] = {}

    async def look(pilot: Any) -> None:
        try:
            await until(pilot, lambda: app.counts_loaded and app.core_status.broker_error != "", timeout=15)
            services = app.screen.query_one("#dash-services", Static)
            await until(pilot, lambda: "Cannot reach" in str(services.render()))
            lines = str(services.render()).split("\n")
            seen["lines"], seen["shown"] = lines, lines[: services.parent.content_size.height]
        finally:
            app.exit()

    await app.run_async(headless=True, size=SMALL, auto_pilot=look)
    assert "running broker." in " ".join(seen["shown"]), seen


async def test_the_dashboard_lists_each_proplet_with_its_task_count_at_80_columns(console: Any) -> None:
    # The ids were padded to 22 and the ages to 9 in a panel 36 columns wide: "● gw-proplet-1
    # 2s ago …", the task count cut off (even at 140 columns: "0 tas…").
    from tests.wire import SyntheticProplet

    async with console(size=SMALL) as (app, pilot, core):
        async with SyntheticProplet(core.status().broker_url, core.topics, "small-proplet-1", heartbeat=0.5):
            proplets = app.screen.query_one("#dash-proplets", Static)
            await until(pilot, lambda: "small-proplet-1" in str(proplets.render()), timeout=15)
            line = next(line for line in str(proplets.render()).split("\n") if "small-proplet-1" in line)
            assert line.rstrip().endswith("0 tasks") and len(line.rstrip()) <= proplets.content_size.width, (
                line, proplets.content_size.width)


async def test_a_field_error_in_the_dispatch_form_wraps_instead_of_being_cut(console: Any) -> None:
    # At 80 columns the module's error read "✗ No file examples/nothere/add.wasm. Type a path to a
    # .wasm/.wat file, an" and stopped: what to type instead was past the right edge.
    from textual.widgets import Input, Label

    from console.views.dispatch import DispatchScreen

    async with console(size=SMALL) as (app, pilot, _core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        screen.query_one("#module", Input).value = "examples/nothere/add.wasm"
        await pilot.press("f5")
        error = screen.query_one("#error-module", Label)
        await until(pilot, lambda: error.has_class("-shown"))
        await pilot.pause()
        text = str(error.render())
        assert "OCI reference" in text, text  # the whole message, to its end
        assert error.region.right <= error.parent.content_region.right, (error.region, error.parent.content_region)
        assert error.size.height >= 2

        # The round form's errors too ("No proplet is online: launch some (:local) or name the
        # participants." was cut at "name the").
        await pilot.press("escape")  # out of the form's fields, where "8" would be typed
        await until(pilot, lambda: not isinstance(app.screen, DispatchScreen))
        await open_view(app, pilot, "8", FederatedScreen)
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, StartRoundModal))
        modal = app.screen
        modal.query_one("#hyperparams", Input).value = "{lr: 0.01}"
        await pilot.press("f5")
        await until(pilot, lambda: modal.query(".error.-shown"))
        await pilot.pause()
        for error in modal.query(".error.-shown"):
            assert error.region.right <= error.parent.content_region.right, (error.render(), error.region)


async def test_an_80x24_dashboard_shows_every_state_both_rates_and_how_to_launch_a_proplet(console: Any) -> None:
    # A panel shows five lines there: "skipped", "interrupted" and the totals were below its edge,
    # each second sparkline too, the way to launch a proplet was cut at "Launch o…", and the `:`
    # bar's lower border was under the key hints.
    from console.widgets import CommandBar

    async with console(size=SMALL) as (app, pilot, _core):
        screen = app.screen
        tasks = screen.query_one("#dash-tasks", Static)
        proplets = screen.query_one("#dash-proplets", Static)
        await until(pilot, lambda: "interrupted" in str(tasks.render()) and "broker." in str(proplets.render()))
        await pilot.pause()
        for static in (tasks, proplets):
            lines = str(static.render()).split("\n")
            assert len(lines) <= static.parent.content_size.height, lines
            assert all(len(line.rstrip()) <= static.content_size.width for line in lines), lines
        assert "total 0" in str(tasks.render())
        for spark in ("finished-rate", "dispatched-rate", "heartbeat-rate", "mqtt-rate"):
            widget = screen.query_one(f"#{spark}")
            assert widget.region.height >= 1 and widget.region.bottom <= widget.parent.content_region.bottom, spark
        await pilot.press("colon")
        bar = screen.query_one(CommandBar)
        await until(pilot, lambda: bar.has_focus and bar.region.height == 3)
        assert bar.region.bottom <= screen.query_one(KeyHints).region.y
        placeholder = str(bar.placeholder)
        assert len(placeholder) <= bar.content_size.width and placeholder.endswith("q"), (placeholder, bar.content_size)
        await pilot.press("escape")

        # Made tall, the states get their bars back at once, not a refresh later.
        app._cadence.base = app._cadence.interval = 60.0  # no refresh from the cadence meanwhile
        await pilot.resize_terminal(80, 40)
        await until(pilot, lambda: "█" in str(tasks.render()) or len(str(tasks.render()).split("\n")) > 5, timeout=2)


async def test_the_whole_dispatch_form_fits_an_80x24_terminal_without_a_scroll(console: Any) -> None:
    # Its buttons and the "start now" box were below the bottom edge: an operator saw no Dispatch
    # button and had to know that Enter or F5 submits, or scroll the form.
    from textual.containers import VerticalScroll
    from textual.widgets import Button

    from console.views.dispatch import DispatchScreen

    async with console(size=SMALL) as (app, pilot, _core):
        screen = await open_view(app, pilot, "5", DispatchScreen)
        await pilot.pause()
        form = screen.query_one("#form", VerticalScroll)
        assert form.max_scroll_y == 0, form.virtual_size
        for widget_id in ("#module", "#name", "#inputs", "#env", "#target", "#proplet", "#timeout", "#priority",
                          "#daemon", "#latent", "#start-now", "#submit", "#reset"):
            region = screen.query_one(widget_id).region
            assert region.height >= 1 and region.bottom <= form.content_region.bottom, (widget_id, region)
        assert "Dispatch" in str(screen.query_one("#submit", Button).label)

        # Taller, the rows get their spacing back.
        await pilot.resize_terminal(80, 40)
        await until(pilot, lambda: not screen.has_class("-short"))
        await pilot.pause()
        rows = [screen.query_one(i).region.y for i in ("#module", "#name")]
        assert rows[1] - rows[0] >= 3, rows  # a blank line between rows (the module's hint is one)
