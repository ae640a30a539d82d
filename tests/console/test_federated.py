"""The federated-learning view: rounds started from the console's form run on real proplets (in-process
agents, real wasmtime, the C training client tests/wasm/flclient.c) and the view follows them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.widgets import Label

from console.views.federated import FederatedScreen, RoundDetailScreen, StartRoundModal
from console.widgets import ConsoleInput, StateTable
from tests.console.conftest import command, open_view, table_rows, until
from tests.proplet.conftest import PropletFactory, proplet_factory  # noqa: F401  (the fixture, for these tests)
from tests.wasmfixtures import wasm


def _row(screen: FederatedScreen, round_id: str) -> dict[str, str]:
    table = screen.table
    columns = [str(c.label) for c in table.columns.values()]
    cells = [str(c) for c in table.get_row(round_id)]
    return dict(zip(columns, cells, strict=True))


def _error(modal: StartRoundModal, field: str) -> str:
    return str(modal.query_one(f"#{field}-error", Label).render())


async def _fill(pilot: Any, modal: StartRoundModal, **values: str) -> None:
    for name, value in values.items():
        modal.query_one(f"#{name}", ConsoleInput).value = value
    await pilot.pause()


async def test_rounds_started_from_the_form_train_on_real_proplets_and_the_view_follows_them(
        console: Any, proplet_factory: PropletFactory, tmp_path: Path) -> None:  # noqa: F811
    module = tmp_path / "flclient.wasm"
    module.write_bytes(wasm("flclient"))
    async with console() as (app, pilot, core), proplet_factory(core, "fl-a"), proplet_factory(core, "fl-b"):
        screen = await open_view(app, pilot, "8", FederatedScreen)
        await until(pilot, lambda: "0 rounds" in str(screen.query_one("#fl-status").render()))
        assert "models: none yet" in str(screen.query_one("#fl-models").render())

        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, StartRoundModal))
        modal = app.screen
        assert isinstance(modal, StartRoundModal)
        await _fill(pilot, modal, module=str(module), round_id="demo-1", hyperparams='{"lr": 0.02, "epochs": 20}')
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, FederatedScreen), timeout=15)

        # Every online proplet took part (the participants field was empty); the row follows the round.
        await until(pilot, lambda: _row(screen, "demo-1")["STATE"] == "completed", timeout=30)
        row = _row(screen, "demo-1")
        assert row["UPDATES"] == "2/2" and row["PROPLETS"] == "2/2" and row["MODEL"] == "v0→v1"
        assert row["ENDS / TOOK"].startswith("took ")
        await until(pilot, lambda: "v1 (from demo-1)" in str(screen.query_one("#fl-models").render()))
        first_model = await core.federated.model(1)

        # The detail lists each participant's update with its loss and the weights' shapes.
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, RoundDetailScreen))
        detail = app.screen
        assert isinstance(detail, RoundDetailScreen)
        updates = detail.query_one("#updates", StateTable)
        await until(pilot, lambda: updates.row_count == 2)
        rows = sorted(table_rows(updates))
        assert [r[0] for r in rows] == ["fl-a", "fl-b"]
        assert all(r[2] == "result" and r[4].startswith("loss=") and "w: " in r[5] for r in rows), rows
        fields = str(detail.query_one("#round-fields").render())
        assert "v0 → v1" in fields and "2 of 2 needed" in fields

        # n: the next round, from the model this one made, with the same participants and module.
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, StartRoundModal))
        modal = app.screen
        assert isinstance(modal, StartRoundModal)
        assert modal.query_one("#model", ConsoleInput).value == "1"
        assert modal.query_one("#participants", ConsoleInput).value == "fl-a, fl-b"
        assert modal.query_one("#module", ConsoleInput).value == str(module)
        assert modal.query_one("#hyperparams", ConsoleInput).value == '{"epochs": 20, "lr": 0.02}'
        assert modal.latest_model == 1  # an emptied model field means the newest, as in the list
        await _fill(pilot, modal, round_id="demo-2")
        # F5 twice, as an impatient user does: one round, and no error for the second press.
        await pilot.press("f5", "f5")
        await until(pilot, lambda: isinstance(app.screen, FederatedScreen), timeout=15)
        await until(pilot, lambda: "demo-2" in screen._shown and _row(screen, "demo-2")["STATE"] == "completed",
                    timeout=30)
        assert _row(screen, "demo-2")["MODEL"] == "v1→v2"
        assert (await core.federated.list_rounds(0, 10))[0] == 2
        # Trained from model 1: the average moved on from it.
        assert await core.federated.model(2) != first_model
        assert [r[0] for r in table_rows(screen.table)][:2] == ["demo-2", "demo-1"]

        # The filter narrows the rounds.
        await pilot.press("slash", *"demo-2", "enter")
        await until(pilot, lambda: screen.table.row_count == 1)


async def test_the_form_shows_every_problem_in_place_and_starts_nothing(
        console: Any, proplet_factory: PropletFactory, tmp_path: Path) -> None:  # noqa: F811
    async with console() as (app, pilot, core):
        screen = await open_view(app, pilot, "8", FederatedScreen)
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, StartRoundModal))
        modal = app.screen
        assert isinstance(modal, StartRoundModal)
        await _fill(pilot, modal, model="latest", k_of_n="two", timeout_s="-5", hyperparams="[1, 2]")
        await pilot.press("f5")
        await until(pilot, lambda: "Choose a module" in _error(modal, "module"))
        assert "not a model version" in _error(modal, "model")
        assert "not a whole number" in _error(modal, "k_of_n")
        assert "positive" in _error(modal, "timeout_s")
        assert "JSON object" in _error(modal, "hyperparams")
        assert "No proplet is online" in _error(modal, "participants")

        # Named participants that are all offline: the manager's refusal shows on the form.
        await _fill(pilot, modal, module=str(Path(__file__).parents[2] / "examples" / "hello.wat"), model="",
                    k_of_n="", timeout_s="", hyperparams="", participants="nobody-here")
        await pilot.press("f5")
        await until(pilot, lambda: "is online" in _error(modal, "participants"))
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen)
        assert (await core.federated.list_rounds(0, 10))[0] == 0

        async with proplet_factory(core, "fl-c"):
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, StartRoundModal))
            modal = app.screen
            assert isinstance(modal, StartRoundModal)
            # A model version no round made is refused by the manager, next to the field.
            await _fill(pilot, modal, module=str(Path(__file__).parents[2] / "examples" / "hello.wat"),
                        round_id="r1", model="7")
            await pilot.press("f5")
            await until(pilot, lambda: "version 7" in _error(modal, "model"))
            # A round id taken is said next to the round id.
            await _fill(pilot, modal, model="")
            await pilot.press("f5")
            await until(pilot, lambda: isinstance(app.screen, FederatedScreen))
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, StartRoundModal))
            modal = app.screen
            assert isinstance(modal, StartRoundModal)
            await _fill(pilot, modal, module=str(Path(__file__).parents[2] / "examples" / "hello.wat"),
                        round_id="r1")
            await pilot.press("f5")
            await until(pilot, lambda: "exists" in _error(modal, "round_id"))
            await pilot.press("escape")


async def test_read_only_refuses_to_start_rounds(console: Any) -> None:
    async with console(read_only=True) as (app, pilot, _core):
        await command(pilot, "rounds")
        await until(pilot, lambda: isinstance(app.screen, FederatedScreen))
        await pilot.press("s")
        await pilot.press("n")
        await pilot.pause()
        assert isinstance(app.screen, FederatedScreen)


async def test_with_an_external_coordinator_the_view_says_who_runs_the_rounds(console: Any) -> None:
    async with console(manager={"coordinator_url": "http://127.0.0.1:9/fl"}) as (app, pilot, _core):
        screen = await open_view(app, pilot, "8", FederatedScreen)
        status = screen.query_one("#fl-status")
        await until(pilot, lambda: "coordinated by http://127.0.0.1:9/fl" in str(status.render()))
        assert screen.table.row_count == 0
