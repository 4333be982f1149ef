-- The workers seen recently (issue 26): each worker reports its slots,
-- how many are busy and the runtimes it runs every 10 s. The scrape reads
-- the rows seen in the last 30 s for the backlog per slot an autoscaler
-- scales on; the reaper forgets rows a day old.
CREATE TABLE worker_presence (
    worker_id  text PRIMARY KEY CHECK (length(worker_id) BETWEEN 1 AND 200),
    credential text NOT NULL,
    slots      integer NOT NULL CHECK (slots BETWEEN 1 AND 10000),
    busy       integer NOT NULL CHECK (busy BETWEEN 0 AND slots),
    runtimes   text[] NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);
