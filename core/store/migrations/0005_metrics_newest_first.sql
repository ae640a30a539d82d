-- Metrics samples indexed newest first down to the row id, the order in which they are listed and
-- pruned (Store.prune_metrics finds an owner's `keep`-th newest sample by walking it). The indexes
-- of migration 1 left the id to a sort of every sample of the owner.
CREATE INDEX IF NOT EXISTS idx_proplet_metrics_newest ON proplet_metrics (proplet_id, timestamp DESC, id DESC);
DROP INDEX IF EXISTS idx_proplet_metrics_proplet;
CREATE INDEX IF NOT EXISTS idx_task_metrics_newest ON task_metrics (task_id, timestamp DESC, id DESC);
DROP INDEX IF EXISTS idx_task_metrics_task;
