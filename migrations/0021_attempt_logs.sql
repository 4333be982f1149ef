-- Attempt logs (issue 25): what an attempt printed is stored in the object
-- store under orgs/{org}/logs/jobs/{job}/tasks/{task}/attempts/{n}.log
-- (outside every attempt's writable prefix); the attempt row says where and
-- how big. Adding nullable columns rewrites nothing.
ALTER TABLE attempts
    ADD COLUMN log_key           text,
    ADD COLUMN log_bytes         bigint,
    ADD COLUMN log_dropped_bytes bigint;

-- Objects whose rows are gone, to delete from the object store: the pruner
-- enqueues a pruned job's logs here in the transaction that deletes the
-- job, then deletes the objects and their rows (so a failed delete is
-- retried, and no log outlives its job unnoticed).
CREATE TABLE object_deletions (
    key         text PRIMARY KEY,
    enqueued_at timestamptz NOT NULL DEFAULT now()
);
