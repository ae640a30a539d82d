"""Getting around: `:` commands with aliases and suggestions, number keys, Esc, help, palette, themes,
keymap, read-only mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.command import CommandPalette
from textual.widgets import Input

from console.app import VIEWS, ConsoleApp
from console.settings import ConsoleSettings
from console.views.tasks import TasksScreen, TasksTable
from console.widgets import CommandBar, ConfirmModal, FleetHeader, HelpScreen, KeyHints
from tests.console.conftest import add_body, command, console_settings, open_view, until

ALIASES = [("tasks", "tasks"), ("t", "tasks"), ("proplets", "proplets"), ("p", "proplets"), ("mqtt", "traffic"),
           ("traffic", "traffic"), ("dispatch", "dispatch"), ("new", "dispatch"), ("local", "local"),
           ("fw", "firmware"), ("dash", "dashboard")]


async def test_colon_commands_and_aliases_reach_every_view(console: Any) -> None:
    async with console() as (app, pilot, _core):
        assert app.current_mode == "dashboard"
        # Typed once as a user would; the other aliases go through the same command runner.
        await command(pilot, "t")
        await until(pilot, lambda: app.current_mode == "tasks")
        for word, mode in ALIASES:
            app.run_command(word)
            await until(pilot, lambda mode=mode: app.current_mode == mode)
        # The dispatch form takes the keyboard (":" is text there); Esc leaves it.
        app.run_command("new")
        await until(pilot, lambda: app.current_mode == "dispatch")
        await pilot.press("escape")
        await until(pilot, lambda: app.current_mode != "dispatch")


async def test_number_keys_switch_views_and_esc_goes_back(console: Any) -> None:
    async with console() as (app, pilot, _core):
        for key, mode in (("2", "tasks"), ("3", "proplets"), ("4", "traffic"), ("6", "local"), ("7", "firmware"),
                          ("1", "dashboard")):
            await pilot.press(key)
            await until(pilot, lambda mode=mode: app.current_mode == mode)
        await pilot.press("escape")
        await until(pilot, lambda: app.current_mode == "firmware")
        await pilot.press("escape")
        await until(pilot, lambda: app.current_mode == "local")


async def test_command_bar_suggests_ghost_text_and_tab_completes(console: Any) -> None:
    async with console() as (app, pilot, _core):
        await pilot.press("colon", "p", "r", "o")
        bar = app.screen.query_one(CommandBar)
        await until(pilot, lambda: bar._suggestion == "proplets")
        await pilot.press("tab", "enter")
        await until(pilot, lambda: app.current_mode == "proplets")
        await pilot.press("colon", *"theme propeller-l")
        bar = app.screen.query_one(CommandBar)
        await until(pilot, lambda: bar._suggestion == "theme propeller-light")


async def test_unknown_command_says_what_exists(console: Any) -> None:
    async with console() as (app, pilot, _core):
        await command(pilot, "pods")
        await until(pilot, lambda: any("Unknown command ':pods'" in n.message for n in app._notifications))
        message = next(n.message for n in app._notifications if "pods" in n.message)
        assert ":tasks" in message and ":q" in message
        assert app.current_mode == "dashboard"


async def test_header_shows_where_you_are(console: Any) -> None:
    async with console() as (app, pilot, core):
        header = app.screen.query_one(FleetHeader)
        await until(pilot, lambda: "connected" in header.text)
        text = header.text
        assert core.status().broker_url in text
        assert app.hostname in text
        assert "sqlite" in text
        assert "Dashboard" in text and "proplets 0/0 online" in text


async def test_header_counts_get_markers_when_they_change(console: Any) -> None:
    async with console() as (app, pilot, core):
        header = app.screen.query_one(FleetHeader)
        await until(pilot, lambda: "completed 0" in header.text)
        from tests.wire import SyntheticProplet

        async with SyntheticProplet(core.status().broker_url, core.topics, "marker-proplet"):
            task = await core.create_task(add_body())
            await core.start_task(task.id)
            await until(pilot, lambda: "completed 1↑" in header.text)
            await until(pilot, lambda: "proplets 1↑/1" in header.text or "proplets 1/1" in header.text)


async def test_help_lists_the_keys_that_apply_now_with_their_ids(console: Any) -> None:
    async with console() as (app, pilot, _core):
        await pilot.press("2")
        await until(pilot, lambda: app.current_mode == "tasks")
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        help_screen = app.screen
        assert isinstance(help_screen, HelpScreen)
        ids = {row[2] for row in help_screen.bindings}
        assert {"tasks.stop", "tasks.delete", "tasks.filter", "app.command", "app.help"} <= ids
        assert "Task table" in help_screen.help_text or "### Tasks" in help_screen.help_text
        # Every view is named, with its digit (the FL view, 8, was once missing).
        assert all(f"`:{words[0]}`" in help_screen.help_text for _label, words in VIEWS.values())
        assert f"**1**–**{len(VIEWS)}** views" in help_screen.help_text and len(VIEWS) == 8
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))


async def test_command_palette_offers_commands_of_the_current_view(console: Any) -> None:
    async with console() as (app, pilot, core):
        await core.create_task(add_body())
        await pilot.press("2")
        await until(pilot, lambda: app.screen.query_one("#tasks").row_count == 1)
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"sort by name")
        await until(pilot, lambda: "Tasks: sort by name" in _palette_text(app))
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen) and app.screen.sort_column == "name")


def _palette_text(app: ConsoleApp) -> str:
    from textual.command import CommandList

    options = app.screen.query_one(CommandList)
    return " ".join(str(options.get_option_at_index(i).prompt) for i in range(options.option_count))


async def test_themes_switch_at_run_time_and_come_from_the_config(console: Any, tmp_path: Path) -> None:
    async with console(theme="propeller-light") as (app, pilot, _core):
        assert app.theme == "propeller-light"
        await command(pilot, "theme dark")
        await until(pilot, lambda: app.theme == "propeller-dark")
        app.run_command("theme terminal")
        await until(pilot, lambda: app.theme == "ansi-dark")
        assert app.current_theme.ansi
        app.run_command("theme no-such-theme")
        await until(pilot, lambda: any("No theme 'no-such-theme'" in n.message for n in app._notifications))
        assert app.theme == "ansi-dark"


async def test_a_view_shown_again_is_styled_again_only_when_the_app_changed_meanwhile(console: Any) -> None:
    """Textual restyled every widget of a view on each switch back to it, which also threw away every
    widget's rendered lines: half of a view switch's time under a traffic flood. Skipped now unless
    something the styles depend on outside the view changed while it was hidden."""
    from console.views.traffic import TrafficScreen

    async with console() as (app, pilot, _core):
        tasks = await open_view(app, pilot, "2", TasksScreen)
        restyled: list[str] = []
        original = tasks.update_node_styles

        def counting(animate: bool = True) -> None:
            restyled.append(app.theme)
            original(animate)

        tasks.update_node_styles = counting  # type: ignore[method-assign]
        table = tasks.query_one(TasksTable)
        dark_background = table.styles.background
        await open_view(app, pilot, "4", TrafficScreen)
        await open_view(app, pilot, "2", TasksScreen)
        assert restyled == []
        # The app loses focus while the view is hidden: widgets styled by :focus / :blur must follow.
        await open_view(app, pilot, "4", TrafficScreen)
        app.app_focus = False
        await pilot.pause()
        app.go("tasks")  # not by a key: a key would give the app its focus back first
        await until(pilot, lambda: app.screen is tasks)
        assert len(restyled) == 1
        app.app_focus = True
        await pilot.pause()
        # The theme changes while it is hidden: shown in the new theme's colours.
        await open_view(app, pilot, "4", TrafficScreen)
        app.run_command("theme light")
        await until(pilot, lambda: app.theme == "propeller-light")
        await open_view(app, pilot, "2", TasksScreen)
        await until(pilot, lambda: table.styles.background != dark_background)
        assert restyled[-1] == "propeller-light"


async def test_an_unknown_theme_is_reported_under_the_name_the_user_gave_it(
        console: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`propeller --theme nosuch` warned about `console.theme`, a setting the user had not touched."""
    from console.settings import load_settings

    def warning(app: Any) -> str:
        return next(n.message for n in app._notifications if "nosuch" in n.message)

    async with console(settings=load_settings(theme="nosuch")) as (app, pilot, _core):  # as run_console does
        await until(pilot, lambda: warning(app))
        message = warning(app)
        assert "--theme nosuch" in message and "console.theme" not in message
        assert "propeller-dark" in message and "propeller-light" in message and "ansi-light" in message
        assert app.theme == "propeller-dark"
    monkeypatch.setenv("PROPELLER_CONSOLE_THEME", "nosuch")
    async with console(settings=load_settings()) as (app, pilot, _core):
        await until(pilot, lambda: warning(app))
        assert "PROPELLER_CONSOLE_THEME" in warning(app) and "--theme" not in warning(app)


