-- Durable time: when something must happen to a run by itself. For a pending run, when it
-- may start or wake (a durable sleep, a scheduled start); for a paused run, when its pause
-- expires. NULL: nothing scheduled.
ALTER TABLE runs ADD COLUMN wake_at REAL;
CREATE INDEX runs_wake ON runs (wake_at) WHERE wake_at IS NOT NULL;

-- Live events read the journal in commit-time order across runs.
CREATE INDEX transitions_at ON transitions (at, run_id, seq);
