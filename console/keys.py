"""Every key binding of the console, in one place: footer, `?` help, palette and keymap all read these.

Each binding has an id (`scope.name`); the `keymap:` of the config file maps ids to other keys. Nothing
important sits on ctrl+a/b/d/k/s/j (tmux, screen and shell clashes), and every ctrl chord has a plain
alternative. Actions listed in MUTATING are refused (and greyed out in the footer) in read-only mode.
"""

from __future__ import annotations

from textual.binding import Binding

# Priority bindings are checked before the focused widget sees the key, so a burst such as ":q<Enter>"
# (fast typing, paste, tmux send-keys) cannot race the view switch; ConsoleApp.check_action lets the
# keys through as text while an input field has the focus.
APP = [
    Binding("colon", "command_bar", "Command", id="app.command", priority=True),
    Binding("question_mark", "help", "Help", id="app.help", priority=True),
    Binding("escape", "back", "Back", id="app.back", show=False),
    Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True, show=False),
    Binding("1", "mode('dashboard')", "Dashboard", id="mode.dashboard", show=False, priority=True),
    Binding("2", "mode('tasks')", "Tasks", id="mode.tasks", show=False, priority=True),
    Binding("3", "mode('proplets')", "Proplets", id="mode.proplets", show=False, priority=True),
    Binding("4", "mode('traffic')", "MQTT", id="mode.traffic", show=False, priority=True),
    Binding("5", "mode('dispatch')", "Dispatch", id="mode.dispatch", show=False, priority=True),
    Binding("6", "mode('local')", "Local", id="mode.local", show=False, priority=True),
    Binding("7", "mode('firmware')", "Firmware", id="mode.firmware", show=False, priority=True),
    Binding("8", "mode('fl')", "FL", id="mode.fl", show=False, priority=True),
]

TASKS = [
    Binding("d", "describe", "Describe", id="tasks.describe"),
    Binding("slash", "filter", "Filter", id="tasks.filter"),
    Binding("s", "start", "Start/Re-run", id="tasks.start"),
    Binding("x", "stop", "Stop", id="tasks.stop"),
    Binding("i", "invoke", "Invoke", id="tasks.invoke"),
    Binding("D", "delete", "Delete", id="tasks.delete"),
    Binding("y", "copy", "Copy id", id="tasks.copy"),
    Binding("N", "sort('name')", "Sort name", id="tasks.sort_name", show=False),
    Binding("S", "sort('state')", "Sort state", id="tasks.sort_state", show=False),
    Binding("A", "sort('created')", "Sort age", id="tasks.sort_age", show=False),
    Binding("P", "sort('proplet')", "Sort proplet", id="tasks.sort_proplet", show=False),
    Binding("r", "reload", "Reload", id="tasks.reload", show=False),
]

TASK_DETAIL = [
    Binding("s", "start", "Start/Re-run", id="task.start"),
    Binding("x", "stop", "Stop", id="task.stop"),
    Binding("i", "invoke", "Invoke", id="task.invoke"),
    Binding("D", "delete", "Delete", id="task.delete"),
    Binding("y", "copy", "Copy id", id="task.copy"),
    Binding("c", "copy_result", "Copy result", id="task.copy_result"),
    Binding("r", "reload", "Reload", id="task.reload", show=False),
]

PROPLETS = [
    Binding("d", "describe", "Describe", id="proplets.describe"),
    Binding("slash", "filter", "Filter", id="proplets.filter"),
    Binding("y", "copy", "Copy id", id="proplets.copy"),
    Binding("D", "delete", "Forget", id="proplets.delete"),
]

PROPLET_DETAIL = [
    Binding("y", "copy", "Copy id", id="proplet.copy"),
    Binding("r", "reload", "Reload", id="proplet.reload", show=False),
]

TRAFFIC = [
    Binding("p", "pause", "Pause", id="traffic.pause"),
    Binding("slash", "filter", "Filter topic", id="traffic.filter"),
    Binding("i", "direction", "In/out", id="traffic.direction"),
    Binding("y", "copy", "Copy payload", id="traffic.copy"),
    Binding("G", "follow", "Follow", id="traffic.follow"),
    Binding("t", "focus_tree", "Topics", id="traffic.topics", show=False),
    Binding("C", "clear", "Clear", id="traffic.clear", show=False),
]

