-- Core state of the dispatcher: orgs and users, jobs, tasks, attempts, events,
-- buffer publishes and the outbox. Postgres is the only source of truth.
--
-- Conventions
--   * States are text with CHECK constraints (cheap to extend expand/contract).
--   * The hot `tasks` row is kept narrow: payloads (bundle, inputs) live in
--     `task_specs`, history in `attempts`. The row is updated on every claim
--     and heartbeat, so it gets a fillfactor that leaves room for HOT updates.
--   * Every lease decision compares against Postgres `now()` (ADR 0003).

CREATE TABLE orgs (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    email       text NOT NULL UNIQUE CHECK (length(email) BETWEEN 3 AND 320),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    org_id      uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    org_id            uuid NOT NULL REFERENCES orgs (id),
    name              text NOT NULL,
    state             text NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    created_by        uuid REFERENCES users (id),
    -- Tasks not yet succeeded. Decremented under the job row lock, so the
    -- last success is seen by exactly one transaction.
    tasks_unfinished  integer NOT NULL CHECK (tasks_unfinished >= 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);
CREATE INDEX jobs_org_created_idx ON jobs (org_id, created_at DESC);

-- The hot row: one per task, touched by claim, heartbeat and completion.
CREATE TABLE tasks (
    id                uuid PRIMARY KEY,
    job_id            uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    state             text NOT NULL CHECK (state IN ('blocked', 'ready', 'leased', 'succeeded', 'failed', 'cancelled')),
    -- Fencing token. Incremented by every claim, never reset (invariant 3).
    attempt           integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts      integer NOT NULL CHECK (max_attempts >= 1),
    pending_deps      integer NOT NULL CHECK (pending_deps >= 0),
    lease_seconds     integer CHECK (lease_seconds >= 1),
    lease_expires_at  timestamptz,
    not_before        timestamptz,
    cancel_requested  boolean NOT NULL DEFAULT false,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'leased') = (lease_expires_at IS NOT NULL)),
    CHECK (attempt <= max_attempts)
) WITH (fillfactor = 80);
CREATE INDEX tasks_job_idx ON tasks (job_id);
-- Expiry scan of the lease reaper.
CREATE INDEX tasks_lease_expiry_idx ON tasks (lease_expires_at) WHERE state = 'leased';
-- Ready tasks, for re-waking tasks whose wake-up went missing.
CREATE INDEX tasks_ready_idx ON tasks (not_before) WHERE state = 'ready';

-- Cold, immutable description of a task.
CREATE TABLE task_specs (
    task_id     uuid PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    ord         integer NOT NULL,
    key         text NOT NULL,
    runtime     text NOT NULL CHECK (runtime IN ('exec', 'node', 'python', 'rust')),
    bundle      text NOT NULL,
    inputs      jsonb NOT NULL DEFAULT '{}'::jsonb,
    outputs     text[] NOT NULL DEFAULT '{}',
    UNIQUE (job_id, key)
);

CREATE TABLE task_deps (
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    depends_on  uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, depends_on),
    CHECK (task_id <> depends_on)
);
CREATE INDEX task_deps_depends_on_idx ON task_deps (depends_on);

-- One row per claim. `completion` is the normalised completion request and
-- `response` the answer given, so a replay returns the original answer.
CREATE TABLE attempts (
    task_id       uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt       integer NOT NULL CHECK (attempt >= 1),
    worker_id     text NOT NULL,
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    outcome       text CHECK (outcome IN ('succeeded', 'failed', 'lease_expired', 'cancelled')),
    progress      jsonb,
    completion    jsonb,
    response      jsonb,
    PRIMARY KEY (task_id, attempt)
);

CREATE TABLE task_events (
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    seq         bigint NOT NULL CHECK (seq >= 0),
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt, seq)
);

CREATE TABLE buffer_publishes (
    batch_id    uuid PRIMARY KEY,
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    dataset     text NOT NULL,
    object_key  text NOT NULL,
    rows        bigint NOT NULL CHECK (rows >= 0),
    sha256      text NOT NULL,
    state       text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'ingested', 'dead')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX buffer_publishes_task_idx ON buffer_publishes (task_id);

-- Transactional outbox (invariant 5): written in the same transaction as the
-- state change that must wake someone; published by the relay.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    topic         text NOT NULL CHECK (topic IN ('wakeup', 'buffer', 'alert')),
    payload       jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'dead')),
    available_at  timestamptz NOT NULL DEFAULT now(),
    tries         integer NOT NULL DEFAULT 0,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (available_at, id) WHERE state = 'pending';
CREATE INDEX outbox_dead_idx ON outbox (id) WHERE state = 'dead';
