//! The bad-input corpus (`tests/corpus/bad_input/`) and its generator: one copy, used by the
//! `bad_input` integration test (which checks the committed files equal what [`generate`] makes
//! and sends them through the workers) and by the example that rewrites the files after a change
//! of the generator:
//!
//! ```text
//! cargo run --release -p orderflow --example bad_input_corpus
//! ```

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use orderflow_api::events::{
    cancel_reason, change_reason, failure_reason, store_key, AdjustedItem, InventoryAdjusted, OrderCancelled, OrderCompleted, OrderCreated,
    OrderItem, SoldItem,
};
use orderflow_api::fixtures;
use orderflow_api::{derive_event_id, Event};
use orderflow_runtime::codec::{Codec, SINGLE_OBJECT_HEADER_LEN};
use serde_json::{json, Value};

/// Where the corpus lives, relative to the repository root.
pub const CORPUS_DIR: &str = "tests/corpus/bad_input";
/// `max_record_bytes` of the run's topology copy; the oversized case is larger.
pub const MAX_RECORD_BYTES: usize = 4096;
/// `occurredAt` of every decodable case (2025-01-01T00:00:00Z): in the past, as a late outbox
/// relay could deliver.
pub const PAST_MS: i64 = 1_735_689_600_000;
/// `occurredAt` the future-timestamp case carries in its file (2100-01-01T00:00:00Z); the run
/// re-stamps it to send time + [`FUTURE_BY`].
pub const FAR_FUTURE_MS: i64 = 4_102_444_800_000;
/// How far ahead the future-timestamp case is sent (the topology allows 1 h of clock skew).
pub const FUTURE_BY: Duration = Duration::from_secs(2 * 24 * 3600);
/// The store of the run: restocked before the orders.
pub const HQ: &str = "HQ-BADIN";
pub const STORE: &str = "ST-BADIN";
/// A store that never receives inventory.
pub const UNKNOWN_STORE: &str = "ST-NOWHERE";
/// Products of the store (each restocked by the run).
pub const PRODUCTS: [&str; 5] = ["P-B1", "P-B2", "P-B3", "P-B4", "P-B5"];
/// Good orders of the run.
pub const GOOD_ORDERS: usize = 50;
/// The product only the misrouted orders buy, [`MISROUTED_UNITS`] each: the run restocks it
/// with [`MISROUTED_STOCK`] units, so each of them is reserved whatever the good orders took.
pub const MISROUTED_PRODUCT: &str = "P-BM";
/// Units of [`MISROUTED_PRODUCT`] the run restocks before the orders.
pub const MISROUTED_STOCK: i64 = 10;
/// Units of [`MISROUTED_PRODUCT`] each misrouted order buys.
pub const MISROUTED_UNITS: i32 = 2;
/// The product the misrouted `inventory.adjusted` restocks by [`ADJUSTED_DELTA`]: no other
/// record touches it.
pub const ADJUSTED_PRODUCT: &str = "P-BA";
pub const ADJUSTED_DELTA: i64 = 7;

/// The record key of good order `k` (also the key of the undecodable cases, so that they share
/// partitions with good orders).
pub fn good_order_id(k: usize) -> String {
    format!("O-GOOD-{k:02}")
}

/// The `eventId` of good order `k`'s `order.created`.
pub fn good_order_event_id(k: usize) -> String {
    format!("ev-good-{k:02}")
}

/// The id of the reservation the stock reserver makes for good order `k`:
/// `derive_event_id(<its order.created eventId>, "reservation")`.
pub fn good_reservation_id(k: usize) -> String {
    derive_event_id(&good_order_event_id(k), "reservation")
}

/// Good order `k` of the run: 1 to 3 lines of 1 to 4 units.
pub fn good_order(k: usize, occurred_at: i64) -> OrderCreated {
    let n = 1 + k % 3;
    OrderCreated {
        event_id: good_order_event_id(k),
        occurred_at,
        order_id: good_order_id(k),
        customer_id: format!("C-{k}"),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: (0..n)
            .map(|j| OrderItem {
                product_id: PRODUCTS[(k + j) % PRODUCTS.len()].into(),
                quantity: 1 + ((k * 7 + j * 3) % 4) as i32,
                unit_price: 1_000,
            })
            .collect(),
    }
}

