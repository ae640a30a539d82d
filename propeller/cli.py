"""`propeller`: the console (no subcommand), the headless manager, the proplet, the proxy, the
firmware tools and a client of the REST API.

This is the process entry point: it alone configures logging and signal handling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import click

from core.domain import Proplet, TaskState, invocation_wait_s
from core.entrypoint import (
    LazyEpilogCommand,
    freeze_startup_objects,
    load_settings,
    settings_help,
    setup_logging,
    stop_on_signals,
)

__all__ = ["main", "settings_help", "setup_logging"]

DEFAULT_MANAGER_URL = "http://127.0.0.1:7070"


class _CommandsOfOtherPackages(click.Group):
    """The top-level group, with the commands of the other packages imported only when asked for:
    importing them all cost every process (an idle proplet among them) the memory of the firmware
    tools too."""

    # name -> (module, attribute); listed when the module is installed.
    lazy: ClassVar[dict[str, tuple[str, str]]] = {
        "proplet": ("proplet.cli", "proplet_command"),
        "proxy": ("proplet.proxy_cli", "proxy_command"),
        "firmware": ("propeller.firmware", "firmware_group"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        import importlib.util

        installed = [name for name, (module, _) in self.lazy.items() if importlib.util.find_spec(module)]
        return sorted({*super().list_commands(ctx), *installed})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib
            import importlib.util

            module, attr = self.lazy[cmd_name]
            if importlib.util.find_spec(module) is None:
                return None
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_CommandsOfOtherPackages, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Config file (YAML with manager:, proplet:, proxy:, console: sections). "
                   "Default: $PROPELLER_CONFIG or ~/.config/propeller/config.yaml.")
@click.option("--read-only", "read_only", is_flag=True, default=None,
              help="Console: disable every action that changes the fleet (console.read_only).")
@click.option("--theme", help="Console: colour theme, e.g. propeller-dark, propeller-light, terminal (console.theme).")
@click.option("--mouse/--no-mouse", default=None, help="Console: mouse support, on by default (console.mouse).")
@click.option("--headless", is_flag=True,
              help="Run the manager without a UI until SIGINT/SIGTERM (the same as `propeller serve`).")
@click.version_option(package_name="propeller")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, read_only: bool | None, theme: str | None,
         mouse: bool | None, headless: bool) -> None:
    """Propeller: run WebAssembly workloads across an edge fleet over MQTT.

    With no command, opens the operator console, which hosts the manager in-process (by default:
    SQLite, and the broker on localhost:1883, or an in-process one when nothing listens there). Keys:
    ? help, : commands, Ctrl+P palette, Ctrl+Q quit. Use `propeller serve` for a manager that must
    outlive the terminal.
    """
    if config_file is not None:
        if not config_file.is_file():
            raise click.UsageError(f"config file {config_file} does not exist")
        os.environ["PROPELLER_CONFIG"] = str(config_file)
    elif os.environ.get("PROPELLER_CONFIG") and not Path(os.environ["PROPELLER_CONFIG"]).is_file():
        # Settings then come from the environment and defaults only: say so, or a typo in the path
        # runs on the defaults unnoticed. A warning, not an error: pointing it at a missing file is
        # also how a run (the tests) keeps ~/.config/propeller/config.yaml out.
        click.echo(f"warning: $PROPELLER_CONFIG names {os.environ['PROPELLER_CONFIG']}, which does not "
                   "exist; no config file is read", err=True)
    if ctx.invoked_subcommand is None and headless:
        ctx.invoke(serve)
    elif ctx.invoked_subcommand is None:
        try:
            from console.app import run_console
        except ImportError:
            click.echo(ctx.get_help())
            return
        run_console(read_only=read_only, theme=theme, mouse=mouse)


# ---- serve -----------------------------------------------------------------------------------


def _serve_epilog() -> str:
    from core.config import ManagerSettings, describe_settings

    return settings_help(describe_settings(ManagerSettings, "MANAGER_"))


@main.command(cls=LazyEpilogCommand, epilog_factory=_serve_epilog)
@click.option("--host", help="REST API address (MANAGER_HTTP_HOST).")
@click.option("--port", type=int, help="REST API port (MANAGER_HTTP_PORT).")
@click.option("--mqtt-address", help="Broker URL (MANAGER_MQTT_ADDRESS).")
@click.option("--storage", type=click.Choice(["sqlite", "postgres", "memory"]), help="MANAGER_STORAGE_TYPE.")
@click.option("--sqlite-path", type=click.Path(dir_okay=False), help="MANAGER_SQLITE_PATH.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="MANAGER_LOG_LEVEL.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def serve(host: str | None, port: int | None, mqtt_address: str | None, storage: str | None,
          sqlite_path: str | None, log_level: str | None, log_format: str) -> None:
    """Run the manager headless (REST API + MQTT) until SIGINT or SIGTERM.

    With no configuration it keeps its state in SQLite under ~/.local/share/propeller and uses the
    broker on localhost:1883, or starts an in-process one when nothing listens there.
    """
    from core.config import ManagerSettings

    settings = load_settings(ManagerSettings, http_host=host, http_port=port, mqtt_address=mqtt_address,
                             storage_type=storage, sqlite_path=sqlite_path, log_level=log_level)
    setup_logging(settings.log_level, log_format)
    try:
        asyncio.run(_serve(settings))
    except KeyboardInterrupt:
        pass


async def _serve(settings: Any) -> None:
    from core.errors import CoreError
    from core.service import ManagerCore
    from core.store import StoreError

    log = logging.getLogger("propeller.serve")
    started = time.perf_counter()
    try:
        core = ManagerCore(settings)
        async with core:
            stop_on_signals(core.request_shutdown)
            log.info("serving: API %s, broker %s (started in %.2fs); stop with Ctrl-C",
                     core.api_url, core.status().broker_url, time.perf_counter() - started)
            freeze_startup_objects()
            await core.wait_closed()
            log.info("shutting down")
        if core.taken_over is not None:
            raise core.taken_over
    except (CoreError, StoreError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


# ---- info ------------------------------------------------------------------------------------


@main.command()
def info() -> None:
    """Print the files and directories Propeller uses and the effective manager settings."""
    from core import __version__, paths
    from core.config import ManagerSettings

    settings = load_settings(ManagerSettings)
    click.echo(f"propeller {__version__}")
    click.echo(f"config file   {paths.default_config_file()}"
               f"{'' if paths.default_config_file().is_file() else ' (absent)'}")
    click.echo(f"data dir      {paths.data_dir()}")
    click.echo(f"cache dir     {paths.cache_dir()}")
    click.echo(f"state dir     {paths.state_dir()}")
    click.echo(f"console log   {paths.console_log_file()}")
    # What a manager started now would use: the settings below leave the broker unset by default
    # and list sqlite_path whatever the storage type.
    from core.store import store_from_settings

    click.echo(f"database      {store_from_settings(settings).description}")
    click.echo(f"broker        {_broker_in_use(settings)}")
    click.echo("manager settings:")
    for key, value in settings.model_dump().items():
        if key in ("api_key", "postgres_pass", "http_tokens") and value:
            value = "***"
        click.echo(f"  {key} = {value}")


def _broker_in_use(settings: Any) -> str:
    """The broker as ManagerCore._resolve_broker would choose it at this moment."""
    if settings.mqtt_address:
        return str(settings.mqtt_address)
    from core.embedded_broker import MQTT_BROKER, NOTHING, what_listens

    port = settings.default_broker_port
    listener = what_listens("127.0.0.1", port)
    if listener == MQTT_BROKER:
        return f"the one listening on 127.0.0.1:{port}"
    if listener == NOTHING:
        return f"an in-process one on 127.0.0.1:{port} (nothing listens there now)"
    return (f"none: something that is not an MQTT broker listens on 127.0.0.1:{port}, so a manager would "
            "not start (set MANAGER_MQTT_ADDRESS or MANAGER_DEFAULT_BROKER_PORT)")


# ---- REST client -----------------------------------------------------------------------------


def _client_options(f: Any) -> Any:
    f = click.option("--manager-url", "-m", envvar="PROPELLER_MANAGER_URL", default=DEFAULT_MANAGER_URL,
                     show_default=True, help="Manager REST API (PROPELLER_MANAGER_URL).")(f)
    f = click.option("--token", envvar="PROPELLER_TOKEN", help="Bearer token (PROPELLER_TOKEN).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")(f)
    return f


def _run(call: Any) -> Any:
    from propeller.client import ApiError

    try:
        return call()
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None


def ManagerClient(url: str, token: str | None) -> Any:
    # httpx costs ~180 ms to import: only the client commands pay for it.
    from propeller.client import ManagerClient as Client

    return Client(url, token)


def _show(data: Any, as_json: bool, render: Any) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def _fetch_and_show(manager_url: str, token: str | None, as_json: bool, fetch: Callable[[Any], Any],
                    render: Callable[[Any], Any]) -> None:
    """One request (or a few) with a client, then the answer shown (an API error: a clean message)."""
    with ManagerClient(manager_url, token) as client:
        data = _run(lambda: fetch(client))
    _show(data, as_json, render)


def _json_file(path: str) -> Any:
    try:
        return json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}") from None


def _table(columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    cells = [["" if v is None else str(v) for v in r] for r in rows]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, c in enumerate(columns):
        if c == "ID":
            # An id is what the next command takes (`tasks get <id>`): never cut short. Rich otherwise ends
            # a squeezed cell with "…", as it did to every id in 80 columns, a pipe's default width.
            table.add_column(c, no_wrap=True, min_width=max((len(r[i]) for r in cells), default=0))
        else:
            table.add_column(c, overflow="fold")  # wrapped onto more lines, not cut
    for r in cells:
        # Text, not str: a str cell is read as markup, and results are whatever a guest printed
        # ("argv: [hello] [world]" showed as "argv:  ", each [word] taken for a style).
        table.add_row(*(Text(value) for value in r))
    console = Console()
    if not console.is_terminal:
        console = Console(width=100_000)  # piped (grep, awk): one line per row, whatever its length
    console.print(table)


def _short_time(text: str | None) -> str:
    if not text or _unset_time(text):
        return ""
    return text.replace("T", " ")[:19]


def _task_rows(tasks: list[dict[str, Any]]) -> None:
    _table(["ID", "NAME", "STATE", "PROPLET", "CREATED", "RESULT / REASON"], [
        [t["id"], t["name"], t.get("state_name", t["state"]), t.get("proplet_id", ""),
         _short_time(t.get("created_at")),
         (t.get("error") or (json.dumps(t["results"]) if t.get("results") is not None else t.get("reason", "")))[:60]]
        for t in tasks])


def _task_detail(t: dict[str, Any]) -> None:
    fields = ["id", "name", "state_name", "proplet_id", "broadcast", "daemon", "latent", "image_url", "wasm_digest",
              "inputs", "env", "priority", "attempt", "reason", "results", "error", "created_at", "start_time",
              "finish_time", "workflow_id", "job_id", "depends_on", "schedule", "is_recurring", "timezone", "next_run"]
    if not t.get("schedule"):
        fields.remove("is_recurring")  # false, and meaningless, without a schedule
    # The kinds of task, shown only when they apply: "false" three times in every task says nothing.
    fields = [f for f in fields if f not in ("broadcast", "daemon", "latent") or t.get(f)]
    _table(["FIELD", "VALUE"], [[f, _field_text(t.get(f))]
                                for f in fields if t.get(f) not in (None, "", [], {}) and not _unset_time(t.get(f))])


def _field_text(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes" if value else "no"  # Python's True and False are not the reader's words
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _unset_time(value: Any) -> bool:
    """Upstream's zero time, which the API gives for a time that has not come (start, next run...)."""
    return isinstance(value, str) and value.startswith("0001-")


