-- The reference order service of the main job (seed 002's synchronous order, issue 15): products
-- with their prices, and each accepted order with its lines, written in the same transaction as
-- its order.created outbox row (`orderflow demo`; applied by the demo, not by the relay, so a real order service's database gets only the outbox table). Amounts in the smallest currency
-- unit; times in ms since the Unix epoch.
CREATE TABLE products (
    product_id  VARCHAR(64) NOT NULL PRIMARY KEY,
    unit_price  BIGINT NOT NULL,
    active      BIGINT NOT NULL DEFAULT 1
);
CREATE TABLE orders (
    order_id     VARCHAR(64) NOT NULL PRIMARY KEY,
    customer_id  VARCHAR(64) NOT NULL,
    hq_id        VARCHAR(64) NOT NULL,
    store_id     VARCHAR(64) NOT NULL,
    status       VARCHAR(32) NOT NULL,
    total_amount BIGINT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE TABLE order_lines (
    order_id    VARCHAR(64) NOT NULL,
    line_no     BIGINT NOT NULL,
    product_id  VARCHAR(64) NOT NULL,
    quantity    BIGINT NOT NULL,
    unit_price  BIGINT NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
