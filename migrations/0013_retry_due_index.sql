-- Ready tasks waiting out a retry's backoff, by when it ends: the ready
-- listener (ADR 0017) asks for the earliest one after each retry is
-- scheduled and each time one comes due. Partial, so it holds only the
-- few tasks in backoff, and the claim's own predicate
-- (coalesce(not_before, '-infinity') <= now()) does not match it.
CREATE INDEX tasks_retry_due_idx ON tasks (not_before)
    WHERE state = 'ready' AND not_before IS NOT NULL;
