//! Rust shapes of the Avro events in `avro/` (one struct per `.avsc`, same field names).
//!
//! Timestamps are milliseconds since the Unix epoch (UTC), Avro `timestamp-millis`.
//! Quantities are whole units (`int`), money is in minor currency units (`long`).

use serde::{Deserialize, Serialize};

/// Reason codes carried by `order.cancelled` (domain contract, seeds 000/001).
pub mod cancel_reason {
    /// Stock reserver could not serve every item (seed 000).
    pub const INSUFFICIENT_STOCK: &str = "INSUFFICIENT_STOCK";
    /// The reservation passed its TTL without payment (seed 004).
    pub const RESERVATION_EXPIRED: &str = "RESERVATION_EXPIRED";
    /// POS reported a failed payment (seed 004).
    pub const PAYMENT_FAILED: &str = "PAYMENT_FAILED";
    /// No stock answer or no saga end in time (seed 001): no `stock.reserved` /
    /// `stock.reservation.failed` within the stock answer timeout (3 minutes), or the saga still
    /// open at its bound (10 minutes), both counted from when the canceller processed
    /// `order.created`.
    pub const SAGA_TIMEOUT: &str = "SAGA_TIMEOUT";
    /// The order's content cannot be served as written (issue 4): the stock reserver answered
    /// with one of the [`super::failure_reason::INVALID_CONTENT`] reasons.
    pub const INVALID_ORDER: &str = "INVALID_ORDER";
    /// The POS took payment after the order's reservation had expired or been released, and the
    /// store no longer had the units to sell (issue 13): the stock reserver settled the payment
    /// `REFUND_REQUIRED`; the cancellation carries `refundRequired = true` (the POS refunds).
    pub const PAYMENT_AFTER_EXPIRY: &str = "PAYMENT_AFTER_EXPIRY";
}

/// Outcomes of `order.settled`: the stock reserver's verdict on a payment (issue 13). Exactly one
/// per payment (`order.completed` eventId); the order's outcome everywhere.
pub mod settlement {
    /// The payment's units were deducted (`stock.updated` `SALE`), from the live reservation or,
    /// when it had expired or been released, re-reserved at payment time (`late = true`).
    pub const SOLD: &str = "SOLD";
    /// Nothing was deducted and the customer must be refunded: the reservation had expired or
    /// been released and the store no longer had the units. `reason` says why
    /// (`PAYMENT_AFTER_EXPIRY`).
    pub const REFUND_REQUIRED: &str = "REFUND_REQUIRED";
}

/// Reason codes of `stock.reservation.failed`. Every failure reserves nothing and is final for
/// the order (one reservation per order, domain rule 5).
pub mod failure_reason {
    /// At least one item has `requested > available` (seed 000). `items`: the short products,
    /// `available = on hand − reserved` (≥ 0).
    pub const INSUFFICIENT_STOCK: &str = "INSUFFICIENT_STOCK";
    /// A line's quantity is ≤ 0 or above the reserver's `MAX_QUANTITY` (issue 4). `items`: each
    /// offending line, `requested` = its quantity, `available` = the product's available units.
    pub const INVALID_QUANTITY: &str = "INVALID_QUANTITY";
    /// The order has no items (issue 4). `items` is empty.
    pub const EMPTY_ORDER: &str = "EMPTY_ORDER";
    /// The same productId is on two or more lines (issue 4; rejected, not merged). `items`: each
    /// repeated product once, `requested` = the sum of its lines (saturating at `i32::MAX`),
    /// `available` = its available units.
    pub const DUPLICATE_PRODUCT: &str = "DUPLICATE_PRODUCT";
    /// The store never received inventory: no `inventory.adjusted` was ever applied to this
    /// `hqId:storeId` (issue 4). `items`: every line, `available` = 0.
    pub const UNKNOWN_STORE: &str = "UNKNOWN_STORE";
    /// A line has an empty productId (issue 4). `items`: each such line, `available` = 0.
    pub const INVALID_PRODUCT: &str = "INVALID_PRODUCT";

    /// The reasons that mean "the order's content is invalid", as opposed to a stock shortage:
    /// the canceller cancels these with [`super::cancel_reason::INVALID_ORDER`].
    pub const INVALID_CONTENT: &[&str] = &[INVALID_QUANTITY, EMPTY_ORDER, DUPLICATE_PRODUCT, UNKNOWN_STORE, INVALID_PRODUCT];
}

/// Reasons of `stock.reservation.released`.
pub mod release_reason {
    /// Released because `stock.reservation.expired` reached the reserver first.
    pub const EXPIRED: &str = "EXPIRED";
    /// Released because `order.cancelled` reached the reserver first.
    pub const CANCELLED: &str = "CANCELLED";
    /// The reserved units a payment did not sell (a partial sale, issue 13): the order itself
    /// was sold.
    pub const UNSOLD: &str = "UNSOLD";
}

