-- UDF bundles (issue 13): a bundle is a gzipped tar with a `bundle.json`
-- manifest, stored in the object store under its content hash and known
-- to one org. Tasks of a runtime other than `exec` name a bundle by its
-- digest; a tag (an org's name for a digest) is resolved when the job is
-- submitted, so a task's code never changes under it. Expand-only.
CREATE TABLE bundles (
    org_id           uuid NOT NULL REFERENCES orgs (id),
    -- 'sha256:' followed by 64 lowercase hex digits of the archive.
    digest           text NOT NULL CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    runtime          text NOT NULL CHECK (runtime IN ('node', 'python', 'rust')),
    handler          text NOT NULL,
    memory_mb        integer CHECK (memory_mb > 0),
    timeout_seconds  integer CHECK (timeout_seconds > 0),
    size_bytes       bigint NOT NULL,
    object_key       text NOT NULL,
    created_by       uuid REFERENCES users (id),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, digest)
);

CREATE TABLE bundle_tags (
    org_id      uuid NOT NULL,
    name        text NOT NULL,
    digest      text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, name),
    FOREIGN KEY (org_id, digest) REFERENCES bundles (org_id, digest)
);

-- Per-task timeout (the invocation's deadline) and per-job deadline.
ALTER TABLE task_specs ADD COLUMN timeout_seconds integer CHECK (timeout_seconds > 0);
ALTER TABLE jobs ADD COLUMN deadline_at timestamptz;
CREATE INDEX jobs_deadline_idx ON jobs (deadline_at) WHERE state = 'running' AND deadline_at IS NOT NULL;
