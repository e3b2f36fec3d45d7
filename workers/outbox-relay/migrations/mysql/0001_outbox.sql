-- The transactional outbox of seeds 002/003 (issue 15). A writer inserts a row in the same database
-- transaction as its business change; `orderflow` outbox-relay workers publish PENDING rows to
-- `topic`, keyed by `aggregate_id`, and mark them COMPLETED (or QUARANTINED after
-- `max_attempts` failures). Times are milliseconds since the Unix epoch. README "Outbox relay".
CREATE TABLE outbox (
    id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    aggregate_id    VARCHAR(255) NOT NULL,
    topic           VARCHAR(249) NOT NULL,
    event_type      VARCHAR(128) NOT NULL,
    event_id        VARCHAR(64),
    payload         LONGTEXT NOT NULL,
    status          VARCHAR(16) NOT NULL DEFAULT 'PENDING',
    retry_count     BIGINT NOT NULL DEFAULT 0,
    last_error      VARCHAR(2000),
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    claim_token     VARCHAR(64),
    claimed_until   BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL DEFAULT (ROUND(UNIX_TIMESTAMP(NOW(3)) * 1000)),
    published_at    BIGINT,
    requeued_at     BIGINT,
    requeued_by     VARCHAR(255),
    CONSTRAINT outbox_status_known CHECK (status IN ('PENDING', 'COMPLETED', 'QUARANTINED')),
    INDEX outbox_open (topic, status, id),
    INDEX outbox_aggregate (aggregate_id, id),
    INDEX outbox_claim (claim_token),
    INDEX outbox_published (status, published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
