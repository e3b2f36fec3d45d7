//! Stock reserver: owns each store's stock and every order's reservation.
//!
//! Input is the store-keyed command stream written by the deduplicator, so all events of one store
//! arrive on one partition, in order, and the store's stock lives in one state shard.
//!
//! Rules (domain contract, `/shared/docs/domain.md`):
//! - `InventoryAdjusted` changes on-hand stock (seed 004) and reports `stock.updated`.
//! - `OrderCreated` reserves **all or nothing** (seed 000, rule 1) against
//!   `available = on hand − reserved` (rule 2), at most **one reservation per order** (rule 5).
//!   An order whose ids (`eventId`, `orderId`, `hqId`, `storeId`) are present but whose content
//!   cannot be served is answered with `stock.reservation.failed` (issue 4) so it reaches a
//!   terminal outcome: `EMPTY_ORDER`, `INVALID_PRODUCT` (empty productId), `INVALID_QUANTITY`
//!   (≤ 0 or > [`MAX_QUANTITY`]), `DUPLICATE_PRODUCT` (a product on two lines), `UNKNOWN_STORE`
//!   (no `inventory.adjusted` ever applied to the store, see [`store_registry_key`]); checked in
//!   that order, before the stock. An order without those ids is dead-lettered: there is no
//!   order to answer.
//! - `OrderCancelled` / `StockReservationExpired` release a live reservation.
//! - `OrderCompleted` (a payment) is settled here, once, with `order.settled` (issue 13): the
//!   reserver is the one place where an order's payment, cancellation and expiry are totally
//!   ordered, so whichever reaches it first wins and its verdict is the order's outcome for the
//!   canceller, the confirmer and the expirer. A payment of the live reservation deducts what was
//!   sold (seed 004; a subset of the reserved items, the rest released `UNSOLD`) and settles
//!   `SOLD`. A payment that finds nothing held (the reservation expired or was released first)
//!   is a late payment: sold from available stock if it is all there (`SOLD`, `late`), else
//!   settled `REFUND_REQUIRED` (`PAYMENT_AFTER_EXPIRY`). Never below zero (rule 2). A payment
//!   naming another reservation, breaking the subset rule or paying a settled order again is
//!   `Invalid` and deducts nothing. See [`StockReserver::completed`].
//!
//! Every output is deterministic in its input (rule 7): ids come from
//! [`derive_event_id`]`(input eventId, tag)` and `occurredAt` is the input's `occurredAt`.
//!
//! State (JSON): [`stock_key`] → [`StockRecord`], [`reservation_key`] → [`Reservation`],
//! [`store_registry_key`] → [`StoreRecord`].
//!
//! # Layout
//!
//! - `lib.rs`: [`Config`] (its settings: the reservation TTL), ports, state keys ([`stock_key`], [`reservation_key`],
//!   ...), the state records ([`StockRecord`], [`Reservation`]) and [`StockReserver`].
//! - `tests.rs`: unit tests through `orderflow_api::Harness`.

use std::collections::BTreeMap;
use std::time::Duration;

use orderflow_api::events::{
    cancel_reason, change_reason, failure_reason, release_reason, settlement, AdjustedItem, FailedItem, InventoryAdjusted, OrderCancelled,
    OrderCompleted, OrderCreated, OrderSettled, ReleasedItem, ReservedItem, SettledItem, StockLevel, StockReservationExpired,
    StockReservationFailed, StockReservationReleased, StockReserved, StockUpdated,
};
use orderflow_api::{derive_event_id, Context, Event, Export, Outputs, ProcessError, Processor, StateTxn};
use serde::{Deserialize, Serialize};

pub mod reconcile;
pub use reconcile::{reconcile, DEFAULT_RECONCILE_INTERVAL_MS, RECONCILE_TIMER};

/// Its settings in `topology.toml` (the keys of its `[workers.<name>]` entry beyond the common
/// ones, parsed by the kinds registry).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `reservation_ttl` (seed 004): how long a reservation holds its units after the order's
    /// `occurredAt`; default 5 minutes, at least 1 ms; must agree with the reservation
    /// expirer's (`topology check` says so).
    #[serde(default = "default_reservation_ttl", with = "humantime_serde")]
    pub reservation_ttl: Duration,
    /// `reconcile_interval` (seed 004 재고 대사, issue 13): how often each state shard is
    /// reconciled ([`reconcile`]); default 1 minute, at least 1 s.
    #[serde(default = "default_reconcile_interval", with = "humantime_serde")]
    pub reconcile_interval: Duration,
}

fn default_reservation_ttl() -> Duration {
    orderflow_api::DEFAULT_RESERVATION_TTL
}

fn default_reconcile_interval() -> Duration {
    Duration::from_millis(DEFAULT_RECONCILE_INTERVAL_MS as u64)
}

impl Default for Config {
    fn default() -> Config {
        Config { reservation_ttl: default_reservation_ttl(), reconcile_interval: default_reconcile_interval() }
    }
}

impl Config {
    /// The reservation TTL in ms.
    ///
    /// Errors: a TTL under 1 ms.
    pub fn ttl_ms(&self) -> Result<i64, String> {
        orderflow_api::ReservationTtlConfig { reservation_ttl: self.reservation_ttl }.ttl_ms()
    }

    /// Errors: a TTL under 1 ms or a reconcile interval under 1 s.
    pub fn validate(&self) -> Result<(), String> {
        self.ttl_ms()?;
        if self.reconcile_interval < Duration::from_secs(1) {
            return Err(format!("reconcile_interval {} must be at least 1s", humantime::format_duration(self.reconcile_interval)));
        }
        Ok(())
    }