/// `changeReason` values of `stock.updated` (seed 004, issue 16).
pub mod change_reason {
    /// A payment deducted sold units from a store (and so from its HQ's total).
    pub const SALE: &str = "SALE";
    /// New units arrived at the HQ (or through it straight at a store).
    pub const RESTOCK: &str = "RESTOCK";
    /// HQ unallocated units moved to a store (HQ total unchanged).
    pub const DISTRIBUTION: &str = "DISTRIBUTION";
    /// Units moved between two stores of one HQ (HQ total unchanged).
    pub const TRANSFER: &str = "TRANSFER";
    /// An audited signed correction of the HQ's or a store's figure.
    pub const CORRECTION: &str = "CORRECTION";
    /// HQ units allocated to a short store to serve an order (HQ fallback, seed 004).
    pub const HQ_FALLBACK: &str = "HQ_FALLBACK";
    /// Units an HQ fallback allocated, given back to the HQ when the order released them.
    pub const HQ_RETURN: &str = "HQ_RETURN";
}

/// `adjustmentType` values of `inventory.adjusted` (seed 004, issue 16); see the schema's doc.
pub mod adjustment_type {
    /// Units arrive at the HQ (`storeId` empty) or through it at a store.
    pub const RESTOCK: &str = "RESTOCK";
    /// HQ unallocated → store `storeId`.
    pub const DISTRIBUTION: &str = "DISTRIBUTION";
    /// Store `storeId` → store `toStoreId` of the same HQ.
    pub const TRANSFER: &str = "TRANSFER";
    /// Signed correction of the HQ's (`storeId` empty) or a store's figure, with a reason.
    pub const CORRECTION: &str = "CORRECTION";
    /// Every type, in the order above.
    pub const ALL: &[&str] = &[RESTOCK, DISTRIBUTION, TRANSFER, CORRECTION];
}

/// `step` values of `StockAllocation` (issue 16): the stock hierarchy protocol between the HQ's
/// and the stores' state shards.
pub mod allocation_step {
    /// Store → HQ: the units an order is short at the store.
    pub const FALLBACK_REQUEST: &str = "FALLBACK_REQUEST";
    /// HQ → store: the short units, taken from the HQ's unallocated stock (now in transit).
    pub const FALLBACK_GRANT: &str = "FALLBACK_GRANT";
    /// HQ → store: not enough at the HQ; `items` carry what the HQ had.
    pub const FALLBACK_DENY: &str = "FALLBACK_DENY";
    /// HQ → store: distributed units (debited at the HQ) to credit.
    pub const DISTRIBUTION: &str = "DISTRIBUTION";
    /// Store → store: transferred units (debited at `fromStoreId`) to credit.
    pub const TRANSFER: &str = "TRANSFER";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    pub product_id: String,
    pub quantity: i32,
    pub unit_price: i64,
}

/// `order.created` (key orderId).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub customer_id: String,
    pub hq_id: String,
    pub store_id: String,
    pub items: Vec<OrderItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservedItem {
    pub product_id: String,
    pub reserved: i32,
}

/// `stock.reserved` (key orderId).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockReserved {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub reservation_id: String,
    pub hq_id: String,
    pub store_id: String,
    pub expires_at: i64,
    pub items: Vec<ReservedItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedItem {
    pub product_id: String,
    pub requested: i32,
    pub available: i32,
}

/// `stock.reservation.failed` (key orderId).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockReservationFailed {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub hq_id: String,
    pub store_id: String,
    pub reason: String,
    pub items: Vec<FailedItem>,
}

/// `order.confirmed` (key orderId).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderConfirmed {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub reservation_id: String,
    pub hq_id: String,
    pub store_id: String,
    pub status: String,
    pub expires_at: i64,
}

/// `order.cancelled` (key orderId).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelled {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub hq_id: String,
    pub store_id: String,
    pub reason: String,
    pub reservation_id: Option<String>,
    pub customer_message: String,
    /// Whether the customer paid and must be refunded (issue 13: `PAYMENT_AFTER_EXPIRY`). Added
    /// in schema version 2 with default `false`: records written with version 1 read as `false`.
    #[serde(default)]
    pub refund_required: bool,
    /// The customer to notify (from `order.created`), so a notifier needs no join (issue 13).
    /// Added in schema version 2 with default `null`; `None` when the canceller never saw the
    /// order's `order.created`, and in POS cancellations that do not set it.
    #[serde(default)]
    pub customer_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SoldItem {
    pub product_id: String,
    pub quantity: i32,
    pub actual_price: i64,
}

/// `order.completed` (key orderId), produced by POS after payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCompleted {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub reservation_id: String,
    pub hq_id: String,
    pub store_id: String,
    pub items: Vec<SoldItem>,
    pub total_amount: i64,
}