DISPATCH = [
    Binding("f5", "submit", "Dispatch", id="dispatch.submit"),
    Binding("ctrl+o", "browse", "Browse…", id="dispatch.browse"),
    Binding("f2", "browse", "Browse…", id="dispatch.browse_f2", show=False),
    Binding("ctrl+r", "reset", "Reset", id="dispatch.reset", show=False),
]

LOCAL = [
    Binding("a", "launch", "Launch one", id="local.launch"),
    Binding("n", "launch_many", "Launch N", id="local.launch_many"),
    Binding("x", "stop", "Stop", id="local.stop"),
    Binding("X", "stop_all", "Stop all", id="local.stop_all"),
    Binding("c", "forget", "Clear stopped", id="local.clear", show=False),
]

FIRMWARE = [
    Binding("r", "ports", "Ports", id="firmware.ports"),
    Binding("b", "build", "Build", id="firmware.build"),
    Binding("f", "flash", "Flash", id="firmware.flash"),
    Binding("m", "monitor", "Monitor", id="firmware.monitor"),
    Binding("p", "provision", "Provision", id="firmware.provision"),
    Binding("x", "cancel", "Cancel job", id="firmware.cancel"),
]

FL = [
    Binding("d", "describe", "Describe", id="fl.describe"),
    Binding("s", "new_round", "New round", id="fl.new"),
    Binding("n", "next_round", "Next round", id="fl.next"),
    Binding("slash", "filter", "Filter", id="fl.filter"),
    Binding("y", "copy", "Copy id", id="fl.copy"),
    Binding("r", "reload", "Reload", id="fl.reload", show=False),
]

FL_ROUND = [
    Binding("n", "next_round", "Next round", id="fl_round.next"),
    Binding("y", "copy", "Copy id", id="fl_round.copy"),
    Binding("r", "reload", "Reload", id="fl_round.reload", show=False),
]

ROUND_FORM = [
    Binding("f5", "submit", "Start round", id="round_form.submit"),
    Binding("ctrl+o", "browse", "Browse…", id="round_form.browse"),
    Binding("f2", "browse", "Browse…", id="round_form.browse_f2", show=False),
    Binding("escape", "cancel", "Cancel", id="round_form.cancel"),
]

CONFIRM = [
    Binding("y", "confirm", "Yes", id="confirm.yes"),
    Binding("n", "cancel", "No", id="confirm.no"),
    Binding("escape", "cancel", "Cancel", id="confirm.cancel", show=False),
]

VIEWS = (TASKS, TASK_DETAIL, PROPLETS, PROPLET_DETAIL, TRAFFIC, DISPATCH, LOCAL, FIRMWARE, FL, FL_ROUND, ROUND_FORM,
         CONFIRM)
ALL = APP + [b for view in VIEWS for b in view]
BINDING_IDS = frozenset(b.id for b in ALL if b.id)


def keymap_clashes(keymap: dict[str, str]) -> list[tuple[str, str, str]]:
    """(key, id given it by the keymap, id that had it) for each key the keymap gives a binding that
    another binding active in the same view keeps (the app's bindings are active in every view)."""
    clashes = []
    for view in VIEWS:
        bindings = APP + view
        for taker in bindings:
            for key in keymap.get(taker.id or "", "").split(","):
                for other in bindings:
                    kept = keymap.get(other.id or "") or other.key
                    if other is not taker and key and key in kept.split(","):
                        clash = (key, str(taker.id), str(other.id))
                        if clash not in clashes:
                            clashes.append(clash)
    return clashes

# Actions that change the fleet, a device or the database (checked by `check_action` per screen).
MUTATING = frozenset({
    "start", "stop", "delete", "submit", "launch", "launch_many", "stop_all", "flash", "provision", "new_round",
    "next_round", "invoke",
})
