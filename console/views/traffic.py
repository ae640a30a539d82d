"""MQTT traffic: a bounded live stream (Line-API `Log`), a topic tree with counts, the payload view."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.geometry import Size
from textual.reactive import Reactive
from textual.widgets import Log, Static, Tree

from console import keys
from console.base import ConsoleScreen, PaletteCommand
from console.fleet import TrafficEntry, pretty_payload
from console.widgets import StatusLine

DIRECTIONS = ("all", "in", "out")
# Lines written to the stream per refresh (4 a second by default): more than anyone can read, and
# a flood of thousands of messages a second would otherwise spend the manager's loop on rendering.
# The rest are counted on a marker line; the topic tree, payload view and counts still see them all.
MAX_LINES_PER_REFRESH = 100
COMPACT_BELOW = 56  # stream columns


class TrafficLog(Log):
    HELP = """\
The live stream: one line per message (time, direction as seen by the manager, QoS, topic, size,
the start of the payload; module bytes are never shown). It follows the newest line only while you
are at the bottom; scroll up to read and it stops, **G** follows again.
"""

    # Whether the reader is at the bottom, as of their last scroll: a resize moves the bottom (a smaller
    # terminal leaves the same top line with more lines below it), not where the reader is.
    following = True

    # Widget's virtual_size asks for a layout of the whole screen whenever it changes, that is after
    # every batch of lines written until the log holds max_lines: 10-15 ms of the console's thread
    # each under a flood (with the GIL held, which the hosted core shares). The log's height is set by
    # the screen's CSS, not by its lines, so only its scrollbars follow its size; a scrollbar that
    # appears or goes still asks for a layout (Widget.show_vertical_scrollbar does).
    virtual_size: Reactive[Size] = Reactive(Size(0, 0), repaint=True)

    def watch_virtual_size(self, size: Size) -> None:
        self._scroll_update(size)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self.following = new_value >= self.max_scroll_y - 1

    def on_resize(self) -> None:
        if self.following:
            self.scroll_end(animate=False, immediate=True, x_axis=False)


class TopicTree(Tree[str]):
    """Labels are given as Text, never as str: Tree reads a str as markup, and topic levels come from
    the network (the manager subscribes to fl/rounds/+/updates/+), so a level `[@click=app.quit]x`
    would be a link running that action, and `[b]x` would restyle the tree."""

    HELP = "Topics seen, with message counts. Moving onto a topic shows its latest payload."


class TrafficScreen(ConsoleScreen):
    CRUMB = "MQTT"
    BINDINGS: ClassVar = keys.TRAFFIC
    AUTO_FOCUS = "#traffic-log"
    HELP = """\
