-- Live events follow the journal by rowid (commit order), no longer by time, so nothing reads
-- the index on the time any more, and every journal row paid an entry in it.
DROP INDEX IF EXISTS transitions_at;
