"""The console's plain-Python parts: filters, the fleet and traffic buffers and their bounds, payload
summaries, form parsing, theme files, the local proplet command template, the example modules."""

from __future__ import annotations

import base64
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import wasmtime

from console.filtering import RowFilter
from console.fleet import (
    FleetState,
    PropletRow,
    RateSeries,
    TrafficEntry,
    TrafficState,
    pretty_payload,
    summarise_payload,
)
from console.local import LaunchError, LocalFleet
from console.modules import DispatchForm, FormErrors, ModuleSource, build_body, errors_by_field, split_inputs
from console.themes import ThemeFileError, load_themes, theme_from_mapping
from core.domain import Proplet, Task, TaskDeleted, TaskState, TaskStateChanged
from core.mqtt import TrafficRecord
from tests.console.conftest import EXAMPLES

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


# -- examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(EXAMPLES.glob("*.wat")), ids=lambda p: p.name)
def test_each_checked_in_example_wasm_is_its_wat_compiled(source: Path) -> None:
    compiled = source.with_suffix(".wasm")
    assert compiled.is_file(), f"{compiled.name} is missing: compile {source.name} with wasmtime.wat2wasm"
    assert compiled.read_bytes() == wasmtime.wat2wasm(source.read_text()), (
        f"{compiled.name} is stale: regenerate it from {source.name} with wasmtime.wat2wasm")


def test_the_examples_do_what_their_comments_say() -> None:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    add = wasmtime.Instance(store, wasmtime.Module.from_file(engine, str(EXAMPLES / "add.wasm")), [])
    assert add.exports(store)["add"](store, 40, 2) == 42
    out = subprocess.run([sys.executable, "-c", (
        "import wasmtime, sys\n"
        "e = wasmtime.Engine(); s = wasmtime.Store(e); c = wasmtime.WasiConfig(); c.inherit_stdout(); s.set_wasi(c)\n"
        "l = wasmtime.Linker(e); l.define_wasi()\n"
        f"i = l.instantiate(s, wasmtime.Module.from_file(e, {str(EXAMPLES / 'hello.wasm')!r}))\n"
        "i.exports(s)['_start'](s)\n")], capture_output=True, text=True, timeout=60)
    assert out.stdout == "Hello from Propeller!\n", out.stderr


# -- filters ----------------------------------------------------------------------------------


def test_row_filter_regex_inversion_literal_and_per_field_anchors() -> None:
    assert RowFilter.parse("").matches(("anything",))
    f = RowFilter.parse("^al")
    assert f.matches(("7f3c", "x", "alpha")) and not f.matches(("7f3c", "in alpha"))
    assert f.matches(("7f3c", "alpha")) and not f.matches(("7f3c", "beta"))
    inv = RowFilter.parse("!^al")
    assert inv.invert and inv.matches(("7f3c", "beta")) and not inv.matches(("7f3c", "alpha"))
    literal = RowFilter.parse("(gam")
    assert literal.literal and literal.matches(("x(gamma",)) and not literal.matches(("gamma",))
    assert RowFilter.parse("ALPHA").matches(("alpha",))  # case-insensitive
    assert "not matching /^al/" == inv.describe()


# -- fleet ------------------------------------------------------------------------------------


def _task(task_id: str, name: str = "add", state: TaskState = TaskState.PENDING, at: datetime = T0) -> Task:
    return Task(id=task_id, name=name, state=state, created_at=at, updated_at=at)


