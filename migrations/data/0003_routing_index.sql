-- The alert router scans a routed dataset's batches from its first route's
-- creation on (review M3): an index by dataset and ingestion time.
CREATE INDEX sink_batches_ingested_idx ON sink_batches (dataset_id, ingested_at);