# The console shows the first 8 characters of a task id; the task commands take any unique start
# of at least this many hex digits.
MIN_ID_PREFIX = 4
_SHOWN_MATCHES = 10


def _full_id(client: Any, text: str, kind: str) -> str:
    """The `kind` ("task" or "job") id that `text` (a whole id, or a unique start of one) names, found
    with the API's `id_prefix` filter; an unknown or ambiguous start is an error that says what to type."""
    import uuid

    text = text.strip()
    try:
        uuid.UUID(text)
        return text
    except ValueError:
        pass
    hint = f"{kind.upper()}_ID"
    if not text or any(c not in "0123456789abcdefABCDEF-" for c in text):
        raise click.BadParameter(f"{text!r} is not hex: give a {kind} id or its start, as `propeller {kind}s list` "
                                 "or the console shows it", param_hint=hint)
    if sum(c != "-" for c in text) < MIN_ID_PREFIX:
        raise click.BadParameter(f"{text!r} is too short: give at least {MIN_ID_PREFIX} hex digits of the {kind} id",
                                 param_hint=hint)
    if kind == "job":
        page = _run(lambda: client.list_jobs(0, _SHOWN_MATCHES, id_prefix=text))
        found = [(j["job_id"], j["name"], j.get("state_name", "")) for j in page["jobs"]]
    else:
        page = _run(lambda: client.list_tasks(0, _SHOWN_MATCHES, id_prefix=text))
        found = [(t["id"], t["name"], t.get("state_name", "")) for t in page["tasks"]]
    if page["total"] == 1 and found:
        return str(found[0][0])
    if not found:
        raise click.ClickException(f"no {kind} id starts with {text}; `propeller {kind}s list` shows the {kind}s")
    more = f"\n  ... and {page['total'] - len(found)} more" if page["total"] > len(found) else ""
    raise click.ClickException(f"{text} matches {page['total']} {kind}s; give more of the id:\n  "
                               + "\n  ".join(f"{i}  {name}  {state}" for i, name, state in found) + more)