async def test_user_theme_files_are_loaded_and_bad_ones_reported(console: Any, tmp_path: Path) -> None:
    themes = tmp_path / "themes"
    themes.mkdir()
    (themes / "ocean.yaml").write_text("name: ocean\ndark: true\nprimary: '#1E88E5'\nbackground: '#001018'\n")
    (themes / "broken.yaml").write_text("name: broken\nprimary: not-a-colour\n")
    async with console(theme="ocean", theme_dirs=[themes]) as (app, pilot, _core):
        assert app.theme == "ocean"
        await until(pilot, lambda: any("broken.yaml" in n.message and "not a colour" in n.message
                                       for n in app._notifications))


async def test_keymap_from_the_config_file_overrides_bindings(console: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("console:\n  keymap:\n    tasks.stop: k\n    mode.traffic: m\n    no.such: z\n"
                      "  read_only: false\n")
    monkeypatch.setenv("PROPELLER_CONFIG", str(config))
    settings = ConsoleSettings(cursor_blink=False, refresh_interval=0.1)
    assert settings.keymap["tasks.stop"] == "k"
    async with console(settings=settings, manager={"ack_timeout": 60}) as (app, pilot, core):
        await until(pilot, lambda: any("no.such" in n.message for n in app._notifications))
        task = await core.create_task(add_body(proplet_id="nobody-home"))
        await core.start_task(task.id)
        await pilot.press("m")
        await until(pilot, lambda: app.current_mode == "traffic")
        await pilot.press("2")
        await until(pilot, lambda: app.screen.query_one("#tasks").row_count == 1)
        await pilot.press("x")  # the old key does nothing now
        await pilot.pause(0.1)
        assert not isinstance(app.screen, ConfirmModal)
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await until(pilot, lambda: app.fleet.tasks[task.id].state.label == "interrupted")


async def test_read_only_mode_greys_out_and_refuses_every_mutating_action(console: Any) -> None:
    async with console(read_only=True) as (app, pilot, core):
        task = await core.create_task(add_body())
        await pilot.press("2")
        await until(pilot, lambda: app.screen.query_one("#tasks").row_count == 1)
        screen = app.screen
        enabled = {b.binding.id: b.enabled for b in screen.active_bindings.values()}
        assert enabled["tasks.start"] is False and enabled["tasks.stop"] is False
        assert enabled["tasks.delete"] is False and enabled["tasks.copy"] is True
        for key in ("s", "x", "D"):
            await pilot.press(key)
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ConfirmModal)
        assert (await core.get_task(task.id)).state.label == "pending"
        assert "READ-ONLY" in app.screen.query_one(FleetHeader).text
        # Detail screen, local proplets, dispatch and firmware refuse too.
        await pilot.press("enter")
        await until(pilot, lambda: app.screen.__class__.__name__ == "TaskDetailScreen")
        for key in ("s", "x", "D"):
            await pilot.press(key)
        await pilot.pause(0.2)
        assert (await core.get_task(task.id)).state.label == "pending"
        await pilot.press("escape", "6", "a")
        await pilot.pause(0.3)
        assert not app.local.proplets
        app.screen.action_launch()  # even when called directly (palette), the action refuses
        await pilot.pause(0.1)
        assert not app.local.proplets
        await pilot.press("5")
        await until(pilot, lambda: app.current_mode == "dispatch")
        app.screen.query_one("#module", Input).value = "examples/add.wasm"
        app.screen.action_submit()
        await pilot.pause(0.3)
        assert (await core.list_tasks()).total == 1
        assert any("(--read-only or console.read_only)" in n.message for n in app._notifications)
        await pilot.press("escape", "7")
        await until(pilot, lambda: app.current_mode == "firmware")
        app.screen.query_one("#port", Input).value = "/dev/ttyUSB9"
        app.screen.action_flash()
        await pilot.pause(0.1)
        assert not isinstance(app.screen, ConfirmModal)


