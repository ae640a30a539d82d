"""End to end: the real `propeller` command in a real terminal (tmux on a private socket), from start to a
completed task (a local proplet launched from the console runs the example module) and a clean exit;
and a hung-up terminal stopping the manager cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services import Mosquitto, need

ROOT = Path(__file__).resolve().parents[2]
PROPELLER = Path(sys.executable).with_name("propeller")

pytestmark = [pytest.mark.serial, pytest.mark.slow]


class Tmux:
    def __init__(self, socket: str) -> None:
        self.socket = socket
        # The tmux server hands its own environment to the pane: keep the test process's out of it
        # (COLUMNS/LINES set by the test runner would override the pane's real size).
        self.env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "USER", "SHELL")}

    def __call__(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10,
                             env=self.env)
        if check and out.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def screen(self, history: bool = False) -> str:
        # With history: the scrollback too, wrapped lines joined (text printed after the console
        # left the alternate screen may have scrolled up).
        extra = ("-J", "-S", "-200") if history else ()
        return self("capture-pane", "-t", "console", "-p", *extra, check=False)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "console", *keys)

    def type(self, text: str) -> None:
        self("send-keys", "-t", "console", "-l", text)

    def wait_for(self, check: Callable[[str], bool], timeout: float = 30.0, what: str = "",
                 history: bool = False) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(history)
            if check(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{what or 'condition'} not seen within {timeout}s; the screen was:\n{screen}")

    def cursor_on(self, label: str) -> bool:
        """The terminal cursor (Textual puts it at the focused input's caret) is on the row of `label`."""
        rows = self.screen().splitlines()
        where = self("display-message", "-p", "-t", "console", "#{cursor_y}", check=False).strip()
        return where.isdigit() and int(where) < len(rows) and rows[int(where)].lstrip().startswith(label)

    def pane_pid(self) -> int:
        return int(self("display-message", "-p", "-t", "console", "#{pane_pid}").strip())

    def pane_dead(self) -> bool:
        return self("display-message", "-p", "-t", "console", "#{pane_dead}", check=False).strip() == "1"


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    need(shutil.which("tmux") is not None, "tmux", "install it with `apt-get install tmux`")
    server = Tmux(f"propeller-test-{uuid.uuid4().hex[:8]}")
    yield server
    server("kill-server", check=False)


def _env(broker: Mosquitto, home: Path) -> dict[str, str]:
    """An isolated user: its own HOME and XDG directories, no config file, the session broker."""
    # COLUMNS/LINES would override the terminal's real size.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MANAGER_", "PROPLET_", "PROPELLER_", "XDG_", "TMUX"))
           and k not in ("COLUMNS", "LINES")}
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"),
        "XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(home / "cache"),
        "PROPELLER_CONFIG": str(home / "no-config.yaml"), "TERM": "xterm-256color",
        "MANAGER_MQTT_ADDRESS": broker.url, "MANAGER_TENANT_ID": f"tmux-{uuid.uuid4().hex[:6]}",
        "MANAGER_ENTITY_ID": f"tmux-manager-{uuid.uuid4().hex[:6]}", "MANAGER_HTTP_ENABLED": "false",
        "PROPELLER_CONSOLE_CURSOR_BLINK": "false",
    })
    return env


def _start(tmux: Tmux, env: dict[str, str]) -> None:
    assert PROPELLER.exists(), f"{PROPELLER} is missing: install the project (scripts/bootstrap)"
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    tmux("new-session", "-d", "-s", "console", "-x", "150", "-y", "40", "-c", str(ROOT), *env_args,
         f"exec {PROPELLER}")
    tmux("set-option", "-t", "console", "remain-on-exit", "on")
    # Without an attached client tmux keeps its default size; make the window the size asked for.
    tmux("resize-window", "-t", "console", "-x", "150", "-y", "40")


def test_propeller_in_a_terminal_from_start_to_a_completed_task_and_a_clean_exit(
        tmux: Tmux, broker: Mosquitto, tmp_path: Path) -> None:
    env = _env(broker, tmp_path / "home")
    _start(tmux, env)
    screen = tmux.wait_for(lambda s: "Dashboard" in s and "connected" in s, what="the dashboard")
    assert broker.url in screen and "Propeller" in screen
    # Launch a local proplet from the console.
    tmux.keys("6")
    tmux.wait_for(lambda s: "Local proplets" in s, what="the local proplets view")
    tmux.keys("a")
    tmux.wait_for(lambda s: "online" in s and "local-" in s, timeout=60, what="a local proplet online")
    # Dispatch the example module.
    tmux.keys("5")
    tmux.wait_for(lambda s: "Module" in s and "Function" in s, what="the dispatch form")
    tmux.type("examples/add.wasm")
    tmux.wait_for(lambda s: "exports: add" in s, what="the module's exports")
    # Field by field, as a person does: look where the cursor is before typing.
    tmux.keys("Tab")
    tmux.wait_for(lambda s: tmux.cursor_on("Function"), what="the cursor in the Function field")
    tmux.keys("Tab")
    tmux.wait_for(lambda s: tmux.cursor_on("Inputs"), what="the cursor in the Inputs field")
    tmux.type("40 2")
    tmux.keys("Enter")
    screen = tmux.wait_for(lambda s: "completed" in s and " 42" in s, timeout=60, what="the completed task")
    assert "add" in screen and "local-" in screen
    # The messages are in the traffic view.
    tmux.keys("4")
    tmux.wait_for(lambda s: "control/manager/start" in s and "control/proplet/results" in s,
                  what="the start and result messages")
    # Quit with :q.
    tmux.keys(":")
    tmux.type("q")
    tmux.keys("Enter")
    screen = tmux.wait_for(lambda s: "Propeller console closed" in s, timeout=30, what="the goodbye line",
                           history=True)
    tmux.wait_for(lambda s: tmux.pane_dead(), timeout=10, what="the process exiting")
    assert "the manager stopped cleanly" in screen
    log = (tmp_path / "home" / "state" / "propeller" / "console.log").read_text()
    assert "manager core stopped cleanly" in log and "Traceback" not in log