def test_fleet_applies_events_into_latest_state_and_tells_each_view() -> None:
    fleet = FleetState(max_tasks=10)
    fleet.load_tasks([_task("a")])
    table_dirty = fleet.watch_tasks()
    other_dirty = fleet.watch_tasks()
    table_dirty.clear()
    other_dirty.clear()
    events = [
        TaskStateChanged("a", "add", TaskState.PENDING, TaskState.PENDING, T0, "", "queued"),
        TaskStateChanged("a", "add", TaskState.PENDING, TaskState.RUNNING, T0 + timedelta(seconds=1), "p1", "x"),
        TaskStateChanged("a", "add", TaskState.RUNNING, TaskState.FAILED, T0 + timedelta(seconds=3), "p1", "x"),
    ]
    fleet.apply_events(events, now=1000.0)
    row = fleet.tasks["a"]
    assert row.state is TaskState.FAILED and row.proplet_id == "p1" and row.duration == 2.0
    assert table_dirty == {"a"} and other_dirty == {"a"}
    assert "a" in fleet.to_fetch  # results and error come from the core
    assert [f.task_id for f in fleet.recent_failures()] == ["a"]
    fleet.apply_events([TaskDeleted("a")], now=1000.0)
    assert "a" not in fleet.tasks and "a" not in fleet.to_fetch
    fleet.unwatch_tasks(other_dirty)
    fleet.apply_events([TaskStateChanged("b", "x", TaskState.PENDING, TaskState.PENDING, T0, "", "created")], 1.0)
    assert "b" in table_dirty and "b" not in other_dirty


def test_fleet_is_bounded_and_evicts_finished_tasks_first() -> None:
    fleet = FleetState(max_tasks=3)
    fleet.load_tasks([_task("done", state=TaskState.COMPLETED), _task("run", state=TaskState.RUNNING)])
    for i in range(3):
        fleet.apply_events([TaskStateChanged(f"n{i}", "x", TaskState.PENDING, TaskState.PENDING, T0, "", "created")],
                           now=1.0)
    assert len(fleet.tasks) == 3
    assert "done" not in fleet.tasks  # the finished one went first


def test_rate_series_counts_per_second_over_a_bounded_window() -> None:
    rate = RateSeries(seconds=5)
    for _ in range(3):
        rate.add(100.2)
    rate.add(101.5)
    rate.add(200.0)  # much later: the window slides
    assert rate.values(103.0)[-3:] == [3.0, 1.0, 0.0]
    assert rate.values(201.0) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert rate.total == 5 and len(rate._buckets) <= 5


# -- traffic ----------------------------------------------------------------------------------


def _record(topic: str, payload: bytes, direction: str = "in", at: float = 1000.0) -> TrafficRecord:
    return TrafficRecord(at, direction, topic, len(payload), payload, 1)  # type: ignore[arg-type]


def test_traffic_buffer_is_bounded_counts_topics_and_hands_out_what_is_new() -> None:
    traffic = TrafficState(max_entries=5, topic_history=2, prefix="m/t/c/d/")
    traffic.ingest([_record(f"m/t/c/d/control/proplet/{'alive' if i % 2 else 'results'}", b"{}") for i in range(8)],
                   dropped_total=3)
    assert len(traffic.entries) == 5 and traffic.seq == 8 and traffic.dropped == 3
    assert traffic.counts == {"m/t/c/d/control/proplet/results": 4, "m/t/c/d/control/proplet/alive": 4}
    assert all(len(h) == 2 for h in traffic.history.values())
    assert [e.seq for e in traffic.since(6)] == [7, 8]
    assert [e.seq for e in traffic.since(0)] == [4, 5, 6, 7, 8]  # what fell out is gone
    assert traffic.since(8) == []
    line = traffic.format_line(traffic.entries[-1])
    assert "← in " in line and " control/proplet/alive " in line and "m/t/c/d" not in line


