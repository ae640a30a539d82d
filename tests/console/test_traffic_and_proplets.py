"""The MQTT traffic view (stream, topic tree, payloads, pause, filters, follow) and the proplet views."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from textual.widgets import Log, Sparkline

from console.views.proplets import PropletDetailScreen, PropletsScreen
from console.views.traffic import TrafficScreen
from console.widgets import ConfirmModal
from core import topics as t
from tests.console.conftest import add_body, open_view, table_rows, until
from tests.wire import SyntheticProplet


async def test_traffic_stream_tree_and_payload_with_module_bytes_summarised(console: Any) -> None:
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "4", TrafficScreen)
        log = screen.query_one("#traffic-log", Log)
        async with SyntheticProplet(core.status().broker_url, core.topics, "traffic-proplet", heartbeat=0.2):
            task = await core.create_task(add_body())
            await core.start_task(task.id)
            await until(pilot, lambda: app.fleet.tasks[task.id].results == "42")
            await until(pilot, lambda: any("control/manager/start" in line for line in log.lines))
        lines = list(log.lines)
        start_line = next(line for line in lines if "control/manager/start" in line)
        assert "→ out" in start_line and '"file":"<base64>"' in start_line
        assert any("← in " in line and "control/proplet/results" in line for line in lines)
        # The topic tree counts messages per topic.
        start_node = screen._topic_nodes[core.topics.start]
        assert str(start_node.label) == "start (1)"
        assert str(screen._topic_nodes[core.topics.alive].label).startswith("alive (")
        # Selecting the start topic shows its payload: pretty JSON, the module summarised, never dumped.
        tree = screen.query_one("#topics")
        tree.focus()
        tree.move_cursor(start_node)
        await until(pilot, lambda: screen.selected_topic == core.topics.start)
        payload = str(screen.query_one("#payload").render())
        assert '"name": "add"' in payload and "<base64: 59 bytes, not shown>" in payload
        import base64

        wasm_b64 = base64.b64encode((app.settings and __import__("pathlib").Path("examples/add.wasm")).read_bytes())
        assert wasm_b64.decode()[:16] not in payload
        await pilot.press("y")
        assert '"name": "add"' in app.clipboard


async def test_the_payload_box_takes_the_height_of_each_payload_shown(console: Any) -> None:
    # Same-shaped payloads only repaint; one of another height lays the box out again.
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "4", TrafficScreen)
        payload = screen.query_one("#payload")
        tree = screen.query_one("#topics")
        async with SyntheticProplet(core.status().broker_url, core.topics, "tall-proplet", heartbeat=0.1):
            task = await core.create_task(add_body())
            await core.start_task(task.id)
            await until(pilot, lambda: core.topics.start in screen._topic_nodes
                        and core.topics.alive in screen._topic_nodes)
            tree.focus()
            heights = []
            for topic in (core.topics.alive, core.topics.start, core.topics.alive):
                tree.move_cursor(screen._topic_nodes[topic])
                await until(pilot, lambda topic=topic: screen.selected_topic == topic
                            and payload.size.height == len(str(payload.render()).split("\n")))
                heights.append(payload.size.height)
            # Later heartbeats of the same shape keep the height and show the newest one.
            shown = str(payload.render())
            await until(pilot, lambda: str(payload.render()) != shown)
            assert payload.size.height == len(str(payload.render()).split("\n"))
        alive, start, alive_again = heights
        assert start > alive == alive_again


async def test_pause_filter_direction_and_follow(console: Any) -> None:
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "4", TrafficScreen)
        log = screen.query_one("#traffic-log", Log)
        async with SyntheticProplet(core.status().broker_url, core.topics, "chatty-proplet", heartbeat=0.05):
            await until(pilot, lambda: log.line_count > 5)
            # Pause: ingest goes on, the stream stands still.
            await pilot.press("p")
            assert screen.query_one("#traffic-status").has_class("-paused")
            frozen = log.line_count
            seen = app.traffic.seq
            await until(pilot, lambda: app.traffic.seq > seen + 5)
            assert log.line_count == frozen
            assert "PAUSED" in str(screen.query_one("#traffic-status").render())
            await pilot.press("p")
            # Resuming lists at once what arrived while paused.
            assert log.line_count > frozen
            assert not screen.query_one("#traffic-status").has_class("-paused")
            # Filter by topic (regex, ! inverts).
            await pilot.press("slash", *"alive$", "enter")
            await until(pilot, lambda: log.line_count > 0 and all("alive" in line for line in log.lines))
            await pilot.press("slash", "ctrl+u", *"!alive$", "enter")
            await until(pilot, lambda: all("alive" not in line for line in log.lines))
            await pilot.press("escape")  # Esc clears the filter
            await until(pilot, lambda: any("alive" in line for line in log.lines))
            # Direction: in only, then out only.
            await pilot.press("i")
            await until(pilot, lambda: screen.direction == "in")
            await until(pilot, lambda: log.line_count > 0 and all("← in" in line for line in log.lines))
            await pilot.press("i")
            await until(pilot, lambda: all("→ out" in line for line in log.lines))
            await pilot.press("i")
            assert screen.direction == "all"
            # Follow the bottom only when the reader is there.
            await until(pilot, lambda: log.max_scroll_y > 3)
            log.scroll_home(animate=False)
            await until(pilot, lambda: screen.pending_below > 0)
            assert log.scroll_y == 0
            assert "new ↓" in str(screen.query_one("#traffic-status").render())
            await pilot.press("G")
            await until(pilot, lambda: screen.pending_below == 0 and log.scroll_y >= log.max_scroll_y - 1)


def _tree_topics(node: Any) -> list[str]:
    """The topics listed under `node`; an interior node with nothing under it is listed as "<empty ...>"."""
    if node.data:
        return [node.data]
    found = [topic for child in node.children for topic in _tree_topics(child)]
    return found if found or node.is_root else [f"<empty {node.label}>"]


async def test_the_topic_filter_filters_the_topic_tree_too(console: Any) -> None:
    """With `/` `alive$` the stream showed only heartbeats, but the tree still listed every topic."""
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "4", TrafficScreen)
        tree = screen.query_one("#topics")
        async with SyntheticProplet(core.status().broker_url, core.topics, "tree-proplet", heartbeat=0.05):
            task = await core.create_task(add_body())
            await core.start_task(task.id)
            await until(pilot, lambda: {core.topics.start, core.topics.alive} <= set(_tree_topics(tree.root)))
            await pilot.press("slash", *"alive$", "enter")
            await until(pilot, lambda: _tree_topics(tree.root) == [core.topics.alive])
            # Still counted as they come, by key.
            node = screen._topic_nodes[core.topics.alive]
            label = str(node.label)
            await until(pilot, lambda: str(node.label) != label)
            assert str(node.label).startswith("alive (")
            assert _tree_topics(tree.root) == [core.topics.alive]
            await pilot.press("escape")  # Esc clears the filter: every topic again, with its count
            await until(pilot, lambda: {core.topics.start, core.topics.alive} <= set(_tree_topics(tree.root)))
            assert str(screen._topic_nodes[core.topics.start].label) == "start (1)"
            assert all(not t.startswith("<empty") for t in _tree_topics(tree.root))


async def test_proplets_table_detail_and_forget(console: Any) -> None:
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "3", PropletsScreen)
        url = core.status().broker_url
        async with SyntheticProplet(url, core.topics, "beta-proplet", heartbeat=0.1,
                                    metadata={"os": "linux", "cpu_arch": "aarch64", "wasm_runtime": "wasmtime",
                                              "max_concurrent_tasks": 4}):
            async with SyntheticProplet(url, core.topics, "alpha-proplet", heartbeat=0.1) as alpha:
                await alpha.publish(t.METRICS, {
                    "proplet_id": "alpha-proplet", "namespace": "default",
                    "timestamp": datetime.now(UTC).isoformat(),
                    "cpu_metrics": {"percent": 12.5}, "memory_metrics": {"rss_bytes": 50 * 1024 * 1024}})
                table = screen.table
                await until(pilot, lambda: [r[0] for r in table_rows(table)] == ["alpha-proplet", "beta-proplet"])
                await until(pilot, lambda: str(table.get_cell("alpha-proplet", "cpu")) == "12.5")
                # Metadata arrives with the once-a-second sync from the core.
                await until(pilot, lambda: str(table.get_cell("beta-proplet", "tasks")) == "0/4")
                rows = {r[0]: r for r in table_rows(table)}
                assert rows["alpha-proplet"][2] == "online" and rows["alpha-proplet"][3].endswith("s ago")
                assert rows["alpha-proplet"][6] == "50.0 MiB"
                assert rows["beta-proplet"][8] == "linux/aarch64" and rows["beta-proplet"][7] == "wasmtime"
                # Filter.
                await pilot.press("slash", *"beta", "enter")
                await until(pilot, lambda: [r[0] for r in table_rows(table)] == ["beta-proplet"])
                await pilot.press("slash", "ctrl+u", "enter")
                await until(pilot, lambda: table.row_count == 2)
                # Detail: heartbeat history and metrics plots.
                table.move_cursor(row=table.get_row_index("alpha-proplet"))
                await pilot.press("enter")
                await until(pilot, lambda: isinstance(app.screen, PropletDetailScreen))
                detail = app.screen
                await until(pilot, lambda: len(detail.query_one("#heartbeats", Sparkline).data or []) >= 3)
                await until(pilot, lambda: 12.5 in (detail.query_one("#cpu", Sparkline).data or []))
                assert "online" in str(detail.query_one("#proplet-fields").render())
                await pilot.press("y")
                assert app.clipboard == "alpha-proplet"
                await pilot.press("escape")
                await until(pilot, lambda: isinstance(app.screen, PropletsScreen))
            # alpha said goodbye: offline at once.
            await until(pilot, lambda: str(table.get_cell("alpha-proplet", "state")) == "offline")
            # Forget it (asks first).
            table.move_cursor(row=table.get_row_index("alpha-proplet"))
            await pilot.press("D")
            await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
            await pilot.press("y")
            await until(pilot, lambda: [r[0] for r in table_rows(table)] == ["beta-proplet"])


async def test_a_growing_stream_does_not_lay_the_screen_out_again_for_each_batch_of_lines(console: Any) -> None:
    """Under a flood, every batch of lines written while the stream grows to its limit changed its
    size, and each size change laid the whole screen out again (10-15 ms of the console's thread each,
    with the GIL the hosted core shares). Only its scrollbar depends on the stream's length, and must
    still follow it."""
    async with console(traffic_lines=5000) as (app, pilot, core):
        screen = await open_view(app, pilot, "4", TrafficScreen)
        log = screen.query_one("#traffic-log", Log)
        layouts = 0
        lay_out = screen._refresh_layout

        def counted(*args: Any, **kwargs: Any) -> None:
            nonlocal layouts
            layouts += 1
            lay_out(*args, **kwargs)

        screen._refresh_layout = counted  # type: ignore[method-assign]
        async with SyntheticProplet(core.status().broker_url, core.topics, "chatty-proplet", heartbeat=0.01):
            # Once its scrollbar shows (the one change of the stream's size that needs a layout).
            await until(pilot, lambda: log.show_vertical_scrollbar and log.line_count > log.size.height)
            await pilot.pause(0.3)
            layouts, lines = 0, log.line_count
            for _ in range(8):  # batches of lines, one per refresh
                grown = log.line_count
                await until(pilot, lambda grown=grown: log.line_count > grown)
            await pilot.pause()
            assert log.line_count > lines
            assert layouts <= 1, f"{layouts} layouts for 8 batches of lines"
            # The scrollbar follows the length, and the stream follows its bottom.
            await until(pilot, lambda: log.vertical_scrollbar.window_virtual_size == log.line_count)
            assert log.scroll_y == log.max_scroll_y