    /// The processor these settings configure.
    ///
    /// Errors: as [`Config::validate`].
    pub fn processor(&self) -> Result<StockReserver, String> {
        self.validate()?;
        Ok(StockReserver::new(self.ttl_ms()?).with_reconcile_interval(orderflow_api::millis(self.reconcile_interval)))
    }
}

/// Port of `stock.reserved` (key orderId).
pub const PORT_RESERVED: &str = "reserved";
/// Port of `stock.reservation.failed` (key orderId).
pub const PORT_FAILED: &str = "failed";
/// Port of `stock.reservation.released` (key orderId).
pub const PORT_RELEASED: &str = "released";
/// Port of `stock.updated` (key productId).
pub const PORT_UPDATED: &str = "updated";
/// Port of `order.settled` (key orderId): the verdict on each payment (issue 13).
pub const PORT_SETTLED: &str = "settled";

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_RESERVED, PORT_FAILED, PORT_RELEASED, PORT_UPDATED, PORT_SETTLED];

/// Largest quantity one order line may ask for (units). A larger one fails the order with
/// `INVALID_QUANTITY` (issue 4).
pub const MAX_QUANTITY: i32 = 1_000_000;

/// Prefix of every stock record key (see [`stock_key`]); scan it to list a shard's stock.
pub const STOCK_PREFIX: &[u8] = b"stock/";

/// Prefix of every reservation key (see [`reservation_key`]).
pub const RESERVATION_PREFIX: &[u8] = b"res/";

/// State key of one product's stock in one store: `stock/{hqId}:{storeId}/{productId}`.
pub fn stock_key(hq_id: &str, store_id: &str, product_id: &str) -> Vec<u8> {
    format!("stock/{hq_id}:{store_id}/{product_id}").into_bytes()
}

/// Prefix of every store registry key (see [`store_registry_key`]).
pub const STORE_PREFIX: &[u8] = b"store/";

/// State key marking a store known: `store/{hqId}:{storeId}`, written by the first
/// `inventory.adjusted` applied to the store (value: JSON `{"firstAdjustment": eventId}`). An
/// order for a store without it fails with `UNKNOWN_STORE` (issue 4). Distinct from
/// [`STOCK_PREFIX`], so a scan of stock records never sees it.
pub fn store_registry_key(hq_id: &str, store_id: &str) -> Vec<u8> {
    format!("store/{hq_id}:{store_id}").into_bytes()
}

/// What [`store_registry_key`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreRecord {
    /// `eventId` of the adjustment that registered the store (empty when registered from stock
    /// records older than the registry).
    pub first_adjustment: String,
}

/// State key of an order's reservation: `res/{orderId}`.
pub fn reservation_key(order_id: &str) -> Vec<u8> {
    format!("res/{order_id}").into_bytes()
}

/// One product's stock in one store, in whole units. Stored as JSON `{"onHand":…,"reserved":…}`;
/// a product never seen has both at 0.
///
/// Invariants kept by the reserver (rule 2): `0 ≤ reserved ≤ on_hand`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockRecord {
    /// Units physically in the store.
    pub on_hand: i64,
    /// Units held by live reservations.
    pub reserved: i64,
}

impl StockRecord {
    /// Units that can still be reserved: `on_hand − reserved` (rule 2).
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }
}

/// Lifecycle of a [`Reservation`]. Serialised as `LIVE`, `RELEASED`, `DEDUCTED`, `FAILED`, `CLOSED`,
/// `REFUNDED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationStatus {
    /// Holding stock until completion (deduct), cancellation or expiry (release).
    Live,
    /// Stock given back (order cancelled or reservation expired).
    Released,
    /// Stock deducted by `order.completed` (seed 004).
    Deducted,
    /// Nothing reserved: at least one item was short (seed 000), or the order's content was
    /// invalid (issue 4). Final: the order never reserves later.
    Failed,
    /// Tombstone: the order was cancelled or completed before any reservation was made; holds
    /// nothing and stops a late `order.created` from reserving for a closed order.
    Closed,
    /// A payment came when nothing was held for the order and the store no longer had the units:
    /// settled `REFUND_REQUIRED` (issue 13). Final, holds nothing.
    Refunded,
}

/// One reserved line: `quantity` units of `product_id` (an order names each product once:
/// repeated products fail with `DUPLICATE_PRODUCT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservationItem {
    /// Product reserved.
    pub product_id: String,
    /// Units held (or once held), > 0.
    pub quantity: i32,
}

/// An order's reservation, stored at [`reservation_key`]. At most one per order (rule 5): once any
/// record exists, another `order.created` for the order is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// `derive_event_id(order.created eventId, "reservation")`; empty for a [`ReservationStatus::Closed`] tombstone.
    pub reservation_id: String,
    /// The order that made the reservation.
    pub order_id: String,
    /// Store whose stock is held.
    pub hq_id: String,
    /// Store whose stock is held.
    pub store_id: String,
    /// What the reservation holds (or held). Empty when `Failed` or `Closed`.
    pub items: Vec<ReservationItem>,
    /// Lifecycle state.
    pub status: ReservationStatus,
    /// `order.created occurredAt + TTL`, ms since the epoch (0 for a tombstone).
    pub expires_at: i64,
}

/// The stock reserver worker. See the crate docs for the rules.
#[derive(Debug, Clone)]
pub struct StockReserver {
    reservation_ttl_ms: i64,
    reconcile_interval_ms: i64,
}

