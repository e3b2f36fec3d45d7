//! The demo's inputs besides TPC-H: the seed scenarios, the simulated POS (its decision and answer
//! per order) and port topics.

use std::time::Duration;

use anyhow::{Context as _, Result};
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::worker::now_ms;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::kafkaio::limits::{topic_limits, SizeCheck};

pub(super) const SEED_HQ: &str = "HQ-SEED";

/// Seed 000 scenario 1 (single product short) and 2 (multi-product, one short: all or nothing).
pub(super) fn seed_inputs(now: i64) -> (Vec<InventoryAdjusted>, Vec<OrderCreated>) {
    let inv = |store: &str, items: &[(&str, i64)]| InventoryAdjusted {
        event_id: format!("seed-stock-{store}"),
        occurred_at: now,
        hq_id: SEED_HQ.into(),
        store_id: store.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "seed-000".into(),
        items: items.iter().map(|(p, q)| AdjustedItem { product_id: p.to_string(), delta: *q }).collect(),
        to_store_id: None,
        reason: None,
        operator: None,
    };
    let order = |id: &str, store: &str, items: &[(&str, i32)]| OrderCreated {
        event_id: format!("seed-order-{id}"),
        occurred_at: now,
        order_id: id.into(),
        customer_id: "C-SEED".into(),
        hq_id: SEED_HQ.into(),
        store_id: store.into(),
        items: items.iter().map(|(p, q)| OrderItem { product_id: p.to_string(), quantity: *q, unit_price: 1000 }).collect(),
    };
    (
        vec![inv("ST-SEED-1", &[("P-001", 5)]), inv("ST-SEED-2", &[("P-001", 10), ("P-002", 1)])],
        vec![order("SEED-000-1", "ST-SEED-1", &[("P-001", 10)]), order("SEED-000-2", "ST-SEED-2", &[("P-001", 5), ("P-002", 3)])],
    )
}

/// Store of the `--hot-orders` scenario: one product (`P-HOT`) that many orders want.
pub(super) const HOT_STORE: &str = "ST-HOT";

/// `--hot-orders n`: `n` orders `HOT-000001`… for one unit of `P-HOT` at `HQ-SEED:ST-HOT`, whose
/// stock is a fifth of them (at least 1). Units released by one order's expiry are soon
/// reserved by another, so a payment that arrives after its own expiry often finds none left:
/// the refund branch of issue 13, on purpose.
pub(super) fn hot_inputs(n: usize, now: i64) -> (InventoryAdjusted, Vec<OrderCreated>) {
    let stock = InventoryAdjusted {
        event_id: "hot-stock".into(),
        occurred_at: now,
        hq_id: SEED_HQ.into(),
        store_id: HOT_STORE.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "hot-orders".into(),
        items: vec![AdjustedItem { product_id: "P-HOT".into(), delta: (n as i64 / 5).max(1) }],
        to_store_id: None,
        reason: None,
        operator: None,
    };
    let orders = (1..=n)
        .map(|i| OrderCreated {
            event_id: format!("hot-order-{i:06}"),
            occurred_at: now,
            order_id: format!("HOT-{i:06}"),
            customer_id: format!("C-HOT-{i}"),
            hq_id: SEED_HQ.into(),
            store_id: HOT_STORE.into(),
            items: vec![OrderItem { product_id: "P-HOT".into(), quantity: 1, unit_price: 1000 }],
        })
        .collect();
    (stock, orders)
}

/// FNV-1a of `bytes`: a stable share of an order id, independent of arrival order.
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// What the POS does with a confirmed order: `"complete"` for `complete_pct` % of the order
/// ids, `"payment_failed"` for the next `fail_pct` %, else `"leave"` (to expire). A stable
/// share: a hash of the id, independent of arrival order.
pub(crate) fn pos_decision(order_id: &str, complete_pct: u32, fail_pct: u32) -> &'static str {
    let h = fnv1a(order_id.bytes());
    let bucket = (h % 100) as u32;
    if bucket < complete_pct {
        "complete"
    } else if bucket < complete_pct + fail_pct {
        "payment_failed"
    } else {
        "leave"
    }
}

