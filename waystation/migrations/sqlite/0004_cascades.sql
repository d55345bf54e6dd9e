-- Runs that ended (failed or cancelled) while they had unfinished children: the engine that
-- ended one cancels those children right after, and deletes its row here when done. The row
-- is written in the transaction that ends the run, so a process that dies in between leaves
-- it behind, and the next engine's recovery does the cancelling instead. `since`: when the
-- run ended (children created later belong to a retry of it and are left alone).
CREATE TABLE cascades (
    run_id  TEXT PRIMARY KEY,
    since   REAL NOT NULL
) WITHOUT ROWID;