@main.group()
def tasks() -> None:
    """Create, start, stop and inspect tasks on a running manager.

    TASK_ID may be a task's whole id or a unique start of it, at least 4 hex digits (the console
    shows 8).
    """


@tasks.command("create")
@click.argument("name")
@click.option("--wasm", "source", required=True,
              help="The module: a local .wasm file (or .wat text, compiled here), an http(s):// URL, or "
                   "an OCI reference.")
@click.option("--digest", "wasm_digest",
              help="With a URL or an OCI reference: the module's sha256:<hex> (wasm_digest). Proplets run "
                   "only those exact bytes; those with PROPLET_TRUSTED_KEYS need it.")
@click.option("--input", "-i", "inputs", multiple=True, help="An argument (repeat for several).")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE for the guest (repeat for several).")
@click.option("--arg", "cli_args", multiple=True, help="A runtime CLI argument (repeat).")
@click.option("--proplet", "proplet_id", help="Pin the task to this proplet.")
@click.option("--broadcast", is_flag=True, help="Run on every live proplet.")
@click.option("--priority", type=click.IntRange(0, 100), help="0..100, higher first (default 50).")
@click.option("--timeout", type=float, help="Wall-clock limit in seconds.")
@click.option("--fuel", type=int, help="Instruction budget.")
@click.option("--memory", type=int, help="Largest linear memory in bytes.")
@click.option("--retries", type=int, default=0, help="Retries when its proplet goes offline.")
@click.option("--daemon", is_flag=True, help="A long-running task.")
@click.option("--latent", is_flag=True,
              help="Deploy it when started, then call it as often as needed with `tasks invoke` (a function).")