def test_module_bytes_and_chunk_data_are_summarised_never_dumped() -> None:
    module = base64.b64encode(b"\0asm" + bytes(range(256)) * 4).decode()
    start = orjson.dumps({"id": "t1", "name": "add", "file": module, "inputs": ["40", "2"]})
    entry = TrafficEntry(1, 0.0, "out", "m/x/control/manager/start", len(start), 1, start)
    text = pretty_payload(entry)
    assert '"name": "add"' in text and "<base64: 1,028 bytes, not shown>" in text and module[:20] not in text
    chunk = orjson.dumps({"app_name": "blob:sha256:ab", "chunk_idx": 0, "total_chunks": 3,
                          "data": base64.b64encode(b"x" * 600_000).decode()})
    kept, summarised = summarise_payload(chunk, 8000)
    assert summarised and len(kept) < 8000 and b"600,000 bytes" in kept
    big = TrafficEntry(2, 0.0, "in", "m/x/registry/server", len(chunk), 1, kept, summarised)
    assert "summarised: the message was" in pretty_payload(big) and '"chunk_idx": 0' in pretty_payload(big)
    binary = TrafficEntry(3, 0.0, "in", "x", 3, 0, b"\xff\x00\x01")
    assert "(binary, 3 bytes)" in pretty_payload(binary)
    line = TrafficState().format_line(entry)
    assert '"file":"<base64>' in line and module[:20] not in line


# -- dispatch form ----------------------------------------------------------------------------


def test_form_fields_become_a_task_body() -> None:
    module = ModuleSource("file", "add.wasm", (EXAMPLES / "add.wasm").read_bytes(), ("add",))
    body = build_body(DispatchForm(name="add", inputs="40, 2", env="A=1 B=x=y", target="broadcast",
                                   timeout_s="2.5", fuel="1000", memory_mib="16", retries="2", priority="70"),
                      module)
    assert body["inputs"] == ["40", "2"] and body["env"] == {"A": "1", "B": "x=y"} and body["broadcast"] is True
    assert body["limits"] == {"timeout_s": 2.5, "fuel": 1000, "memory_bytes": 16 * 1024 * 1024}
    assert body["max_retries"] == 2 and body["priority"] == 70
    assert base64.b64decode(body["file"]).startswith(b"\0asm")
    url = build_body(DispatchForm(name="add", target="pinned", proplet_id="p1"), ModuleSource("url", "https://x/a.wasm"))
    assert url["image_url"] == "https://x/a.wasm" and url["proplet_id"] == "p1"
    assert split_inputs(" 1  2,3 ") == ["1", "2", "3"]
    with pytest.raises(FormErrors) as missing_name:
        build_body(DispatchForm(), module)
    assert "exports: add" in missing_name.value.errors["name"]
    # Every problem at once, each on its field.
    with pytest.raises(FormErrors) as several:
        build_body(DispatchForm(name="add", fuel="0", env="NOVALUE", retries="x", target="pinned"), module)
    assert set(several.value.errors) == {"fuel", "env", "retries", "proplet"}


def test_core_validation_messages_land_on_their_fields() -> None:
    errors = errors_by_field("limits.fuel: Input should be greater than 0; inputs.0: expected string or number; "
                             "'proplet_id' and 'broadcast' cannot both be set")
    assert "greater than 0" in errors["fuel"] and "expected string" in errors["inputs"]
    assert "cannot both be set" in errors["form"]


# -- themes and local proplets ------------------------------------------------------------------


def test_house_themes_load_and_theme_files_are_checked(tmp_path: Path) -> None:
    loaded = load_themes([])
    names = {t.name for t in loaded.themes}
    assert {"propeller-dark", "propeller-light"} <= names and loaded.problems == []
    light = next(t for t in loaded.themes if t.name == "propeller-light")
    assert light.dark is False and light.primary.startswith("#")
    with pytest.raises(ThemeFileError, match="'primary' is missing"):
        theme_from_mapping({"name": "x"}, "x.yaml")
    with pytest.raises(ThemeFileError, match="not a colour"):
        theme_from_mapping({"name": "x", "primary": "#12"}, "x.yaml")
    (tmp_path / "a.yaml").write_text("- not a mapping\n")
    assert any("a.yaml" in p for p in load_themes([tmp_path]).problems)


