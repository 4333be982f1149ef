-- What each attempt has stored through /v1/task/events, so the per-attempt
-- bounds (count and bytes, `Settings::max_events_per_attempt`,
-- `max_event_bytes_per_attempt`) are checked in the transaction of the
-- insert, serialised per attempt by this row. Expand-only: old code ignores
-- the columns.
ALTER TABLE attempts
    ADD COLUMN events integer NOT NULL DEFAULT 0,
    ADD COLUMN event_bytes bigint NOT NULL DEFAULT 0;

-- A correction to 0001's header (applied migrations cannot be edited): the
-- hot path's updates of `tasks` are not HOT today. Claims, heartbeats and
-- completions each change an indexed column (`lease_expires_at`, or
-- `state`, read by the partial indexes' predicates), so fillfactor 80 buys
-- little until those indexes change.
