-- Modules stored once per digest instead of in each task's row (see the SQLite file of this
-- migration: there a state change rewrote the module with the row; here it was a copy per task).
-- tasks.file stays, empty, as on SQLite, so both backends keep one schema.
CREATE TABLE IF NOT EXISTS modules (
    digest TEXT PRIMARY KEY,
    data   BYTEA NOT NULL
);
INSERT INTO modules (digest, data)
    SELECT DISTINCT ON (wasm_digest) wasm_digest, file FROM tasks WHERE file IS NOT NULL AND wasm_digest <> ''
    ON CONFLICT (digest) DO NOTHING;
UPDATE tasks SET file = NULL WHERE file IS NOT NULL AND wasm_digest <> '';
