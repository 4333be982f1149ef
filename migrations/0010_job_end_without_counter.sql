-- A successful completion no longer updates its job's row (issue 14): the
-- job's end is judged after the completion commits, by looking for an
-- unfinished task of the job (tasks_unfinished_idx makes that one probe),
-- and the reaper ends any running job a crash left with every task
-- succeeded (jobs_running_idx keeps that scan to the running jobs).
-- `jobs.tasks_unfinished` is no longer maintained (expand-only: kept).
CREATE INDEX tasks_unfinished_idx ON tasks (job_id) WHERE state <> 'succeeded';
CREATE INDEX jobs_running_idx ON jobs (id) WHERE state = 'running';
COMMENT ON COLUMN jobs.tasks_unfinished IS
    'The task count at submission; no longer maintained (migration 0010).';
