-- Runs that ended (failed or cancelled) while they had unfinished children: the engine that
-- ended one cancels those children right after, and deletes its row here when done. The row
-- is written in the transaction that ends the run, so a process that dies in between leaves
-- it behind, and the next engine's recovery does the cancelling instead. `since`: when the
-- run ended (children created later belong to a retry of it and are left alone).
CREATE TABLE cascades (
    run_id  TEXT PRIMARY KEY,
    since   REAL NOT NULL
) WITHOUT ROWID;

-- The unfinished children of a run, for the check made in the commit that ends it (a run
-- with 100,000 finished children cost 11-23 ms of the write lock through `runs_parent`).
-- Root runs, the most, are not in it; a child is, from its create to its end.
CREATE INDEX runs_open_children ON runs (parent_run_id)
WHERE parent_run_id IS NOT NULL AND status IN ('pending', 'running', 'paused');

-- Runs that a crash before this version left that way.
INSERT INTO cascades (run_id, since)
SELECT p.run_id, p.updated_at FROM runs p
WHERE p.status IN ('failed', 'cancelled') AND EXISTS (
    SELECT 1 FROM runs c
    WHERE c.parent_run_id = p.run_id AND c.status IN ('pending', 'running', 'paused')
);