async def test_in_read_only_mode_every_mutating_key_is_shown_disabled_and_says_why_when_pressed(
        console: Any) -> None:
    """F5 in the read-only dispatch form (and s, x, D, a, n, f, p... elsewhere) did nothing, silently."""
    from console import keys
    from console.views.dispatch import DispatchScreen
    from console.views.federated import FederatedScreen
    from console.views.firmware import FirmwareScreen
    from console.views.local import LocalScreen
    from console.views.proplets import PropletsScreen

    async with console(read_only=True) as (app, pilot, core):
        task = await core.create_task(add_body())
        refused: set[str] = set()

        async def check(screen: Any) -> None:
            screen.set_focus(None)  # letters go to the bindings, not into a field
            await pilot.pause()
            mutating = [a for a in screen.active_bindings.values()
                        if a.binding.action.partition("(")[0] in keys.MUTATING]
            assert mutating, type(screen).__name__
            assert not any(a.enabled for a in mutating)
            footer = screen.query_one(KeyHints)
            footer.refresh()
            await pilot.pause()
            hints = {h.key: h.enabled for h in footer._hints}
            assert not any(hints.get(a.binding.key, False) for a in mutating)
            app.action_help()
            await until(pilot, lambda: isinstance(app.screen, HelpScreen))
            rows = {binding_id: enabled for _k, _d, binding_id, enabled in app.screen.bindings}
            assert not any(rows[a.binding.id] for a in mutating)
            # Titled as the header names the view (a detail screen: its view and the item), not
            # by the class ("Help: TaskDetailScreen" before).
            assert app.screen.help_title == (screen.CRUMB or " › ".join(screen.crumbs())), app.screen.help_title
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is screen)
            for active in mutating:
                app.clear_notifications()
                await pilot.press(active.binding.key)
                await until(pilot, lambda active=active: any(
                    active.binding.description in n.message and "--read-only" in n.message
                    for n in app._notifications))
                refused.add(str(active.binding.id))
            assert app.screen is screen  # no confirmation, no form

        await check(await open_view(app, pilot, "2", TasksScreen))
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "TaskDetailScreen")
        await check(app.screen)
        await pilot.press("escape")
        await check(await open_view(app, pilot, "3", PropletsScreen))
        local = await open_view(app, pilot, "6", LocalScreen)
        await check(local)
        assert "press a" not in str(local.query_one("#local-status").render())
        await check(await open_view(app, pilot, "7", FirmwareScreen))
        await check(await open_view(app, pilot, "8", FederatedScreen))
        await check(await open_view(app, pilot, "5", DispatchScreen))
        assert {"tasks.start", "task.delete", "proplets.delete", "local.launch_many", "firmware.flash", "fl.new",
                "dispatch.submit"} <= refused
        assert (await core.get_task(task.id)).state.label == "pending" and not app.local.proplets


