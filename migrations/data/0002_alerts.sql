-- Alert routing and delivery (issue 13). The router takes each ingested
-- batch of a routed stream once: it records the batch here and writes one
-- delivery per (event, destination) in the same transaction. An event is
-- one row of the batch, `<batch id>-<line>`.
CREATE TABLE alert_routed_batches (
    org_id      uuid NOT NULL,
    batch_id    uuid NOT NULL,
    events      integer NOT NULL,
    deliveries  integer NOT NULL,
    routed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, batch_id)
);

CREATE TABLE alert_deliveries (
    -- Also the `webhook-id`: stable across retries and replays.
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL,
    event_id         text NOT NULL,
    dataset_id       uuid NOT NULL,
    route_id         uuid NOT NULL,
    destination_id   uuid NOT NULL,
    -- The body every try sends (the timestamp header and signature change).
    payload          jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'dead')),
    tries            integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- Held by a delivery worker until then; past it, another may take it.
    lease_until      timestamptz,
    last_status      integer,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, event_id, destination_id)
);
CREATE INDEX alert_deliveries_due_idx ON alert_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX alert_deliveries_dead_idx ON alert_deliveries (org_id, created_at) WHERE state = 'dead';
CREATE INDEX alert_deliveries_event_idx ON alert_deliveries (org_id, event_id);