/// Whether the run's POS fails the payment of good order `k` (`PAYMENT_FAILED`) instead of
/// completing it: every fifth order.
pub fn pos_fails(k: usize) -> bool {
    k % 5 == 4
}

// ------------------------------------------------------------------------------------------
// The corpus.

/// What a case must lead to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Dead-lettered with this class by every worker reading the case's topic.
    DeadLetter(String),
    /// `stock.reservation.failed` with this reason, then `order.cancelled` `INVALID_ORDER`.
    Rejected(String),
    /// A payment (`order.completed`) of the good order named by the case's key, sent by the run's
    /// POS while that order's reservation is live, just before the order's good payment: the
    /// stock reserver refuses it (`ProcessError::Invalid`), so the record it read
    /// (`stock.commands`, where the deduplicator forwards it) is dead-lettered once, by the stock
    /// reserver, to `dead_letter_topic` with error class `class`; nothing is deducted, released
    /// or settled for it, and the good payment then sells the order as usual.
    PaymentRejected { class: String, dead_letter_topic: String },
    /// A good record of an external topic keyed otherwise than orderflow would (issue 19):
    /// `reason` is `no_key` (sent without a record key) or `key_mismatch` (a key other than the
    /// event's `orderId`, or `hqId:storeId` for `inventory.adjusted`). Every worker reading the
    /// topic (only the deduplicator reads external topics) counts it once in
    /// `orderflow_misrouted_records_total{worker,topic,reason}` and processes it like any good
    /// record, re-keyed from the event's own fields, never from the record key: it is
    /// forwarded once to each repartition topic carrying its schema (`stock.commands` by
    /// `hqId:storeId`, `order.created.repartition` by `orderId`, on the partition orderflow's
    /// partitioner gives that key). An order (`O-MIS-<name>`, 2 × [`MISROUTED_PRODUCT`]) is then
    /// reserved, confirmed, completed by the run's POS, sold and settled `SOLD` exactly once,
    /// and never cancelled; an adjustment is applied once (one `stock.updated` per product).
    /// Never dead-lettered.
    Misrouted(String),
}

/// One bad record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// `<nn>-<name>`: also the file stem.
    pub name: String,
    pub topic: String,
    /// The record key; `None`: sent without a key (`null` in `cases.json`).
    pub key: Option<String>,
    /// The record value; `None` is a tombstone (null value).
    pub value: Option<Vec<u8>>,
    pub expect: Expect,
    /// Sent with `occurredAt` = send time + this instead of the file's: [`FUTURE_BY`] for the
    /// future-timestamp case, zero for the misrouted orders (their reservation's TTL counts from
    /// `occurredAt`). Only `order.created` cases are re-stamped.
    pub restamp: Option<Duration>,
    /// What is wrong with it.
    pub why: String,
}

impl Case {
    pub fn file(&self) -> Option<String> {
        self.value.as_ref().map(|_| format!("{}.bin", self.name))
    }

    pub fn to_json(&self) -> Value {
        let expect = match &self.expect {
            Expect::DeadLetter(class) => json!({ "dead_letter": class }),
            Expect::Rejected(reason) => json!({ "reservation_failed": reason, "order_cancelled": cancel_reason::INVALID_ORDER }),
            Expect::PaymentRejected { class, dead_letter_topic } => {
                json!({ "payment_rejected": class, "dead_letter_topic": dead_letter_topic })
            }
            Expect::Misrouted(reason) => json!({ "misrouted": reason }),
        };
        let mut v = json!({
            "name": self.name,
            "file": self.file(),
            "topic": self.topic,
            "key": self.key,
            "expect": expect,
            "why": self.why,
        });
        match self.restamp {
            Some(d) if d.is_zero() => v["occurred_at"] = json!("send time"),
            Some(d) => v["occurred_at"] = json!(format!("send time + {}", humantime::format_duration(d))),
            None => {}
        }
        v
    }

