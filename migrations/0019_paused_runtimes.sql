-- Pause and resume a runtime per org (issue 25): while a row is here, no
-- ready task of that org and runtime is claimed (they stay `ready`);
-- leased ones run on. The claim reads the table only when it has a row.
CREATE TABLE paused_runtimes (
    org_id     uuid NOT NULL REFERENCES orgs (id),
    runtime    text NOT NULL CHECK (runtime IN ('exec', 'node', 'python', 'rust')),
    paused_by  uuid REFERENCES users (id),
    paused_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, runtime)
);