impl StockReserver {
    /// A reserver whose reservations expire `reservation_ttl_ms` ms after the order's
    /// `occurredAt` (rule 3: 5 minutes by default, configured per topology).
    ///
    /// # Panics
    /// If `reservation_ttl_ms ≤ 0` (a configuration error).
    pub fn new(reservation_ttl_ms: i64) -> Self {
        assert!(reservation_ttl_ms > 0, "reservation TTL must be positive, got {reservation_ttl_ms} ms");
        StockReserver { reservation_ttl_ms, reconcile_interval_ms: DEFAULT_RECONCILE_INTERVAL_MS }
    }

    /// The same reserver reconciling each shard every `ms` ms (see [`reconcile`]).
    ///
    /// # Panics
    /// If `ms ≤ 0` (a configuration error).
    pub fn with_reconcile_interval(mut self, ms: i64) -> Self {
        assert!(ms > 0, "reconcile interval must be positive, got {ms} ms");
        self.reconcile_interval_ms = ms;
        self
    }

    /// The configured reservation TTL, ms.
    pub fn reservation_ttl_ms(&self) -> i64 {
        self.reservation_ttl_ms
    }

    fn adjust(&self, e: &InventoryAdjusted, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("InventoryAdjusted", &e.event_id, "hqId", &e.hq_id)?;
        orderflow_api::require("InventoryAdjusted", &e.event_id, "storeId", &e.store_id)?;
        if e.items.is_empty() {
            return Err(invalid("InventoryAdjusted", &e.event_id, "has no items"));
        }
        // Repeated products are summed so each product gets one `stock.updated` (unique id).
        let mut deltas: Vec<(String, i64)> = Vec::new();
        for AdjustedItem { product_id, delta } in &e.items {
            orderflow_api::require("InventoryAdjusted", &e.event_id, "productId", product_id)?;
            match deltas.iter_mut().find(|(p, _)| p == product_id) {
                Some((_, d)) => *d = d.checked_add(*delta).ok_or_else(|| invalid("InventoryAdjusted", &e.event_id, "delta overflows"))?,
                None => deltas.push((product_id.clone(), *delta)),
            }
        }
        // Check everything first: the whole adjustment applies or none of it does.
        let mut changes = Vec::with_capacity(deltas.len());
        for (product_id, delta) in deltas {
            let key = stock_key(&e.hq_id, &e.store_id, &product_id);
            let before = load_stock(state, &key)?;
            let on_hand = before
                .on_hand
                .checked_add(delta)
                .ok_or_else(|| invalid("InventoryAdjusted", &e.event_id, &format!("delta {delta} for {product_id} overflows")))?;
            if on_hand < 0 || on_hand < before.reserved {
                return Err(invalid(
                    "InventoryAdjusted",
                    &e.event_id,
                    &format!(
                        "delta {delta} for {product_id} would leave on hand {on_hand} below zero or below the {} reserved units",
                        before.reserved
                    ),
                ));
            }
            changes.push((key, product_id, delta, before, StockRecord { on_hand, reserved: before.reserved }));
        }
        for (key, product_id, delta, before, after) in changes {
            store_stock(state, key, &after, out);
            reconcile::book(state, (&e.hq_id, &e.store_id, &product_id), before.on_hand, delta, 0)?;
            out.emit(
                PORT_UPDATED,
                product_id.clone(),
                StockUpdated {
                    event_id: derive_event_id(&e.event_id, &format!("stock.updated/{product_id}")),
                    occurred_at: e.occurred_at,
                    hq_id: e.hq_id.clone(),
                    store_id: e.store_id.clone(),
                    product_id,
                    hq_stock: None,
                    store_stock: StockLevel { previous: before.on_hand, current: after.on_hand },
                    change_amount: delta,
                    change_reason: e.adjustment_type.clone(),
                    reference_id: e.reference_id.clone(),
                },
            )?;
        }
        register_store(&e.hq_id, &e.store_id, &e.event_id, state);
        out.note("adjustment", known_change_reason(&e.adjustment_type));
        Ok(())
    }

