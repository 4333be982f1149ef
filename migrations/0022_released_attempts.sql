-- A worker that stops hands its unfinished tasks back (issue 30): the
-- attempt ends `released` and the task is ready again at once, instead of
-- waiting out its lease. NOT VALID then VALIDATE: the check of existing
-- rows does not block writes to attempts.
ALTER TABLE attempts DROP CONSTRAINT attempts_outcome_check;
ALTER TABLE attempts ADD CONSTRAINT attempts_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'lease_expired', 'cancelled', 'released')) NOT VALID;
ALTER TABLE attempts VALIDATE CONSTRAINT attempts_outcome_check;