def test_console_stylesheet_uses_theme_variables_only() -> None:
    import re

    console_dir = Path(__file__).resolve().parents[2] / "console"
    sources = [console_dir / "app.tcss", *console_dir.rglob("*.py")]
    for source in sources:
        text = source.read_text()
        css = text if source.suffix == ".tcss" else "\n".join(re.findall(r'CSS = """(.*?)"""', text, re.S))
        assert not re.search(r"#[0-9a-fA-F]{3,8}\b", css), f"{source.name} has a hex colour; use a theme variable"


def test_local_proplet_command_template_is_rendered_and_checked(tmp_path: Path) -> None:
    fleet = LocalFleet(command="{python} -m propeller proplet --id {id} --mqtt-address {broker}",
                       env={"PROPLET_MQTT_ADDRESS": "mqtt://127.0.0.1:1883"}, state_root=tmp_path, id_prefix="lp")
    assert fleet.render("lp-1") == [sys.executable, "-m", "propeller", "proplet", "--id", "lp-1",
                                    "--mqtt-address", "mqtt://127.0.0.1:1883"]
    with pytest.raises(LaunchError, match="placeholders"):
        LocalFleet(command="{pyhton} x", env={}, state_root=tmp_path).render("x")


# -- render cadence ---------------------------------------------------------------------------


def test_redraws_stretch_while_the_loop_is_late_and_come_back_when_it_is_on_time() -> None:
    from console.app import MAX_REFRESH_INTERVAL, RenderCadence

    cadence = RenderCadence(0.25)
    now = 100.0
    assert cadence.due(now)
    # On time: every tick redraws.
    for _ in range(4):
        now += 0.25
        assert cadence.due(now)
    # The timer fires a whole interval late each time: the interval doubles up to the ceiling.
    for _ in range(6):
        now += 0.6
        cadence.due(now)
    assert cadence.interval == MAX_REFRESH_INTERVAL
    drawn = 0
    for _ in range(8):  # two seconds of on-time ticks at the stretched interval
        now += 0.25
        drawn += cadence.due(now)
    assert drawn <= 4
    # Back on time for a while: the base interval returns.
    for _ in range(60):
        now += 0.25
        cadence.due(now)
    assert cadence.interval == 0.25


def test_the_round_form_reads_models_participants_and_numbers() -> None:
    from console.rounds import RoundForm, build_experiment

    module = ModuleSource("oci", "registry.lan/fl/client:v1")

    def body(**fields: str) -> dict[str, object]:
        return build_experiment(RoundForm(**fields), module, online=["p1", "p2"], latest_model=4,
                                default_round_id="round-x")

    assert body() == {"round_id": "round-x", "task_wasm_image": "registry.lan/fl/client:v1",
                      "model_ref": "global_model_v4", "participants": ["p1", "p2"]}
    for text in ("3", "v3", "global_model_v3", " 3 "):
        assert body(model=text)["model_ref"] == "global_model_v3"
    assert body(participants="a, b  c,d")["participants"] == ["a", "b", "c", "d"]
    assert body(k_of_n="0", timeout_s="2.5")["k_of_n"] == 0
    with pytest.raises(FormErrors) as caught:
        body(model="²", k_of_n="1.5", timeout_s="0", hyperparams='"lr"')
    assert set(caught.value.errors) == {"model", "k_of_n", "timeout_s", "hyperparams"}


def test_the_managers_refusals_land_on_the_field_they_are_about() -> None:
    from console.rounds import round_errors_by_field

    assert set(round_errors_by_field("round_id: String should have at least 1 character; "
                                     "task_wasm_file: not a WebAssembly module")) == {"round_id", "module"}
    assert set(round_errors_by_field("model version 7 (model_ref 'global_model_v7') is unknown: give a version "
                                     "a round produced")) == {"model"}
    assert round_errors_by_field("round r1 exists; give a new round_id") == {
        "round_id": "round r1 exists; give a new round_id"}
    assert set(round_errors_by_field("none of the participants (x) is online")) == {"participants"}
    assert set(round_errors_by_field("the coordinator answered 502")) == {"form"}


