-- Heartbeats as HOT updates (issue 14, ADR 0020). A heartbeat changes only
-- tasks.lease_expires_at (and attempts.progress). Postgres can update a row
-- in place on its page, without a new entry in every index (a HOT update),
-- only when no indexed column changes, counting the columns of partial
-- index predicates. tasks_lease_expiry_idx indexed lease_expires_at, so
-- every heartbeat wrote a new entry into each of the task's indexes.
--
-- The reaper's two reads of leased tasks (`expired_leases`,
-- `next_lease_expiry`) now read the leased tasks through an index whose key
-- and predicate a heartbeat does not touch, and filter or order them by
-- lease_expires_at. Leased tasks are the running ones, bounded by the
-- workers' slots, so that costs a scan of a few hundred or thousand index
-- entries per reaper tick, not a scan of the table.
DROP INDEX tasks_lease_expiry_idx;
CREATE INDEX tasks_leased_idx ON tasks (id) WHERE state = 'leased';

-- Room on each page for the new version a HOT update writes next to the
-- old one: tasks has had fillfactor 80 since 0001; attempts (whose progress
-- a heartbeat writes) now leaves 10% (pages written from now on).
ALTER TABLE attempts SET (fillfactor = 90);