/// One settled line of `order.settled`: `quantity` units of `product_id` deducted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettledItem {
    pub product_id: String,
    pub quantity: i32,
}

/// `order.settled` (key orderId), produced by the stock reserver: its verdict on one payment
/// (`order.completed`), see [`settlement`]. The canceller, the order confirmer and the
/// reservation expirer take an order's paid outcome from it, never from the POS event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderSettled {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub hq_id: String,
    pub store_id: String,
    /// `eventId` of the `order.completed` this settles.
    pub payment_event_id: String,
    /// The reservation the payment named.
    pub reservation_id: String,
    /// [`settlement::SOLD`] or [`settlement::REFUND_REQUIRED`].
    pub outcome: String,
    /// Sold after the reservation had expired or been released (re-reserved at payment time).
    pub late: bool,
    /// Why a refund is required ([`cancel_reason::PAYMENT_AFTER_EXPIRY`]); `None` when sold.
    pub reason: Option<String>,
    /// What was deducted (empty when a refund is required).
    pub items: Vec<SettledItem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    pub previous: i64,
    pub current: i64,
}

/// `stock.updated` (key productId).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockUpdated {
    pub event_id: String,
    pub occurred_at: i64,
    pub hq_id: String,
    pub store_id: String,
    pub product_id: String,
    pub hq_stock: Option<StockLevel>,
    pub store_stock: StockLevel,
    pub change_amount: i64,
    pub change_reason: String,
    pub reference_id: String,
}

/// `stock.reservation.expired` (key orderId).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockReservationExpired {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub reservation_id: String,
    pub hq_id: String,
    pub store_id: String,
    pub expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleasedItem {
    pub product_id: String,
    pub released: i32,
}

/// `stock.reservation.released` (key orderId), internal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockReservationReleased {
    pub event_id: String,
    pub occurred_at: i64,
    pub order_id: String,
    pub reservation_id: String,
    pub hq_id: String,
    pub store_id: String,
    pub reason: String,
    pub items: Vec<ReleasedItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdjustedItem {
    pub product_id: String,
    pub delta: i64,
}

/// `inventory.adjusted` (key `hqId:storeId`, `hqId:` for the HQ's own stock): an admin stock
/// movement, see [`adjustment_type`] and the schema's doc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryAdjusted {
    pub event_id: String,
    pub occurred_at: i64,
    pub hq_id: String,
    /// Empty for the HQ's own (unallocated) stock.
    pub store_id: String,
    pub adjustment_type: String,
    pub reference_id: String,
    pub items: Vec<AdjustedItem>,
    /// `TRANSFER` only: the receiving store.
    #[serde(default)]
    pub to_store_id: Option<String>,
    /// Why (required for `CORRECTION`).
    #[serde(default)]
    pub reason: Option<String>,
    /// Who issued it (audit).
    #[serde(default)]
    pub operator: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationItem {
    pub product_id: String,
    pub quantity: i64,
}

/// `StockAllocation` on `stock.commands` (key `hqId:storeId` of the receiver): one step of the
/// stock hierarchy protocol (issue 16), see [`allocation_step`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockAllocation {
    pub event_id: String,
    pub occurred_at: i64,
    pub hq_id: String,
    /// Receiving store; empty for the HQ.
    pub store_id: String,
    /// Sending store; empty for the HQ.
    pub from_store_id: String,
    pub step: String,
    pub reference_id: String,
    #[serde(default)]
    pub order_id: Option<String>,
    pub cause_event_id: String,
    pub items: Vec<AllocationItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerLine {
    pub product_id: String,
    pub store_previous: i64,
    pub store_current: i64,
    /// Change of the HQ's units in transit.
    pub in_transit: i64,
    /// Change of the HQ's unallocated units.
    pub unallocated: i64,
}

/// `StockLedgerEntry` on `stock.commands` (key `hqId:`): a store's on-hand change reported to
/// its HQ's ledger (issue 16), which publishes `stock.updated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockLedgerEntry {
    pub event_id: String,
    pub occurred_at: i64,
    pub hq_id: String,
    pub store_id: String,
    pub change_reason: String,
    pub reference_id: String,
    pub cause_event_id: String,
    pub lines: Vec<LedgerLine>,
}