    fn reserve(&self, e: &OrderCreated, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        // Without these there is no order to answer (or no store to answer from): dead-letter.
        orderflow_api::require("OrderCreated", &e.event_id, "eventId", &e.event_id)?;
        orderflow_api::require("OrderCreated", &e.event_id, "orderId", &e.order_id)?;
        orderflow_api::require("OrderCreated", &e.event_id, "hqId", &e.hq_id)?;
        orderflow_api::require("OrderCreated", &e.event_id, "storeId", &e.store_id)?;

        let rkey = reservation_key(&e.order_id);
        if let Some(existing) = state.get_json::<Reservation>(&rkey)? {
            // An order settled by a payment that overtook it is closed as well.
            let closed =
                existing.reservation_id.is_empty() || matches!(existing.status, ReservationStatus::Closed | ReservationStatus::Refunded);
            let what = if closed { "created_after_close" } else { "duplicate_order" };
            out.note("late_event", what);
            return Ok(());
        }

        let reservation_id = derive_event_id(&e.event_id, "reservation");
        let expires_at = e.occurred_at.saturating_add(self.reservation_ttl_ms);
        let mut reservation = Reservation {
            reservation_id: reservation_id.clone(),
            order_id: e.order_id.clone(),
            hq_id: e.hq_id.clone(),
            store_id: e.store_id.clone(),
            items: Vec::new(),
            status: ReservationStatus::Failed,
            expires_at,
        };

        // Issue 4: invalid content is answered (the order gets a terminal outcome), not dead-lettered.
        if let Some((reason, items)) = self.invalid_content(e, state)? {
            return fail(e, &rkey, &reservation, reason, items, state, out);
        }

        // Lines are distinct products with quantities in 1..=MAX_QUANTITY from here on.
        let wanted: Vec<(&str, i64)> = e.items.iter().map(|i| (i.product_id.as_str(), i64::from(i.quantity))).collect();
        let mut levels = Vec::with_capacity(wanted.len());
        let mut short = Vec::new();
        for &(product_id, qty) in &wanted {
            let key = stock_key(&e.hq_id, &e.store_id, product_id);
            let rec = load_stock(state, &key)?;
            if rec.available() < qty {
                short.push(FailedItem {
                    product_id: product_id.to_string(),
                    requested: to_i32(qty),
                    available: to_i32(rec.available().max(0)),
                });
            }
            levels.push((key, rec));
        }

        if !short.is_empty() {
            for item in &short {
                // High-cardinality label: the runtime keeps only a bounded top N of it.
                out.note_as("out_of_stock", item.product_id.clone(), Export::TopN);
            }
            // Seed 000: reserve nothing, name only the short products.
            return fail(e, &rkey, &reservation, failure_reason::INSUFFICIENT_STOCK, short, state, out);
        }

        for ((key, mut rec), &(_, qty)) in levels.into_iter().zip(&wanted) {
            rec.reserved += qty;
            store_stock(state, key, &rec, out);
        }
        reservation.items = wanted.iter().map(|&(p, q)| ReservationItem { product_id: p.to_string(), quantity: to_i32(q) }).collect();
        reservation.status = ReservationStatus::Live;
        state.put_json(rkey, &reservation);
        out.emit(
            PORT_RESERVED,
            e.order_id.clone(),
            StockReserved {
                event_id: derive_event_id(&e.event_id, "stock.reserved"),
                occurred_at: e.occurred_at,
                order_id: e.order_id.clone(),
                reservation_id,
                hq_id: e.hq_id.clone(),
                store_id: e.store_id.clone(),
                expires_at,
                items: reservation.items.iter().map(|i| ReservedItem { product_id: i.product_id.clone(), reserved: i.quantity }).collect(),
            },
        )?;
        out.note("reservation", "reserved");
        Ok(())
    }

    /// The first content problem of an order whose ids are present, as `(failure reason, items
    /// to report)`, checked in this order (issue 4): `EMPTY_ORDER`, `INVALID_PRODUCT`,
    /// `INVALID_QUANTITY`, `DUPLICATE_PRODUCT`, `UNKNOWN_STORE`. `None` when the order can be
    /// tried against the stock. Registers the store (see [`store_registry_key`]) when it is known only
    /// from stock records written before the registry existed.
    fn invalid_content(&self, e: &OrderCreated, state: &mut StateTxn) -> Result<Option<(&'static str, Vec<FailedItem>)>, ProcessError> {
        let available = |state: &StateTxn, product_id: &str| -> Result<i32, ProcessError> {
            if product_id.is_empty() {
                return Ok(0);
            }
            Ok(to_i32(load_stock(state, &stock_key(&e.hq_id, &e.store_id, product_id))?.available().max(0)))
        };
        if e.items.is_empty() {
            return Ok(Some((failure_reason::EMPTY_ORDER, Vec::new())));
        }
        let no_product: Vec<FailedItem> = e
            .items
            .iter()
            .filter(|i| i.product_id.is_empty())
            .map(|i| FailedItem { product_id: String::new(), requested: i.quantity, available: 0 })
            .collect();
        if !no_product.is_empty() {
            return Ok(Some((failure_reason::INVALID_PRODUCT, no_product)));
        }
        let mut bad_quantity = Vec::new();
        for i in e.items.iter().filter(|i| i.quantity <= 0 || i.quantity > MAX_QUANTITY) {
            bad_quantity.push(FailedItem {
                product_id: i.product_id.clone(),
                requested: i.quantity,
                available: available(state, &i.product_id)?,
            });
        }
        if !bad_quantity.is_empty() {
            return Ok(Some((failure_reason::INVALID_QUANTITY, bad_quantity)));
        }
        let mut repeated: Vec<FailedItem> = Vec::new();
        for (n, i) in e.items.iter().enumerate() {
            let first = e.items.iter().position(|x| x.product_id == i.product_id) == Some(n);
            let lines = e.items.iter().filter(|x| x.product_id == i.product_id);
            if first && lines.clone().count() > 1 {
                let total: i64 = lines.map(|x| i64::from(x.quantity)).sum();
                repeated.push(FailedItem {
                    product_id: i.product_id.clone(),
                    requested: to_i32(total),
                    available: available(state, &i.product_id)?,
                });
            }
        }
        if !repeated.is_empty() {
            return Ok(Some((failure_reason::DUPLICATE_PRODUCT, repeated)));
        }
        if !self.store_known(e, state)? {
            let items =
                e.items.iter().map(|i| FailedItem { product_id: i.product_id.clone(), requested: i.quantity, available: 0 }).collect();
            return Ok(Some((failure_reason::UNKNOWN_STORE, items)));
        }
        Ok(None)
    }

    /// Whether `e`'s store ever received inventory: its [`store_registry_key`] is set, or (state written
    /// before the registry existed) one of the ordered products has a stock record there, in
    /// which case the registry key is written now.
    fn store_known(&self, e: &OrderCreated, state: &mut StateTxn) -> Result<bool, ProcessError> {
        let key = store_registry_key(&e.hq_id, &e.store_id);
        if state.get(&key).is_some() {
            return Ok(true);
        }
        let stocked = e.items.iter().any(|i| state.get(&stock_key(&e.hq_id, &e.store_id, &i.product_id)).is_some());
        if stocked {
            register_store(&e.hq_id, &e.store_id, "", state);
        }
        Ok(stocked)
    }