async def test_console_settings_come_from_the_console_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "manager:\n  tenant_id: ignored-here\n"
        "console:\n  theme: propeller-light\n  mouse: false\n  read_only: true\n"
        "  local_proplet_command: '{python} -m propeller proplet --id {id} --log-level debug'\n"
        "  firmware:\n    env: esp32-s3-bench\n    build: 'pio run -d {project} -e {env}'\n")
    monkeypatch.setenv("PROPELLER_CONFIG", str(config))
    monkeypatch.setenv("PROPELLER_CONSOLE_TRAFFIC_LINES", "1234")
    settings = ConsoleSettings()
    assert settings.theme == "propeller-light" and settings.mouse is False and settings.read_only is True
    assert settings.traffic_lines == 1234
    assert settings.firmware.env == "esp32-s3-bench" and settings.firmware.build == "pio run -d {project} -e {env}"
    assert "--log-level debug" in settings.local_proplet_command
    # A flag the user typed wins over the file.
    from console.settings import load_settings

    assert load_settings(read_only=False, theme=None).read_only is False
    assert load_settings(read_only=None).read_only is True


def test_console_settings_defaults_are_usable() -> None:
    settings = console_settings()
    assert settings.theme == "propeller-dark" and settings.mouse and not settings.read_only
    assert settings.refresh_interval == 0.1 and settings.traffic_lines == 5000


async def test_footer_shows_the_keys_that_apply_now_and_a_click_presses_one(console: Any) -> None:
    async with console() as (app, pilot, _core):
        await pilot.press("4")
        await until(pilot, lambda: app.current_mode == "traffic")
        footer = app.screen.query_one(KeyHints)
        await until(pilot, lambda: "p Pause" in str(footer.render()))
        line = str(footer.render())
        assert "? Help" in line and line.rstrip().endswith("^p palette")
        hint = next(h for h in footer._hints if h.key == "p")
        paused = app.screen.paused
        await pilot.click(KeyHints, offset=(hint.start + 1, 0))
        await until(pilot, lambda: app.screen.paused != paused)
        # The view's own keys follow the view.
        await pilot.press("2")
        await until(pilot, lambda: app.current_mode == "tasks")
        await until(pilot, lambda: "d Describe" in str(app.screen.query_one(KeyHints).render()))
        assert "Pause" not in str(app.screen.query_one(KeyHints).render())


