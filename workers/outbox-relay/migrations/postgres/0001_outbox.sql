-- The transactional outbox of seeds 002/003 (issue 15). A writer inserts a row in the same database
-- transaction as its business change; `orderflow` outbox-relay workers publish PENDING rows to
-- `topic`, keyed by `aggregate_id`, and mark them COMPLETED (or QUARANTINED after
-- `max_attempts` failures). Times are milliseconds since the Unix epoch. README "Outbox relay".
CREATE TABLE outbox (
    id              BIGSERIAL PRIMARY KEY,
    aggregate_id    VARCHAR(255) NOT NULL,
    topic           VARCHAR(249) NOT NULL,
    event_type      VARCHAR(128) NOT NULL,
    event_id        VARCHAR(64),
    payload         TEXT NOT NULL,
    status          VARCHAR(16) NOT NULL DEFAULT 'PENDING',
    retry_count     BIGINT NOT NULL DEFAULT 0,
    last_error      VARCHAR(2000),
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    claim_token     VARCHAR(64),
    claimed_until   BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL DEFAULT (floor(extract(epoch FROM clock_timestamp()) * 1000))::BIGINT,
    published_at    BIGINT,
    requeued_at     BIGINT,
    requeued_by     VARCHAR(255),
    CONSTRAINT outbox_status_known CHECK (status IN ('PENDING', 'COMPLETED', 'QUARANTINED'))
);
CREATE INDEX outbox_open ON outbox (topic, status, id) WHERE status <> 'COMPLETED';
CREATE INDEX outbox_aggregate ON outbox (aggregate_id, id);
CREATE INDEX outbox_claim ON outbox (claim_token);
CREATE INDEX outbox_published ON outbox (published_at) WHERE status = 'COMPLETED';

-- Wakes relays waiting in LISTEN orderflow_outbox as soon as a writer commits rows, so the publish
-- lag is not bounded by the poll interval.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('orderflow_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
