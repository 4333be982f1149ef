-- GET /v1/jobs (issue 25): an org's jobs newest first, paged by
-- (created_at, id). The new index leads with the same columns as
-- jobs_org_created_idx, so it replaces it.
CREATE INDEX jobs_org_created_id_idx ON jobs (org_id, created_at DESC, id DESC);
DROP INDEX jobs_org_created_idx;
