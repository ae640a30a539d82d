"""Persistence: one interface (`Store`), SQLite and PostgreSQL adapters, one migration runner."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.store.base import Page, Store, StoreError, WriteOp
from core.store.migrate import migrate

if TYPE_CHECKING:
    from core.config import ManagerSettings

__all__ = ["Page", "Store", "StoreError", "WriteOp", "migrate", "store_from_settings"]


def store_from_settings(settings: ManagerSettings) -> Store:
    """The configured backend, not yet opened."""
    if settings.storage_type == "postgres":
        from core.store.postgres import PostgresStore

        return PostgresStore(settings.postgres_dsn, one_manager=True)
    from core.store.sqlite import SqliteStore

    if settings.storage_type == "memory":
        return SqliteStore(":memory:")
    return SqliteStore(settings.sqlite_path, one_manager=True)