    /// The case from its `cases.json` entry and the corpus directory.
    pub fn from_json(v: &Value, dir: &Path) -> Case {
        let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("cases.json: {k} missing in {v}")).to_string();
        let expect = if let Some(class) = v["expect"]["dead_letter"].as_str() {
            Expect::DeadLetter(class.to_string())
        } else if let Some(class) = v["expect"]["payment_rejected"].as_str() {
            let topic = v["expect"]["dead_letter_topic"].as_str().unwrap_or_else(|| panic!("cases.json: dead_letter_topic missing in {v}"));
            Expect::PaymentRejected { class: class.to_string(), dead_letter_topic: topic.to_string() }
        } else if let Some(reason) = v["expect"]["misrouted"].as_str() {
            Expect::Misrouted(reason.to_string())
        } else {
            Expect::Rejected(v["expect"]["reservation_failed"].as_str().unwrap_or_else(|| panic!("cases.json: expect of {v}")).to_string())
        };
        let value = v["file"].as_str().map(|f| fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display())));
        let key = match v.get("key") {
            Some(Value::Null) => None,
            Some(Value::String(k)) => Some(k.clone()),
            _ => panic!("cases.json: key (a string, or null for none) missing in {v}"),
        };
        let restamp = v.get("occurred_at").map(|o| {
            let by = o.as_str().and_then(|o| o.strip_prefix("send time")).unwrap_or_else(|| panic!("cases.json: occurred_at of {v}"));
            match by.strip_prefix(" + ") {
                Some(d) => humantime::parse_duration(d).unwrap_or_else(|e| panic!("cases.json: occurred_at of {v}: {e}")),
                None if by.is_empty() => Duration::ZERO,
                None => panic!("cases.json: occurred_at of {v}"),
            }
        });
        Case { name: s("name"), topic: s("topic"), key, value, expect, restamp, why: s("why") }
    }

    /// The good order `k` a payment case is for (its key is `O-GOOD-<k>`); `None` for other cases.
    pub fn payment_of(&self) -> Option<usize> {
        match self.expect {
            Expect::PaymentRejected { .. } => self.key.as_deref()?.strip_prefix("O-GOOD-").and_then(|k| k.parse().ok()),
            _ => None,
        }
    }

    /// The order id inside a decodable case (`O-BAD-<name>`, `O-MIS-<name>`, or `O-GOOD-<k>` for
    /// a payment), if any.
    pub fn order_id(&self, codec: &Codec) -> Option<String> {
        self.value.as_deref().and_then(|b| codec.decode_local(b).ok()).and_then(|e| e.order_id().map(str::to_string))
    }
}

/// The record key [`generate`]'s cases are sent with.
enum Key {
    /// A good order's id (undecodable cases share partitions with good orders).
    Spread,
    Of(String),
    /// No key at all.
    Absent,
}

/// splitmix64, for the random-bytes case.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `order.created` of case `name`: eventId `ev-bad-<name>`, orderId `O-BAD-<name>`, the run's
/// store, one line of 1 × `P-B1`, at [`PAST_MS`].
pub fn bad_order(name: &str) -> OrderCreated {
    OrderCreated {
        event_id: format!("ev-bad-{name}"),
        occurred_at: PAST_MS,
        order_id: format!("O-BAD-{name}"),
        customer_id: "C-BAD".into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![OrderItem { product_id: PRODUCTS[0].into(), quantity: 1, unit_price: 1_000 }],
    }
}

/// `order.created` of misrouted case `name`: eventId `ev-mis-<name>`, orderId `O-MIS-<name>`,
/// customer `C-MIS-<name>`, the run's store, one line of [`MISROUTED_UNITS`] ×
/// [`MISROUTED_PRODUCT`], at [`PAST_MS`] (sent re-stamped to send time).
pub fn misrouted_order(name: &str) -> OrderCreated {
    OrderCreated {
        event_id: format!("ev-mis-{name}"),
        occurred_at: PAST_MS,
        order_id: format!("O-MIS-{name}"),
        customer_id: format!("C-MIS-{name}"),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![OrderItem { product_id: MISROUTED_PRODUCT.into(), quantity: MISROUTED_UNITS, unit_price: 1_000 }],
    }
}

/// The key orderflow gives `event` on external topic `topic`: `hqId:storeId` on
/// `inventory.adjusted`, its `orderId` on the order topics.
pub fn own_key(topic: &str, event: &Event) -> Option<String> {
    if topic == "inventory.adjusted" {
        Some(event.store_key())
    } else {
        event.order_id().map(str::to_string)
    }
}

pub fn lines(items: &[(&str, i32)]) -> Vec<OrderItem> {
    items.iter().map(|&(p, quantity)| OrderItem { product_id: p.into(), quantity, unit_price: 1_000 }).collect()
}

