-- Datasets (issue 11, first slice: the registry). A dataset belongs to one
-- org and has a typed schema; a committed version is a row here, its parts
-- are listed with the version that added them. Expand-only.

CREATE TABLE datasets (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs (id),
    name             text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    mode             text NOT NULL CHECK (mode IN ('replace', 'append', 'stream')),
    -- [{"name", "type", "nullable"}], validated by the API.
    columns          jsonb NOT NULL,
    -- The committed version readers see; NULL until the first commit.
    current_version  integer CHECK (current_version >= 1),
    created_by       uuid REFERENCES users (id),
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

-- One row per committed version. At most one version per task and dataset.
CREATE TABLE dataset_versions (
    dataset_id    uuid NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    version       integer NOT NULL CHECK (version >= 1),
    parent        integer CHECK (parent >= 1 AND parent < version),
    task_id       uuid NOT NULL,
    attempt       integer NOT NULL CHECK (attempt >= 1),
    rows          bigint NOT NULL CHECK (rows >= 0),
    manifest_key  text NOT NULL,
    committed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset_id, version),
    UNIQUE (dataset_id, task_id)
);

-- The parts a version added. An `append` version holds its own parts and
-- every earlier version's; a `replace` version only its own.
CREATE TABLE dataset_parts (
    dataset_id  uuid NOT NULL,
    version     integer NOT NULL,
    key         text NOT NULL,
    rows        bigint NOT NULL CHECK (rows >= 0),
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    PRIMARY KEY (dataset_id, version, key),
    FOREIGN KEY (dataset_id, version) REFERENCES dataset_versions (dataset_id, version) ON DELETE CASCADE
);
CREATE INDEX dataset_parts_key_idx ON dataset_parts (key);

-- What each task may read (its submission's `reads`), beside `outputs`.
ALTER TABLE task_specs ADD COLUMN reads text[] NOT NULL DEFAULT '{}';