@click.option("--schedule", help="Start it at the times of this cron expression ('*/15 * * * *', @daily).")
@click.option("--recurring", is_flag=True, help="With --schedule: every time, not only the next one.")
@click.option("--timezone", help="With --schedule: the IANA zone it is read in (default UTC).")
@click.option("--start", "start_now", is_flag=True, help="Start it right away.")
@click.option("--wait", "wait_s", type=float, help="With --start: wait up to N seconds for the result.")
@_client_options
def tasks_create(name: str, source: str, inputs: tuple[str, ...], env: tuple[str, ...],
                 cli_args: tuple[str, ...], proplet_id: str | None, broadcast: bool, priority: int | None,
                 timeout: float | None, fuel: int | None, memory: int | None, retries: int, daemon: bool,
                 latent: bool, schedule: str | None, recurring: bool, timezone: str | None,
                 start_now: bool, wait_s: float | None, manager_url: str, token: str | None, as_json: bool,
                 wasm_digest: str | None) -> None:
    """Create a task that calls export NAME of a module.

    \b
    Exit codes (with --start --wait N):
      0  the task completed (a --daemon task: it is running; the wait ends once it reports, as a
         wasi:http daemon reports its port; a --latent task: it is deployed, ready for `tasks invoke`)
      1  the manager refused a request or could not be reached
      2  a usage error in the command line
      3  the task had not finished after N seconds (it goes on: `propeller tasks get ID`)
      4  the task failed, was skipped or was interrupted (its error goes to stderr)
      130  interrupted by Ctrl-C while waiting (the task goes on; its id goes to stderr)
    """
    if (recurring or timezone) and not schedule:
        raise click.UsageError("--recurring and --timezone go with --schedule (the cron expression they apply to)")
    if wait_s and not start_now:
        raise click.UsageError("--wait goes with --start (a task that is not started has no result to wait for)")
    if latent and (daemon or schedule):
        raise click.UsageError("--latent goes with neither --daemon nor --schedule: a latent task is deployed "
                               "once and then called with `propeller tasks invoke`")
    body: dict[str, Any] = {"name": name, "inputs": list(inputs), "daemon": daemon, "broadcast": broadcast,
                            "max_retries": retries}
    if latent:
        body["latent"] = True
    from propeller.client import module_fields

    body.update(_run(lambda: module_fields(source)))
    if wasm_digest:
        if "image_url" not in body:
            raise click.UsageError("--digest goes with an http(s) URL or an OCI reference (a local file's digest "
                                   "is taken from its bytes)")
        body["wasm_digest"] = wasm_digest
    if env:
        body["env"] = _env_pairs(env)
    if cli_args:
        body["cli_args"] = list(cli_args)
    if proplet_id:
        body["proplet_id"] = proplet_id
    if priority is not None:
        body["priority"] = priority
    limits = {k: v for k, v in {"timeout_s": timeout, "fuel": fuel, "memory_bytes": memory}.items() if v}
    if limits:
        body["limits"] = limits
    if schedule:
        body.update(schedule=schedule, is_recurring=recurring, timezone=timezone or "")
    with ManagerClient(manager_url, token) as client:
        task = _run(lambda: client.create_task(body))
        if start_now:
            _run(lambda: client.start_task(task["id"]))
            if wait_s:
                task = _wait_for(client, task["id"], wait_s)
            else:
                task = _run(lambda: client.get_task(task["id"]))
    _show(task, as_json, _task_detail)
    if wait_s:
        _exit_for_outcome(task, wait_s)


# `tasks create|start --wait`: how a script tells the outcome (documented in `tasks create --help`).
# 1 is click's ClickException (an API error) and 2 its usage error, so the task's outcomes come after.
EXIT_NOT_FINISHED = 3
EXIT_TASK_FAILED = 4
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT
_FINISHED = frozenset(state.label for state in TaskState if state.is_terminal)


def _wait_for(client: ManagerClient, task_id: str, wait_s: float) -> dict[str, Any]:
    """The task once it has finished, or once a daemon is up (running, and what it reported, such
    as the port a wasi:http daemon serves, is in), or as it is after `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    try:
        while True:
            task = _run(lambda: client.get_task(task_id))
            if task["state_name"] in _FINISHED or _is_up(task) or time.monotonic() > deadline:
                return task
            time.sleep(0.05)
    except KeyboardInterrupt:
        # Ctrl-C ends the wait, not the task: name it, or it runs on with no id to follow it by.
        click.echo(f"\nstopped waiting; task {task_id} was started and goes on. Follow it with "
                   f"`propeller tasks get {task_id}`, stop it with `propeller tasks stop {task_id}`.", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


def _is_up(task: dict[str, Any]) -> bool:
    """A daemon that runs and has reported, or a latent task deployed (its proplet confirmed it)."""
    if task["state_name"] != "running":
        return False
    return bool(task.get("latent")) or (bool(task.get("daemon")) and task.get("results") not in (None, ""))


def _env_pairs(env: tuple[str, ...]) -> dict[str, str]:
    pairs = [e.partition("=") for e in env]
    if any(not sep for _, sep, _ in pairs):
        raise click.BadParameter("use KEY=VALUE", param_hint="--env")
    return {k: v for k, _, v in pairs}


def _exit_for_outcome(task: dict[str, Any], wait_s: float) -> None:
    """After a wait: a task that did not complete is said on stderr and ends the command non-zero.
    A daemon or a latent task is not meant to finish: running at the end of the wait, it is what was
    asked for."""
    state, tid = task["state_name"], task["id"]
    if state == "completed" or ((task.get("daemon") or task.get("latent")) and state == "running"):
        return
    if state in _FINISHED:
        reason = task.get("error") or task.get("reason") or "no error was given"
        click.echo(f"task {tid} {state}: {reason}", err=True)
        raise SystemExit(EXIT_TASK_FAILED)
    click.echo(f"task {tid} is {state}, not finished after {wait_s:g}s; it goes on: follow it with "
               f"`propeller tasks get {tid}`", err=True)
    raise SystemExit(EXIT_NOT_FINISHED)


@tasks.command("start")
@click.argument("task_id")
@click.option("--wait", "wait_s", type=float, help="Wait up to N seconds for the result.")
@_client_options
def tasks_start(task_id: str, wait_s: float | None, manager_url: str, token: str | None, as_json: bool) -> None:
    """Start (or re-run) a task. With --wait, the exit codes are those of `tasks create --help`."""
    with ManagerClient(manager_url, token) as client:
        task_id = _full_id(client, task_id, "task")
        _run(lambda: client.start_task(task_id))
        task = _wait_for(client, task_id, wait_s) if wait_s else _run(lambda: client.get_task(task_id))
    _show(task, as_json, _task_detail)
    if wait_s:
        _exit_for_outcome(task, wait_s)


@tasks.command("invoke")
@click.argument("task_id")
@click.option("--input", "-i", "inputs", multiple=True,
              help="An argument (repeat for several); none: the task's own inputs.")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE for this call, over the task's env (repeat).")
@_client_options
def tasks_invoke(task_id: str, inputs: tuple[str, ...], env: tuple[str, ...], manager_url: str, token: str | None,
                 as_json: bool) -> None:
    """Call a deployed latent task (`tasks create --latent --start`) and print its result.

    Each call runs once, on the task's proplet (a --broadcast task: on one of its proplets, in
    turn). The manager waits 30 s, or the task's --timeout and 5 s.

    \b
    Exit codes:
      0  the call returned; its result is printed
      1  the manager refused the call (not a latent task, not deployed) or could not be reached
      3  no answer within the wait
      4  the call failed on the proplet (a trap, a limit, wrong inputs); the error goes to stderr
    """
    from propeller.client import ApiError

    with ManagerClient(manager_url, token) as client:
        task_id = _full_id(client, task_id, "task")
        limit = (_run(lambda: client.get_task(task_id)).get("limits") or {}).get("timeout_s")
        try:
            data = client.invoke(task_id, list(inputs), _env_pairs(env), invocation_wait_s(limit))
        except ApiError as exc:
            outcome = {502: EXIT_TASK_FAILED, 504: EXIT_NOT_FINISHED}.get(exc.status or 0)
            if outcome is None:
                raise click.ClickException(str(exc)) from None
            click.echo(str(exc).split(": ", 1)[-1], err=True)
            raise SystemExit(outcome) from None
    _show(data, as_json, lambda d: click.echo(d.get("results") if d.get("results") is not None else ""))


@tasks.command("stop")
@click.argument("task_id")
@_client_options
def tasks_stop(task_id: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Stop a queued or running task."""
    with ManagerClient(manager_url, token) as client:
        task_id = _full_id(client, task_id, "task")
        data = _run(lambda: client.stop_task(task_id))
    _show(data, as_json, lambda d: click.echo(f"stopped {task_id}"))