/// How long the POS waits before paying order `order_id` whose reservation expires at
/// `expires_at` (ms since the epoch), at `now` (ms), under `--pay-at-expiry jitter`: until
/// `expires_at + offset`, the offset a stable share of the id in `[-jitter, +jitter]` (FNV-1a,
/// like [`pos_decision`]); zero when that moment has passed.
pub(crate) fn payment_delay(order_id: &str, expires_at: i64, jitter: Duration, now: i64) -> Duration {
    // The id's bytes backwards: a share independent of the POS decision's.
    let h = fnv1a(order_id.bytes().rev());
    let span = i64::try_from(jitter.as_millis()).unwrap_or(i64::MAX / 4).max(0);
    let offset = (h % (2 * span as u64 + 1)) as i64 - span;
    Duration::from_millis(u64::try_from(expires_at + offset - now).unwrap_or(0))
}

/// The POS's answer to a confirmed `order` for `decision` (of [`pos_decision`]): `(topic,
/// event)`, an `OrderCompleted` (payment taken, on `completed_topic`) or an `OrderCancelled`
/// `PAYMENT_FAILED` (on `cancelled_topic`); `None` for `"leave"` / `"late"`.
pub(crate) fn pos_answer(
    decision: &str,
    order: &OrderCreated,
    confirmed: &OrderConfirmed,
    completed_topic: &str,
    cancelled_topic: &str,
) -> Option<(String, Event)> {
    match decision {
        "complete" => Some((
            completed_topic.to_string(),
            Event::OrderCompleted(OrderCompleted {
                event_id: format!("pos-complete-{}", order.order_id),
                occurred_at: now_ms(),
                order_id: order.order_id.clone(),
                reservation_id: confirmed.reservation_id.clone(),
                hq_id: order.hq_id.clone(),
                store_id: order.store_id.clone(),
                items: order
                    .items
                    .iter()
                    .map(|i| SoldItem { product_id: i.product_id.clone(), quantity: i.quantity, actual_price: i.unit_price })
                    .collect(),
                total_amount: order.items.iter().map(|i| i.unit_price * i.quantity as i64).sum(),
            }),
        )),
        "payment_failed" => Some((
            cancelled_topic.to_string(),
            Event::OrderCancelled(OrderCancelled {
                event_id: format!("pos-payment-failed-{}", order.order_id),
                occurred_at: now_ms(),
                order_id: order.order_id.clone(),
                hq_id: order.hq_id.clone(),
                store_id: order.store_id.clone(),
                reason: cancel_reason::PAYMENT_FAILED.into(),
                reservation_id: Some(confirmed.reservation_id.clone()),
                customer_message: canceller::customer_message(cancel_reason::PAYMENT_FAILED).into(),
                refund_required: false,
                customer_id: None,
            }),
        )),
        _ => None,
    }
}

/// The topic the topology wires to port `port` of the (first) worker of kind `kind`.
pub(crate) fn port_topic(t: &orderflow_runtime::topology::Topology, kind: &str, port: &str) -> Result<String> {
    t.workers
        .values()
        .find(|w| w.kind == kind)
        .and_then(|w| w.outputs.get(port).cloned())
        .with_context(|| format!("the topology wires no {kind} port {port}"))
}

/// Checks every stock adjustment and order of `input`, encoded as it will be produced, against its
/// topic's size limit ([`SizeCheck`]) before the demo produces anything. (The POS simulator's
/// answers are produced as confirmations arrive: a refused one is logged.)
///
/// Errors: a record over its limit (nothing was produced), an encoding failure.
pub(super) async fn check_sizes(t: &orderflow_runtime::topology::Topology, codec: &Codec, input: &super::tpch::TpchInput) -> Result<()> {
    let (inventory, orders) = ("inventory.adjusted", "order.created");
    let mut sizes = SizeCheck::new(topic_limits(&t.broker, &[inventory.to_string(), orders.to_string()]).await?);
    for inv in &input.inventory {
        let (key, bytes) = (store_key(&inv.hq_id, &inv.store_id), codec.encode(inventory, &Event::InventoryAdjusted(inv.clone())).await?);
        sizes.record(|| format!("stock adjustment {}", inv.event_id), inventory, Some(key.as_bytes()), Some(&bytes), []);
    }
    for order in &input.orders {
        let bytes = codec.encode(orders, &Event::OrderCreated(order.clone())).await?;
        sizes.record(|| format!("order {}", order.order_id), orders, Some(order.order_id.as_bytes()), Some(&bytes), []);
    }
    sizes.finish()
}

/// Encodes `event` for `topic` and produces it keyed by `key`; waits for the acknowledgement.
pub(crate) async fn send(producer: &FutureProducer, codec: &Codec, topic: &str, key: &str, event: &Event) -> Result<()> {
    let bytes = codec.encode(topic, event).await?;
    producer
        .send(FutureRecord::to(topic).key(key).payload(&bytes), Timeout::Never)
        .await
        .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
    Ok(())
}
