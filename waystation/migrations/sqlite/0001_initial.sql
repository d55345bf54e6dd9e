-- One row per run: a cache of its journal's tail, changed in the same transaction as the journal.
CREATE TABLE runs (
    run_id            TEXT PRIMARY KEY,
    pipeline          TEXT NOT NULL,
    pipeline_version  TEXT NOT NULL,
    fingerprint       TEXT NOT NULL,
    status            TEXT NOT NULL,
    stage_index       INTEGER NOT NULL DEFAULT 0,
    seq               INTEGER NOT NULL DEFAULT 0,
    input             TEXT,
    output            TEXT,
    error             TEXT,
    pause             TEXT,
    parent_run_id     TEXT,
    root_run_id       TEXT NOT NULL,
    run_kind          TEXT NOT NULL DEFAULT 'root',
    depth             INTEGER NOT NULL DEFAULT 0,
    idempotency_key   TEXT,
    lease_owner       TEXT,
    lease_expires     REAL,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    replay_of         TEXT,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL
);
CREATE UNIQUE INDEX runs_idempotency ON runs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_status ON runs (status, run_id);
CREATE INDEX runs_pipeline ON runs (pipeline, run_id);
CREATE INDEX runs_parent ON runs (parent_run_id, run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_root ON runs (root_run_id);

-- The append-only transition journal. A stage's output lives only in its `succeeded` row.
-- A rowid table, not WITHOUT ROWID: outputs of a kilobyte or more would overflow the small
-- cells of an index b-tree and waste most of a page each (measured: 4 kB per 1 kB output).
CREATE TABLE transitions (
    run_id       TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    stage_index  INTEGER,
    stage_path   TEXT,
    event        TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    payload      TEXT,
    error        TEXT,
    at           REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Named budgets (`ctx.spend`), summed over a tree of runs.
CREATE TABLE budgets (
    root_run_id  TEXT NOT NULL,
    name         TEXT NOT NULL,
    spent        REAL NOT NULL,
    PRIMARY KEY (root_run_id, name)
) WITHOUT ROWID;
