-- Retention of finished jobs (issue 25): the pruner deletes jobs that
-- finished longer ago than the retention, oldest first; their tasks,
-- specs, dependencies, attempts, events, staged parts and buffer publishes
-- go with them (ON DELETE CASCADE). Dataset versions keep their own rows.
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE state <> 'running';