/// Every case, made with the codec. Asserts that each undecodable value fails to decode with
/// the class it is meant to have and that each other one decodes.
pub fn generate(codec: &Codec) -> Vec<Case> {
    let enc = |e: Event| codec.encode_local(&e).expect("corpus events encode");
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name: &str, topic: &str, key: Key, value: Option<Vec<u8>>, expect: Expect, why: &str| {
        let n = cases.len() + 1;
        let key = match key {
            Key::Spread => Some(good_order_id((n * 13) % GOOD_ORDERS)),
            Key::Of(k) => Some(k),
            Key::Absent => None,
        };
        let restamp = match (&expect, name) {
            (_, "future-timestamp") => Some(FUTURE_BY),
            (Expect::Misrouted(_), _) if topic == "order.created" => Some(Duration::ZERO),
            _ => None,
        };
        cases.push(Case { name: format!("{n:02}-{name}"), topic: topic.into(), key, value, restamp, expect, why: why.into() });
    };
    let dead = |c: &str| Expect::DeadLetter(c.to_string());
    let rejected = |r: &str| Expect::Rejected(r.to_string());
    let own = |name: &str| Key::Of(format!("O-BAD-{name}"));

    // Not Avro at all.
    let json_text = br#"{"eventId":"ev-bad-json","orderId":"O-BAD-json","items":[{"productId":"P-B1","quantity":1}]}"#;
    add("not-avro-json", "order.created", Key::Spread, Some(json_text.to_vec()), dead("not_avro"), "JSON text instead of Avro");
    let mut seed = 0x0BAD_1A9E_u64;
    let mut random: Vec<u8> = (0..8).flat_map(|_| splitmix(&mut seed).to_le_bytes()).collect();
    if matches!(random[0], 0x00 | 0xC3) {
        random[0] = 0x5A;
    }
    add(
        "not-avro-random",
        "order.completed",
        Key::Spread,
        Some(random),
        dead("not_avro"),
        "64 random bytes (first byte neither C3 nor 00)",
    );

    // Unknown schema.
    let mut unknown = enc(bad_order("unknown-fingerprint").into());
    unknown[2..SINGLE_OBJECT_HEADER_LEN].copy_from_slice(&0x0123_4567_89ab_cdef_u64.to_le_bytes());
    add(
        "unknown-fingerprint",
        "order.created",
        Key::Spread,
        Some(unknown),
        dead("unknown_schema"),
        "single-object header with a fingerprint of no schema (0x0123456789abcdef), then an OrderCreated datum",
    );
    let cancel = OrderCancelled {
        event_id: "ev-bad-confluent".into(),
        order_id: "O-BAD-confluent".into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        ..fixtures::order_cancelled("x", "x", cancel_reason::PAYMENT_FAILED, PAST_MS)
    };
    let mut confluent = vec![0x00, 0, 0, 0, 7];
    confluent.extend_from_slice(&enc(cancel.into())[SINGLE_OBJECT_HEADER_LEN..]);
    add(
        "confluent-framed",
        "order.cancelled",
        Key::Spread,
        Some(confluent),
        dead("unknown_schema"),
        "Confluent framing (00, schema id 7) while no schema registry is configured",
    );

    // Truncated.
    let full = enc(bad_order("truncated").into());
    add(
        "truncated-header",
        "order.created",
        Key::Spread,
        Some(full[..6].to_vec()),
        dead("truncated"),
        "C3 01 and 4 of the 8 fingerprint bytes",
    );
    add(
        "truncated-datum",
        "order.created",
        Key::Spread,
        Some(full[..full.len() / 2].to_vec()),
        dead("truncated"),
        "a valid OrderCreated cut in the middle of its datum",
    );

    // Malformed.
    let mut trailing = enc(bad_order("trailing-bytes").into());
    trailing.extend_from_slice(&[0x01, 0x02, 0x03]);
    add(
        "malformed-trailing-bytes",
        "order.created",
        Key::Spread,
        Some(trailing),
        dead("malformed"),
        "a valid OrderCreated followed by 3 bytes",
    );
    let mut varint = full[..SINGLE_OBJECT_HEADER_LEN].to_vec();
    varint.extend_from_slice(&[0xFF; 11]);
    varint.extend_from_slice(b"\x02O");
    add(
        "malformed-bad-varint",
        "order.created",
        Key::Spread,
        Some(varint),
        dead("malformed"),
        "OrderCreated header, then a varint of 11 continuation bytes (longer than any long) as the eventId length",
    );

    // Valid Avro, wrong schema for the topic.
    let reserved = orderflow_api::events::StockReserved {
        hq_id: HQ.into(),
        store_id: STORE.into(),
        ..fixtures::stock_reserved(
            "ev-bad-wrong-schema-1",
            "O-BAD-wrong-schema-1",
            "R-BAD",
            PAST_MS,
            PAST_MS + 300_000,
            &[(PRODUCTS[0], 1)],
        )
    };
    add(
        "wrong-schema-stock-reserved",
        "order.created",
        own("wrong-schema-1"),
        Some(enc(reserved.into())),
        dead("wrong_schema"),
        "a valid StockReserved on order.created",
    );
    let completed = OrderCompleted {
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![SoldItem { product_id: PRODUCTS[0].into(), quantity: 1, actual_price: 1_000 }],
        total_amount: 1_000,
        ..fixtures::order_completed("ev-bad-wrong-schema-2", "O-BAD-wrong-schema-2", "R-BAD", PAST_MS)
    };
    add(
        "wrong-schema-order-completed",
        "order.created",
        own("wrong-schema-2"),
        Some(enc(completed.into())),
        dead("wrong_schema"),
        "a valid OrderCompleted on order.created",
    );
    add(
        "wrong-schema-order-created",
        "inventory.adjusted",
        Key::Of(store_key(HQ, STORE)),
        Some(enc(bad_order("wrong-schema-3").into())),
        dead("wrong_schema"),
        "a valid OrderCreated on inventory.adjusted",
    );

    // Valid Avro, invalid business content: answered, not dead-lettered.
    let business: [(&str, Vec<OrderItem>, &str, &str); 7] = [
        ("quantity-zero", lines(&[(PRODUCTS[0], 0)]), failure_reason::INVALID_QUANTITY, "a line of quantity 0"),
        ("quantity-negative", lines(&[(PRODUCTS[0], -3)]), failure_reason::INVALID_QUANTITY, "a line of quantity -3"),
        ("quantity-huge", lines(&[(PRODUCTS[0], 2_000_000_000)]), failure_reason::INVALID_QUANTITY, "a line of quantity 2,000,000,000"),
        ("empty-items", Vec::new(), failure_reason::EMPTY_ORDER, "no lines at all"),
        (
            "duplicate-product",
            lines(&[(PRODUCTS[0], 1), (PRODUCTS[1], 1), (PRODUCTS[0], 2)]),
            failure_reason::DUPLICATE_PRODUCT,
            "P-B1 on two lines",
        ),
        ("unknown-store", lines(&[(PRODUCTS[0], 1)]), failure_reason::UNKNOWN_STORE, "store ST-NOWHERE never received inventory"),
        ("empty-product-id", lines(&[("", 1)]), failure_reason::INVALID_PRODUCT, "a line with an empty productId"),
    ];
    for (name, items, reason, why) in business {
        let mut order = OrderCreated { items, ..bad_order(name) };
        if name == "unknown-store" {
            order.store_id = UNKNOWN_STORE.into();
        }
        add(name, "order.created", own(name), Some(enc(order.into())), rejected(reason), why);
    }

    // Missing ids: nothing to answer, dead-lettered.
    add(
        "empty-order-id",
        "order.created",
        Key::Of(String::new()),
        Some(enc(OrderCreated { order_id: String::new(), ..bad_order("empty-order-id") }.into())),
        dead("invalid"),
        "an order.created with an empty orderId (and so an empty key)",
    );
    add(
        "empty-event-id",
        "order.created",
        own("empty-event-id"),
        Some(enc(OrderCreated { event_id: String::new(), ..bad_order("empty-event-id") }.into())),
        dead("invalid"),
        "an order.created with an empty eventId",
    );
    add(
        "empty-store-id",
        "order.created",
        own("empty-store-id"),
        Some(enc(OrderCreated { store_id: String::new(), ..bad_order("empty-store-id") }.into())),
        dead("invalid"),
        "an order.created with an empty storeId",
    );

    // Runtime limits.
    add(
        "future-timestamp",
        "order.created",
        own("future-timestamp"),
        Some(enc(OrderCreated { occurred_at: FAR_FUTURE_MS, ..bad_order("future-timestamp") }.into())),
        dead("future_timestamp"),
        "occurredAt 2 days ahead of the clock (sent re-stamped; the file holds 2100-01-01)",
    );
    let oversized = OrderCreated { customer_id: format!("C-{}", "X".repeat(5_000)), ..bad_order("oversized") };
    add(
        "oversized",
        "order.created",
        own("oversized"),
        Some(enc(oversized.into())),
        dead("oversized"),
        "a valid OrderCreated of ~5 KB, above the run's max_record_bytes (4096)",
    );
    add("tombstone", "order.completed", Key::Spread, None, dead("truncated"), "a null value (tombstone)");

    // Payments the stock reserver refuses while the order's reservation is live (issue 13): each
    // one for a good order the POS completes, sent by it just before that order's good payment.
    let payment_rejected = || Expect::PaymentRejected { class: "invalid".into(), dead_letter_topic: "stock.commands.dlq".into() };
    let sold = |items: &[(&str, i32)]| -> Vec<SoldItem> {
        items.iter().map(|&(p, quantity)| SoldItem { product_id: p.into(), quantity, actual_price: 1_000 }).collect()
    };
    let reserved = |k: usize| -> Vec<(String, i32)> { good_order(k, 0).items.into_iter().map(|i| (i.product_id, i.quantity)).collect() };
    let payment = |name: &str, k: usize, reservation_id: String, items: Vec<SoldItem>| -> Vec<u8> {
        assert!(k < GOOD_ORDERS && !pos_fails(k), "{name}: good order {k} is not one the POS completes");
        let total_amount = items.iter().map(|i| i64::from(i.quantity) * i.actual_price).sum();
        enc(OrderCompleted {
            event_id: format!("ev-bad-{name}"),
            occurred_at: PAST_MS,
            order_id: good_order_id(k),
            reservation_id,
            hq_id: HQ.into(),
            store_id: STORE.into(),
            items,
            total_amount,
        }
        .into())
    };
    // (a) Another reservation, the order's items: k = 6 holds 3 × P-B2.
    let k = 6;
    let r = reserved(k);
    let all: Vec<(&str, i32)> = r.iter().map(|(p, q)| (p.as_str(), *q)).collect();
    add(
        "wrong-reservation-id",
        "order.completed",
        Key::Of(good_order_id(k)),
        Some(payment("wrong-reservation-id", k, "R-WRONG".into(), sold(&all))),
        payment_rejected(),
        &format!("a payment of {} naming reservation R-WRONG instead of its live one, selling what it holds", good_order_id(k)),
    );
    // (b) One line above what is reserved: k = 7 holds 2 × P-B3, 1 × P-B4.
    let k = 7;
    let r = reserved(k);
    let over: Vec<(&str, i32)> = r.iter().enumerate().map(|(j, (p, q))| (p.as_str(), if j == 0 { q + 1 } else { *q })).collect();
    add(
        "over-sale",
        "order.completed",
        Key::Of(good_order_id(k)),
        Some(payment("over-sale", k, good_reservation_id(k), sold(&over))),
        payment_rejected(),
        &format!("a payment of {} (its reservation) selling {} × {} of {} reserved", good_order_id(k), r[0].1 + 1, r[0].0, r[0].1),
    );
    // (c) Every held line, plus a product the order does not hold: k = 8 holds P-B4, P-B5, P-B1.
    let k = 8;
    let r = reserved(k);
    let stranger = PRODUCTS.iter().copied().find(|p| r.iter().all(|(q, _)| q != p)).expect("a product not in the order");
    let mut lines_c: Vec<(&str, i32)> = r.iter().map(|(p, q)| (p.as_str(), *q)).collect();
    lines_c.push((stranger, 1));
    add(
        "unreserved-product",
        "order.completed",
        Key::Of(good_order_id(k)),
        Some(payment("unreserved-product", k, good_reservation_id(k), sold(&lines_c))),
        payment_rejected(),
        &format!("a payment of {} (its reservation) selling what it holds plus 1 × {stranger}, which it does not hold", good_order_id(k)),
    );
    // (d) Exactly the held units, but one product split over two lines: k = 11 holds 2 × P-B2,
    // 1 × P-B3, 4 × P-B4.
    let k = 11;
    let r = reserved(k);
    let (twice, q) = r.iter().find(|(_, q)| *q >= 2).map(|(p, q)| (p.as_str(), *q)).expect("a line of 2 or more units");
    let mut lines_d: Vec<(&str, i32)> = r.iter().map(|(p, held)| (p.as_str(), if p == twice { 1 } else { *held })).collect();
    lines_d.push((twice, q - 1));
    add(
        "sold-twice-listed",
        "order.completed",
        Key::Of(good_order_id(k)),
        Some(payment("sold-twice-listed", k, good_reservation_id(k), sold(&lines_d))),
        payment_rejected(),
        &format!(
            "a payment of {} (its reservation) selling what it holds, but {twice} on two lines (1 + {} of {q})",
            good_order_id(k),
            q - 1
        ),
    );

    // Good records keyed otherwise than orderflow would (issue 19): re-keyed from the event by the
    // deduplicator, counted as misrouted, processed like any good record.
    let misrouted = |reason: &str| Expect::Misrouted(reason.to_string());
    add(
        "order-created-no-key",
        "order.created",
        Key::Absent,
        Some(enc(misrouted_order("no-key").into())),
        misrouted("no_key"),
        "a good order.created sent without a record key (a producer that forgot it; a librdkafka producer then picks any partition)",
    );
    let wrong_key = misrouted_order("wrong-key");
    add(
        "order-created-wrong-key",
        "order.created",
        Key::Of(wrong_key.customer_id.clone()),
        Some(enc(wrong_key.into())),
        misrouted("key_mismatch"),
        "a good order.created keyed by its customerId (C-MIS-wrong-key) instead of its orderId",
    );
    let adjusted = InventoryAdjusted {
        event_id: "ev-mis-inventory-wrong-key".into(),
        occurred_at: PAST_MS,
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "restock-mis-wrong-key".into(),
        items: vec![AdjustedItem { product_id: ADJUSTED_PRODUCT.into(), delta: ADJUSTED_DELTA }],
        to_store_id: None,
        reason: None,
        operator: None,
    };
    add(
        "inventory-adjusted-wrong-key",
        "inventory.adjusted",
        Key::Of(STORE.into()),
        Some(enc(adjusted.into())),
        misrouted("key_mismatch"),
        &format!("a good restock of {ADJUSTED_DELTA} × {ADJUSTED_PRODUCT} keyed by its storeId alone ({STORE}) instead of hqId:storeId"),
    );

    // Self-check: each value fails to decode as meant, or decodes.
    for c in &cases {
        let Some(value) = &c.value else { continue };
        let decoded = codec.decode_local(value);
        match (&c.expect, decoded) {
            (Expect::DeadLetter(class), Err(e)) => assert_eq!(e.class(), class, "{}: {e}", c.name),
            (Expect::DeadLetter(class), Ok(_)) => {
                assert!(["wrong_schema", "invalid", "future_timestamp", "oversized"].contains(&class.as_str()), "{} decodes", c.name)
            }
            (Expect::Rejected(_), Err(e)) => panic!("{} does not decode: {e}", c.name),
            (Expect::Rejected(_), Ok(_)) => {}
            (Expect::PaymentRejected { .. }, Err(e)) => panic!("{} does not decode: {e}", c.name),
            (Expect::PaymentRejected { .. }, Ok(Event::OrderCompleted(p))) => {
                let k = c.payment_of().unwrap_or_else(|| panic!("{}: key {:?} is no good order", c.name, c.key));
                assert_eq!(p.order_id, good_order_id(k), "{}: names another order than its key", c.name);
                assert!(k < GOOD_ORDERS && !pos_fails(k), "{}: good order {k} is not one the POS completes", c.name);
            }
            (Expect::PaymentRejected { .. }, Ok(e)) => panic!("{}: a {} is no payment", c.name, e.schema_name()),
            (Expect::Misrouted(_), Err(e)) => panic!("{} does not decode: {e}", c.name),
            (Expect::Misrouted(reason), Ok(e)) => {
                let own = own_key(&c.topic, &e).unwrap_or_else(|| panic!("{}: a {} has no key field", c.name, e.schema_name()));
                match (reason.as_str(), c.key.as_deref()) {
                    ("no_key", None) => {}
                    ("key_mismatch", Some(k)) => assert_ne!(k, own, "{}: keyed by its own key", c.name),
                    other => panic!("{}: misrouted as {other:?}", c.name),
                }
                match &e {
                    Event::OrderCreated(o) => {
                        assert_eq!(c.restamp, Some(Duration::ZERO), "{}: a misrouted order is sent at send time", c.name);
                        assert!(
                            o.items.iter().all(|i| i.product_id == MISROUTED_PRODUCT),
                            "{}: buys more than {MISROUTED_PRODUCT}",
                            c.name
                        );
                    }
                    Event::InventoryAdjusted(a) => {
                        assert!(
                            a.items.iter().all(|i| i.product_id == ADJUSTED_PRODUCT),
                            "{}: adjusts more than {ADJUSTED_PRODUCT}",
                            c.name
                        )
                    }
                    other => panic!("{}: a misrouted {} (the run checks orders and adjustments)", c.name, other.schema_name()),
                }
            }
        }
        if c.restamp.is_some() {
            assert!(matches!(codec.decode_local(value), Ok(Event::OrderCreated(_))), "{}: only order.created cases are re-stamped", c.name);
        }
    }
    let units: i64 = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Misrouted(_)))
        .filter_map(|c| match c.value.as_deref().map(|v| codec.decode_local(v)) {
            Some(Ok(Event::OrderCreated(o))) => Some(o.items.iter().map(|i| i64::from(i.quantity)).sum::<i64>()),
            _ => None,
        })
        .sum();
    assert!(units <= MISROUTED_STOCK, "the misrouted orders buy {units} × {MISROUTED_PRODUCT}, more than the {MISROUTED_STOCK} restocked");
    let mut paid_orders = BTreeSet::new();
    for c in cases.iter().filter_map(Case::payment_of) {
        assert!(paid_orders.insert(c), "two payment cases for good order {c}");
    }
    let oversized = cases.iter().find(|c| c.name.ends_with("oversized")).and_then(|c| c.value.as_ref()).expect("oversized case");
    assert!(oversized.len() > MAX_RECORD_BYTES && oversized.len() < 2 * MAX_RECORD_BYTES, "oversized case is {} bytes", oversized.len());
    cases
}

