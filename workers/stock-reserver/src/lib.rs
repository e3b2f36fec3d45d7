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
//! - `OrderCompleted` turns a live reservation into a deduction (seed 004); never below zero and
//!   never without a live reservation (rule 2).
//!
//! Every output is deterministic in its input (rule 7): ids come from
//! [`derive_event_id`]`(input eventId, tag)` and `occurredAt` is the input's `occurredAt`.
//!
//! State (JSON): [`stock_key`] → [`StockRecord`], [`reservation_key`] → [`Reservation`],
//! [`store_registry_key`] → [`StoreRecord`].

use orderflow_api::events::{
    change_reason, failure_reason, release_reason, AdjustedItem, FailedItem, InventoryAdjusted, OrderCancelled, OrderCompleted,
    OrderCreated, ReleasedItem, ReservedItem, StockLevel, StockReservationExpired, StockReservationFailed, StockReservationReleased,
    StockReserved, StockUpdated,
};
use orderflow_api::{derive_event_id, Context, Event, Export, Outputs, ProcessError, Processor, StateTxn};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The stock reserver's own settings: the keys of its `[workers.<name>]` entry in `topology.toml`
/// beyond the common ones (parsed by the kinds registry, `orderflow_kinds`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `reservation_ttl` (seed 004): how long a reservation holds its units after the order's
    /// `occurredAt`; default 5 minutes ([`orderflow_api::DEFAULT_RESERVATION_TTL`]), at least
    /// 1 ms. Must equal the reservation expirer's (`topology check` says so).
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub reservation_ttl: Duration,
}

fn default_ttl() -> Duration {
    orderflow_api::DEFAULT_RESERVATION_TTL
}

impl Default for Config {
    fn default() -> Config {
        Config { reservation_ttl: default_ttl() }
    }
}

impl Config {
    /// Errors: a reservation TTL under 1 ms.
    pub fn validate(&self) -> Result<(), String> {
        if self.reservation_ttl < Duration::from_millis(1) {
            return Err(format!("reservation_ttl {} must be at least 1 ms", humantime::format_duration(self.reservation_ttl)));
        }
        Ok(())
    }

    /// The processor these settings configure.
    pub fn processor(&self) -> StockReserver {
        StockReserver::new(orderflow_api::millis(self.reservation_ttl))
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

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_RESERVED, PORT_FAILED, PORT_RELEASED, PORT_UPDATED];

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

/// Lifecycle of a [`Reservation`]. Serialised as `LIVE`, `RELEASED`, `DEDUCTED`, `FAILED`, `CLOSED`.
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
}

