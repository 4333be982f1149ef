-- The W3C trace context a job's attempts continue (issue 26, ADR 0023):
-- the submission's span when traces are on, else the caller's
-- `traceparent` as given (well formed, or not stored at all). Handed to
-- the worker with each claim; never part of any credential.
ALTER TABLE jobs ADD COLUMN traceparent text
    CHECK (traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');
