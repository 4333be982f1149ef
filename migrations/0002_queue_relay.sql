-- The local profile's queue (SQS semantics) and the notifications that let
-- the outbox relay and queue long-polls react without busy polling.

CREATE TABLE queue_messages (
    id             bigserial PRIMARY KEY,
    queue          text NOT NULL,
    body           jsonb NOT NULL,
    -- Invisible until then: a delayed send, or a delivery in flight.
    visible_at     timestamptz NOT NULL DEFAULT now(),
    receive_count  integer NOT NULL DEFAULT 0,
    -- The current delivery's receipt; a new delivery replaces it, so a late
    -- delete or visibility change by an earlier receiver does nothing.
    receipt        uuid,
    sent_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_messages_visible_idx ON queue_messages (queue, visible_at, id);

CREATE FUNCTION notify_channel() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_channel('outbox');
CREATE TRIGGER queue_messages_notify AFTER INSERT ON queue_messages
    FOR EACH STATEMENT EXECUTE FUNCTION notify_channel('queue_messages');