impl StockReserver {
    /// A reserver whose reservations expire `reservation_ttl_ms` ms after the order's
    /// `occurredAt` (rule 3: 5 minutes by default, configured per topology).
    ///
    /// # Panics
    /// If `reservation_ttl_ms ≤ 0` (a configuration error).
    pub fn new(reservation_ttl_ms: i64) -> Self {
        assert!(reservation_ttl_ms > 0, "reservation TTL must be positive, got {reservation_ttl_ms} ms");
        StockReserver { reservation_ttl_ms }
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
            let what = if existing.status == ReservationStatus::Closed { "created_after_close" } else { "duplicate_order" };
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
            Some(r) if matches!(r.status, ReservationStatus::Failed | ReservationStatus::Released) => {
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

    fn completed(&self, e: &OrderCompleted, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderCompleted", &e.event_id, "orderId", &e.order_id)?;
        let rkey = reservation_key(&e.order_id);
        let mut r = match state.get_json::<Reservation>(&rkey)? {
            Some(r) if r.status == ReservationStatus::Live => r,
            Some(_) => {
                out.note("late_event", "completed_without_reservation");
                return Ok(());
            }
            None => {
                close_before_reservation(&e.order_id, &e.hq_id, &e.store_id, state);
                out.note("late_event", "completed_without_reservation");
                return Ok(());
            }
        };
        for item in &r.items {
            let key = stock_key(&r.hq_id, &r.store_id, &item.product_id);
            let before = load_stock(state, &key)?;
            let q = i64::from(item.quantity);
            if before.reserved < q || before.on_hand < q {
                return Err(ProcessError::CorruptState {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    message: format!(
                        "deducting {q} for order {} would drive stock negative (on hand {}, reserved {})",
                        e.order_id, before.on_hand, before.reserved
                    ),
                });
            }
            let after = StockRecord { on_hand: before.on_hand - q, reserved: before.reserved - q };
            store_stock(state, key, &after, out);
            out.emit(
                PORT_UPDATED,
                item.product_id.clone(),
                StockUpdated {
                    event_id: derive_event_id(&e.event_id, &format!("stock.updated/{}", item.product_id)),
                    occurred_at: e.occurred_at,
                    hq_id: r.hq_id.clone(),
                    store_id: r.store_id.clone(),
                    product_id: item.product_id.clone(),
                    hq_stock: None,
                    store_stock: StockLevel { previous: before.on_hand, current: after.on_hand },
                    change_amount: -q,
                    change_reason: change_reason::SALE.to_string(),
                    reference_id: e.order_id.clone(),
                },
            )?;
        }
        r.status = ReservationStatus::Deducted;
        state.put_json(rkey, &r);
        out.note("deduction", change_reason::SALE);
        Ok(())
    }
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
    fn process(&mut self, _ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        match event {
            Event::InventoryAdjusted(e) => self.adjust(e, state, out),
            Event::OrderCreated(e) => self.reserve(e, state, out),
            Event::OrderCancelled(e) => self.cancelled(e, state, out),
            Event::StockReservationExpired(e) => self.expired(e, state, out),
            Event::OrderCompleted(e) => self.completed(e, state, out),
            _ => Ok(()),
        }
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
            items: r.items.iter().map(|i| ReleasedItem { product_id: i.product_id.clone(), released: i.quantity }).collect(),
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
mod tests {
    use super::*;
    use orderflow_api::fixtures::*;
    use orderflow_api::{Harness, Output};

    const TTL: i64 = 300_000;

    fn harness() -> Harness<StockReserver> {
        Harness::new(StockReserver::new(TTL), PORTS)
    }

    fn restock(h: &mut Harness<StockReserver>, id: &str, items: &[(&str, i64)]) -> Vec<Output> {
        h.feed("stock.commands", adjust_ev(id, items), 0).unwrap()
    }

    fn adjust_ev(id: &str, items: &[(&str, i64)]) -> InventoryAdjusted {
        InventoryAdjusted { reference_id: format!("ref-{id}"), ..inventory_adjusted(id, 500, items) }
    }

    fn order(id: &str, order_id: &str, items: &[(&str, i32)]) -> OrderCreated {
        order_created(id, order_id, 1_000, items)
    }

    fn cancel(id: &str, order_id: &str) -> OrderCancelled {
        order_cancelled(id, order_id, "PAYMENT_FAILED", 2_000)
    }

    fn complete(id: &str, order_id: &str) -> OrderCompleted {
        order_completed(id, order_id, "", 3_000)
    }

    fn expire(id: &str, order_id: &str, reservation_id: &str) -> StockReservationExpired {
        stock_reservation_expired(id, order_id, reservation_id, 1_000 + TTL)
    }

    fn stock(h: &Harness<StockReserver>, product: &str) -> StockRecord {
        h.store.get_json(&stock_key(HQ, STORE, product)).unwrap_or_default()
    }

    fn reservation(h: &Harness<StockReserver>, order_id: &str) -> Option<Reservation> {
        h.store.get_json(&reservation_key(order_id))
    }

    fn notes(h: &Harness<StockReserver>, measure: &str) -> Vec<String> {
        h.notes.iter().filter(|n| n.measure == measure).map(|n| n.label.clone()).collect()
    }

    fn reserved_id(outs: &[Output]) -> String {
        match &outs[0].event {
            Event::StockReserved(e) => e.reservation_id.clone(),
            other => panic!("expected StockReserved, got {other:?}"),
        }
    }

    #[test]
    fn key_helpers_have_the_documented_shape() {
        assert_eq!(stock_key("H", "S", "P"), b"stock/H:S/P".to_vec());
        assert!(stock_key("H", "S", "P").starts_with(STOCK_PREFIX));
        assert_eq!(reservation_key("O-1"), b"res/O-1".to_vec());
        assert!(reservation_key("O-1").starts_with(RESERVATION_PREFIX));
        let json = serde_json::to_string(&StockRecord { on_hand: 3, reserved: 1 }).unwrap();
        assert_eq!(json, r#"{"onHand":3,"reserved":1}"#);
        assert_eq!(StockRecord { on_hand: 3, reserved: 1 }.available(), 2);
    }

    #[test]
    fn adjustment_updates_on_hand_and_reports_stock_updated() {
        let mut h = harness();
        let outs = restock(&mut h, "a1", &[("P-001", 10), ("P-002", 4)]);
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
        assert_eq!(outs.len(), 2);
        let Event::StockUpdated(u) = &outs[0].event else { panic!() };
        assert_eq!(outs[0].port, PORT_UPDATED);
        assert_eq!(outs[0].key, "P-001");
        assert_eq!(u.event_id, derive_event_id("a1", "stock.updated/P-001"));
        assert_eq!(u.store_stock, StockLevel { previous: 0, current: 10 });
        assert_eq!((u.change_amount, u.change_reason.as_str(), u.reference_id.as_str()), (10, "RESTOCK", "ref-a1"));
        assert_eq!(u.hq_stock, None);
        assert_eq!(u.occurred_at, 500);
        let outs = restock(&mut h, "a2", &[("P-001", -3)]);
        let Event::StockUpdated(u) = &outs[0].event else { panic!() };
        assert_eq!(u.store_stock, StockLevel { previous: 10, current: 7 });
        assert_eq!(notes(&h, "adjustment"), vec!["RESTOCK", "RESTOCK"]);
    }

    #[test]
    fn adjustment_below_zero_or_below_reserved_is_rejected_whole() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 5), ("P-002", 5)]);
        let err = h.feed("t", adjust_ev("a2", &[("P-001", 1), ("P-002", -6)]), 0).unwrap_err();
        assert!(matches!(err, ProcessError::Invalid(ref m) if m.contains("P-002")), "{err}");
        assert_eq!(stock(&h, "P-001").on_hand, 5, "nothing applied");
        h.feed("t", order("o1", "O-1", &[("P-002", 4)]), 0).unwrap();
        let err = h.feed("t", adjust_ev("a3", &[("P-002", -2)]), 0).unwrap_err();
        assert!(matches!(err, ProcessError::Invalid(_)), "on hand 3 < reserved 4");
        assert_eq!(stock(&h, "P-002"), StockRecord { on_hand: 5, reserved: 4 });
        assert!(matches!(h.feed("t", adjust_ev("a4", &[]), 0), Err(ProcessError::Invalid(_))));
    }

    #[test]
    fn seed_000_scenario_1_single_item_short() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 5)]);
        let outs = h.feed("t", order("o1", "O-1", &[("P-001", 10)]), 0).unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_FAILED, "O-1"));
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!() };
        assert_eq!(f.reason, "INSUFFICIENT_STOCK");
        assert_eq!(f.items, vec![FailedItem { product_id: "P-001".into(), requested: 10, available: 5 }]);
        assert_eq!(f.event_id, derive_event_id("o1", "stock.reservation.failed"));
        assert_eq!(f.occurred_at, 1_000);
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 5, reserved: 0 }, "nothing reserved");
        assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Failed);
        assert_eq!(notes(&h, "reservation"), vec!["INSUFFICIENT_STOCK"]);
    }

    #[test]
    fn seed_000_scenario_2_all_or_nothing_names_only_short_item() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10), ("P-002", 1)]);
        let outs = h.feed("t", order("o1", "O-1", &[("P-001", 5), ("P-002", 3)]), 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
        assert_eq!(f.items, vec![FailedItem { product_id: "P-002".into(), requested: 3, available: 1 }]);
        assert_eq!(stock(&h, "P-001").available(), 10, "P-001 not reserved");
        assert_eq!(stock(&h, "P-002").available(), 1);
    }

    #[test]
    fn reserves_all_items_and_available_is_on_hand_minus_reserved() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10), ("P-002", 3)]);
        let outs = h.feed("t", order("o1", "O-1", &[("P-001", 6), ("P-002", 3)]), 0).unwrap();
        assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_RESERVED, "O-1"));
        let Event::StockReserved(r) = &outs[0].event else { panic!() };
        assert_eq!(r.event_id, derive_event_id("o1", "stock.reserved"));
        assert_eq!(r.reservation_id, derive_event_id("o1", "reservation"));
        assert_eq!(r.expires_at, 1_000 + TTL);
        assert_eq!(r.occurred_at, 1_000);
        assert_eq!(
            r.items,
            vec![ReservedItem { product_id: "P-001".into(), reserved: 6 }, ReservedItem { product_id: "P-002".into(), reserved: 3 }]
        );
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 6 });
        assert_eq!(stock(&h, "P-001").available(), 4);
        // A second order sees only what is available, not what is on hand.
        let outs = h.feed("t", order("o2", "O-2", &[("P-001", 5)]), 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!() };
        assert_eq!(f.items[0].available, 4);
        let outs = h.feed("t", order("o3", "O-3", &[("P-002", 1)]), 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!() };
        assert_eq!(f.items[0].available, 0, "available never negative");
        let live = reservation(&h, "O-1").unwrap();
        assert_eq!(live.status, ReservationStatus::Live);
        assert_eq!(notes(&h, "reservation"), vec!["reserved", "INSUFFICIENT_STOCK", "INSUFFICIENT_STOCK"]);
    }

    #[test]
    fn unknown_products_have_no_stock() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 1)]);
        let outs = h.feed("t", order("o1", "O-1", &[("P-404", 1)]), 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!() };
        assert_eq!(f.items, vec![FailedItem { product_id: "P-404".into(), requested: 1, available: 0 }]);
    }

    #[test]
    fn orders_without_ids_are_dead_lettered_without_effect() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        let blank = |f: fn(&mut OrderCreated)| {
            let mut ev = order("x1", "O-1", &[("P-001", 1)]);
            f(&mut ev);
            ev
        };
        for (ev, what) in [
            (blank(|e| e.order_id.clear()), "orderId"),
            (blank(|e| e.hq_id.clear()), "hqId"),
            (blank(|e| e.store_id.clear()), "storeId"),
            (blank(|e| e.event_id.clear()), "eventId"),
            // No ids and bad content: still dead-lettered, there is no order to answer.
            (OrderCreated { items: vec![], ..blank(|e| e.store_id.clear()) }, "storeId"),
        ] {
            let err = h.feed("t", ev, 0).unwrap_err();
            assert!(matches!(err, ProcessError::Invalid(ref m) if m.contains(what)), "{err}");
        }
        assert!(reservation(&h, "O-1").is_none());
        assert!(reservation(&h, "").is_none());
        assert_eq!(stock(&h, "P-001").reserved, 0);
        assert!(notes(&h, "reservation").is_empty());
    }

    /// Feeds `ev` to a harness whose store holds P-001 ×10 and P-002 ×3 (2 of them reserved by
    /// O-0), and returns the failure it answers with.
    fn invalid_answer(ev: OrderCreated) -> (Harness<StockReserver>, StockReservationFailed) {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10), ("P-002", 3)]);
        h.feed("t", order("o0", "O-0", &[("P-002", 2)]), 0).unwrap();
        let outs = h.feed("t", ev.clone(), 0).unwrap();
        assert_eq!(outs.len(), 1, "{outs:?}");
        assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_FAILED, ev.order_id.as_str()));
        let Event::StockReservationFailed(f) = outs[0].event.clone() else { panic!("{outs:?}") };
        assert_eq!(f.event_id, derive_event_id(&ev.event_id, "stock.reservation.failed"));
        assert_eq!((f.occurred_at, &f.hq_id, &f.store_id), (ev.occurred_at, &ev.hq_id, &ev.store_id));
        // Nothing reserved, and the order is closed for good (rule 5), like a stock failure.
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
        assert_eq!(stock(&h, "P-002"), StockRecord { on_hand: 3, reserved: 2 });
        let r = reservation(&h, &ev.order_id).expect("failure recorded");
        assert_eq!((r.status, r.items.len()), (ReservationStatus::Failed, 0));
        assert_eq!(r.reservation_id, derive_event_id(&ev.event_id, "reservation"));
        assert_eq!(notes(&h, "reservation"), vec!["reserved".to_string(), f.reason.clone()]);
        (h, f)
    }

    fn item(p: &str, requested: i32, available: i32) -> FailedItem {
        FailedItem { product_id: p.into(), requested, available }
    }

    #[test]
    fn invalid_quantity_is_answered_naming_the_offending_lines() {
        for q in [0, -1, MAX_QUANTITY + 1, i32::MIN, i32::MAX] {
            let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 1), ("P-002", q)]));
            assert_eq!(f.reason, "INVALID_QUANTITY");
            assert_eq!(f.items, vec![item("P-002", q, 1)], "requested = the quantity, available = the real available");
        }
        let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 0), ("P-002", 1), ("P-404", -5)]));
        assert_eq!(f.items, vec![item("P-001", 0, 10), item("P-404", -5, 0)]);
        // The bound itself is valid.
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", i64::from(MAX_QUANTITY))]);
        let outs = h.feed("t", order("o1", "O-1", &[("P-001", MAX_QUANTITY)]), 0).unwrap();
        assert!(matches!(outs[0].event, Event::StockReserved(_)), "{outs:?}");
    }

    #[test]
    fn empty_order_is_answered() {
        let (_, f) = invalid_answer(order("x1", "O-1", &[]));
        assert_eq!(f.reason, "EMPTY_ORDER");
        assert!(f.items.is_empty());
    }

    #[test]
    fn duplicate_product_is_rejected_not_merged() {
        let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 4), ("P-002", 1), ("P-001", 2)]));
        assert_eq!(f.reason, "DUPLICATE_PRODUCT");
        assert_eq!(f.items, vec![item("P-001", 6, 10)], "each repeated product once, requested = its lines summed");
        let (_, f) = invalid_answer(order("x1", "O-1", &[("P-002", 1), ("P-001", 1), ("P-002", 1), ("P-001", 1), ("P-002", 1)]));
        assert_eq!(f.items, vec![item("P-002", 3, 1), item("P-001", 2, 10)]);
        let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", MAX_QUANTITY), ("P-001", MAX_QUANTITY), ("P-001", MAX_QUANTITY)]));
        assert_eq!(f.items, vec![item("P-001", 3 * MAX_QUANTITY, 10)]);
    }

    #[test]
    fn invalid_product_is_answered() {
        let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 1), ("", 3)]));
        assert_eq!(f.reason, "INVALID_PRODUCT");
        assert_eq!(f.items, vec![item("", 3, 0)]);
    }

    #[test]
    fn content_checks_apply_in_the_documented_order() {
        // EMPTY_ORDER, INVALID_PRODUCT, INVALID_QUANTITY, DUPLICATE_PRODUCT, UNKNOWN_STORE, stock.
        let (_, f) = invalid_answer(order("x1", "O-1", &[("", 0), ("P-001", 0)]));
        assert_eq!(f.reason, "INVALID_PRODUCT");
        let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 1), ("P-001", 0)]));
        assert_eq!((f.reason.as_str(), f.items.clone()), ("INVALID_QUANTITY", vec![item("P-001", 0, 10)]));
        let unknown = |items: &[(&str, i32)]| OrderCreated { store_id: "S-NEW".into(), ..order("x1", "O-1", items) };
        let (_, f) = invalid_answer(unknown(&[("P-001", 1), ("P-001", 1)]));
        assert_eq!(f.reason, "DUPLICATE_PRODUCT");
        let (_, f) = invalid_answer(unknown(&[("P-001", 1_000)]));
        assert_eq!(f.reason, "UNKNOWN_STORE", "the store is checked before the stock");
    }

    #[test]
    fn order_for_a_store_never_adjusted_fails_with_unknown_store() {
        let mut h = harness();
        let outs = h.feed("t", order("o1", "O-1", &[("P-001", 1), ("P-002", 2)]), 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
        assert_eq!(f.reason, "UNKNOWN_STORE");
        assert_eq!(f.items, vec![item("P-001", 1, 0), item("P-002", 2, 0)]);
        assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Failed);
        assert_eq!(notes(&h, "reservation"), vec!["UNKNOWN_STORE"]);
        // Stock arriving later does not revive the order (one answer per order), but the store
        // is known from then on, also for products it never stocked.
        let outs = restock(&mut h, "a1", &[("P-001", 10)]);
        assert_eq!(outs.len(), 1);
        assert_eq!(h.store.get_json::<StoreRecord>(&store_registry_key(HQ, STORE)).unwrap().first_adjustment, "a1");
        assert!(h.feed("t", order("o1b", "O-1", &[("P-001", 1)]), 0).unwrap().is_empty());
        assert_eq!(notes(&h, "late_event"), vec!["duplicate_order"]);
        let outs = h.feed("t", order("o2", "O-2", &[("P-002", 1)]), 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
        assert_eq!(f.reason, "INSUFFICIENT_STOCK");
        // Another store of the same HQ is still unknown.
        let other = OrderCreated { store_id: "S-2".into(), ..order("o3", "O-3", &[("P-001", 1)]) };
        let outs = h.feed("t", other, 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
        assert_eq!(f.reason, "UNKNOWN_STORE");
    }

    #[test]
    fn every_adjustment_keeps_the_store_registered_and_a_rejected_one_registers_nothing() {
        let mut h = harness();
        assert!(h.feed("t", adjust_ev("a0", &[("P-001", -1)]), 0).is_err());
        assert!(!h.store.data.contains_key(&store_registry_key(HQ, STORE)), "rejected adjustment");
        restock(&mut h, "a1", &[("P-001", 1)]);
        restock(&mut h, "a2", &[("P-001", -1)]);
        assert_eq!(stock(&h, "P-001").on_hand, 0);
        assert_eq!(h.store.get_json::<StoreRecord>(&store_registry_key(HQ, STORE)).unwrap().first_adjustment, "a1");
        // Known, even with nothing on hand: a stock failure, not UNKNOWN_STORE.
        let outs = h.feed("t", order("o1", "O-1", &[("P-001", 1)]), 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
        assert_eq!(f.reason, "INSUFFICIENT_STOCK");
        assert_eq!(store_registry_key("H", "S"), b"store/H:S".to_vec());
        assert!(!store_registry_key("H", "S").starts_with(STOCK_PREFIX));
    }

    #[test]
    fn stock_written_before_the_store_registry_existed_counts_as_known() {
        let mut h = harness();
        h.store.data.insert(stock_key(HQ, STORE, "P-001"), serde_json::to_vec(&StockRecord { on_hand: 5, reserved: 0 }).unwrap());
        let outs = h.feed("t", order("o1", "O-1", &[("P-001", 2)]), 0).unwrap();
        assert!(matches!(outs[0].event, Event::StockReserved(_)), "{outs:?}");
        assert_eq!(h.store.get_json::<StoreRecord>(&store_registry_key(HQ, STORE)).unwrap().first_adjustment, "");
        // Now registered: a product it never stocked is a stock failure.
        let outs = h.feed("t", order("o2", "O-2", &[("P-009", 1)]), 0).unwrap();
        let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
        assert_eq!(f.reason, "INSUFFICIENT_STOCK");
    }

    #[test]
    fn invalid_order_after_close_is_late_not_answered() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        h.feed("t", cancel("k1", "O-1"), 0).unwrap();
        assert!(h.feed("t", order("o1", "O-1", &[("P-001", 0)]), 0).unwrap().is_empty());
        assert_eq!(notes(&h, "late_event"), vec!["cancel_before_reservation", "created_after_close"]);
        assert!(notes(&h, "reservation").is_empty());
    }

    /// The canceller's `SAGA_TIMEOUT` cancellation (seed 001) as it arrives on `stock.commands`.
    fn saga_timeout_cancel(id: &str, order_id: &str) -> OrderCancelled {
        order_cancelled(id, order_id, "SAGA_TIMEOUT", 180_000)
    }

    #[test]
    fn saga_timeout_after_a_late_reservation_releases_it() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        // The reserver was down past the stock answer timeout: it reserves late, then reads the
        // SAGA_TIMEOUT cancellation that followed the order on the store's partition.
        let res_id = reserved_id(&h.feed("t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
        assert_eq!(stock(&h, "P-001").reserved, 4);
        let outs = h.feed("t", saga_timeout_cancel("k1", "O-1"), 0).unwrap();
        let Event::StockReservationReleased(r) = &outs[0].event else { panic!("{outs:?}") };
        assert_eq!((r.reason.as_str(), r.reservation_id.as_str()), ("CANCELLED", res_id.as_str()));
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
        assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Released);
    }

    #[test]
    fn saga_timeout_before_the_order_reaches_the_reserver_blocks_it() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        assert!(h.feed("t", saga_timeout_cancel("k1", "O-1"), 0).unwrap().is_empty());
        assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Closed);
        assert!(h.feed("t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap().is_empty(), "tombstone: never reserves");
        assert_eq!(stock(&h, "P-001").reserved, 0);
        assert_eq!(notes(&h, "late_event"), vec!["cancel_before_reservation", "created_after_close"]);
    }

    #[test]
    fn one_reservation_per_order() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        h.feed("t", order("o1", "O-1", &[("P-001", 2)]), 0).unwrap();
        // Same order, new eventId (e.g. a re-sent outbox row): not reserved again.
        let outs = h.feed("t", order("o1-again", "O-1", &[("P-001", 2)]), 0).unwrap();
        assert!(outs.is_empty());
        assert_eq!(stock(&h, "P-001").reserved, 2);
        assert_eq!(notes(&h, "late_event"), vec!["duplicate_order"]);
        // Also after a failure: the order never reserves later.
        h.feed("t", order("o2", "O-2", &[("P-001", 100)]), 0).unwrap();
        assert!(h.feed("t", order("o2b", "O-2", &[("P-001", 1)]), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001").reserved, 2);
    }

    #[test]
    fn duplicate_event_id_has_no_effect() {
        let mut h = harness();
        assert_eq!(restock(&mut h, "a1", &[("P-001", 10)]).len(), 1);
        assert!(restock(&mut h, "a1", &[("P-001", 10)]).is_empty());
        assert_eq!(stock(&h, "P-001").on_hand, 10);
        assert_eq!(h.feed("t", order("o1", "O-1", &[("P-001", 2)]), 0).unwrap().len(), 1);
        assert!(h.feed("t", order("o1", "O-1", &[("P-001", 2)]), 0).unwrap().is_empty());
        assert_eq!(h.feed("t", complete("c1", "O-1"), 0).unwrap().len(), 1);
        assert!(h.feed("t", complete("c1", "O-1"), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 8, reserved: 0 });
        assert!(notes(&h, "late_event").is_empty(), "repeats are dropped before the worker");
    }

    #[test]
    fn cancel_releases_live_reservation() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        let res_id = reserved_id(&h.feed("t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
        let outs = h.feed("t", cancel("k1", "O-1"), 0).unwrap();
        assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_RELEASED, "O-1"));
        let Event::StockReservationReleased(r) = &outs[0].event else { panic!() };
        assert_eq!(r.reason, "CANCELLED");
        assert_eq!(r.reservation_id, res_id);
        assert_eq!(r.event_id, derive_event_id("k1", "stock.reservation.released"));
        assert_eq!(r.occurred_at, 2_000);
        assert_eq!(r.items, vec![ReleasedItem { product_id: "P-001".into(), released: 4 }]);
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
        assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Released);
        // A second cancellation (new id) releases nothing.
        assert!(h.feed("t", cancel("k2", "O-1"), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001").reserved, 0);
        assert_eq!(notes(&h, "compensation_echo"), vec!["cancel_after_release"]);
        assert!(notes(&h, "late_event").is_empty());
        assert_eq!(notes(&h, "release"), vec!["CANCELLED"]);
    }

    #[test]
    fn cancel_after_failure_is_a_compensation_echo_and_changes_nothing() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 1)]);
        h.feed("t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap();
        assert!(h.feed("t", cancel("k1", "O-1"), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 1, reserved: 0 });
        assert_eq!(notes(&h, "compensation_echo"), vec!["cancel_after_failure"]);
        assert!(notes(&h, "late_event").is_empty());
    }

    #[test]
    fn cancel_before_reservation_blocks_a_late_order_created() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        assert!(h.feed("t", cancel("k1", "O-1"), 0).unwrap().is_empty());
        assert!(h.feed("t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001").reserved, 0);
        assert_eq!(notes(&h, "late_event"), vec!["cancel_before_reservation", "created_after_close"]);
    }

    #[test]
    fn expiry_releases_matching_live_reservation_only() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        let res_id = reserved_id(&h.feed("t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
        assert!(h.feed("t", expire("x0", "O-1", "some-other-reservation"), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001").reserved, 4);
        let outs = h.feed("t", expire("x1", "O-1", &res_id), 0).unwrap();
        let Event::StockReservationReleased(r) = &outs[0].event else { panic!() };
        assert_eq!(r.reason, "EXPIRED");
        assert_eq!(r.event_id, derive_event_id("x1", "stock.reservation.released"));
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
        // Completion after expiry deducts nothing.
        assert!(h.feed("t", complete("c1", "O-1"), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001").on_hand, 10);
        assert_eq!(notes(&h, "late_event"), vec!["expired_other_reservation", "completed_without_reservation"]);
        assert_eq!(notes(&h, "release"), vec!["EXPIRED"]);
    }

    #[test]
    fn expiry_after_completion_is_late() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        let res_id = reserved_id(&h.feed("t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
        h.feed("t", complete("c1", "O-1"), 0).unwrap();
        assert!(h.feed("t", expire("x1", "O-1", &res_id), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 6, reserved: 0 });
        assert_eq!(notes(&h, "late_event"), vec!["expired_after_deduction"]);
    }

    #[test]
    fn completion_deducts_reserved_stock_with_previous_and_current() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10), ("P-002", 3)]);
        h.feed("t", order("o1", "O-1", &[("P-001", 4), ("P-002", 3)]), 0).unwrap();
        let outs = h.feed("t", complete("c1", "O-1"), 0).unwrap();
        assert_eq!(outs.len(), 2);
        let Event::StockUpdated(u) = &outs[0].event else { panic!() };
        assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_UPDATED, "P-001"));
        assert_eq!(u.store_stock, StockLevel { previous: 10, current: 6 });
        assert_eq!((u.change_amount, u.change_reason.as_str(), u.reference_id.as_str()), (-4, "SALE", "O-1"));
        assert_eq!(u.event_id, derive_event_id("c1", "stock.updated/P-001"));
        assert_eq!(u.occurred_at, 3_000);
        let Event::StockUpdated(u) = &outs[1].event else { panic!() };
        assert_eq!(u.store_stock, StockLevel { previous: 3, current: 0 }, "down to zero, never below");
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 6, reserved: 0 });
        assert_eq!(stock(&h, "P-002"), StockRecord { on_hand: 0, reserved: 0 });
        assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Deducted);
        assert_eq!(notes(&h, "deduction"), vec!["SALE"]);
        // A second completion (new id) deducts nothing; a cancel after completion releases nothing.
        assert!(h.feed("t", complete("c2", "O-1"), 0).unwrap().is_empty());
        assert!(h.feed("t", cancel("k1", "O-1"), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 6, reserved: 0 });
        assert_eq!(notes(&h, "late_event"), vec!["completed_without_reservation", "cancel_after_deduction"]);
    }

    #[test]
    fn no_deduction_without_live_reservation() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        assert!(h.feed("t", complete("c1", "O-9"), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001").on_hand, 10);
        assert_eq!(notes(&h, "late_event"), vec!["completed_without_reservation"]);
        // The completed order can no longer reserve.
        assert!(h.feed("t", order("o9", "O-9", &[("P-001", 1)]), 0).unwrap().is_empty());
        assert_eq!(stock(&h, "P-001").reserved, 0);
    }

    #[test]
    fn deduction_that_would_go_negative_is_corrupt_state() {
        let mut h = harness();
        restock(&mut h, "a1", &[("P-001", 10)]);
        h.feed("t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap();
        // Tamper with the store to break the invariant.
        h.store.data.insert(stock_key(HQ, STORE, "P-001"), serde_json::to_vec(&StockRecord { on_hand: 2, reserved: 4 }).unwrap());
        let err = h.feed("t", complete("c1", "O-1"), 0).unwrap_err();
        assert!(matches!(err, ProcessError::CorruptState { .. }), "{err}");
        assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 2, reserved: 4 }, "nothing applied");
        assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Live);
    }

    #[test]
    fn outputs_are_deterministic_in_the_input() {
        let script: Vec<Event> = vec![
            adjust_ev("a1", &[("P-001", 10), ("P-002", 1)]).into(),
            order("o1", "O-1", &[("P-001", 5)]).into(),
            order("o2", "O-2", &[("P-001", 5), ("P-002", 3)]).into(),
            order("o3", "O-3", &[("P-001", 2)]).into(),
            complete("c1", "O-1").into(),
            cancel("k3", "O-3").into(),
        ];
        let run = || {
            let mut h = harness();
            let mut all = Vec::new();
            for (i, ev) in script.iter().enumerate() {
                // Processing time differs between runs: outputs must not depend on it.
                all.extend(h.feed("t", ev.clone(), i as i64 * 7).unwrap());
            }
            (all, h.store.data)
        };
        let (a, sa) = run();
        let (b, sb) = run();
        assert_eq!(a.len(), 7);
        assert_eq!(a, b);
        assert_eq!(
            sa.into_iter().filter(|(k, _)| !k.starts_with(b"\x00")).collect::<Vec<_>>(),
            sb.into_iter().filter(|(k, _)| !k.starts_with(b"\x00")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn ignores_unrelated_events() {
        let mut h = harness();
        let ev = stock_reservation_released("r", "O-1", "R", "EXPIRED", 0, &[]);
        assert!(h.feed("order.created", ev, 0).unwrap().is_empty());
        assert!(h.notes.is_empty());
    }
}
