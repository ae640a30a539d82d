-- Tasks listed by state or by proplet come newest first (Store.list_tasks: ORDER BY created_at DESC,
-- id). With an index on the state or the proplet alone, every matching task was read and sorted
-- before the first page went out: 0.33 s for `GET /tasks?state=completed&limit=100` among 300,000
-- completed tasks on SQLite. These indexes hand the page over in order; each also serves what the
-- single-column index it replaces did.
CREATE INDEX IF NOT EXISTS idx_tasks_state_newest ON tasks (state, created_at DESC, id);
DROP INDEX IF EXISTS idx_tasks_state;
CREATE INDEX IF NOT EXISTS idx_tasks_proplet_newest ON tasks (proplet_id, created_at DESC, id);
DROP INDEX IF EXISTS idx_tasks_proplet_id;
