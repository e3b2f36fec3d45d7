-- The transactional outbox of seeds 002/003 (issue 15). A writer inserts a row in the same database
-- transaction as its business change; `orderflow` outbox-relay workers publish PENDING rows to
-- `topic`, keyed by `aggregate_id`, and mark them COMPLETED (or QUARANTINED after
-- `max_attempts` failures). Times are milliseconds since the Unix epoch. README "Outbox relay".
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
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
    created_at      BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    published_at    BIGINT,
    requeued_at     BIGINT,
    requeued_by     VARCHAR(255),
    CONSTRAINT outbox_status_known CHECK (status IN ('PENDING', 'COMPLETED', 'QUARANTINED'))
);
CREATE INDEX outbox_open ON outbox (topic, status, id);
CREATE INDEX outbox_aggregate ON outbox (aggregate_id, id);
CREATE INDEX outbox_claim ON outbox (claim_token);
CREATE INDEX outbox_published ON outbox (status, published_at);
