-- Jobs: a named group of tasks (tasks.job_id) and how they are started. Their state is derived
-- from their tasks', never stored.
CREATE TABLE IF NOT EXISTS jobs (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL DEFAULT '',
    execution_mode TEXT NOT NULL DEFAULT '',
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_jobs_created_at ON jobs (created_at DESC);
