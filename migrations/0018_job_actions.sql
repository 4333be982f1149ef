-- Retries and bulk actions (issue 25). Every retry and every bulk action
-- a user takes through the API is recorded: who, when, on what (a job, a
-- task, or a listing filter), how many jobs and tasks it touched.
CREATE TABLE job_actions (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES orgs (id),
    user_id     uuid REFERENCES users (id),
    action      text NOT NULL CHECK (action IN ('retry', 'cancel')),
    -- {"job_id": …}, {"job_id": …, "task": key}, or {"filter": {…}}.
    target      jsonb NOT NULL,
    jobs        integer NOT NULL CHECK (jobs >= 0),
    tasks       integer NOT NULL CHECK (tasks >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_actions_org_idx ON job_actions (org_id, created_at DESC);
