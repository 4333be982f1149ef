-- Parts an attempt has staged for a dataset (POST /v1/task/dataset-stage),
-- verified (size, sha256, every row against the schema) before the row is
-- written. They become a version's parts only when the attempt completes
-- `succeeded`; a failed, fenced or superseded attempt's rows here are never
-- referenced by any version. Expand-only.
CREATE TABLE staged_parts (
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    dataset_id  uuid NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    key         text NOT NULL,
    rows        bigint NOT NULL CHECK (rows >= 0),
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    staged_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt, dataset_id, key)
);
CREATE INDEX staged_parts_staged_at_idx ON staged_parts (staged_at);
