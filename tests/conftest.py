"""Shared fixtures: isolated environment, a private Mosquitto, PostgreSQL databases, a manager."""

from __future__ import annotations

import gc
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.services import Mosquitto, PrivatePostgres, create_database, drop_database, private_postgres

if TYPE_CHECKING:
    from core.store import Store


def pytest_collection_finish(session: pytest.Session) -> None:
    """What is loaded by now (the modules of the product, its libraries and the tests) lives for the
    whole session: out of the collector's reach, the collection at the end of each test (see
    no_exception_lost_in_asyncio) walks only what the tests made."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that ran a fleet of processes (tests.fleet.Fleet) reports the tail of each one's
    log: a manager or proplet that died or misbehaved says why there, and CI keeps nothing else."""
    from tests.fleet import Fleet

    report = yield
    if report.failed and call.when == "call":
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Fleet):
                report.sections.append((f"logs of fixture {name!r}'s processes", value.logs()))
    return report


@pytest.fixture(autouse=True)
def no_exception_lost_in_asyncio(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """An exception raised in a callback, or by a task nobody awaits, is only logged by asyncio's
    default handler (the caller never sees it): a bug however the test's own assertions went. A
    manager's done-callback failed that way on every refused result write, unseen by the tests."""
    yield
    # A future or task is found unretrieved only when it is collected: now, so that it is this test's.
    gc.collect()
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]  # the last: teardown's
    lost = [r for r in records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not lost, "asyncio logged an exception nobody handled:\n" + "\n".join(
        logging.Formatter().format(r) for r in lost)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's config file, XDG directories or MANAGER_*/PROPLET_* variables."""
    home = tmp_path_factory.mktemp("home")
    for var in list(os.environ):
        if var.startswith(("MANAGER_", "PROPLET_", "PROXY_", "PROPELLER_")) and var != "PROPELLER_TEST_POSTGRES":
            monkeypatch.delenv(var)
    monkeypatch.setenv("PROPELLER_CONFIG", str(home / "no-config.yaml"))
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"),
                     ("XDG_CACHE_HOME", "cache"), ("XDG_STATE_HOME", "state")):
        monkeypatch.setenv(var, str(home / sub))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One Mosquitto with TCP_NODELAY for the whole session; tests isolate by topic domain."""
    mosquitto = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto for this test alone (tests that kill or reconfigure the broker)."""
    mosquitto = Mosquitto(tmp_path / "mosquitto")
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    db = await create_database()
    try:
        yield db.dsn
    finally:
        await drop_database(db)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A migrated store on SQLite, then on PostgreSQL (a database of its own on the shared server)."""
    from core.store.migrate import migrate
    from core.store.postgres import PostgresStore
    from core.store.sqlite import SqliteStore

    db = None
    if request.param == "sqlite":
        s: Store = SqliteStore(tmp_path / "store.db")
    else:
        db = await create_database()
        s = PostgresStore(db.dsn)
    await s.open()
    await migrate(s)
    try:
        yield s
    finally:
        await s.close()
        if db is not None:
            await drop_database(db)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of the test's own, which it may stop and start (tests.services.PrivatePostgres)."""
    with private_postgres() as server:
        yield server


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


ManagerFactory = Callable[..., AbstractAsyncContextManager[Any]]


@pytest.fixture
def manager_factory(broker: Mosquitto, tmp_path: Path) -> ManagerFactory:
    """`async with manager_factory(**settings) as core`: a manager on the session broker."""

    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[Any]:
        from core.config import ManagerSettings
        from core.service import ManagerCore

        values: dict[str, Any] = {
            "mqtt_address": broker.url,
            "tenant_id": unique("t"),
            "entity_id": unique("manager"),
            "storage_type": "sqlite",
            "sqlite_path": tmp_path / f"{uuid.uuid4().hex[:6]}.db",
            "http_port": 0,
            "mqtt_timeout": 5.0,
        }
        values.update(overrides)
        core = ManagerCore(ManagerSettings(**values))
        async with core:
            assert core.bus is not None
            await core.bus.wait_connected(10)
            yield core

    return factory


@pytest.fixture
async def manager(manager_factory: ManagerFactory) -> AsyncIterator[Any]:
    async with manager_factory() as core:
        yield core


@pytest.fixture(params=["sqlite", "postgres"])
async def managers_on_each_backend(request: pytest.FixtureRequest, broker: Mosquitto,
                                   tmp_path: Path) -> AsyncIterator[Callable[[], AbstractAsyncContextManager[Any]]]:
    """`async with managers() as core`, on SQLite, then on PostgreSQL: managers started one after
    another on the same database (a restart), on the session broker."""
    from core.config import ManagerSettings
    from core.service import ManagerCore
    from core.store.postgres import PostgresStore

    settings = ManagerSettings(mqtt_address=broker.url, tenant_id=unique("t"), entity_id=unique("manager"),
                               storage_type="sqlite", sqlite_path=tmp_path / "m.db", http_port=0,
                               mqtt_timeout=5.0)
    db = await create_database() if request.param == "postgres" else None

    @asynccontextmanager
    async def start() -> AsyncIterator[Any]:
        async with ManagerCore(settings, store=PostgresStore(db.dsn) if db is not None else None) as core:
            assert core.bus is not None
            await core.bus.wait_connected(10)
            yield core

    try:
        yield start
    finally:
        if db is not None:
            await drop_database(db)
