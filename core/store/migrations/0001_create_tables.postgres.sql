-- Tasks, their lifecycle events, proplets and metrics.
CREATE TABLE IF NOT EXISTS tasks (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL,
    kind               TEXT NOT NULL DEFAULT 'standard',
    state              SMALLINT NOT NULL DEFAULT 0,
    image_url          TEXT NOT NULL DEFAULT '',
    file               BYTEA,
    wasm_digest        TEXT NOT NULL DEFAULT '',
    cli_args           JSONB,
    inputs             JSONB NOT NULL DEFAULT '[]',
    env                JSONB NOT NULL DEFAULT '{}',
    daemon             BOOLEAN NOT NULL DEFAULT FALSE,
    latent             BOOLEAN NOT NULL DEFAULT FALSE,
    encrypted          BOOLEAN NOT NULL DEFAULT FALSE,
    kbs_resource_path  TEXT NOT NULL DEFAULT '',
    proplet_id         TEXT NOT NULL DEFAULT '',
    pinned             BOOLEAN NOT NULL DEFAULT FALSE,
    broadcast          BOOLEAN NOT NULL DEFAULT FALSE,
    priority           INTEGER NOT NULL DEFAULT 50,
    metadata           JSONB NOT NULL DEFAULT '{}',
    monitoring_profile JSONB,
    hal_storage_path   TEXT,
    mode               TEXT NOT NULL DEFAULT '',
    depends_on         JSONB NOT NULL DEFAULT '[]',
    run_if             TEXT NOT NULL DEFAULT '',
    workflow_id        TEXT NOT NULL DEFAULT '',
    job_id             TEXT NOT NULL DEFAULT '',
    limits             JSONB NOT NULL DEFAULT '{}',
    max_retries        INTEGER NOT NULL DEFAULT 0,
    attempt            INTEGER NOT NULL DEFAULT 0,
    retries            INTEGER NOT NULL DEFAULT 0,
    results            JSONB,
    error              TEXT NOT NULL DEFAULT '',
    reason             TEXT NOT NULL DEFAULT '',
    queued_at          TIMESTAMPTZ,
    start_time         TIMESTAMPTZ,
    finish_time        TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_tasks_state ON tasks (state);
CREATE INDEX IF NOT EXISTS idx_tasks_proplet_id ON tasks (proplet_id);
CREATE INDEX IF NOT EXISTS idx_tasks_created_at ON tasks (created_at DESC);
CREATE INDEX IF NOT EXISTS idx_tasks_wasm_digest ON tasks (wasm_digest);
CREATE INDEX IF NOT EXISTS idx_tasks_workflow_id ON tasks (workflow_id);
CREATE INDEX IF NOT EXISTS idx_tasks_job_id ON tasks (job_id);
CREATE INDEX IF NOT EXISTS idx_tasks_metadata ON tasks USING GIN (metadata jsonb_path_ops);

CREATE TABLE IF NOT EXISTS task_events (
    id         BIGSERIAL PRIMARY KEY,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    state      SMALLINT NOT NULL,
    attempt    INTEGER NOT NULL DEFAULT 0,
    proplet_id TEXT NOT NULL DEFAULT '',
    detail     TEXT NOT NULL DEFAULT '',
    at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_task_events_task ON task_events (task_id, id);

CREATE TABLE IF NOT EXISTS proplets (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    namespace      TEXT NOT NULL DEFAULT '',
    metadata       JSONB NOT NULL DEFAULT '{}',
    alive_history  JSONB NOT NULL DEFAULT '[]',
    online         BOOLEAN NOT NULL DEFAULT FALSE,
    offline_reason TEXT NOT NULL DEFAULT '',
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_proplets_online ON proplets (online);

CREATE TABLE IF NOT EXISTS proplet_metrics (
    id             BIGSERIAL PRIMARY KEY,
    proplet_id     TEXT NOT NULL REFERENCES proplets (id) ON DELETE CASCADE,
    namespace      TEXT NOT NULL DEFAULT '',
    timestamp      TIMESTAMPTZ NOT NULL,
    cpu_metrics    JSONB NOT NULL DEFAULT '{}',
    memory_metrics JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS idx_proplet_metrics_proplet ON proplet_metrics (proplet_id, timestamp DESC);

CREATE TABLE IF NOT EXISTS task_metrics (
    id         BIGSERIAL PRIMARY KEY,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    proplet_id TEXT NOT NULL DEFAULT '',
    timestamp  TIMESTAMPTZ NOT NULL,
    metrics    JSONB NOT NULL DEFAULT '{}',
    aggregated JSONB
);
CREATE INDEX IF NOT EXISTS idx_task_metrics_task ON task_metrics (task_id, timestamp DESC);
