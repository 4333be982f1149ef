-- The completion fast path in one call (issue 14, ADR 0020). A completion
-- batch, or a single completion (a batch of one), took seven round trips
-- before its commit when its entries were successes of leaves: BEGIN, the
-- job locks, a savepoint, the update, a check for parts staged meanwhile,
-- releasing the savepoint, COMMIT. This function does the job locks, the
-- update and the check in one call, inside the caller's transaction, so the
-- same completion takes three round trips: BEGIN, this call, COMMIT.
--
-- Arguments: every entry of the batch (job, task, whether it is a success)
-- for the job locks, then the leaf candidates (task, job, attempt, canonical
-- completion, answer). Returns the tasks it ended; the caller takes the
-- ordinary path for every other entry.
--
-- What it writes is exactly what the ordinary path writes for the success of
-- a leaf with nothing staged. The update and the check run in a block with
-- an exception handler, a subtransaction: if the update fails, or a part was
-- staged by one of the ended attempts while the update waited on its task row
-- (seen by the check, which as a statement of a volatile function takes a
-- fresh snapshot), the block's writes are undone and it returns no task, so
-- every entry takes the ordinary path, which refuses that completion,
-- retryably, as it would have alone.
CREATE FUNCTION complete_leaf_successes(
    job_ids uuid[], task_ids uuid[], succeeded boolean[],
    leaf_tasks uuid[], leaf_jobs uuid[], leaf_attempts int[],
    completions jsonb[], responses jsonb[])
RETURNS uuid[] LANGUAGE plpgsql AS $$
DECLARE
    ended uuid[];
BEGIN
    PERFORM lock_completion_jobs(job_ids, task_ids, succeeded);
    BEGIN
        WITH input AS (
            SELECT * FROM unnest(leaf_tasks, leaf_jobs, leaf_attempts, completions, responses)
                AS i(task_id, job_id, attempt, completion, response)
        ), done AS (
            UPDATE tasks t
               SET state = 'succeeded', not_before = NULL, lease_expires_at = NULL,
                   updated_at = now()
              FROM input i
             WHERE t.id = i.task_id AND t.job_id = i.job_id AND t.attempt = i.attempt
               AND t.state = 'leased' AND t.lease_expires_at > clock_timestamp()
               AND NOT t.cancel_requested
               AND NOT EXISTS (SELECT 1 FROM task_deps d WHERE d.depends_on = t.id)
               AND NOT EXISTS (SELECT 1 FROM staged_parts s
                                WHERE s.task_id = t.id AND s.attempt = t.attempt)
         RETURNING t.id, t.attempt
        ), recorded AS (
            UPDATE attempts a
               SET finished_at = now(), outcome = 'succeeded',
                   completion = i.completion, response = i.response
              FROM done e JOIN input i ON i.task_id = e.id
             WHERE a.task_id = e.id AND a.attempt = e.attempt
         RETURNING a.task_id
        )
        SELECT coalesce(array_agg(task_id), '{}') INTO ended FROM recorded;
        IF EXISTS (SELECT 1 FROM staged_parts s
                     JOIN unnest(leaf_tasks, leaf_attempts) AS i(task_id, attempt)
                       ON s.task_id = i.task_id AND s.attempt = i.attempt
                    WHERE s.task_id = ANY(ended)) THEN
            RAISE EXCEPTION 'parts were staged while the completion waited';
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RETURN '{}';
    END;
    RETURN ended;
END
$$;
