-- The job locks of a completion batch, taken at its start in one call and
-- in job id order (the lock order of every transaction, so batches cannot
-- deadlock on jobs): FOR NO KEY UPDATE for a job that an entry may end or
-- whose dependants an entry may release (a failure, a cancellation, the
-- success of a task with dependants); FOR SHARE for a job whose entries
-- are all successes of leaves. Shared locks do not wait for each other, so
-- the successes of one job's leaves run side by side, while anything that
-- ends the job (which takes FOR NO KEY UPDATE) waits for them and they for
-- it (ADR 0016).
CREATE FUNCTION lock_completion_jobs(job_ids uuid[], task_ids uuid[], succeeded boolean[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    j record;
BEGIN
    FOR j IN
        SELECT e.job_id,
               bool_or(NOT e.ok OR EXISTS (SELECT 1 FROM task_deps d
                                            WHERE d.depends_on = e.task_id)) AS exclusive
          FROM unnest(job_ids, task_ids, succeeded) AS e(job_id, task_id, ok)
         GROUP BY e.job_id
         ORDER BY e.job_id
    LOOP
        IF j.exclusive THEN
            PERFORM 1 FROM jobs WHERE id = j.job_id FOR NO KEY UPDATE;
        ELSE
            PERFORM 1 FROM jobs WHERE id = j.job_id FOR SHARE;
        END IF;
    END LOOP;
END
$$;
