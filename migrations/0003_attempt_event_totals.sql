-- What each attempt has stored through /v1/task/events, so the per-attempt
-- bounds (count and bytes, `Settings::max_events_per_attempt`,
-- `max_event_bytes_per_attempt`) are checked in the transaction of the
-- insert, serialised per attempt by this row. Expand-only: old code ignores
-- the columns.
ALTER TABLE attempts
    ADD COLUMN events integer NOT NULL DEFAULT 0,
    ADD COLUMN event_bytes bigint NOT NULL DEFAULT 0;