    fn cancelled(&self, e: &OrderCancelled, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderCancelled", &e.event_id, "orderId", &e.order_id)?;
        let rkey = reservation_key(&e.order_id);
        match state.get_json::<Reservation>(&rkey)? {
            Some(mut r) if r.status == ReservationStatus::Live => {
                release(&mut r, release_reason::CANCELLED, &e.event_id, e.occurred_at, state, out)
            }
            // The canceller's own order.cancelled coming back after a failed or released
            // reservation is the normal end of the compensation, not an anomaly.
            Some(r) if matches!(r.status, ReservationStatus::Failed | ReservationStatus::Released | ReservationStatus::Refunded) => {
                out.note("compensation_echo", format!("cancel_after_{}", status_label(r.status)));
                Ok(())
            }
            Some(r) => {
                out.note("late_event", format!("cancel_after_{}", status_label(r.status)));
                Ok(())
            }
            None => {
                close_before_reservation(&e.order_id, &e.hq_id, &e.store_id, state);
                out.note("late_event", "cancel_before_reservation");
                Ok(())
            }
        }
    }

    fn expired(&self, e: &StockReservationExpired, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReservationExpired", &e.event_id, "orderId", &e.order_id)?;
        match state.get_json::<Reservation>(&reservation_key(&e.order_id))? {
            Some(mut r) if r.status == ReservationStatus::Live && r.reservation_id == e.reservation_id => {
                release(&mut r, release_reason::EXPIRED, &e.event_id, e.occurred_at, state, out)
            }
            Some(r) if r.status == ReservationStatus::Live => {
                out.note("late_event", "expired_other_reservation");
                Ok(())
            }
            Some(r) => {
                out.note("late_event", format!("expired_after_{}", status_label(r.status)));
                Ok(())
            }
            None => {
                out.note("late_event", "expired_without_reservation");
                Ok(())
            }
        }
    }

    /// `order.completed`: the POS took payment. This is where the payment meets the order's
    /// cancellation and expiry in one total order, so the reserver's verdict, one `order.settled`
    /// per payment, is the order's paid outcome everywhere (issue 13):
    ///
    /// - **Live reservation**: the payment must name it (`reservationId`) and may list what was
    ///   sold (`items`, a subset: each reserved product at most once, 1 ≤ quantity ≤ reserved;
    ///   none listed = all of it). The sold units are deducted (`stock.updated` `SALE`), the rest
    ///   released (`stock.reservation.released` `UNSOLD`), settled `SOLD`.
    /// - **Nothing held** (the reservation expired or was released first, the order failed, or
    ///   the payment overtook `order.created`): a *late payment*. What it sold (the released
    ///   reservation's lines, or the payment's own items when nothing was ever reserved) is
    ///   deducted from available stock if every line is still there (settled `SOLD`,
    ///   `late = true`, note `late_sale`); otherwise nothing is deducted and it is settled
    ///   `REFUND_REQUIRED` reason `PAYMENT_AFTER_EXPIRY` (the canceller turns that into a
    ///   refund-required cancellation).
    ///
    /// Errors (dead-lettered, nothing deducted, nothing settled): `Invalid` for a payment naming
    /// another reservation than the order's, items breaking the subset rule, or a second payment
    /// for an order already settled (`DEDUCTED` or `REFUNDED`).
    fn completed(&self, e: &OrderCompleted, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderCompleted", &e.event_id, "orderId", &e.order_id)?;
        let rkey = reservation_key(&e.order_id);
        let stored = state.get_json::<Reservation>(&rkey)?;
        if let Some(r) = &stored {
            if !r.reservation_id.is_empty() && e.reservation_id != r.reservation_id {
                return Err(ProcessError::Invalid(format!(
                    "OrderCompleted {}: reservationId {:?} is not the reservation {} of order {}; nothing deducted",
                    e.event_id, e.reservation_id, r.reservation_id, e.order_id
                )));
            }
            if matches!(r.status, ReservationStatus::Deducted | ReservationStatus::Refunded) {
                return Err(ProcessError::Invalid(format!(
                    "OrderCompleted {}: order {} was already settled ({}) by another payment; nothing deducted",
                    e.event_id,
                    e.order_id,
                    status_label(r.status)
                )));
            }
        }
        match stored {
            Some(r) if r.status == ReservationStatus::Live => self.sell_reserved(e, r, state, out),
            stored => self.late_payment(e, stored, state, out),
        }
    }

    /// The payment of a live reservation: deducts the sold units, releases the unsold ones
    /// (`UNSOLD`), settles `SOLD`.
    fn sell_reserved(&self, e: &OrderCompleted, mut r: Reservation, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let sold = sold_quantities(e, &r)?;
        let mut unsold = Vec::new();
        let mut settled = Vec::new();
        for item in &r.items {
            let key = stock_key(&r.hq_id, &r.store_id, &item.product_id);
            let before = load_stock(state, &key)?;
            let (q_reserved, q_sold) = (i64::from(item.quantity), i64::from(sold[&item.product_id]));
            if before.reserved < q_reserved || before.on_hand < q_sold {
                return Err(ProcessError::CorruptState {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    message: format!(
                        "selling {q_sold} of {q_reserved} reserved for order {} would drive stock negative (on hand {}, reserved {})",
                        e.order_id, before.on_hand, before.reserved
                    ),
                });
            }
            let after = StockRecord { on_hand: before.on_hand - q_sold, reserved: before.reserved - q_reserved };
            store_stock(state, key, &after, out);
            reconcile::book(state, (&r.hq_id, &r.store_id, &item.product_id), before.on_hand, 0, q_sold)?;
            if q_reserved > q_sold {
                unsold.push(ReleasedItem { product_id: item.product_id.clone(), released: to_i32(q_reserved - q_sold) });
            }
            if q_sold > 0 {
                emit_sale(e, &r, &item.product_id, before.on_hand, after.on_hand, out)?;
                settled.push(SettledItem { product_id: item.product_id.clone(), quantity: to_i32(q_sold) });
            }
        }
        r.status = ReservationStatus::Deducted;
        state.put_json(reservation_key(&r.order_id), &r);
        out.note("deduction", change_reason::SALE);
        if !unsold.is_empty() {
            emit_released(&r, release_reason::UNSOLD, &e.event_id, e.occurred_at, unsold, out)?;
        }
        settle(e, &r, settlement::SOLD, false, None, settled, out)
    }

