-- Alerting (issue 13, milestone 6): where an org's alert events go. A
-- destination is a webhook (Standard Webhooks: a per-destination secret);
-- a route sends the events of one stream dataset that match its filter (a
-- `where` map of the query service, checked against the stream's schema
-- when the route is made) to one destination. The events themselves and
-- their deliveries live in the data database (data migration 0002).
CREATE TABLE alert_destinations (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES orgs (id),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    url         text NOT NULL CHECK (url ~ '^https?://'),
    -- `whsec_` + base64 of the key, as Standard Webhooks writes it.
    secret      text NOT NULL CHECK (secret ~ '^whsec_'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE alert_routes (
    id              uuid PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES orgs (id),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    dataset_id      uuid NOT NULL REFERENCES datasets (id),
    destination_id  uuid NOT NULL REFERENCES alert_destinations (id) ON DELETE CASCADE,
    -- The `where` map (null: every event).
    matcher         jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);
CREATE INDEX alert_routes_dataset_idx ON alert_routes (dataset_id);