/// The codec of the repository at `root` (its `avro/`).
pub fn codec(root: &Path) -> Codec {
    Codec::load(&root.join("avro"), None).expect("schemas load")
}

/// The committed corpus.
pub fn load_corpus(root: &Path) -> Vec<Case> {
    let dir = root.join(CORPUS_DIR);
    let manifest: Value =
        serde_json::from_slice(&fs::read(dir.join("cases.json")).expect("tests/corpus/bad_input/cases.json")).expect("JSON");
    manifest["cases"].as_array().expect("cases").iter().map(|v| Case::from_json(v, &dir)).collect()
}

pub fn manifest(cases: &[Case]) -> String {
    let v = json!({
        "generated_by": "tests/bad_input_corpus/mod.rs (cargo run --release -p orderflow --example bad_input_corpus)",
        "requires": {
            "max_record_bytes": MAX_RECORD_BYTES,
            "store_with_inventory": store_key(HQ, STORE),
            "misrouted_orders_stock": { MISROUTED_PRODUCT: MISROUTED_STOCK },
        },
        "cases": cases.iter().map(Case::to_json).collect::<Vec<_>>(),
    });
    serde_json::to_string_pretty(&v).expect("JSON") + "\n"
}

/// (Re)writes the corpus directory of the repository at `root` from [`generate`]; returns how
/// many cases it wrote.
pub fn write(root: &Path) -> usize {
    let dir = root.join(CORPUS_DIR);
    if dir.exists() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "bin" || e == "json") {
                fs::remove_file(path).unwrap();
            }
        }
    }
    fs::create_dir_all(&dir).unwrap();
    let cases = generate(&codec(root));
    for c in &cases {
        if let (Some(file), Some(value)) = (c.file(), &c.value) {
            fs::write(dir.join(file), value).unwrap();
        }
    }
    fs::write(dir.join("cases.json"), manifest(&cases)).unwrap();
    cases.len()
}