macro_rules! events {
    ($($variant:ident),* $(,)?) => {
        /// Any event of the saga. The variant name equals the Avro record name (and the
        /// `.avsc` file stem in `avro/`).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Event { $($variant($variant)),* }

        impl Event {
            /// Avro record names of every event, in the order of the enum.
            pub const SCHEMA_NAMES: &'static [&'static str] = &[$(stringify!($variant)),*];

            /// The Avro record name of this event.
            pub fn schema_name(&self) -> &'static str {
                match self { $(Event::$variant(_) => stringify!($variant)),* }
            }
            /// The event's unique id (domain rule 7).
            pub fn event_id(&self) -> &str {
                match self { $(Event::$variant(e) => &e.event_id),* }
            }
            /// When the fact happened, ms since the epoch.
            pub fn occurred_at(&self) -> i64 {
                match self { $(Event::$variant(e) => e.occurred_at),* }
            }
            /// The event as a serde_json value with the Avro field names (for logs and tools).
            pub fn to_json(&self) -> serde_json::Value {
                match self { $(Event::$variant(e) => serde_json::to_value(e).expect("events serialise")),* }
            }
            /// Builds an event from a serde value of the named record.
            ///
            /// Errors: unknown schema name or a value that does not fit the record.
            pub fn from_json(schema_name: &str, value: serde_json::Value) -> Result<Event, String> {
                match schema_name {
                    $(stringify!($variant) => serde_json::from_value(value).map(Event::$variant).map_err(|e| e.to_string()),)*
                    other => Err(format!("unknown event schema {other}")),
                }
            }
        }
        $(impl From<$variant> for Event { fn from(e: $variant) -> Event { Event::$variant(e) } })*
    };
}

events!(
    OrderCreated,
    StockReserved,
    StockReservationFailed,
    OrderConfirmed,
    OrderCancelled,
    OrderCompleted,
    StockUpdated,
    StockReservationExpired,
    StockReservationReleased,
    InventoryAdjusted,
    OrderSettled,
    StockAllocation,
    StockLedgerEntry,
);

impl Event {
    /// The order this event belongs to, if any.
    pub fn order_id(&self) -> Option<&str> {
        match self {
            Event::OrderCreated(e) => Some(&e.order_id),
            Event::StockReserved(e) => Some(&e.order_id),
            Event::StockReservationFailed(e) => Some(&e.order_id),
            Event::OrderConfirmed(e) => Some(&e.order_id),
            Event::OrderCancelled(e) => Some(&e.order_id),
            Event::OrderCompleted(e) => Some(&e.order_id),
            Event::StockReservationExpired(e) => Some(&e.order_id),
            Event::StockReservationReleased(e) => Some(&e.order_id),
            Event::StockUpdated(e) => Some(e.reference_id.as_str()).filter(|_| e.change_reason == change_reason::SALE),
            Event::InventoryAdjusted(_) => None,
            Event::OrderSettled(e) => Some(&e.order_id),
            Event::StockAllocation(e) => e.order_id.as_deref(),
            Event::StockLedgerEntry(_) => None,
        }
    }

    /// `(hqId, storeId)` of the store whose stock this event touches; `storeId` is empty when it
    /// is the HQ's own stock (an HQ-level movement, a ledger entry, a fallback request).
    pub fn store(&self) -> (&str, &str) {
        match self {
            Event::OrderCreated(e) => (&e.hq_id, &e.store_id),
            Event::StockReserved(e) => (&e.hq_id, &e.store_id),
            Event::StockReservationFailed(e) => (&e.hq_id, &e.store_id),
            Event::OrderConfirmed(e) => (&e.hq_id, &e.store_id),
            Event::OrderCancelled(e) => (&e.hq_id, &e.store_id),
            Event::OrderCompleted(e) => (&e.hq_id, &e.store_id),
            Event::StockUpdated(e) => (&e.hq_id, &e.store_id),
            Event::StockReservationExpired(e) => (&e.hq_id, &e.store_id),
            Event::StockReservationReleased(e) => (&e.hq_id, &e.store_id),
            Event::InventoryAdjusted(e) => (&e.hq_id, &e.store_id),
            Event::OrderSettled(e) => (&e.hq_id, &e.store_id),
            Event::StockAllocation(e) => (&e.hq_id, &e.store_id),
            Event::StockLedgerEntry(e) => (&e.hq_id, ""),
        }
    }

    /// The `stock.commands` key this event is processed under (issue 16): the store's
    /// `hqId:storeId`, or `hqId:` (the HQ's own shard) for a `DISTRIBUTION` (debited at the HQ
    /// first), an HQ-level movement and a ledger entry.
    pub fn command_key(&self) -> String {
        match self {
            Event::InventoryAdjusted(e) if e.adjustment_type == adjustment_type::DISTRIBUTION => store_key(&e.hq_id, ""),
            _ => self.store_key(),
        }
    }

    /// Partition key of the store, `hqId:storeId` (the repartition key of `stock.commands`).
    pub fn store_key(&self) -> String {
        let (hq, store) = self.store();
        store_key(hq, store)
    }
}

/// Partition key of a store: `hqId:storeId`.
pub fn store_key(hq_id: &str, store_id: &str) -> String {
    format!("{hq_id}:{store_id}")
}