async def test_footer_click_on_a_refused_key_does_nothing_in_read_only_mode(console: Any) -> None:
    async with console(read_only=True) as (app, pilot, core):
        task = await core.create_task(add_body())
        await pilot.press("2")
        await until(pilot, lambda: app.screen.query_one("#tasks").row_count == 1)
        footer = app.screen.query_one(KeyHints)
        await until(pilot, lambda: any(h.key == "D" for h in footer._hints))
        delete = next(h for h in footer._hints if h.key == "D")
        assert not delete.enabled
        await pilot.click(KeyHints, offset=(delete.start + 1, 0))
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ConfirmModal)
        assert (await core.get_task(task.id)) is not None


async def test_a_view_shown_again_is_current_in_its_first_frame_with_no_repaint_hold(console: Any) -> None:
    # A slow cadence: only the switch itself can bring the hidden task table up to date.
    async with console(refresh_interval=5.0) as (app, pilot, core):
        tasks = await open_view(app, pilot, "2", TasksScreen)
        await pilot.press("4")
        await until(pilot, lambda: app.current_mode == "traffic")
        task = await core.create_task(add_body(name="while-hidden"))
        await until(pilot, lambda: task.id in app.fleet.tasks)
        assert tasks.table.row_count == 0  # hidden views are not rendered

        app.switch_mode("tasks")
        # Before any message is processed (the screen's resume, a timer): the rows are there, and
        # repaints are not held back (Textual's 50 ms App.delay_update is for screens still composing).
        assert app.screen is tasks
        assert tasks.table.row_count == 1
        assert app._batch_count == 0



async def test_a_keymap_entry_with_no_key_is_reported(console: Any) -> None:
    """`tasks.delete: ""` gives the binding no key, which Textual's keymap skips without a word (the
    binding keeps D, so a user who meant to take the key away still has it): the console says so."""
    settings = console_settings(keymap={"tasks.delete": "", "tasks.stop": "k"})
    async with console(settings=settings) as (app, pilot, core):
        await until(pilot, lambda: any("tasks.delete" in n.message for n in app._notifications))
        message = next(n.message for n in app._notifications if "tasks.delete" in n.message)
        assert "D" in message and "tasks.stop" not in message, message
        await core.create_task(add_body())
        await pilot.press("2")
        await until(pilot, lambda: app.screen.query_one("#tasks").row_count == 1)
        await pilot.press("D")  # the default key, as the notification says
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))


async def test_a_keymap_entry_that_takes_another_bindings_key_is_reported(console: Any) -> None:
    """`tasks.stop: d` takes `d` from tasks.describe in the task table: Textual drops Describe's key and
    reports the clash (to App.handle_bindings_clash) only for bindings without an id, and all of ours
    have one, so Describe lost its key without a word. A key swap (`tasks.stop: d, tasks.describe: x`)
    is no clash."""
    async with console(settings=console_settings(keymap={"tasks.stop": "d", "proplets.copy": "c",
                                                         "proplets.describe": "y"})) as (app, pilot, _core):
        await until(pilot, lambda: any("tasks.describe" in n.message for n in app._notifications))
        message = next(n.message for n in app._notifications if "tasks.describe" in n.message)
        assert "d from tasks.describe (to tasks.stop)" in message, message
        assert "proplets" not in message, message
        await pilot.press("2")
        await until(pilot, lambda: isinstance(app.screen, TasksScreen))
        assert "d" not in {k for k, b in app.screen.active_bindings.items() if b.binding.id == "tasks.describe"}


async def test_ctrl_c_says_how_to_quit_in_plain_text(console: Any) -> None:
    """Ctrl+C does not quit; Textual's hint about the key that does was markup, which the console's
    plain-text notifications showed as typed: "Press [b]ctrl+q[/b] to quit the app"."""
    async with console() as (app, pilot, _core):
        await pilot.press("ctrl+c")
        await until(pilot, lambda: any("quit" in n.message for n in app._notifications))
        message = next(n.message for n in app._notifications if "quit" in n.message)
        assert "[b]" not in message and "ctrl+q" not in message, message
        assert "Press ^q (or type :q Enter) to quit" in message, message  # ^q: as the footer shows keys
        assert app.is_running
