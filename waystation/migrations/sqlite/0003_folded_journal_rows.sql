-- A write's row may carry the row that follows it, when that one says nothing of its own:
-- a `started` (or `completed`) row with no payload or error, for the next stage, in the same
-- commit. Every stage commit is `succeeded` + the next stage's `started`; stored as one row,
-- it costs SQLite one b-tree entry per index instead of two. The `journal` view (and the
-- store's reads) give back the logical rows: the follower is (run_id, seq + 1, stage_index + 1
-- (0 after `created`), next_path, next_event, next_attempt, no payload, no error, at).
ALTER TABLE transitions ADD COLUMN next_event TEXT;
ALTER TABLE transitions ADD COLUMN next_path TEXT;
ALTER TABLE transitions ADD COLUMN next_attempt INTEGER;

CREATE VIEW journal AS
SELECT run_id, seq, stage_index, stage_path, event, attempt, payload, error, at
FROM transitions
UNION ALL
SELECT run_id, seq + 1, COALESCE(stage_index + 1, 0), next_path, next_event, next_attempt,
       NULL, NULL, at
FROM transitions WHERE next_event IS NOT NULL;