### MQTT traffic
Every message the manager sends (→ out) and receives (← in), at most `console.traffic_lines` kept.
**p** pauses the stream (messages are still counted), **/** filters the stream and the topic tree
by topic (regex, `!` inverts), **i** cycles in / out / all, **y** copies the payload shown, **C**
clears. Under a flood, at most 100 lines are listed per refresh and the rest counted ("not listed");
pause or filter to read.
"""
    DEFAULT_CSS = """
    TrafficScreen #traffic-body { height: 1fr; }
    TrafficScreen TopicTree { width: 38; max-width: 35%; border-right: solid $panel; }
    TrafficScreen #traffic-right { width: 1fr; }
    TrafficScreen TrafficLog { height: 2fr; }
    TrafficScreen #payload-box { height: 1fr; border-top: solid $panel; }
    TrafficScreen #traffic-status.-paused { color: $warning; text-style: bold; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.paused = False
        self.direction = "all"
        self.last_seq = 0
        self.pending_below = 0
        self.not_listed = 0
        self.buffered_while_paused = 0
        # Lines were written before the stream had a width (the view's first show comes before its
        # first layout), so in the full form whatever the width turns out to be.
        self._written_without_width = False
        self.selected_topic: str | None = None
        self._payload_seq = -1
        self._payload_text = ""
        self._payload_rows = 0
        self._topic_nodes: dict[str, Any] = {}

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="traffic-body"):
            tree = TopicTree("topics", id="topics")
            tree.show_root = True
            tree.root.expand()
            yield tree
            with Vertical(id="traffic-right"):
                yield TrafficLog(id="traffic-log", max_lines=self.console.settings.traffic_lines, auto_scroll=False)
                with VerticalScroll(id="payload-box"):
                    yield Static(Content("Move onto a topic in the tree to see its latest payload."), id="payload")
        yield StatusLine(id="traffic-status", classes="status-line")

    def on_mount(self) -> None:
        traffic = self.console.traffic
        prefix = traffic.prefix.rstrip("/")
        self.query_one(TopicTree).root.set_label(Text(prefix or "topics"))

    @property
    def log_widget(self) -> TrafficLog:
        return self.query_one("#traffic-log", TrafficLog)

    def visible(self, e: TrafficEntry) -> bool:
        if self.direction != "all" and e.direction != self.direction:
            return False
        return self.row_filter.matches(e.topic)

    def flush_body(self) -> None:
        traffic = self.console.traffic
        if self._filter_changed:
            self._filter_changed = False
            self._rebuild()
            self._rebuild_tree()
        elif self._written_without_width and self.log_widget.content_size.width and not self.paused:
            # Too narrow for them (an 80-column terminal): written again, once, as they would be now.
            self._written_without_width = False
            if self._compact():
                self._rebuild()
        self._update_tree()
        if self.paused:
            # The stream stays where it stopped; what arrives meanwhile is listed on resume.
            self.buffered_while_paused = traffic.seq - self.last_seq
        else:
            self._write_new()
        self._update_payload()
        self._update_status()

    def _write_new(self) -> None:
        new = self.console.traffic.since(self.last_seq)
        if new:
            self.last_seq = new[-1].seq
            self._write(new)

    def _write(self, entries: list[TrafficEntry]) -> None:
        log = self.log_widget
        traffic = self.console.traffic
        visible = [e for e in entries if self.visible(e)]
        if not visible:
            return
        skipped = len(visible) - MAX_LINES_PER_REFRESH
        compact = self._compact()
        lines = [traffic.format_line(e, compact=compact) for e in visible[-MAX_LINES_PER_REFRESH:]]
        self._written_without_width |= not log.content_size.width
        if skipped > 0:
            self.not_listed += skipped
            lines.insert(0, f"… {skipped:,} messages not listed (too many to read; p pauses, / filters by topic)")
        # Follow only when the reader is at the bottom; otherwise count what arrived below (toolong).
        at_bottom = log.following
        log.write_lines(lines, scroll_end=at_bottom)
        if at_bottom:
            self.pending_below = 0
        else:
            self.pending_below += len(lines)

    def _compact(self) -> bool:
        # Under 56 columns (a 60-column split pane) the full line's 22 columns of time, direction
        # and QoS left no room for the topic. Lines keep the form they were written in.
        width = self.log_widget.content_size.width
        return 0 < width < COMPACT_BELOW

    def _rebuild(self) -> None:
        log = self.log_widget
        log.clear()
        self.pending_below = 0
        traffic = self.console.traffic
        entries = list(traffic.entries)
        self.last_seq = entries[-1].seq if entries else self.last_seq
        compact = self._compact()
        lines = [traffic.format_line(e, compact=compact) for e in entries if self.visible(e)]
        self._written_without_width = bool(lines) and not log.content_size.width
        log.write_lines(lines[-log.max_lines:] if log.max_lines else lines, scroll_end=True)

    def _update_tree(self) -> None:
        traffic = self.console.traffic
        changed = traffic.changed_topics
        if not changed:
            return
        tree = self.query_one(TopicTree)
        for topic in sorted(changed):
            node = self._topic_nodes.get(topic)
            if node is None:
                if not self.row_filter.matches(topic):
                    continue  # listed when the filter changes to let it through (_rebuild_tree)
                node = self._add_topic(tree, topic)
            node.set_label(Text(f"{self._leaf_name(topic)} ({traffic.counts.get(topic, 0):,})"))
        changed.clear()

    def _rebuild_tree(self) -> None:
        """The tree again, from every topic counted, through the same filter and labels as the
        messages' updates (_update_tree). Only when the filter changes: messages update nodes by key."""
        traffic = self.console.traffic
        tree = self.query_one(TopicTree)
        tree.root.remove_children()
        self._topic_nodes.clear()
        traffic.changed_topics.update(traffic.counts)
        self._update_tree()
        selected = self._topic_nodes.get(self.selected_topic or "")
        if selected is not None:
            tree.move_cursor(selected)

    def _leaf_name(self, topic: str) -> str:
        return self.console.traffic.short_topic(topic).rsplit("/", 1)[-1]

    def _add_topic(self, tree: TopicTree, topic: str) -> Any:
        parts = self.console.traffic.short_topic(topic).split("/")
        parent = tree.root
        path = ""
        for part in parts[:-1]:
            path = f"{path}/{part}"
            node = self._topic_nodes.get(path)
            if node is None:
                node = self._topic_nodes[path] = parent.add(Text(part), expand=True)
            parent = node
        leaf = self._topic_nodes[topic] = parent.add_leaf(Text(parts[-1]), data=topic)
        return leaf

    @on(Tree.NodeHighlighted, "#topics")
    def _topic_highlighted(self, event: Tree.NodeHighlighted[str]) -> None:
        if event.node.data:
            self.selected_topic = event.node.data
            self._payload_seq = -1
            self._update_payload()

    def _update_payload(self) -> None:
        if self.selected_topic is None or (self.paused and self._payload_seq >= 0):
            return
        history = self.console.traffic.history.get(self.selected_topic)
        if not history:
            return
        latest = history[-1]
        if latest.seq == self._payload_seq:
            return
        self._payload_seq = latest.seq
        self._payload_text = pretty_payload(latest)
        count = self.console.traffic.counts.get(self.selected_topic, 0)
        head = (f"{self.console.traffic.short_topic(latest.topic)} · {latest.direction} · q{latest.qos} · "
                f"{latest.size:,} bytes · message {count:,}\n\n")
        text = head + self._payload_text
        payload = self.query_one("#payload", Static)
        # Laid out again only when the text takes another number of rows: the next heartbeat of a
        # topic has the same shape, and laying the whole screen out again for it is wasted work.
        width = max(1, payload.content_size.width)
        rows = sum(1 + cell_len(line) // width for line in text.split("\n"))
        payload.update(Content(text), layout=rows != self._payload_rows)
        self._payload_rows = rows

    def _update_status(self) -> None:
        traffic = self.console.traffic
        now = time.time()
        parts = [f"in {traffic.rate_in.per_second(now):,.0f}/s", f"out {traffic.rate_out.per_second(now):,.0f}/s",
                 f"{traffic.seq:,} seen", f"{len(traffic.entries):,} kept"]
        if traffic.dropped:
            parts.append(f"{traffic.dropped:,} dropped (console too slow)")
        if self.not_listed:
            parts.append(f"{self.not_listed:,} not listed (flood)")
        if self.direction != "all":
            parts.append(f"direction: {self.direction} only")
        if self.row_filter.active:
            parts.append(f"topic {self.row_filter.describe()}")
        if self.paused:
            parts.append(f"PAUSED, {self.buffered_while_paused:,} new (p resumes)")
        elif self.pending_below:
            parts.append(f"{self.pending_below:,} new ↓ (G follows)")
        self.query_one("#traffic-status", StatusLine).show(" · ".join(parts))

    # -- actions ---------------------------------------------------------------------------

    def action_pause(self) -> None:
        self.paused = not self.paused
        # On the status line only: a class on the screen would restyle every widget in it.
        self.query_one("#traffic-status").set_class(self.paused, "-paused")
        if not self.paused:
            self.buffered_while_paused = 0
            # Append what arrived while paused, capped per redraw like any burst: cheap, unlike
            # re-listing the whole buffer.
            self._write_new()
        self._update_status()

    def action_direction(self) -> None:
        self.direction = DIRECTIONS[(DIRECTIONS.index(self.direction) + 1) % len(DIRECTIONS)]
        self._rebuild()
        self._update_status()

    def action_follow(self) -> None:
        self.pending_below = 0
        self.log_widget.scroll_end(animate=False)
        self._update_status()

    def action_focus_tree(self) -> None:
        self.query_one(TopicTree).focus()

    def action_clear(self) -> None:
        self.log_widget.clear()
        self.pending_below = 0
        self._update_status()

    def action_copy(self) -> None:
        if not self._payload_text:
            self.notify("Select a topic in the tree first (t focuses it).", severity="warning")
            return
        self.app.copy_to_clipboard(self._payload_text)
        self.notify("Copied the payload", timeout=3)

    def palette_commands(self) -> list[PaletteCommand]:
        return [
            PaletteCommand("MQTT: pause / resume", "Pause the live stream", self.action_pause),
            PaletteCommand("MQTT: filter topics", "Filter the stream by topic", self.action_filter),
            PaletteCommand("MQTT: direction", "Cycle in / out / all", self.action_direction),
            PaletteCommand("MQTT: copy payload", "Copy the payload shown", self.action_copy),
            PaletteCommand("MQTT: clear", "Clear the stream", self.action_clear),
        ]
