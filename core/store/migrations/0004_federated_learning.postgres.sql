-- Federated learning (core/federated.py): rounds, the updates they received and the models they
-- produced. Upstream's manager keeps none of this (an external coordinator does); here a round
-- survives a restart and aggregates by itself. JSON is kept as text: it is only stored and read back.
CREATE TABLE IF NOT EXISTS fl_rounds (
    round_id        TEXT PRIMARY KEY,
    experiment_id   TEXT NOT NULL DEFAULT '',
    model_ref       TEXT NOT NULL,
    task_wasm_image TEXT NOT NULL DEFAULT '',
    participants    TEXT NOT NULL DEFAULT '[]',
    started         TEXT NOT NULL DEFAULT '[]',
    hyperparams     TEXT NOT NULL DEFAULT '{}',
    k_of_n          INTEGER NOT NULL,
    timeout_s       DOUBLE PRECISION NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT NOT NULL DEFAULT '',
    model_version   INTEGER,
    created_at      TIMESTAMPTZ NOT NULL,
    deadline        TIMESTAMPTZ NOT NULL,
    completed_at    TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS idx_fl_rounds_created_at ON fl_rounds (created_at DESC);
CREATE TABLE IF NOT EXISTS fl_updates (
    round_id    TEXT NOT NULL REFERENCES fl_rounds (round_id) ON DELETE CASCADE,
    proplet_id  TEXT NOT NULL,
    num_samples BIGINT NOT NULL,
    body        TEXT NOT NULL,
    source      TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (round_id, proplet_id)
);
CREATE TABLE IF NOT EXISTS fl_models (
    version    INTEGER PRIMARY KEY,
    round_id   TEXT NOT NULL DEFAULT '',
    data       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
