"""The operator console: a Textual app that hosts the manager core in-process.

    propeller                      # opens the console (this module's run_console)

`ConsoleApp` starts `ManagerCore` on a thread and event loop of its own (console.hosting.CoreThread)
before the UI starts and stops it when the UI ends (quit, `:q`, SIGTERM, or the terminal hanging up),
so the manager shuts down cleanly and the next start shows the same fleet from the database; the
console's thread stands aside while the core has a start or a result in hand (console.hosting.StandAside),
so rendering does not hold up dispatch. Tests pass an already entered core
instead, which then shares the UI's loop. Either way every call goes through `self.manager`.

Data flow (docs/ARCHITECTURE.md, STYLE rules 17-20): two ingest workers drain the core's event
subscription and the MQTT traffic tap into `console.fleet` (latest-state maps, ring buffers) as fast
as they arrive; one timer applies what changed to the visible view every `refresh_interval` inside
`batch_update()`; one more worker reads the core's status and proplets at that cadence. Hidden views
are not rendered and catch up when shown; nothing renders while a modal is up. Workers never touch
widgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import events, on, work
from textual.app import App
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.filter import LineFilter
from textual.screen import ModalScreen
from textual.widget import AwaitMount, Widget
from textual.widgets import Input
from textual.worker import Worker, WorkerState

from console import keys
from console.base import READ_ONLY, ConsoleScreen, PaletteCommand
from console.firmware import Firmware
from console.fleet import Clock, FleetState, TrafficState, utc_clock
from console.hosting import CoreSnapshot, CoreThread, ManagerLink
from console.local import LocalFleet
from console.messages import TaskDeletedHere, TaskInvokedHere
from console.settings import ConsoleSettings, load_settings
from console.text import ControlCodeFilter, escape
from console.themes import ALIASES, TERMINAL_THEMES, load_themes, resolve_name
from console.views.dashboard import DashboardScreen
from console.views.dispatch import DispatchScreen
from console.views.federated import FederatedScreen
from console.views.firmware import FirmwareScreen
from console.views.local import LocalScreen
from console.views.proplets import PropletsScreen
from console.views.tasks import TaskDetailScreen, TasksScreen
from console.views.traffic import TrafficScreen
from console.widgets import ConfirmModal, FleetHeader, HelpScreen, PromptModal

if TYPE_CHECKING:
    from core.config import ManagerSettings
    from core.service import CoreStatus, ManagerCore

log = logging.getLogger("propeller.console")

# Views: mode name, label, and the `:` commands that reach it (first one is the canonical name).
VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dashboard": ("Dashboard", ("dashboard", "dash", "home", "d")),
    "tasks": ("Tasks", ("tasks", "task", "t", "ts")),
    "proplets": ("Proplets", ("proplets", "proplet", "p", "pl")),
    "traffic": ("MQTT traffic", ("mqtt", "traffic", "tr", "m")),
    "dispatch": ("Dispatch", ("dispatch", "new", "n", "submit")),
    "local": ("Local proplets", ("local", "l", "lp")),
    "firmware": ("Firmware", ("fw", "firmware", "f")),
    "fl": ("Federated learning", ("fl", "rounds", "federated", "round")),
}
QUIT_WORDS = ("q", "quit", "q!", "exit")
HELP_WORDS = ("help", "h", "?")


def anywhere_help() -> str:
    """The keys of every view, for `?`: each view's `:` command, and the digits."""
    commands = " ".join(f"`:{words[0]}`" for _label, words in VIEWS.values())
    return (f"Anywhere: **:** commands ({commands} `:theme <name>` `:q`), **1**–**{len(VIEWS)}** views, "
            "**Ctrl+P** palette, **Esc** back, **Ctrl+Q** quit. In a text field these keys are typed: Esc "
            "leaves it.")

# Events kept for the console while it is busy; on overflow the oldest go and the views reload.
EVENT_BUFFER = 50_000
TRAFFIC_BUFFER = 20_000
COUNTS_INTERVAL = 2.0
# Pause after each batch of events or traffic: the core wakes this loop (a cross-thread write) only
# when the buffer was drained, so without it a fleet's chatter costs both threads a wake-up per
# message; with it, at most one per pause. Well under the render cadence, so nothing shows later.
INGEST_PAUSE = 0.05
MAX_REFRESH_INTERVAL = 1.0


# One instance: lines drawn are cached per filter (Strip.apply_filter).
CONTROL_CODE_FILTER = ControlCodeFilter()


class RenderCadence:
    """When the screen is redrawn: every `interval`, stretched up to MAX_REFRESH_INTERVAL while the
    console's loop is saturated (the refresh timer fires late), so that under a flood of MQTT
    traffic ingest keeps up and the hosted core's thread gets more of the interpreter."""

    def __init__(self, interval: float) -> None:
        self.base = interval
        self.interval = interval
        self._last = 0.0
        self._last_tick = 0.0

    def due(self, now: float) -> bool:
        if self._last_tick:
            late = (now - self._last_tick) - self.base
            if late > self.base / 2:
                self.interval = min(MAX_REFRESH_INTERVAL, self.interval * 2)
            elif late < self.base / 10:
                # Slow to come back (about 7 s from 1 s to 0.25 s): a loop that was just saturated
                # is on time for a tick or two between bursts.
                self.interval = max(self.base, self.interval * 0.95)
        self._last_tick = now
        if now - self._last < self.interval - self.base / 2:
            return False
        self._last = now
        return True


