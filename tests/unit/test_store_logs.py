"""What the PostgreSQL store lets asyncpg's pool log: its reconnect attempts while the server is away are
said once by the store writer instead (the whole outage is tested in tests/faults/test_database_outage.py);
a reconnect that fails for another reason still shows, with its traceback."""

from __future__ import annotations

import logging
import sys

import asyncpg

from core.store.postgres import _quiet_pool_reconnects


def _pool_warning(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("asyncpg.pool", logging.WARNING, "pool.py", 1,
                             "Failed to restore the pool connection floor; retrying", None, info)


def test_a_reconnect_refused_while_the_server_is_away_is_not_logged_again_and_again() -> None:
    assert not _quiet_pool_reconnects(_pool_warning(ConnectionRefusedError(111, "Connect call failed")))
    shutting_down = asyncpg.CannotConnectNowError("the database system is shutting down")
    assert not _quiet_pool_reconnects(_pool_warning(shutting_down))


def test_a_reconnect_that_fails_for_another_reason_still_shows() -> None:
    assert _quiet_pool_reconnects(_pool_warning(asyncpg.InvalidPasswordError("password authentication failed")))
    assert _quiet_pool_reconnects(_pool_warning(asyncpg.InvalidCatalogNameError('database "x" does not exist')))
    other = logging.LogRecord("asyncpg.pool", logging.WARNING, "pool.py", 1, "something else", None, None)
    assert _quiet_pool_reconnects(other)
