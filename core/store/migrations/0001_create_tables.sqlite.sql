-- Tasks, their lifecycle events, proplets and metrics.
CREATE TABLE IF NOT EXISTS tasks (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL,
    kind               TEXT NOT NULL DEFAULT 'standard',
    state              INTEGER NOT NULL DEFAULT 0,
    image_url          TEXT NOT NULL DEFAULT '',
    file               BLOB,
    wasm_digest        TEXT NOT NULL DEFAULT '',
    cli_args           TEXT,
    inputs             TEXT NOT NULL DEFAULT '[]',
    env                TEXT NOT NULL DEFAULT '{}',
    daemon             INTEGER NOT NULL DEFAULT 0,
    latent             INTEGER NOT NULL DEFAULT 0,
    encrypted          INTEGER NOT NULL DEFAULT 0,
    kbs_resource_path  TEXT NOT NULL DEFAULT '',
    proplet_id         TEXT NOT NULL DEFAULT '',
    pinned             INTEGER NOT NULL DEFAULT 0,
    broadcast          INTEGER NOT NULL DEFAULT 0,
    priority           INTEGER NOT NULL DEFAULT 50,
    metadata           TEXT NOT NULL DEFAULT '{}',
    monitoring_profile TEXT,
    hal_storage_path   TEXT,
    mode               TEXT NOT NULL DEFAULT '',
    depends_on         TEXT NOT NULL DEFAULT '[]',
    run_if             TEXT NOT NULL DEFAULT '',
    workflow_id        TEXT NOT NULL DEFAULT '',
    job_id             TEXT NOT NULL DEFAULT '',
    limits             TEXT NOT NULL DEFAULT '{}',
    max_retries        INTEGER NOT NULL DEFAULT 0,
    attempt            INTEGER NOT NULL DEFAULT 0,
    retries            INTEGER NOT NULL DEFAULT 0,
    results            TEXT,
    error              TEXT NOT NULL DEFAULT '',
    reason             TEXT NOT NULL DEFAULT '',
    queued_at          TEXT,
    start_time         TEXT,
    finish_time        TEXT,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_tasks_state ON tasks (state);
CREATE INDEX IF NOT EXISTS idx_tasks_proplet_id ON tasks (proplet_id);
CREATE INDEX IF NOT EXISTS idx_tasks_created_at ON tasks (created_at DESC);
CREATE INDEX IF NOT EXISTS idx_tasks_wasm_digest ON tasks (wasm_digest);
CREATE INDEX IF NOT EXISTS idx_tasks_workflow_id ON tasks (workflow_id);
CREATE INDEX IF NOT EXISTS idx_tasks_job_id ON tasks (job_id);

CREATE TABLE IF NOT EXISTS task_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    state      INTEGER NOT NULL,
    attempt    INTEGER NOT NULL DEFAULT 0,
    proplet_id TEXT NOT NULL DEFAULT '',
    detail     TEXT NOT NULL DEFAULT '',
    at         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_task_events_task ON task_events (task_id, id);

CREATE TABLE IF NOT EXISTS proplets (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    namespace      TEXT NOT NULL DEFAULT '',
    metadata       TEXT NOT NULL DEFAULT '{}',
    alive_history  TEXT NOT NULL DEFAULT '[]',
    online         INTEGER NOT NULL DEFAULT 0,
    offline_reason TEXT NOT NULL DEFAULT '',
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_proplets_online ON proplets (online);

CREATE TABLE IF NOT EXISTS proplet_metrics (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    proplet_id     TEXT NOT NULL REFERENCES proplets (id) ON DELETE CASCADE,
    namespace      TEXT NOT NULL DEFAULT '',
    timestamp      TEXT NOT NULL,
    cpu_metrics    TEXT NOT NULL DEFAULT '{}',
    memory_metrics TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS idx_proplet_metrics_proplet ON proplet_metrics (proplet_id, timestamp DESC);

CREATE TABLE IF NOT EXISTS task_metrics (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    proplet_id TEXT NOT NULL DEFAULT '',
    timestamp  TEXT NOT NULL,
    metrics    TEXT NOT NULL DEFAULT '{}',
    aggregated TEXT
);
CREATE INDEX IF NOT EXISTS idx_task_metrics_task ON task_metrics (task_id, timestamp DESC);