    /// A payment for an order that holds nothing: sells from available stock if every line is
    /// there (`SOLD`, late), else settles `REFUND_REQUIRED`. See [`StockReserver::completed`].
    fn late_payment(
        &self,
        e: &OrderCompleted,
        stored: Option<Reservation>,
        state: &mut StateTxn,
        out: &mut Outputs,
    ) -> Result<(), ProcessError> {
        let mut r = stored.unwrap_or_else(|| Reservation {
            reservation_id: String::new(),
            order_id: e.order_id.clone(),
            hq_id: e.hq_id.clone(),
            store_id: e.store_id.clone(),
            items: Vec::new(),
            status: ReservationStatus::Closed,
            expires_at: 0,
        });
        // What the payment sold: the released reservation's lines (subset rule), or, when the
        // order never held anything, the payment's own lines.
        let lines: Vec<(String, i64)> = if r.items.is_empty() {
            paid_lines(e)?
        } else {
            sold_quantities(e, &r)?.into_iter().filter(|(_, q)| *q > 0).map(|(p, q)| (p, i64::from(q))).collect()
        };
        let mut levels = Vec::with_capacity(lines.len());
        for (product_id, q) in &lines {
            let key = stock_key(&r.hq_id, &r.store_id, product_id);
            let rec = load_stock(state, &key)?;
            levels.push((key, rec, product_id, *q));
        }
        let servable = !lines.is_empty() && levels.iter().all(|(_, rec, _, q)| rec.available() >= *q);
        if !servable {
            r.status = ReservationStatus::Refunded;
            state.put_json(reservation_key(&r.order_id), &r);
            out.note("settlement", "refund_required");
            return settle(e, &r, settlement::REFUND_REQUIRED, false, Some(cancel_reason::PAYMENT_AFTER_EXPIRY), Vec::new(), out);
        }
        let mut settled = Vec::with_capacity(levels.len());
        for (key, before, product_id, q) in levels {
            let after = StockRecord { on_hand: before.on_hand - q, reserved: before.reserved };
            store_stock(state, key, &after, out);
            reconcile::book(state, (&r.hq_id, &r.store_id, product_id), before.on_hand, 0, q)?;
            emit_sale(e, &r, product_id, before.on_hand, after.on_hand, out)?;
            settled.push(SettledItem { product_id: product_id.clone(), quantity: to_i32(q) });
        }
        r.items = settled.iter().map(|i| ReservationItem { product_id: i.product_id.clone(), quantity: i.quantity }).collect();
        r.status = ReservationStatus::Deducted;
        state.put_json(reservation_key(&r.order_id), &r);
        out.note("deduction", change_reason::SALE);
        out.note("settlement", "late_sale");
        settle(e, &r, settlement::SOLD, true, None, settled, out)
    }
}

/// The lines of payment `e` for an order that never reserved: its items (each product once,
/// 1 ≤ quantity ≤ [`MAX_QUANTITY`]); empty when it lists none (nothing known to sell: refund).
///
/// Errors: `Invalid` for an empty productId, a repeated product or a quantity out of range.
fn paid_lines(e: &OrderCompleted) -> Result<Vec<(String, i64)>, ProcessError> {
    let mut lines: Vec<(String, i64)> = Vec::with_capacity(e.items.len());
    for item in &e.items {
        let bad = |what: String| {
            ProcessError::Invalid(format!("OrderCompleted {} of order {}: {what}; nothing deducted", e.event_id, e.order_id))
        };
        if item.product_id.is_empty() {
            return Err(bad("a sold item has no productId".to_string()));
        }
        if lines.iter().any(|(p, _)| *p == item.product_id) {
            return Err(bad(format!("sold product {} is listed twice", item.product_id)));
        }
        if item.quantity < 1 || item.quantity > MAX_QUANTITY {
            return Err(bad(format!("sold {} of {}", item.quantity, item.product_id)));
        }
        lines.push((item.product_id.clone(), i64::from(item.quantity)));
    }
    Ok(lines)
}

/// Emits the `stock.updated` `SALE` of `product_id` for payment `e` (on hand `previous` →
/// `current`), its id derived from the payment's eventId.
fn emit_sale(
    e: &OrderCompleted,
    r: &Reservation,
    product_id: &str,
    previous: i64,
    current: i64,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    out.emit(
        PORT_UPDATED,
        product_id.to_string(),
        StockUpdated {
            event_id: derive_event_id(&e.event_id, &format!("stock.updated/{product_id}")),
            occurred_at: e.occurred_at,
            hq_id: r.hq_id.clone(),
            store_id: r.store_id.clone(),
            product_id: product_id.to_string(),
            hq_stock: None,
            store_stock: StockLevel { previous, current },
            change_amount: current - previous,
            change_reason: change_reason::SALE.to_string(),
            reference_id: e.order_id.clone(),
        },
    )
}

