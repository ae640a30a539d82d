-- Task schedules (cron): a row per task that has one. Upstream's SQL stores have no place for
-- them and drop them; here they survive a restart.
CREATE TABLE IF NOT EXISTS task_schedules (
    task_id    TEXT PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    expression TEXT NOT NULL,
    timezone   TEXT NOT NULL DEFAULT 'UTC',
    recurring  BOOLEAN NOT NULL DEFAULT FALSE,
    next_run   TIMESTAMPTZ NOT NULL
);
