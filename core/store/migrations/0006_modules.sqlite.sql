-- Modules stored once per digest instead of in each task's row. SQLite writes a row whole on every
-- UPDATE, so each state change of a task carrying a 200 KB module cost ~0.2 ms of SQL (2 MB: ~5 ms,
-- and the warm task p50 went from 1.6 to 14 ms), and every task kept a copy of its module.
-- tasks.file stays, empty: SQLite has no DROP COLUMN IF EXISTS, and the runner heals a database by
-- applying every migration again.
CREATE TABLE IF NOT EXISTS modules (
    digest TEXT PRIMARY KEY,
    data   BLOB NOT NULL
);
INSERT OR IGNORE INTO modules (digest, data)
    SELECT wasm_digest, file FROM tasks WHERE file IS NOT NULL AND wasm_digest <> '';
UPDATE tasks SET file = NULL WHERE file IS NOT NULL AND wasm_digest <> '';