def test_keys_sent_in_one_burst_through_the_terminal_fill_the_form_field_by_field(
        tmux: Tmux, broker: Mosquitto, tmp_path: Path) -> None:
    # One send-keys call writes everything to the terminal at once, as a paste of keystrokes or a
    # slow SSH link delivers them: the view key, then the fields, before the form was ever shown.
    _start(tmux, _env(broker, tmp_path / "home"))
    tmux.wait_for(lambda s: "Dashboard" in s and "connected" in s, what="the dashboard")
    tmux.keys("5", "examples/add.wasm", "Tab", "add", "Tab", "40 2", "Tab", "A=1", "BSpace", "2")

    def field(screen: str, label: str) -> str:
        line = next((ln for ln in screen.splitlines() if ln.lstrip().startswith(label)), "")
        return line.strip()[len(label):].strip().split("  ")[0]

    screen = tmux.wait_for(lambda s: field(s, "Env") == "A=2", what="the Env field filled")
    assert (field(screen, "Module"), field(screen, "Function"), field(screen, "Inputs")) == (
        "examples/add.wasm", "add", "40 2"), screen
    tmux.keys("C-q")
    tmux.wait_for(lambda s: tmux.pane_dead(), timeout=30, what="the process exiting")


def test_quitting_with_colon_q_typed_in_one_go_prints_no_warning(
        tmux: Tmux, broker: Mosquitto, tmp_path: Path) -> None:
    # The command bar's ghost-text worker for "q" never ran, and Python said so at exit:
    # "RuntimeWarning: coroutine 'Suggester._get_suggestion' was never awaited".
    _start(tmux, _env(broker, tmp_path / "home"))
    tmux.wait_for(lambda s: "Dashboard" in s and "connected" in s, what="the dashboard")
    tmux.keys(":", "q", "Enter")
    tmux.wait_for(lambda s: tmux.pane_dead(), timeout=30, what="the process exiting")
    screen = tmux.wait_for(lambda s: "Propeller console closed" in s, what="the goodbye line", history=True)
    assert "Warning" not in screen and "never awaited" not in screen, screen


def test_a_hung_up_terminal_stops_the_manager_cleanly(tmux: Tmux, broker: Mosquitto, tmp_path: Path) -> None:
    env = _env(broker, tmp_path / "home")
    _start(tmux, env)
    tmux.wait_for(lambda s: "Dashboard" in s and "connected" in s, what="the dashboard")
    pid = tmux.pane_pid()
    # Closing the pane sends SIGHUP, as a dropped SSH session does.
    tmux("kill-pane", "-t", "console")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)
    log = (tmp_path / "home" / "state" / "propeller" / "console.log").read_text()
    assert not _running(pid), f"the console did not exit after its terminal hung up; its log ends:\n{log[-3000:]}"
    assert "the terminal hung up" in log and "manager core stopped cleanly" in log


def _running(pid: int) -> bool:
    """True while the process runs; an exited child tmux has not reaped yet (a zombie) has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_a_hang_up_while_the_terminal_takes_no_output_still_stops_the_manager_cleanly(
        broker: Mosquitto, tmp_path: Path) -> None:
    """The console's way out writes to the terminal. A terminal that stopped taking output (its reader
    gone, its buffer full) blocks Textual's writer thread, and the UI's shutdown then waits for it for
    ever; this is also how a hang-up ends about one run in twenty (the kernel's SIGCONT after SIGHUP
    restarts Textual's terminal mode on the dead terminal). The hang-up backstop stops the core and
    ends the process anyway."""
    import fcntl
    import struct
    import termios

    home = tmp_path / "home"
    env = _env(broker, home)
    master, slave = os.openpty()
    # A large screen, so that the first frames alone fill the terminal's buffer: nobody reads it.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 100, 300, 0, 0))
    proc = subprocess.Popen([str(PROPELLER)], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                            start_new_session=True)
    os.close(slave)
    log_file = home / "state" / "propeller" / "console.log"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (log_file.exists() and "console ready" in log_file.read_text()):
            time.sleep(0.1)
        assert "console ready" in log_file.read_text(), log_file.read_text()[-3000:]
        time.sleep(1)  # a few more frames: the writer thread is stuck on the full terminal by now
        os.kill(proc.pid, signal.SIGHUP)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the console did not exit after SIGHUP with its terminal blocked; its log ends:\n"
                                 + log_file.read_text()[-3000:]) from None
        log = log_file.read_text()
        assert "the terminal hung up" in log and "manager core stopped cleanly" in log, log[-3000:]
        assert "did not close within" in log, "the UI closed by itself: the backstop was not exercised"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