DOC_KEY_NAMES = {"slash": "/", "question_mark": "?", "colon": ":", "escape": "Esc", "backspace": "Backspace",
                 "enter": "Enter", "tab": "Tab"}


def doc_key(key: str) -> str:
    """A binding's key as docs/console.md writes it: `/`, `Esc`, `Ctrl+O`, `F5`, `D`."""
    *modifiers, name = key.split("+")
    name = DOC_KEY_NAMES.get(name, name.upper() if len(name) > 1 or modifiers else name)
    return "+".join([m.capitalize() for m in modifiers] + [name])


def console_bindings() -> dict[str, tuple[str, str]]:
    """Every binding with an id of the console: the app's and those of each view, detail screen and dialog."""
    from textual.binding import Binding
    from textual.screen import Screen

    import console.app

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    found = {}
    for cls in (console.app.ConsoleApp, *subclasses(Screen)):
        if cls.__module__.startswith("console."):
            for binding in cls.__dict__.get("BINDINGS", []):
                if isinstance(binding, Binding) and binding.id:
                    found[binding.id] = (",".join(doc_key(k) for k in binding.key.split(",")), binding.description)
    return found


def test_docs_key_tables_list_every_binding_of_every_view_exactly() -> None:
    """docs/console.md had no `r` (reload) nor `c` (copy result), which `?` shows."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "console.md").read_text()
    section = text.split("\n## Keys\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for key, does, binding_id in re.findall(r"^\| `([^`]+)` \| ([^|]+?) \| `([^`]+)` \|$", section, re.MULTILINE):
        assert binding_id not in documented, f"{binding_id} is listed twice"
        documented[binding_id] = (key, does)
    bindings = console_bindings()
    from console import keys

    assert keys.BINDING_IDS <= set(bindings) and {"task.reload", "task.copy_result"} <= set(bindings)
    assert documented == bindings


def test_a_proplets_row_says_what_the_manager_sends_it_no_more() -> None:
    board = Proplet(id="esp-1", online=True, metadata={"environment": "embedded", "max_module_bytes": 4096,
                                                       "capabilities": ["task_state", "result_ack"]})
    row = PropletRow("esp-1")
    assert row.update_from(board) and row.takes == ("modules up to 4.0 KiB, core modules only, no WASI, no HTTP URLs, "
                                                "no latent tasks")
    ours = Proplet(id="gw-1", online=True, metadata={"environment": "binary", "max_module_bytes": 100 << 20})
    assert PropletRow("gw-1").update_from(ours)
    assert ours.takes == "modules up to 100.0 MiB"
    assert Proplet(id="rust-1", online=True).takes == ""  # upstream's Rust proplet announces no limit
    board.metadata = {**board.metadata, "capabilities": ["latent", "components"]}
    assert row.update_from(board) and row.takes == "modules up to 4.0 KiB, no WASI, no HTTP URLs"
    board.metadata = {**board.metadata, "capabilities": ["latent", "components", "wasi", "http_fetch"]}
    assert row.update_from(board) and row.takes == "modules up to 4.0 KiB"


def test_a_proplets_row_names_its_metrics_endpoint_and_says_when_it_drains() -> None:
    p = Proplet(id="edge-1", online=True, metadata={"ip": "10.0.0.7", "metrics_port": 9092})
    row = PropletRow("edge-1")
    assert row.update_from(p) and (row.metrics_url, row.state) == ("http://10.0.0.7:9092/metrics", "online")
    assert not row.update_from(p)  # nothing changed
    p.draining = True
    assert row.update_from(p) and row.state == "draining"
    p.metadata = {"hostname": "edge-1.lan"}  # no endpoint announced
    assert row.update_from(p) and row.metrics_url == ""
