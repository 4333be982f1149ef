-- The data database (ADR 0006): rows of `stream` datasets, ingested by the
-- buffer sink. Each dataset's rows live in a table of its own,
-- `stream_<dataset id>`, created by the sink on first ingest with one typed
-- column per schema column plus `_batch_id` and `_line`.
--
-- A batch is recorded here in the same transaction as its rows, under a
-- unique key: a duplicate delivery, a replayed publish, or a crash between
-- the insert and the queue delete inserts nothing twice (invariant 8).
CREATE TABLE sink_batches (
    org_id       uuid NOT NULL,
    batch_id     uuid NOT NULL,
    dataset_id   uuid NOT NULL,
    rows         bigint NOT NULL CHECK (rows >= 0),
    sha256       text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    task_id      uuid NOT NULL,
    attempt      integer NOT NULL,
    ingested_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, batch_id)
);
CREATE INDEX sink_batches_dataset_idx ON sink_batches (dataset_id);
