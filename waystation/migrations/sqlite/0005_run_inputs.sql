-- A run's input, in a table of its own. In `runs` it made every update of the run's row
-- (one per stage commit) rebuild a record as long as the input: with a 100 KB input each
-- stage commit cost the writer ~50 us of CPU instead of ~1.5. An input is written once,
-- when the run is created, and read with the run; `runs.input` stays NULL from here on
-- (kept, not dropped: DROP COLUMN needs SQLite 3.35).
-- A rowid table: inputs may be large, and SQLite keeps WITHOUT ROWID tables for small rows
-- (a 100 KB input read back 5x slower there). Reads fall back to `runs.input`, which is
-- where a process of the previous version (still running, against the advice) writes it.
CREATE TABLE run_inputs (
    run_id  TEXT PRIMARY KEY,
    input   TEXT
);

INSERT INTO run_inputs (run_id, input) SELECT run_id, input FROM runs WHERE input IS NOT NULL;

UPDATE runs SET input = NULL WHERE input IS NOT NULL;