/// Emits `order.settled` for payment `e` (id `derive(payment eventId, "order.settled")`).
fn settle(
    e: &OrderCompleted,
    r: &Reservation,
    outcome: &str,
    late: bool,
    reason: Option<&str>,
    items: Vec<SettledItem>,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    out.emit(
        PORT_SETTLED,
        e.order_id.clone(),
        OrderSettled {
            event_id: derive_event_id(&e.event_id, "order.settled"),
            occurred_at: e.occurred_at,
            order_id: e.order_id.clone(),
            hq_id: r.hq_id.clone(),
            store_id: r.store_id.clone(),
            payment_event_id: e.event_id.clone(),
            reservation_id: e.reservation_id.clone(),
            outcome: outcome.to_string(),
            late,
            reason: reason.map(str::to_string),
            items,
        },
    )
}

/// Product → units sold of reservation `r` by payment `e`: every reserved product, 0 when not
/// listed; all of them when `e` lists no items.
///
/// Errors: `Invalid` naming the first broken rule: a product not reserved, listed twice, a
/// quantity < 1 or above what is reserved.
fn sold_quantities(e: &OrderCompleted, r: &Reservation) -> Result<BTreeMap<String, i32>, ProcessError> {
    let reserved: BTreeMap<&str, i32> = r.items.iter().map(|i| (i.product_id.as_str(), i.quantity)).collect();
    if e.items.is_empty() {
        return Ok(reserved.iter().map(|(p, q)| (p.to_string(), *q)).collect());
    }
    let mut sold: BTreeMap<String, i32> = reserved.keys().map(|p| (p.to_string(), 0)).collect();
    let bad = |what: String| {
        Err(ProcessError::Invalid(format!("OrderCompleted {} of order {}: {what}; nothing deducted", e.event_id, e.order_id)))
    };
    for item in &e.items {
        let Some(&held) = reserved.get(item.product_id.as_str()) else {
            return bad(format!("sold product {:?} is not reserved", item.product_id));
        };
        let entry = sold.get_mut(&item.product_id).expect("every reserved product has an entry");
        if *entry != 0 {
            return bad(format!("sold product {} is listed twice", item.product_id));
        }
        if item.quantity < 1 || item.quantity > held {
            return bad(format!("sold {} of {} but {held} are reserved", item.quantity, item.product_id));
        }
        *entry = item.quantity;
    }
    Ok(sold)
}

impl Processor for StockReserver {
    /// Dispatches on the event variant: `InventoryAdjusted`, `OrderCreated`, `OrderCancelled`,
    /// `StockReservationExpired`, `OrderCompleted`; every other event is ignored.
    ///
    /// Errors: [`ProcessError::Invalid`] for shape errors (an `order.created` with an empty
    /// `eventId`, `orderId`, `hqId` or `storeId`; other events with empty ids; an adjustment with
    /// no items or one that would drive on hand below zero or below reserved). An `order.created`
    /// with invalid content is not an error: it is answered with `stock.reservation.failed`;
    /// [`ProcessError::CorruptState`] when stored stock cannot cover a release or deduction of a
    /// live reservation (an invariant broke); [`ProcessError::UnwiredPort`] for a missing port.
    fn process(&mut self, ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        // The shard's reconciliation punctuation runs from its first event on.
        if state.timer(RECONCILE_TIMER).is_none() {
            state.schedule_timer(RECONCILE_TIMER, ctx.now_ms.saturating_add(self.reconcile_interval_ms));
        }
        match event {
            Event::InventoryAdjusted(e) => self.adjust(e, state, out),
            Event::OrderCreated(e) => self.reserve(e, state, out),
            Event::OrderCancelled(e) => self.cancelled(e, state, out),
            Event::StockReservationExpired(e) => self.expired(e, state, out),
            Event::OrderCompleted(e) => self.completed(e, state, out),
            _ => Ok(()),
        }?;
        // Issue 13 (bounded state): a reservation that holds nothing any more is forgotten
        // `state_retention` after it was last written; until then late and repeated events for
        // the order are answered from it (a payment after that is an unknown order's).
        if let Some(order_id) = event.order_id() {
            let key = reservation_key(order_id);
            if state.changes().writes.get(&key).is_some_and(Option::is_some)
                && state.get_json::<Reservation>(&key)?.is_some_and(|r| r.status != ReservationStatus::Live)
            {
                orderflow_api::forget_later(ctx, state, &key);
            }
        }
        Ok(())
    }

    /// The reconciliation punctuation ([`RECONCILE_TIMER`]): reconciles the shard
    /// ([`reconcile`]), reports each mismatch as a broken invariant (its rule, key and both
    /// figures: an ERROR log line and `orderflow_stock_conservation_mismatches_total`), notes
    /// `reconciliation` `clean` or `mismatch`, and runs again `reconcile_interval` later
    /// (processing time). Other timer keys are ignored.
    ///
    /// Errors: [`ProcessError::CorruptState`] for state the reconciliation cannot parse.
    fn on_timer(&mut self, ctx: &Context, key: &[u8], _due_ms: i64, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        if key != RECONCILE_TIMER {
            return Ok(());
        }
        let report = reconcile(state)?;
        for m in &report.mismatches {
            out.note_as("conservation_mismatch", m.to_string(), Export::InvariantBroken);
        }
        out.note("reconciliation", if report.mismatches.is_empty() { "clean" } else { "mismatch" });
        state.schedule_timer(RECONCILE_TIMER, ctx.now_ms.saturating_add(self.reconcile_interval_ms));
        Ok(())
    }
}