@tasks.command("get")
@click.argument("task_id")
@click.option("--events", "with_events", is_flag=True, help="Also show the lifecycle timeline.")
@_client_options
def tasks_get(task_id: str, with_events: bool, manager_url: str, token: str | None, as_json: bool) -> None:
    """Show one task."""
    with ManagerClient(manager_url, token) as client:
        task_id = _full_id(client, task_id, "task")
        task = _run(lambda: client.get_task(task_id))
        events = _run(lambda: client.events(task_id))["events"] if with_events else None
    if as_json:
        click.echo(json.dumps({**task, "events": events} if events is not None else task, indent=2))
        return
    _task_detail(task)
    if events:
        _table(["TIME", "STATE", "PROPLET", "DETAIL"],
               [[_short_time(e["at"]), e["state_name"], e["proplet_id"], e["detail"]] for e in events])


@tasks.command("list")
@click.option("--state", help="Comma-separated states, e.g. running,pending.")
@click.option("--limit", type=click.IntRange(1, 100), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@_client_options
def tasks_list(state: str | None, limit: int, offset: int, manager_url: str, token: str | None,
               as_json: bool) -> None:
    """List tasks, newest first."""
    _fetch_and_show(manager_url, token, as_json, lambda client: client.list_tasks(offset, limit, state),
                    lambda d: (_task_rows(d["tasks"]), click.echo(f"{len(d['tasks'])} of {d['total']} tasks")))


@tasks.command("results")
@click.argument("task_id")
@_client_options
def tasks_results(task_id: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Print a task's result. Exits 0 if it completed, 4 if it failed, was skipped or was interrupted
    (its error goes to stderr), 3 if it has not finished (nothing is printed)."""
    with ManagerClient(manager_url, token) as client:
        task_id = _full_id(client, task_id, "task")
        data = _run(lambda: client.results(task_id))
    try:
        state: TaskState | None = TaskState(data.get("state"))
    except ValueError:
        state = None  # a manager that does not say: print what it answered

    def render(d: dict[str, Any]) -> None:
        results = d.get("results")
        if results not in (None, ""):
            click.echo(results if isinstance(results, str) else json.dumps(results))
    if state is not None and not state.is_terminal:
        if as_json:
            _show(data, as_json, render)
        click.echo(f"task {task_id} has no result yet: it is {state.label}. Follow it with "
                   f"`propeller tasks get {task_id}`.", err=True)
        raise SystemExit(EXIT_NOT_FINISHED)
    _show(data, as_json, render)
    if state is not None and state is not TaskState.COMPLETED:
        click.echo(f"task {task_id} {state.label}: {data.get('error') or 'no error given'}", err=True)
        raise SystemExit(EXIT_TASK_FAILED)


@tasks.command("delete")
@click.argument("task_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_client_options
def tasks_delete(task_id: str, yes: bool, manager_url: str, token: str | None, as_json: bool) -> None:
    """Delete a task (a running one is stopped first)."""
    with ManagerClient(manager_url, token) as client:
        task_id = _full_id(client, task_id, "task")
        if not yes:
            click.confirm(f"Delete task {task_id}?", abort=True)
        _run(lambda: client.delete_task(task_id))
    _show({"deleted": task_id}, as_json, lambda d: click.echo(f"deleted {task_id}"))


def _group_body(path: str) -> dict[str, Any]:
    """A workflow or job body from a JSON file; a task's `wasm` (a local .wasm or .wat, an http(s)
    URL or an OCI reference) becomes its `file` or `image_url`, as in `tasks create --wasm`."""
    from propeller.client import module_fields

    body = _json_file(path)
    if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
        raise click.BadParameter(f'{path} must hold a JSON object with a "tasks" list')
    folder = _folder_of(path)
    for task in body["tasks"]:
        if isinstance(task, dict) and "wasm" in task:
            task.update(_run(lambda t=task: module_fields(str(t.pop("wasm")), folder)))
    return body


def _folder_of(path: str) -> Path:
    """Where a JSON file's relative `wasm` paths are read from: the file's own folder (as
    docker-compose reads its paths), so the file works from any current directory."""
    return Path(path).expanduser().resolve().parent


def _group_detail(g: dict[str, Any]) -> None:
    head = [["job" if "job_id" in g else "workflow", g.get("job_id") or g.get("workflow_id")],
            ["state", g["state_name"]]]
    if g.get("name"):
        head.append(["name", g["name"]])
    if g.get("execution_mode"):
        head.append(["mode", g["execution_mode"]])
    _table(["FIELD", "VALUE"], head)
    _task_rows(g["tasks"])


@main.group()
def workflows() -> None:
    """Create and inspect workflows: tasks that wait for each other (depends_on, run_if)."""


@workflows.command("create")
@click.argument("file", type=click.Path(dir_okay=False))
@_client_options
def workflows_create(file: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Create a workflow from FILE: {"tasks": [{"id": <uuid>, "name", "wasm", "inputs", "depends_on",
    "run_if"}, ...]}. Nothing starts: start its first tasks with `tasks start`. A relative "wasm" path
    is read from FILE's folder."""
    body = _group_body(file)
    _fetch_and_show(manager_url, token, as_json, lambda client: client.create_workflow(body), _group_detail)


@workflows.command("get")
@click.argument("workflow_id")
@_client_options
def workflows_get(workflow_id: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Show a workflow's state and tasks."""
    _fetch_and_show(manager_url, token, as_json, lambda client: client.get_workflow(workflow_id), _group_detail)


@main.group()
def jobs() -> None:
    """Create, start, stop and inspect jobs: named groups of tasks run together.

    JOB_ID may be a job's whole id or a unique start of it, at least 4 hex digits.
    """


@jobs.command("create")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--start", "start_now", is_flag=True, help="Start it right away.")
@_client_options
def jobs_create(file: str, start_now: bool, manager_url: str, token: str | None, as_json: bool) -> None:
    """Create a job from FILE: {"name", "execution_mode": parallel|sequential|configurable, "tasks":
    [{"name", "wasm", "inputs", ...}, ...]}. A relative "wasm" path is read from FILE's folder."""
    body = _group_body(file)
    with ManagerClient(manager_url, token) as client:
        data = _run(lambda: client.create_job(body))
        if start_now:
            _run(lambda: client.start_job(data["job_id"]))
            data = _run(lambda: client.get_job(data["job_id"]))
    _show(data, as_json, _group_detail)


@jobs.command("list")
@click.option("--status", type=click.Choice(["pending", "running", "completed", "failed"]))
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@_client_options
def jobs_list(status: str | None, limit: int, offset: int, manager_url: str, token: str | None,
              as_json: bool) -> None:
    """List jobs, newest first."""
    _fetch_and_show(manager_url, token, as_json, lambda client: client.list_jobs(offset, limit, status), lambda d: (
        _table(["ID", "NAME", "MODE", "STATE", "TASKS", "CREATED"], [
            [j["job_id"], j["name"], j["execution_mode"], j["state_name"], len(j["tasks"]),
             _short_time(j["created_at"])] for j in d["jobs"]]),
        click.echo(f"{len(d['jobs'])} of {d['total']} jobs")))


def _show_job(job_id: str, manager_url: str, token: str | None, as_json: bool,
              action: Callable[[Any, str], Any] | None = None) -> None:
    """Run `action` on the job (the client and its whole id), if any, then show the job as it is."""
    with ManagerClient(manager_url, token) as client:
        full_id = _full_id(client, job_id, "job")

        def fetch() -> Any:
            if action is not None:
                action(client, full_id)
            return client.get_job(full_id)

        data = _run(fetch)
    _show(data, as_json, _group_detail)


@jobs.command("get")
@click.argument("job_id")
@_client_options
def jobs_get(job_id: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Show a job's state and tasks."""
    _show_job(job_id, manager_url, token, as_json)


@jobs.command("start")
@click.argument("job_id")
@_client_options
def jobs_start(job_id: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Start a job; one that completed, failed or was stopped runs again from the start."""
    _show_job(job_id, manager_url, token, as_json, lambda client, full_id: client.start_job(full_id))


@jobs.command("stop")
@click.argument("job_id")
@_client_options
def jobs_stop(job_id: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Stop a job: its queued and running tasks are stopped, the rest skipped."""
    _show_job(job_id, manager_url, token, as_json, lambda client, full_id: client.stop_job(full_id))


@main.group("fl")
def federated() -> None:
    """Federated learning: training rounds on chosen proplets, averaged into models."""


@federated.command("start")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--wait", is_flag=True, help="Wait until the round ends, then show it.")
@_client_options
def fl_start(file: str, wait: bool, manager_url: str, token: str | None, as_json: bool) -> None:
    """Start a round from FILE: {"round_id", "model_ref": "global_model_v0", "participants": [proplet
    ids], "hyperparams": {...}, "k_of_n", "timeout_s", "wasm": <.wasm path, http(s) URL or OCI
    reference; a relative path is read from FILE's folder>}. Each participant that is online runs the
    module with ROUND_ID, MODEL_URI, MODEL_DATA and HYPERPARAMS in its env and prints its update as JSON.

    With --wait it exits 0 once the round made a model, 4 if the round failed (why goes to stderr),
    1 if the manager refused the round or could not be reached, 130 when Ctrl-C ends the wait (the
    round goes on)."""
    from propeller.client import module_fields

    body = _json_file(file)
    if not isinstance(body, dict):
        raise click.BadParameter(f"{file} must hold a JSON object")
    if "wasm" in body:
        fields = _run(lambda: module_fields(str(body.pop("wasm")), _folder_of(file)))
        body["task_wasm_file" if "file" in fields else "task_wasm_image"] = fields.get("file") or fields["image_url"]
    with ManagerClient(manager_url, token) as client:
        data = _run(lambda: client.start_experiment(body))
        if wait:
            try:
                while (status := _run(lambda: client.round_status(data["round_id"]))["status"])["state"] == "running":
                    time.sleep(0.5)
            except KeyboardInterrupt:
                # Ctrl-C ends the wait, not the round: name it, as `tasks create --wait` names its task.
                round_id = data["round_id"]
                click.echo(f"\nstopped waiting; round {round_id} was started and goes on. Follow it with "
                           f"`propeller fl status {round_id}`.", err=True)
                raise SystemExit(EXIT_INTERRUPTED) from None
            data = status
    _show(data, as_json, _round_detail if wait else lambda d: _table(["FIELD", "VALUE"], [
        [k, ", ".join(v) if isinstance(v, list) else v] for k, v in d.items()]))
    if wait and data.get("state") == "failed":
        click.echo(f"round {data.get('round_id')} failed: {data.get('reason') or 'no reason given'}", err=True)
        raise SystemExit(EXIT_TASK_FAILED)


def _round_detail(r: dict[str, Any]) -> None:
    _table(["FIELD", "VALUE"], [[k, r.get(k)] for k in (
        "round_id", "state", "reason", "k_of_n", "num_updates", "model_ref", "model_uri", "created_at",
        "completed_at") if r.get(k) not in (None, "")] + [["started", ", ".join(r.get("started", []))]])
    _table(["PROPLET", "SAMPLES", "VIA", "METRICS", "RECEIVED"], [
        [u["proplet_id"], u["num_samples"], u["source"], json.dumps(u["metrics"]), _short_time(u["received_at"])]
        for u in r.get("updates", [])])


@federated.command("status")
@click.argument("round_id")
@_client_options
def fl_status(round_id: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Show a round: its state, the updates it has and the model it made."""
    _fetch_and_show(manager_url, token, as_json, lambda client: client.round_status(round_id),
                    lambda d: _round_detail(d["status"]))


@federated.command("rounds")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@_client_options
def fl_rounds(limit: int, offset: int, manager_url: str, token: str | None, as_json: bool) -> None:
    """List rounds, newest first."""
    _fetch_and_show(manager_url, token, as_json, lambda client: client.list_rounds(offset, limit), lambda d: (
        _table(["ROUND", "STATE", "UPDATES", "MODEL", "FROM", "CREATED"], [
            [r["round_id"], r["state"], f"{r['num_updates']}/{r['k_of_n']}", r["model_uri"], r["model_ref"],
             _short_time(r["created_at"])] for r in d["rounds"]]),
        click.echo(f"{len(d['rounds'])} of {d['total']} rounds")))


@federated.command("model")
@click.argument("version", type=click.IntRange(0), required=False)
@_client_options
def fl_model(version: int | None, manager_url: str, token: str | None, as_json: bool) -> None:
    """Print model VERSION's weights as JSON; without VERSION, list the models."""
    with ManagerClient(manager_url, token) as client:
        if version is not None:
            click.echo(json.dumps(_run(lambda: client.get_model(version)), indent=None if as_json else 2))
            return
        data = _run(lambda: client.list_models())
    _show(data, as_json, lambda d: _table(["VERSION", "URI", "ROUND", "CREATED"], [
        [m["version"], m["model_uri"], m["round_id"], _short_time(m["created_at"])] for m in d["models"]]))


@main.group()
def proplets() -> None:
    """Inspect the proplets a running manager knows."""


@proplets.command("list")
@click.option("--status", type=click.Choice(["active", "inactive"]))
@_client_options
def proplets_list(status: str | None, manager_url: str, token: str | None, as_json: bool) -> None:
    """List proplets."""
    _fetch_and_show(manager_url, token, as_json, lambda client: client.list_proplets(status), lambda d: _table(
        ["ID", "NAME", "ALIVE", "TASKS", "LAST HEARTBEAT", "RUNTIME", "OS/ARCH"],
        [[p["id"], p["name"], "yes" if p["alive"] else "no", p["task_count"],
          _short_time(p.get("last_alive_at")), _runtime_name(p["metadata"].get("wasm_runtime", "")),
          f"{p['metadata'].get('os', '')}/{p['metadata'].get('cpu_arch', '')}".strip("/")]
         for p in d["proplets"]]))


def _runtime_name(runtime: Any) -> str:
    """A proplet's runtime for a table: an external runtime is announced by its path (upstream's
    field), which made the table as wide as the path; `proplets get` shows it whole."""
    text = str(runtime or "")
    return f"{Path(text).name} (external)" if "/" in text else text


@proplets.command("get")
@click.argument("proplet_id")
@_client_options
def proplets_get(proplet_id: str, manager_url: str, token: str | None, as_json: bool) -> None:
    """Show one proplet, and what limits the tasks the manager sends it (`takes`)."""
    _fetch_and_show(manager_url, token, as_json, lambda client: client.get_proplet(proplet_id),
                    lambda p: _table(["FIELD", "VALUE"], [
        *([k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in p.items()),
        *([["takes", takes]] if (takes := _takes(p)) else [])]))


def _takes(proplet: dict[str, Any]) -> str:
    """What the manager sends the proplet no more of, by what it announced (core.domain.Proplet.takes)."""
    metadata = proplet.get("metadata")
    return Proplet(id=str(proplet.get("id", "")), metadata=metadata if isinstance(metadata, dict) else {}).takes


@main.group()
def keys() -> None:
    """Signing keys for module digests (MANAGER_SIGNING_KEY / PROPLET_TRUSTED_KEYS)."""


@keys.command("generate")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where to write the key pair.")
@click.option("--name", default="propeller-signing", show_default=True)
@click.option("--force", is_flag=True, help="Replace a key pair of that name that is already there.")
def keys_generate(directory: Path, name: str, force: bool) -> None:
    """Write an Ed25519 key pair: NAME.pem for the manager, NAME.pub.pem for the proplets. An existing
    pair is kept unless --force is given (proplets that trust its public key would refuse the new one's
    signatures)."""
    from core.signing import generate_keypair

    existing = [p for p in (directory / f"{name}.pem", directory / f"{name}.pub.pem") if p.exists()]
    if existing and not force:
        raise click.ClickException(f"{', '.join(map(str, existing))} already there: keeping it. Pass --force to "
                                   "replace it, or --name/--dir for another pair.")
    private, public = generate_keypair(directory, name)
    click.echo(f"private key (manager, keep secret): {private}\n  MANAGER_SIGNING_KEY={private.resolve()}")
    click.echo(f"public key (proplets):              {public}\n  PROPLET_TRUSTED_KEYS={public.resolve()}")


# ---- push ------------------------------------------------------------------------------------


@main.command()
@click.argument("module", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("reference")
@click.option("--insecure", is_flag=True,
              help="Plain HTTP to the registry (one on a loopback address gets plain HTTP unless --ca-cert "
                   "is given).")
@click.option("--username", "-u", envvar="PROPELLER_REGISTRY_USERNAME",
              help="Registry user (PROPELLER_REGISTRY_USERNAME). Without one, ~/.docker/config.json's "
                   "entry for the registry is used, if any (docker login).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--registry-token", envvar="PROPELLER_REGISTRY_TOKEN",
              help="Bearer token, when no user is given (PROPELLER_REGISTRY_TOKEN).")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), envvar="PROPELLER_REGISTRY_CA_CERT",
              help="PEM file of the CA that signed the registry's certificate (a private registry's own CA; "
                   "PROPELLER_REGISTRY_CA_CERT). Default: the system's CAs.")
@click.option("--annotation", "-a", "annotations", multiple=True,
              help="KEY=VALUE added to the manifest's annotations (repeat for several).")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the registry to connect or answer each request.")
@click.option("--json", "as_json", is_flag=True, help="Print what was pushed as JSON.")
def push(module: Path, reference: str, insecure: bool, username: str | None, password_stdin: bool,
         registry_token: str | None, ca_cert: str | None, annotations: tuple[str, ...], timeout: float,
         as_json: bool) -> None:
    """Push MODULE (a .wasm file, or .wat text compiled here) to an OCI registry as REFERENCE
    (host[:port]/repository[:tag], tag `latest` when none), where proplets fetch it by that
    reference through the proxy (`propeller proxy`).

    The artifact is the CNCF wasm OCI layout that `oras push … app.wasm:application/wasm` makes:
    one application/wasm layer and a wasm config (os wasip1 for a core module, wasip2 for a
    component). A module wasmtime rejects is not pushed. The password comes from
    PROPELLER_REGISTRY_PASSWORD or, with --password-stdin, from stdin.

    Prints the reference, the manifest's digest (the reference pinned to this very artifact) and
    the module's sha256, which `tasks create --digest` takes so that proplets run only these bytes.

    \b
    Exit codes:
      0  pushed
      1  the registry could not be reached or refused the module
      2  a usage error: a file that is not a module, a reference that is not a name to push to
    """
    from console.modules import FieldError, module_bytes
    from propeller.oci import BadReference, NotAModule, PushError, push_module

    try:
        data = module_bytes(module)
    except FieldError as exc:
        raise click.UsageError(str(exc)) from None
    pairs = [a.partition("=") for a in annotations]
    if any(not sep or not key for key, sep, _ in pairs):
        raise click.BadParameter("use KEY=VALUE", param_hint="--annotation")
    password = ""
    if password_stdin:
        password = click.get_text_stream("stdin").read().rstrip("\r\n")
    elif username:
        password = os.environ.get("PROPELLER_REGISTRY_PASSWORD", "")
    if password_stdin and not username:
        raise click.UsageError("--password-stdin goes with --username")
    filename = module.name if module.suffix == ".wasm" else f"{module.stem}.wasm"
    try:
        pushed = push_module(data, filename, reference, insecure=insecure, username=username or "",
                             password=password, token=registry_token or "", timeout=timeout, ca_cert=ca_cert,
                             annotations={k: v for k, _, v in pairs})
    except NotAModule as exc:
        raise click.UsageError(f"{module}: {exc}; nothing was pushed") from None
    except BadReference as exc:
        raise click.UsageError(str(exc)) from None
    except PushError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(pushed), indent=2))
        return
    click.echo(f"pushed   {pushed.reference} ({pushed.kind}, {pushed.size:,} bytes)")
    click.echo(f"pinned   {pushed.pinned}")
    click.echo(f"module   {pushed.module_digest}")
    name = pushed.exports[0] if len(pushed.exports) == 1 else "<export>"
    if len(pushed.exports) > 1:
        click.echo(f"exports  {', '.join(pushed.exports)}")
    click.echo(f"run it:  propeller tasks create {name} --wasm {pushed.reference} --digest {pushed.module_digest}")
