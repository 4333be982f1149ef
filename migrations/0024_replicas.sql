-- The API replicas running now and the keys they sign and verify with
-- (issue 30): a replica that starts beside one it could not verify, or
-- that could not verify it, refuses to start instead of running side by
-- side with each refusing the other's tokens. Rows are heartbeated by
-- their replica, deleted on a clean stop, and ignored once stale.
CREATE TABLE api_replicas (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    signing_kid text NOT NULL,
    verify_kids text[] NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);