/// Releases a live reservation: gives its units back (`reserved −= q`), marks it released and
/// emits `stock.reservation.released` with `reason`.
fn release(
    r: &mut Reservation,
    reason: &str,
    cause: &str,
    occurred_at: i64,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    for item in &r.items {
        let key = stock_key(&r.hq_id, &r.store_id, &item.product_id);
        let mut rec = load_stock(state, &key)?;
        let q = i64::from(item.quantity);
        if rec.reserved < q {
            return Err(ProcessError::CorruptState {
                key: String::from_utf8_lossy(&key).into_owned(),
                message: format!("releasing {q} for order {} but only {} reserved", r.order_id, rec.reserved),
            });
        }
        rec.reserved -= q;
        store_stock(state, key, &rec, out);
    }
    r.status = ReservationStatus::Released;
    state.put_json(reservation_key(&r.order_id), &*r);
    let items = r.items.iter().map(|i| ReleasedItem { product_id: i.product_id.clone(), released: i.quantity }).collect();
    emit_released(r, reason, cause, occurred_at, items, out)
}

/// Emits `stock.reservation.released` of reservation `r` for `items` with `reason`, its id
/// derived from the `cause` eventId, and notes the release.
fn emit_released(
    r: &Reservation,
    reason: &str,
    cause: &str,
    occurred_at: i64,
    items: Vec<ReleasedItem>,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    out.emit(
        PORT_RELEASED,
        r.order_id.clone(),
        StockReservationReleased {
            event_id: derive_event_id(cause, "stock.reservation.released"),
            occurred_at,
            order_id: r.order_id.clone(),
            reservation_id: r.reservation_id.clone(),
            hq_id: r.hq_id.clone(),
            store_id: r.store_id.clone(),
            reason: reason.to_string(),
            items,
        },
    )?;
    out.note("release", reason.to_string());
    Ok(())
}

/// Writes the [`store_registry_key`] of a store unless it is there already.
fn register_store(hq_id: &str, store_id: &str, cause: &str, state: &mut StateTxn) {
    let key = store_registry_key(hq_id, store_id);
    if state.get(&key).is_none() {
        state.put_json(key, &StoreRecord { first_adjustment: cause.to_string() });
    }
}

/// Answers `order.created` `e` with `stock.reservation.failed` `reason` naming `items`, and stores
/// `failed` (status [`ReservationStatus::Failed`], nothing held) at `rkey` so the order never
/// reserves later (rule 5). Notes `reservation` with the reason as label.
fn fail(
    e: &OrderCreated,
    rkey: &[u8],
    failed: &Reservation,
    reason: &'static str,
    items: Vec<FailedItem>,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    debug_assert_eq!(failed.status, ReservationStatus::Failed);
    state.put_json(rkey.to_vec(), failed);
    out.emit(
        PORT_FAILED,
        e.order_id.clone(),
        StockReservationFailed {
            event_id: derive_event_id(&e.event_id, "stock.reservation.failed"),
            occurred_at: e.occurred_at,
            order_id: e.order_id.clone(),
            hq_id: e.hq_id.clone(),
            store_id: e.store_id.clone(),
            reason: reason.to_string(),
            items,
        },
    )?;
    out.note("reservation", reason);
    Ok(())
}

/// Stores a [`ReservationStatus::Closed`] tombstone for an order closed before it reserved.
fn close_before_reservation(order_id: &str, hq_id: &str, store_id: &str, state: &mut StateTxn) {
    let tombstone = Reservation {
        reservation_id: String::new(),
        order_id: order_id.to_string(),
        hq_id: hq_id.to_string(),
        store_id: store_id.to_string(),
        items: Vec::new(),
        status: ReservationStatus::Closed,
        expires_at: 0,
    };
    state.put_json(reservation_key(order_id), &tombstone);
}

/// Writes a stock record, reporting `conservation_mismatch` (a seed-004 monitoring alarm) when
/// it breaks domain rule 2: on hand or reserved below zero, or more reserved than on hand.
fn store_stock(state: &mut StateTxn, key: Vec<u8>, rec: &StockRecord, out: &mut Outputs) {
    if rec.on_hand < 0 || rec.reserved < 0 || rec.reserved > rec.on_hand {
        out.note_as(
            "conservation_mismatch",
            if rec.on_hand < 0 {
                "negative_on_hand"
            } else if rec.reserved < 0 {
                "negative_reserved"
            } else {
                "reserved_above_on_hand"
            },
            Export::InvariantBroken,
        );
    }
    state.put_json(key, rec);
}

fn load_stock(state: &StateTxn, key: &[u8]) -> Result<StockRecord, ProcessError> {
    Ok(state.get_json::<StockRecord>(key)?.unwrap_or_default())
}

fn status_label(s: ReservationStatus) -> &'static str {
    match s {
        ReservationStatus::Live => "live",
        ReservationStatus::Released => "release",
        ReservationStatus::Deducted => "deduction",
        ReservationStatus::Failed => "failure",
        ReservationStatus::Closed => "close",
        ReservationStatus::Refunded => "refund",
    }
}

/// Keeps the adjustment measure low-cardinality: known reasons, else `OTHER`.
fn known_change_reason(reason: &str) -> &'static str {
    match reason {
        change_reason::SALE => change_reason::SALE,
        change_reason::RESTOCK => change_reason::RESTOCK,
        change_reason::DISTRIBUTION => change_reason::DISTRIBUTION,
        change_reason::CORRECTION => change_reason::CORRECTION,
        _ => "OTHER",
    }
}

fn to_i32(v: i64) -> i32 {
    i32::try_from(v.clamp(i64::from(i32::MIN), i64::from(i32::MAX))).expect("clamped")
}

fn invalid(kind: &str, event_id: &str, what: &str) -> ProcessError {
    ProcessError::Invalid(format!("{kind} {event_id}: {what}"))
}

#[cfg(test)]
mod tests;
