-- Buffered sinks (issue 11, ADR 0006). Batch ids are unique per org, not
-- globally: another org's batch id is no conflict and reveals nothing. The
-- sink's verdict lives here (the state database is what the API reads); the
-- ingested rows and the per-batch dedup record live in the data database
-- (migrations/data/). Expand-only: existing rows are backfilled.

ALTER TABLE buffer_publishes ADD COLUMN org_id uuid;
UPDATE buffer_publishes b SET org_id = j.org_id
  FROM tasks t JOIN jobs j ON j.id = t.job_id
 WHERE t.id = b.task_id;
ALTER TABLE buffer_publishes ALTER COLUMN org_id SET NOT NULL;
ALTER TABLE buffer_publishes DROP CONSTRAINT buffer_publishes_pkey;
ALTER TABLE buffer_publishes ADD PRIMARY KEY (org_id, batch_id);

-- Why a batch is dead (the contract's reason codes), where, and when.
ALTER TABLE buffer_publishes
    ADD COLUMN reason_code text CHECK (reason_code IN (
        'checksum_mismatch', 'row_count_mismatch', 'invalid_json', 'unknown_column',
        'missing_column', 'wrong_type', 'row_too_large', 'object_missing')),
    ADD COLUMN reason_line bigint,
    ADD COLUMN reason_message text,
    -- Sink attempts that ended in a transient failure (store or data
    -- database down); they never make a batch dead.
    ADD COLUMN transient_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error text,
    -- When the latest pointer for this batch was written to the outbox; the
    -- reaper writes a new one for a batch still pending long after.
    ADD COLUMN pointer_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN ingested_at timestamptz,
    ADD COLUMN dead_at timestamptz,
    -- Replays by operators, and the checksum and row count a replay with
    -- --accept-current-object replaced (audit).
    ADD COLUMN replays integer NOT NULL DEFAULT 0,
    ADD COLUMN replaced_sha256 text,
    ADD COLUMN replaced_rows bigint,
    ADD CONSTRAINT buffer_publishes_dead_has_reason
        CHECK ((state = 'dead') = (reason_code IS NOT NULL));

CREATE INDEX buffer_publishes_pending_idx ON buffer_publishes (pointer_at) WHERE state = 'pending';
CREATE INDEX buffer_publishes_dead_idx ON buffer_publishes (org_id, dataset) WHERE state = 'dead';