class ConsoleProvider(Provider):
    """Command palette entries that fit where you are: views, themes, and the current view's actions."""

    def _commands(self) -> list[PaletteCommand]:
        app = self.app
        assert isinstance(app, ConsoleApp)
        commands = [PaletteCommand(f"Go to {label}", f":{words[0]}", partial(app.go, mode))
                    for mode, (label, words) in VIEWS.items()]
        commands += [PaletteCommand(f"Theme: {name}", "Switch the console's colours", partial(app.set_theme, name))
                     for name in app.theme_names()]
        screen = self.screen
        if isinstance(screen, ConsoleScreen):
            commands += screen.palette_commands()
        if app.read_only:
            commands = [c for c in commands if not c.mutating]
        commands.append(PaletteCommand("Help", "Keys and help for the focused widget", app.action_help))
        return commands

    async def discover(self) -> Hits:
        for command in self._commands():
            yield DiscoveryHit(command.name, command.callback, help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self._commands():
            score = matcher.match(command.name)
            if score > 0:
                yield Hit(score, matcher.highlight(command.name), command.callback, help=command.help)


class ConsoleApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "Propeller"
    MODES: ClassVar = {
        "dashboard": DashboardScreen, "tasks": TasksScreen, "proplets": PropletsScreen, "traffic": TrafficScreen,
        "dispatch": DispatchScreen, "local": LocalScreen, "firmware": FirmwareScreen, "fl": FederatedScreen,
    }
    DEFAULT_MODE: ClassVar[str] = "dashboard"
    BINDINGS: ClassVar = keys.APP
    COMMANDS: ClassVar = App.COMMANDS | {ConsoleProvider}

    def __init__(self, core: ManagerCore | None = None, settings: ConsoleSettings | None = None, *,
                 manager_settings: ManagerSettings | None = None, clock: Clock = utc_clock,
                 hostname: str | None = None, handle_signals: bool = False,
                 freeze_startup: bool = False) -> None:
        super().__init__()
        # Set in run_async when the console hosts the core on its thread.
        self.manager: ManagerLink = ManagerLink(core) if core is not None else None  # type: ignore[assignment]
        self.core_status: CoreStatus | None = self.manager.status_at_start if self.manager else None
        self.running_by_proplet: dict[str, list[str]] = {}
        self.settings = settings or ConsoleSettings()
        self.manager_settings = manager_settings
        self.read_only = self.settings.read_only
        self.cursor_blink_enabled = self.settings.cursor_blink
        self.clock = clock
        self.hostname = hostname or socket.gethostname()
        self.handle_signals = handle_signals
        # Set when this app owns its process (`propeller`, the benchmark), never in tests.
        self.freeze_startup = freeze_startup
        self.hung_up = False
        self._core_thread: CoreThread | None = None
        self.fleet = FleetState(max_tasks=self.settings.task_rows, clock=clock)
        self.traffic = TrafficState(max_entries=self.settings.traffic_lines,
                                    preview_limit=self.settings.payload_preview_limit,
                                    topic_history=self.settings.topic_history)
        self.firmware = Firmware(self.settings.firmware)
        self.local: LocalFleet = None  # type: ignore[assignment]  # needs the core's broker: on_mount
        self.counts_loaded = False
        # The start-a-round form's module, offered again for the next round (rounds keep no inline module).
        self.last_round_module = ""
        self._history: deque[str] = deque(maxlen=20)
        self._composed_modes: set[str] = set()
        # Keys that arrived while a newly shown screen had not yet taken focus (see on_event).
        self._held_keys: deque[events.Key] | None = None
        self._key_hold: object | None = None
        self._switching_to_composed = False
        self._loaded = asyncio.Event()
        self._subs: list[Any] = []
        self._cadence = RenderCadence(self.settings.refresh_interval)
        self._started = time.perf_counter()
        loaded = load_themes(self.settings.all_theme_dirs())
        self.theme_problems = loaded.problems
        for theme in loaded.themes:
            self.register_theme(theme)

    # ------------------------------------------------------------------------------------
    # hosting the core

    async def run_async(self, **kwargs: Any) -> None:  # type: ignore[override]
        if self.manager is not None:
            return await super().run_async(**kwargs)
        from core.config import ManagerSettings

        settings = self.manager_settings or ManagerSettings()
        self._core_thread = CoreThread(settings, self._core_closed)
        # The core starts before anything is drawn: a database that does not answer would leave the
        # terminal blank (asyncpg waits a minute), so a slow start says what it waits for.
        slow_start = asyncio.get_running_loop().call_later(SLOW_START_S, _say_starting_slowly, settings)
        try:
            async with self._core_thread as manager:
                slow_start.cancel()
                self.manager = manager
                self.core_status = manager.status_at_start
                log.info("manager core started on its own thread: %s", manager.status_at_start)
                try:
                    result = await super().run_async(**kwargs)
                finally:
                    if self.local is not None:
                        await self.local.stop_all()
                    log.info("console closed%s; stopping the manager core",
                             " (the terminal hung up)" if self.hung_up else "")
        finally:
            slow_start.cancel()
        log.info("manager core stopped cleanly")
        return result

    def _core_closed(self) -> None:
        """The hosted core shut itself down (a background loop of it failed): nothing the console
        shows would be true any more, so it closes with an error (run_console points to the log)."""
        self.exit(return_code=1, message="The manager core stopped after a fatal error; the details are in "
                                         f"{log_path()}.")

    # ------------------------------------------------------------------------------------
    # start-up

    def on_mount(self) -> None:
        assert self.manager is not None, "ConsoleApp needs a ManagerCore (pass one, or let run_async host it)"
        manager = self.manager
        self.traffic.prefix = manager.topics.prefix
        broker = manager.broker_address.url if manager.broker_address else ""
        env = {"PROPLET_MQTT_ADDRESS": broker, "PROPLET_TENANT_ID": manager.settings.tenant_id,
               "PROPLET_CHANNEL_ID": manager.settings.channel_id}
        for name in ("mqtt_tls_ca_cert", "mqtt_tls_client_cert", "mqtt_tls_client_key"):
            value = getattr(manager.settings, name)
            if value:
                env[f"PROPLET_{name.upper()}"] = str(value)
        from core import paths

        self.local = LocalFleet(
            command=self.settings.local_proplet_command,
            env={**self.settings.local_proplet_env, **env},
            state_root=paths.state_dir() / "console-proplets",
            max_lines=self.settings.local_proplet_output_lines,
        )
        self._apply_theme_setting()
        self._apply_keymap()
        # Subscribe before loading, so nothing that happens during the load is missed.
        self._event_sub = manager.subscribe_events(EVENT_BUFFER)
        self._subs.append(self._event_sub)
        traffic = manager.subscribe_traffic(TRAFFIC_BUFFER)
        if traffic is not None:
            self._traffic_sub = traffic
            self._subs.append(traffic)
            self.ingest_traffic()
        self.load_all()
        self.ingest_events()
        self.follow_core()
        self.set_interval(self.settings.refresh_interval, self.flush, name="console-flush")
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self.hang_up)
            loop.add_signal_handler(signal.SIGTERM, self.exit)
            self.set_timer(5.0, self._check_terminal)
        for problem in self.theme_problems:
            self.notify(problem, title="Theme file ignored", severity="warning", timeout=10)

    def on_ready(self) -> None:
        log.info("console ready in %.0f ms", (time.perf_counter() - self._started) * 1000)
        if self.freeze_startup:
            from core.entrypoint import freeze_startup_objects

            freeze_startup_objects()

    async def on_unmount(self) -> None:
        for sub in self._subs:
            sub.close()
        if self.local is not None:
            await self.local.stop_all()

    def get_line_filters(self) -> Sequence[LineFilter]:
        # Control characters in text from the network never reach the terminal (console/text.py).
        return [*super().get_line_filters(), CONTROL_CODE_FILTER]

    def notify(self, message: str, *, title: str = "", severity: Any = "information", timeout: float | None = None,
               markup: bool = True) -> None:
        # Always plain text: notifications quote proplet ids, task names, errors and what the user
        # typed, and Textual reads them as markup by default (`[/]` in any of them raised a MarkupError
        # as the toast was drawn). No notification of the console is styled with markup.
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def action_help_quit(self) -> None:
        # Ctrl+C does not quit; Textual's hint says which key does, but as markup, which notify()
        # above shows as typed ("Press [b]ctrl+q[/b] to quit the app").
        quit_keys = [self.get_key_display(active.binding) for active in self.active_bindings.values()
                     if active.binding.action in ("quit", "app.quit")]
        how = f"Press {' or '.join(dict.fromkeys(quit_keys))} (or type :q Enter)" if quit_keys else "Type :q Enter"
        self.notify(f"Ctrl+C does not quit the console. {how} to quit.", title="Do you want to quit?")

    def _apply_theme_setting(self) -> None:
        wanted = resolve_name(self.settings.theme)
        if wanted in self.available_themes:
            self.theme = wanted
            return
        self.theme = "propeller-dark"
        origin = self.settings.origin("theme")
        given = f"{origin} {self.settings.theme}" if origin.startswith("--") else \
            f"{origin} ({self.settings.theme})"
        self.notify(f"No theme '{self.settings.theme}' (given by {given}); using propeller-dark. Available themes: "
                    f"{', '.join(self.theme_names())} (aliases: {', '.join(ALIASES)}).", severity="warning",
                    timeout=10)

    def _apply_keymap(self) -> None:
        keymap = dict(self.settings.keymap)
        unknown = sorted(set(keymap) - keys.BINDING_IDS)
        if unknown:
            self.notify(f"console.keymap names unknown binding ids: {', '.join(unknown)}. Press ? in a view to see "
                        "the ids it uses.", severity="warning", timeout=10)
        keyless = sorted(k for k, v in keymap.items() if k in keys.BINDING_IDS and not v)
        if keyless:
            defaults = {b.id: b.key for b in keys.ALL}
            self.notify("console.keymap gives no key to " + ", ".join(f"{k} (it keeps {defaults[k]})" for k in keyless)
                        + ". A binding cannot be removed; give it another key.", severity="warning", timeout=10)
        usable = {k: v for k, v in keymap.items() if k in keys.BINDING_IDS and v}
        self.set_keymap(usable)
        # Textual drops the key of a binding whose key the keymap gives to another one of the same view
        # and reports it to handle_bindings_clash only when that binding has no id (all of ours have),
        # so `tasks.stop: d` took Describe's key without a word.
        clashes = keys.keymap_clashes(usable)
        if clashes:
            self.notify("console.keymap takes keys from other bindings: " + "; ".join(
                f"{key} from {lost} (to {taker})" for key, taker, lost in clashes)
                + ". Give one of each pair another key.", severity="warning", timeout=10)

    # ------------------------------------------------------------------------------------
    # ingest (workers: no widgets touched here)

    @work(group="load", description="Loading the fleet from the manager", exit_on_error=False)
    async def load_all(self) -> None:
        from core.domain import TaskState

        manager = self.manager
        await self._load_tasks()
        failed = await manager.list_tasks(limit=8, states=[TaskState.FAILED])
        from console.fleet import Failure

        for task in sorted(failed.items, key=lambda t: t.finish_time or t.updated_at):
            self.fleet.failures.append(Failure(task.finish_time or task.updated_at, task.id, task.name,
                                               task.error or task.reason))
        self._take_snapshot(await manager.snapshot(proplets=True))
        for proplet_id in list(self.fleet.proplets)[:50]:
            page = await manager.proplet_metrics(proplet_id, 0, 1)
            if page.items:
                from core.domain import PropletMetricsReceived

                self.fleet.apply_events([PropletMetricsReceived(page.items[0])], time.time())
        self.fleet.counts = await manager.count_tasks_by_state()
        self.counts_loaded = True
        self._loaded.set()

    def _take_snapshot(self, snapshot: CoreSnapshot) -> None:
        self.core_status = snapshot.status
        self.running_by_proplet = snapshot.running
        if snapshot.proplets is not None:
            self.fleet.sync_proplets(snapshot.proplets)

    async def _load_tasks(self) -> None:
        tasks = []
        offset = 0
        while len(tasks) < self.settings.task_rows:
            limit = min(500, self.settings.task_rows - len(tasks))
            page = await self.manager.list_tasks(offset=offset, limit=limit)
            tasks.extend(page.items)
            offset += limit
            if len(page.items) < limit:
                break
        self.fleet.load_tasks(tasks)

    @work(group="ingest-events", description="Following the manager's events", exit_on_error=False)
    async def ingest_events(self) -> None:
        sub = self._event_sub
        await self._loaded.wait()
        while True:
            items = await sub.wait(1.0)
            if items:
                self.fleet.apply_events(items, time.time())
            if self.fleet.note_dropped(sub.dropped):
                log.warning("the console fell behind the manager's events (%d dropped); reloading", sub.dropped)
                await self._load_tasks()
            # Results and errors are not in the state events: fetch them, a bounded batch per round.
            wanted = list(self.fleet.to_fetch)[:200]
            if wanted:
                found, missing = await self.manager.get_tasks(wanted)
                for task in found:
                    self.fleet.upsert_task(task)
                self.fleet.to_fetch.difference_update(missing)
            await asyncio.sleep(INGEST_PAUSE)

    @work(group="ingest-traffic", description="Following MQTT traffic", exit_on_error=False)
    async def ingest_traffic(self) -> None:
        sub = self._traffic_sub
        while True:
            items = await sub.wait(1.0)
            if items:
                self.traffic.ingest(items, sub.dropped)
            await asyncio.sleep(INGEST_PAUSE)

    @work(group="follow-core", description="Reading the manager's status", exit_on_error=False)
    async def follow_core(self) -> None:
        """Status and running tasks at the render cadence, proplets every second, counts every
        COUNTS_INTERVAL: what flush() shows, read on the core's loop (it may be another thread's)."""
        from core.store.base import StoreUnavailable

        await self._loaded.wait()
        last_proplets = last_counts = time.monotonic()
        while True:
            await asyncio.sleep(self._cadence.interval)
            now = time.monotonic()
            with_proplets = now - last_proplets >= 1.0
            if with_proplets:
                last_proplets = now
            self._take_snapshot(await self.manager.snapshot(proplets=with_proplets))
            if now - last_counts >= COUNTS_INTERVAL:
                last_counts = now
                try:
                    self.fleet.counts = await self.manager.count_tasks_by_state()
                except StoreUnavailable:
                    # The counts stay as they were (the header and the dashboard say the database is
                    # unreachable); ending this loop would freeze the whole status until a restart.
                    pass

    def reload_tasks(self) -> None:
        self._reload()

    @work(exclusive=True, group="reload", description="Reloading tasks", exit_on_error=False)
    async def _reload(self) -> None:
        await self._load_tasks()
        self.notify(f"Reloaded {len(self.fleet.tasks)} tasks from the database", timeout=2)

    # ------------------------------------------------------------------------------------
    # rendering at a fixed cadence

    def flush(self) -> None:
        if not self._loaded.is_set() or self.manager is None:
            return
        now = time.monotonic()
        if not self._cadence.due(now):
            return
        if not self.screen_stack:
            return  # shutting down
        screen = self.screen
        # Rendering (not ingest) pauses while a modal is up (dolphie's WorkerManager does the same).
        if isinstance(screen, ModalScreen) or not isinstance(screen, ConsoleScreen):
            return
        with self.batch_update():
            screen.flush()

    def store_description(self) -> str:
        text = self.manager.store_description
        home = str(Path.home())
        return text.replace(home, "~", 1) if home and home != "/" else text

    def update_header(self, header: FleetHeader, crumbs: list[str]) -> None:
        from core import __version__
        from core.domain import TaskState

        status = self.core_status
        assert status is not None, "set once the core is there"
        state = "[$success]● connected[/]" if status.broker_connected else "[$error]○ not connected[/]"
        embedded = " [$text-muted](in-process)[/]" if status.broker_embedded else ""
        store = self.store_description()
        unreachable = "" if status.store_connected else " [$error]○ unreachable[/]"
        host = f"[$text-muted]host[/] {escape(self.hostname)}"
        # The shorter forms drop the version, then the database's path, then the broker's URL: the
        # states stay (FleetHeader shows the first form that fits).
        where = (f"[b $accent]◆ Propeller[/] [$text-muted]{__version__}[/]  {host}"
                 f"  [$text-muted]broker[/] {status.broker_url} {state}{embedded}"
                 f"  [$text-muted]db[/] {store}{unreachable}",
                 f"[b $accent]◆ Propeller[/]  {host}  [$text-muted]broker[/] {status.broker_url} {state}{embedded}"
                 f"  [$text-muted]db[/] {store.split(' ')[0]}{unreachable}",
                 f"[b $accent]◆[/] {escape(self.hostname)}  [$text-muted]broker[/] {state}{embedded}"
                 f"  [$text-muted]db[/] {store.split(' ')[0]}{unreachable}")
        counts = self.fleet.counts
        loaded = self.counts_loaded

        def n(key: str, value: int) -> str:
            mark = header.marker(key, value) if loaded else ""
            return f"{value:,}{mark}"

        online = f"[b]{n('online', status.proplets_online)}[/]/{status.proplets_total} online"
        active = f"active [b $primary]{n('active', status.active)}[/]"
        queued = f"queued {n('queued', status.backlog)}"
        completed = f"completed [$success]{n('completed', counts.get(TaskState.COMPLETED, 0))}[/]"
        failed = f"failed [$error]{n('failed', counts.get(TaskState.FAILED, 0))}[/]"
        # Crumbs are text, not markup: a filter as typed (`[` is common in a regex) or a proplet id
        # from the network; read as markup, one closed the console (MarkupError) or was restyled.
        crumb_text = " › ".join(f"[b]{escape(c)}[/]" if i == len(crumbs) - 1 else escape(c)
                                for i, c in enumerate(crumbs) if c)
        badge = "  [reverse $warning] READ-ONLY [/]" if self.read_only else ""
        # Shorter forms, tighter and then without the queued and completed counts: failed stays.
        header.show(where, (f"{crumb_text}{badge}  │  proplets {online}  │  {active}  {queued}  {completed}  {failed}",
                            f"{crumb_text}{badge} │ {online} │ {active} {queued} {completed} {failed}",
                            f"{crumb_text}{badge} │ {online} │ {active} {failed}"))

    # ------------------------------------------------------------------------------------
    # navigation and commands

    def switch_mode(self, mode: str) -> AwaitMount:
        # Textual hides a mode switch behind 50 ms without repaints (App.delay_update), time for a new
        # screen to compose. A view shown before is composed and kept: it catches up with what was
        # buffered while it was hidden here, before its first frame, so there is nothing to hide
        # (the 50 ms were most of a view switch's latency).
        self._composed_modes.add(self.current_mode)
        self._switching_to_composed = mode in self._composed_modes
        try:
            shown = super().switch_mode(mode)
        finally:
            self._switching_to_composed = False
            self._composed_modes.add(mode)
        screen = self.screen
        if isinstance(screen, ConsoleScreen):
            screen.flush()
        self._hold_keys_until_resumed()
        return shown

    def push_screen(self, *args: Any, **kwargs: Any) -> Any:
        shown = super().push_screen(*args, **kwargs)
        self._hold_keys_until_resumed()
        return shown

    def pop_screen(self) -> Any:
        popped = super().pop_screen()
        self._hold_keys_until_resumed()
        return popped

    def delay_update(self, delay: float = 0.05) -> None:
        if not self._switching_to_composed:
            super().delay_update(delay)

    def go(self, mode: str) -> None:
        if mode not in self.MODES:
            return
        while len(self.screen_stack) > 1:
            self.pop_screen()
        if mode != self.current_mode:
            self._history.append(self.current_mode)
            self.switch_mode(mode)

    # -- keys ---------------------------------------------------------------------------------

    async def on_event(self, event: events.Event) -> None:
        # Textual hands each key to the focused widget's queue and runs the binding it reaches
        # (Tab, Backspace in a field, a view's key) only when the key has bubbled back to the app:
        # behind every key that arrived meanwhile, which were already handed to the old focus. A
        # burst (fast typing, a paste of keys, keys batched by an SSH link) then lands in the wrong
        # field or view, and "ab<Backspace>c" gives "ab" instead of "ac". A key the focused widget
        # does not read itself has its binding run here instead, before the next key is looked at.
        if isinstance(event, events.Key) and not event.is_forwarded:
            if self._held_keys is not None:
                self._held_keys.append(event)
                return
            if self.screen_stack and self.screen.maximized is None and await self._apply_key_now(event):
                return
        await super().on_event(event)

    async def _apply_key_now(self, event: events.Key) -> bool:
        """Apply a key as it is read, if nothing but the focused widget's own handler needs it later."""
        self.app_focus = True
        if await self._check_bindings(event.key, priority=True):
            return True
        focused = self.focused
        if isinstance(focused, Input) and event.is_printable:
            # Typed text goes in now too, in order with the bindings run here (what the field's own
            # key handler does when the key reaches it).
            await focused._on_key(event)
            return True
        return not _reads_key_itself(focused, event) and await self._check_bindings(event.key)

    def _hold_keys_until_resumed(self) -> None:
        """Keep the keys that follow a screen change until the new screen has handled its resume
        (where it takes focus): they belong to it, not to the screen that was there before."""
        if not self.screen_stack:
            return
        hold = object()
        self._key_hold = hold
        if self._held_keys is None:
            self._held_keys = deque(maxlen=KEY_HOLD_MAX)
        # Posted after the screen's ScreenResume, so it runs once that is handled, and from there
        # to the app, behind a focus the resume deferred (`Widget.focus` goes through the app's
        # queue). The timer is a backstop for a screen that goes away before it gets there.
        self.screen.call_later(self.call_later, self._release_keys, hold)
        self.set_timer(KEY_HOLD_TIMEOUT_S, partial(self._release_keys, hold))

    def _release_keys(self, hold: object) -> None:
        if hold is not self._key_hold or self._held_keys is None:
            return
        held, self._held_keys, self._key_hold = self._held_keys, None, None
        # Behind anything the resume queued on the app (a deferred focus), in the order typed.
        for key in held:
            self.post_message(events.Key(key.key, key.character))

    # Actions whose keys are plain characters: while the user types in a field they are text.
    TYPING_SENSITIVE = frozenset({"command_bar", "help", "mode"})

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.TYPING_SENSITIVE and self.screen_stack:
            from textual.widgets import Input, TextArea

            # Not while a modal (confirm, prompt, help, palette) waits for an answer, nor inside a field.
            if isinstance(self.screen, ModalScreen) or isinstance(self.screen.focused, (Input, TextArea)):
                return False
        return True

    async def run_action(self, action: Any, default_namespace: Any = None, namespaces: Any = None) -> bool:
        # A key whose action check_action disables is otherwise passed over without a word: in
        # read-only mode a mutating one says why it is refused (its key is shown disabled).
        if isinstance(action, str) and isinstance(default_namespace, ConsoleScreen) and \
                default_namespace.refuse_binding(action):
            return True
        return await super().run_action(action, default_namespace, namespaces)

    def action_mode(self, mode: str) -> None:
        self.go(mode)

    def action_back(self) -> None:
        if len(self.screen_stack) > 1:
            self.pop_screen()
            return
        screen = self.screen
        if isinstance(screen, ConsoleScreen) and screen.clear_filter():
            return
        if self._history:
            self.switch_mode(self._history.pop())

    def action_command_bar(self) -> None:
        screen = self.screen
        if isinstance(screen, ConsoleScreen):
            screen.open_command_bar()

    def command_words(self) -> list[str]:
        words = [w for _, aliases in VIEWS.values() for w in aliases if len(w) > 1]
        words += ["quit", "help", "themes"] + [f"theme {name}" for name in self.theme_names()]
        return words

    def run_command(self, text: str) -> None:
        word, _, arg = text.strip().lstrip(":").partition(" ")
        word = word.lower()
        for mode, (_, aliases) in VIEWS.items():
            if word in aliases:
                self.go(mode)
                return
        if word in QUIT_WORDS:
            self.exit()
        elif word in HELP_WORDS:
            self.action_help()
        elif word in ("theme", "themes"):
            if arg.strip():
                self.set_theme(arg.strip())
            else:
                self.notify("Themes: " + ", ".join(self.theme_names()) + ". Use :theme <name>.", timeout=8)
        else:
            self.notify(f"Unknown command ':{text}'. Try :tasks, :proplets, :mqtt, :dispatch, :local, :fw, :dash, "
                        ":theme <name> or :q (press ? for help).", severity="error", timeout=6)

    def theme_names(self) -> list[str]:
        house = [name for name in self.available_themes if name.startswith("propeller-")]
        others = [name for name in self.available_themes if name not in house and not name.startswith("textual-")]
        return sorted(house) + [t for t in TERMINAL_THEMES if t in others] + sorted(
            t for t in others if t not in TERMINAL_THEMES)

    def set_theme(self, name: str) -> None:
        wanted = resolve_name(name)
        if wanted not in self.available_themes:
            self.notify(f"No theme '{name}'. Themes: {', '.join(self.theme_names())} "
                        f"(aliases: {', '.join(ALIASES)}).", severity="error", timeout=8)
            return
        self.theme = wanted
        self.notify(f"Theme: {wanted}", timeout=2)

    def action_help(self) -> None:
        screen = self.screen
        if isinstance(screen, HelpScreen):
            return
        focused = screen.focused
        parts = []
        # A view by its name; a detail screen (no CRUMB of its own) as its header shows it: view › item.
        title = screen.CRUMB or " › ".join(screen.crumbs()) if isinstance(screen, ConsoleScreen) else ""
        title = title or type(screen).__name__
        widget_help = getattr(focused, "HELP", "") if focused is not None else ""
        if widget_help:
            parts.append(widget_help)
        if getattr(screen, "HELP", ""):
            parts.append(screen.HELP)
        parts.append(anywhere_help())
        rows = []
        for active in screen.active_bindings.values():
            binding = active.binding
            if binding.system or not (binding.description or binding.id):
                continue
            rows.append((self.get_key_display(binding), binding.description or binding.action, binding.id or "",
                         active.enabled))
        # The console's own keys (they have ids) first; the widget's cursor keys after them.
        rows.sort(key=lambda row: not row[2])
        self.push_screen(HelpScreen(title, "\n\n".join(parts), rows))

    # ------------------------------------------------------------------------------------
    # actions on tasks and proplets (shared by the table and the detail screen)

    def show_task_in_table(self, task_id: str) -> None:
        self.go("tasks")

        def select() -> None:
            screen = self.screen
            if isinstance(screen, TasksScreen):
                screen.flush()
                screen.select(task_id)

        self.call_after_refresh(select)

    def start_task(self, task_id: str) -> None:
        if not self.read_only:
            self._task_action("start", task_id)

    def confirm_stop_task(self, task_id: str) -> None:
        self._confirm(f"Stop task {task_id[:8]}? It ends as interrupted.", "Stop",
                      lambda: self._task_action("stop", task_id))

    def confirm_delete_task(self, task_id: str) -> None:
        self._confirm(f"Delete task {task_id[:8]} and its history? A running task is stopped first. "
                      "This cannot be undone.", "Delete", lambda: self._task_action("delete", task_id))

    def invoke_task(self, task_id: str) -> None:
        """Ask for the inputs of a call of a deployed latent task, then call it (the result is told)."""
        if self.read_only:
            self.notify(f"Invoke is disabled: {READ_ONLY}.", severity="warning")
            return
        self._ask_invocation(task_id)

    @work(group="task-actions", description="Reading the task to invoke", exit_on_error=False)
    async def _ask_invocation(self, task_id: str) -> None:
        from console.modules import split_inputs
        from core.domain import TaskState

        task = await self.manager.get_task(task_id)
        short = task_id[:8]
        if not task.latent:
            self.notify(f"Task {short} is not latent: only a task dispatched as latent (the form's latent box) "
                        "is deployed to be called.", severity="warning")
            return
        if task.state not in (TaskState.RUNNING, TaskState.SCHEDULED):
            self.notify(f"Task {short} is {task.state.label}, not deployed: start it (s) first.", severity="warning")
            return

        def answered(text: str | None) -> None:
            if text is not None:
                self._invoke(task_id, split_inputs(text))

        self.push_screen(PromptModal(f"Call {task.name} of task {short} with these inputs (Enter calls it; "
                                     "empty: the task's own; Esc cancels)", " ".join(task.inputs)), answered)

    @work(group="invocations", description="Invoking a task", exit_on_error=False)
    async def _invoke(self, task_id: str, inputs: list[str]) -> None:
        from console.fleet import row_text
        from console.views.tasks import fmt_duration

        began = time.monotonic()
        results = await self.manager.invoke_task(task_id, inputs)
        took = time.monotonic() - began
        self.notify(f"Task {task_id[:8]} returned {row_text(results) or '(nothing)'} in {fmt_duration(took)}.",
                    timeout=8)
        self.post_message(TaskInvokedHere(task_id, inputs, results, took))

    @on(TaskInvokedHere)
    def _task_invoked_here(self, message: TaskInvokedHere) -> None:
        screen = self.screen
        if isinstance(screen, TaskDetailScreen) and screen.task_id == message.task_id:
            screen.show_call(message)

    def confirm_forget_proplet(self, proplet_id: str) -> None:
        self._confirm(f"Forget proplet {proplet_id}? The manager deletes its record; it reappears when it "
                      "announces itself again.", "Forget", lambda: self._proplet_action("delete", proplet_id))

    def _confirm(self, question: str, label: str, then: Callable[[], None]) -> None:
        if self.read_only:
            self.notify(f"{label} is disabled: {READ_ONLY}.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                then()

        self.push_screen(ConfirmModal(question, label), answered)

    @work(group="task-actions", description="Changing a task", exit_on_error=False)
    async def _task_action(self, what: str, task_id: str) -> None:
        manager = self.manager
        if what == "start":
            task = await manager.start_task(task_id)
            self.notify(f"Task {task_id[:8]} queued (attempt {task.attempt + 1}).", timeout=3)
        elif what == "stop":
            await manager.stop_task(task_id)
            self.notify(f"Task {task_id[:8]} stopped.", timeout=3)
        elif what == "delete":
            await manager.delete_task(task_id)
            self.notify(f"Task {task_id[:8]} deleted.", timeout=3)
            self.post_message(TaskDeletedHere(task_id))

    @on(TaskDeletedHere)
    def _task_deleted_here(self, message: TaskDeletedHere) -> None:
        screen = self.screen
        if isinstance(screen, TaskDetailScreen) and screen.task_id == message.task_id:
            self.pop_screen()

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        self.report_worker_error(event.worker)

    def report_worker_error(self, worker: Worker[Any]) -> None:
        """The one place worker failures become messages for the user (STYLE rule 14)."""
        if worker.state is not WorkerState.ERROR or worker.error is None:
            return
        self.report_error(worker.error, worker.description)

    def report_error(self, exc: BaseException, doing: str = "") -> None:
        from console.firmware import FirmwareUnavailable
        from console.local import LaunchError
        from console.modules import FieldError
        from core.errors import CoreError

        if isinstance(exc, (CoreError, LaunchError, FieldError, FirmwareUnavailable)):
            message = str(exc)
        else:
            log.error("%s failed", doing or "a background job", exc_info=exc)
            message = (f"{doing or 'A background job'} failed: {exc or type(exc).__name__}. The details are in "
                       f"{log_path()}.")
        self.notify(message, severity="error", timeout=10)

    @work(group="proplet-actions", description="Forgetting a proplet", exit_on_error=False)
    async def _proplet_action(self, what: str, proplet_id: str) -> None:
        if what == "delete":
            await self.manager.delete_proplet(proplet_id)
            self.notify(f"Proplet {proplet_id} forgotten.", timeout=3)

    # ------------------------------------------------------------------------------------
    # terminal and signals

    def hang_up(self) -> None:
        """SIGHUP: the terminal (or the SSH session) is gone; shut the manager down cleanly.

        Textual's way out writes to the terminal (restoring its modes), and a terminal that hung up
        answers writes with EIO, which ends Textual's writer thread; the shutdown then waits for ever
        on that thread's full queue. Worse, the kernel follows SIGHUP with SIGCONT, on which Textual
        starts its terminal mode over with a writer thread of its own. So the terminal's output goes
        to /dev/null from here on, and a backstop thread stops the core and ends the process should
        the UI still not have closed after HANG_UP_GRACE_S (the tmux hang-up test hung about one run
        in twenty without it)."""
        if self.hung_up:
            return
        self.hung_up = True
        _silence_terminal_output()
        if self._core_thread is not None:
            threading.Thread(target=self._hang_up_backstop, args=(self._core_thread,),
                             name="hang-up-backstop", daemon=True).start()
        self.exit()

    @staticmethod
    def _hang_up_backstop(core: CoreThread) -> None:
        time.sleep(HANG_UP_GRACE_S)
        # Still here: the UI's shutdown is stuck on the dead terminal. The core does not need it.
        log.warning("the console did not close within %.0f s of the terminal hanging up; stopping the "
                    "manager core without it", HANG_UP_GRACE_S)
        stopped = core.stop_and_wait(timeout=60)
        if stopped:
            log.info("console closed (the terminal hung up); manager core stopped cleanly")
        else:
            log.error("the manager core did not stop within 60 s of the terminal hanging up")
        logging.shutdown()
        os._exit(0 if stopped else 1)

    def _check_terminal(self) -> None:
        # A backstop for lost sessions that do not deliver SIGHUP (dolphie does the same).
        try:
            alive = sys.__stdin__ is not None and os.isatty(sys.__stdin__.fileno())
        except (OSError, ValueError):
            alive = False
        if not alive:
            self.hang_up()
            return
        self.set_timer(5.0, self._check_terminal)


# How long the UI may take to close after the terminal hung up before the backstop stops the core.
HANG_UP_GRACE_S = 5.0

# After this long without a started core, the terminal (not drawn on yet) says what the start waits for.
SLOW_START_S = 2.0


def _say_starting_slowly(settings: ManagerSettings) -> None:
    if settings.storage_type == "postgres":
        database = (f"PostgreSQL at {settings.postgres_host}:{settings.postgres_port} "
                    f"(database {settings.postgres_db})")
    else:
        database = f"the {settings.storage_type} database"
    with contextlib.suppress(OSError):
        print(f"Starting the manager: waiting for {database}. Ctrl+C cancels.", file=sys.stderr, flush=True)


def _silence_terminal_output() -> None:
    """Point stdout and stderr (Textual draws on stderr) at /dev/null: the terminal is gone."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)


# ------------------------------------------------------------------------------------------
# entry point


def log_path() -> Path:
    from core import paths

    return paths.console_log_file()


def _setup_file_logging(level: str) -> Path:
    """The console owns the terminal, so logs go to a file."""
    from core.entrypoint import setup_logging

    path = log_path()
    setup_logging(level, file=path)
    return path


def run_console(*, read_only: bool | None = None, theme: str | None = None, mouse: bool | None = None,
                clock: Callable[[], datetime] | None = None) -> None:
    """`propeller` with no subcommand. Flags the user typed win over the config file."""
    import click
    from pydantic import ValidationError

    from core.config import ManagerSettings

    try:
        settings = load_settings(read_only=read_only, theme=theme, mouse=mouse)
        manager = ManagerSettings()
    except (ValidationError, ValueError) as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None
    from core.errors import CoreError
    from core.store import StoreError

    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise click.ClickException(
            "the console needs a terminal. Run it in one (tmux keeps it alive over SSH), or run the manager "
            "without a UI: `propeller serve` (or `propeller --headless`).")
    path = _setup_file_logging(manager.log_level)
    app = ConsoleApp(settings=settings, manager_settings=manager, handle_signals=True, clock=clock or utc_clock,
                     freeze_startup=True)
    # An Input with a suggester starts a worker for each value it takes; one the console quits
    # before it runs (`:q` Enter typed in one go) is reported at exit as "RuntimeWarning: coroutine
    # 'Suggester._get_suggestion' was never awaited": a ghost text nobody will see, not a fault.
    warnings.filterwarnings("ignore", message="coroutine 'Suggester._get_suggestion' was never awaited",
                            category=RuntimeWarning)
    try:
        app.run(mouse=settings.mouse)
    except (CoreError, StoreError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if app.return_code not in (None, 0):
        raise click.ClickException(f"the console failed; the details are in {path}")
    if not app.hung_up:
        with contextlib.suppress(OSError):
            click.echo(f"Propeller console closed; the manager stopped cleanly. Its state is in "
                       f"{manager.sqlite_path if manager.storage_type == 'sqlite' else manager.storage_type}; "
                       f"the log is {path}.")


# Keys kept while a screen takes focus: a paste-sized burst; the hold lasts one message round
# for a screen shown before, the time to compose one shown for the first time.
KEY_HOLD_MAX = 512
KEY_HOLD_TIMEOUT_S = 1.0


def _reads_key_itself(widget: Widget | None, event: events.Key) -> bool:
    """Whether the focused widget takes this key in its own key handler rather than a binding.

    Text fields and select lists take printable keys in their handler (everything else they do
    through bindings); a widget of unknown kind with a key handler of its own keeps every key, as
    Textual gives it."""
    if widget is None:
        return False
    if isinstance(widget, Input) or type(widget).__name__ == "SelectOverlay":  # typing, type to search
        return event.is_printable
    if type(widget)._on_key is not Widget._on_key or hasattr(widget, "on_key"):
        return True
    return any(hasattr(widget, f"key_{name}") for name in event.name_aliases)
