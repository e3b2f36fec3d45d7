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
    allocation_step, cancel_reason, change_reason, failure_reason, release_reason, settlement, FailedItem, OrderCancelled, OrderCompleted,
    OrderCreated, OrderSettled, ReleasedItem, ReservedItem, SettledItem, StockAllocation, StockReservationExpired, StockReservationFailed,
    StockReservationReleased, StockReserved,
};
use orderflow_api::{derive_event_id, Context, Event, Export, Outputs, ProcessError, Processor, StateTxn};
use serde::{Deserialize, Serialize};

pub mod hierarchy;
pub mod movements;
pub mod reconcile;
pub use hierarchy::{hq_key, FallbackPolicy, HqOverride, HqStock, HQ_PREFIX};
pub use reconcile::{reconcile, reconcile_hqs, HqReport, DEFAULT_RECONCILE_INTERVAL_MS, RECONCILE_TIMER};

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
    /// `[hq_fallback]` (seed 004 "매장 재고 부족 시 HQ 재고 확인", issue 16): whether and how a
    /// short store is served from its HQ's unallocated stock; see [`FallbackPolicy`].
    #[serde(default)]
    pub hq_fallback: FallbackPolicy,
}

fn default_reservation_ttl() -> Duration {
    orderflow_api::DEFAULT_RESERVATION_TTL
}

fn default_reconcile_interval() -> Duration {
    Duration::from_millis(DEFAULT_RECONCILE_INTERVAL_MS as u64)
}

impl Default for Config {
    fn default() -> Config {
        Config {
            reservation_ttl: default_reservation_ttl(),
            reconcile_interval: default_reconcile_interval(),
            hq_fallback: FallbackPolicy::default(),
        }
    }
}

impl Config {
    /// The reservation TTL in ms.
    ///
    /// Errors: a TTL under 1 ms.
    pub fn ttl_ms(&self) -> Result<i64, String> {
        orderflow_api::ReservationTtlConfig { reservation_ttl: self.reservation_ttl }.ttl_ms()
    }

    /// Errors: a TTL under 1 ms, a reconcile interval under 1 s, a negative fallback limit.
    pub fn validate(&self) -> Result<(), String> {
        self.ttl_ms()?;
        self.hq_fallback.validate()?;
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
        Ok(StockReserver::new(self.ttl_ms()?)
            .with_reconcile_interval(orderflow_api::millis(self.reconcile_interval))
            .with_fallback(self.hq_fallback.clone()))
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
/// Port of `stock.commands`, its own input (issue 16): the stock hierarchy's
/// `StockAllocation` and `StockLedgerEntry` records between the HQ's and the stores' shards.
pub const PORT_COMMANDS: &str = "commands";

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_RESERVED, PORT_FAILED, PORT_RELEASED, PORT_UPDATED, PORT_SETTLED, PORT_COMMANDS];

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
    /// The store was short and asked its HQ for the rest (issue 16): holds nothing until the
    /// HQ's grant (→ `Live`, or `Failed` if the store's own part went meanwhile) or deny
    /// (→ `Failed`).
    AwaitingHq,
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
    /// Units of `items` that came (or are to come) from the HQ (issue 16 fallback); a release
    /// gives exactly these back to the HQ first. Empty for a store-only reservation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_hq: Vec<ReservationItem>,
}

/// The stock reserver worker. See the crate docs for the rules.
#[derive(Debug, Clone)]
pub struct StockReserver {
    reservation_ttl_ms: i64,
    reconcile_interval_ms: i64,
    fallback: FallbackPolicy,
}

impl StockReserver {
    /// A reserver whose reservations expire `reservation_ttl_ms` ms after the order's
    /// `occurredAt` (rule 3: 5 minutes by default, configured per topology).
    ///
    /// # Panics
    /// If `reservation_ttl_ms ≤ 0` (a configuration error).
    pub fn new(reservation_ttl_ms: i64) -> Self {
        assert!(reservation_ttl_ms > 0, "reservation TTL must be positive, got {reservation_ttl_ms} ms");
        StockReserver { reservation_ttl_ms, reconcile_interval_ms: DEFAULT_RECONCILE_INTERVAL_MS, fallback: FallbackPolicy::default() }
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

    /// The same reserver with HQ fallback `policy` (issue 16; default: on, no limits).
    pub fn with_fallback(mut self, policy: FallbackPolicy) -> Self {
        self.fallback = policy;
        self
    }

    /// The configured reservation TTL, ms.
    pub fn reservation_ttl_ms(&self) -> i64 {
        self.reservation_ttl_ms
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

        let expires_at = e.occurred_at.saturating_add(self.reservation_ttl_ms);
        let mut reservation = Reservation {
            reservation_id: derive_event_id(&e.event_id, "reservation"),
            order_id: e.order_id.clone(),
            hq_id: e.hq_id.clone(),
            store_id: e.store_id.clone(),
            items: Vec::new(),
            status: ReservationStatus::Failed,
            expires_at,
            from_hq: Vec::new(),
        };

        // Issue 4: invalid content is answered (the order gets a terminal outcome), not dead-lettered.
        if let Some((reason, items)) = self.invalid_content(e, state)? {
            return fail(&e.event_id, e.occurred_at, &reservation, reason, items, state, out);
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

        if !short.is_empty() && self.fallback.for_hq(&e.hq_id).0 {
            return self.ask_hq(e, reservation, &wanted, levels, state, out);
        }
        if !short.is_empty() {
            for item in &short {
                // High-cardinality label: the runtime keeps only a bounded top N of it.
                out.note_as("out_of_stock", item.product_id.clone(), Export::TopN);
            }
            // Seed 000: reserve nothing, name only the short products.
            return fail(&e.event_id, e.occurred_at, &reservation, failure_reason::INSUFFICIENT_STOCK, short, state, out);
        }

        for ((key, mut rec), &(_, qty)) in levels.into_iter().zip(&wanted) {
            rec.reserved += qty;
            store_stock(state, key, &rec, out);
        }
        reservation.items = wanted.iter().map(|&(p, q)| ReservationItem { product_id: p.to_string(), quantity: to_i32(q) }).collect();
        go_live(&e.event_id, e.occurred_at, reservation, state, out)
    }

    /// The store is short of some lines (issue 16 HQ fallback): records the order `AWAITING_HQ`
    /// and asks the HQ for the rest (`FALLBACK_REQUEST`). The store holds nothing meanwhile, so
    /// an order the HQ cannot serve never blocks the store's units for other orders; its own
    /// part is taken when the HQ's units arrive ([`StockReserver::hq_answer`]).
    fn ask_hq(
        &self,
        e: &OrderCreated,
        mut r: Reservation,
        wanted: &[(&str, i64)],
        levels: Vec<(Vec<u8>, StockRecord)>,
        state: &mut StateTxn,
        out: &mut Outputs,
    ) -> Result<(), ProcessError> {
        let mut short = Vec::new();
        for ((_, rec), &(p, qty)) in levels.into_iter().zip(wanted) {
            let here = rec.available().clamp(0, qty);
            if here < qty {
                short.push((p.to_string(), qty - here));
            }
        }
        r.items = wanted.iter().map(|&(p, q)| ReservationItem { product_id: p.to_string(), quantity: to_i32(q) }).collect();
        r.from_hq = short.iter().map(|(p, q)| ReservationItem { product_id: p.clone(), quantity: to_i32(*q) }).collect();
        r.status = ReservationStatus::AwaitingHq;
        state.put_json(reservation_key(&r.order_id), &r);
        out.note("hq_fallback", "requested");
        let (hq, store) = (&e.hq_id, &e.store_id);
        let step = allocation_step::FALLBACK_REQUEST;
        hierarchy::allocate(&e.event_id, e.occurred_at, hq, store, "", step, &r.reservation_id, Some(&e.order_id), &e.event_id, short, out)
    }

    /// The HQ's answer to this store's `FALLBACK_REQUEST`. Grant: if the store's own part of
    /// every line is still available, the HQ's units arrive (on hand +, reported to the HQ as
    /// `HQ_FALLBACK`) and the whole order is reserved (`stock.reserved`); if the store sold its
    /// part meanwhile, the HQ's units go straight back (`HQ_RETURN`) and the order fails
    /// `INSUFFICIENT_STOCK`. Deny: the order fails `INSUFFICIENT_STOCK`, each short line's
    /// `available` = the store's units + the HQ's spare ones. An answer for an order no longer
    /// waiting (cancelled or paid meanwhile) gives granted units straight back to the HQ.
    fn hq_answer(&self, a: &StockAllocation, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let order_id = a.order_id.clone().unwrap_or_default();
        let rkey = reservation_key(&order_id);
        let waiting = state
            .get_json::<Reservation>(&rkey)?
            .filter(|r| r.status == ReservationStatus::AwaitingHq && r.reservation_id == a.reference_id);
        let granted = a.step == allocation_step::FALLBACK_GRANT;
        let Some(r) = waiting else {
            out.note("late_event", format!("hq_answer_after_close_{}", if granted { "grant" } else { "deny" }));
            return if granted { give_back(a, &order_id, state, out) } else { Ok(()) };
        };
        let from_hq = |p: &str| r.from_hq.iter().find(|f| f.product_id == p).map_or(0, |f| i64::from(f.quantity));
        let mut levels = Vec::with_capacity(r.items.len());
        let mut short = Vec::new();
        let hq_spare: BTreeMap<&str, i64> = a.items.iter().map(|i| (i.product_id.as_str(), i.quantity)).collect();
        for item in &r.items {
            let key = stock_key(&r.hq_id, &r.store_id, &item.product_id);
            let rec = load_stock(state, &key)?;
            let (q, hq) = (i64::from(item.quantity), from_hq(&item.product_id));
            let here = rec.available().max(0);
            if granted && here < q - hq {
                short.push(FailedItem { product_id: item.product_id.clone(), requested: item.quantity, available: to_i32(here + hq) });
            } else if !granted && hq > 0 {
                let spare = hq_spare.get(item.product_id.as_str()).copied().unwrap_or(0);
                short.push(FailedItem { product_id: item.product_id.clone(), requested: item.quantity, available: to_i32(here + spare) });
            }
            levels.push((key, rec, item.product_id.clone(), q, hq));
        }
        if !granted || !short.is_empty() {
            if granted {
                out.note("hq_fallback", "store_sold_meanwhile");
                give_back(a, &order_id, state, out)?;
            } else {
                out.note("hq_fallback", "denied");
            }
            return fail_awaiting(a, r, short, state, out);
        }
        let mut lines = Vec::with_capacity(levels.len());
        for (key, before, product_id, q, hq) in levels {
            let after = StockRecord { on_hand: before.on_hand + hq, reserved: before.reserved + q };
            store_stock(state, key, &after, out);
            if hq > 0 {
                reconcile::book(state, (&r.hq_id, &r.store_id, &product_id), before.on_hand, hq, 0)?;
                lines.push(hierarchy::Line {
                    product_id,
                    previous: before.on_hand,
                    current: after.on_hand,
                    in_transit: -hq,
                    unallocated: 0,
                });
            }
        }
        let (hq, store) = (&a.hq_id, &a.store_id);
        hierarchy::report(
            hq,
            store,
            change_reason::HQ_FALLBACK,
            &order_id,
            &a.cause_event_id,
            "stock.ledger/in",
            a.occurred_at,
            lines,
            out,
        )?;
        out.note("hq_fallback", "served");
        go_live(&a.cause_event_id, a.occurred_at, r, state, out)
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
            Some(mut r) if r.status == ReservationStatus::AwaitingHq => {
                drop_hold(&mut r, state);
                out.note("late_event", "cancel_while_awaiting_hq");
                Ok(())
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
            Some(mut r) if r.status == ReservationStatus::AwaitingHq => {
                // Paid before the HQ answered: what the store held goes back, then it is a late
                // payment (the HQ's units, if granted, return to the HQ on arrival).
                drop_hold(&mut r, state);
                self.late_payment(e, Some(r), state, out)
            }
            stored => self.late_payment(e, stored, state, out),
        }
    }

    /// The payment of a live reservation: deducts the sold units, releases the unsold ones
    /// (`UNSOLD`), settles `SOLD`.
    fn sell_reserved(&self, e: &OrderCompleted, mut r: Reservation, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let sold = sold_quantities(e, &r)?;
        let mut unsold = Vec::new();
        let mut settled = Vec::new();
        let mut lines = Vec::new();
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
                lines.push(sale_line(&item.product_id, before.on_hand, after.on_hand));
                settled.push(SettledItem { product_id: item.product_id.clone(), quantity: to_i32(q_sold) });
            }
        }
        report_sale(e, &r, lines, out)?;
        let unsold_units: BTreeMap<String, i64> = unsold.iter().map(|u| (u.product_id.clone(), i64::from(u.released))).collect();
        return_to_hq(&mut r, &unsold_units, &e.event_id, e.occurred_at, state, out)?;
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
            from_hq: Vec::new(),
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
        let mut sales = Vec::with_capacity(levels.len());
        for (key, before, product_id, q) in levels {
            let after = StockRecord { on_hand: before.on_hand - q, reserved: before.reserved };
            store_stock(state, key, &after, out);
            reconcile::book(state, (&r.hq_id, &r.store_id, product_id), before.on_hand, 0, q)?;
            sales.push(sale_line(product_id, before.on_hand, after.on_hand));
            settled.push(SettledItem { product_id: product_id.clone(), quantity: to_i32(q) });
        }
        report_sale(e, &r, sales, out)?;
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

/// The ledger line of a sale of one product: store on hand `previous` → `current`.
fn sale_line(product_id: &str, previous: i64, current: i64) -> hierarchy::Line {
    hierarchy::Line { product_id: product_id.to_string(), previous, current, in_transit: 0, unallocated: 0 }
}

/// Reports payment `e`'s sales at `r`'s store to the HQ's ledger, which publishes each
/// `stock.updated` `SALE` (id `derive(payment eventId, "stock.updated/<productId>")`, seed 004:
/// "HQ와 Store 재고 동시 차감").
fn report_sale(e: &OrderCompleted, r: &Reservation, lines: Vec<hierarchy::Line>, out: &mut Outputs) -> Result<(), ProcessError> {
    hierarchy::report(&r.hq_id, &r.store_id, change_reason::SALE, &e.order_id, &e.event_id, "stock.ledger", e.occurred_at, lines, out)
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
            Event::InventoryAdjusted(e) => movements::movement(e, state, out),
            Event::StockAllocation(a) => match a.step.as_str() {
                allocation_step::FALLBACK_REQUEST => hierarchy::answer_fallback(a, &self.fallback, state, out),
                allocation_step::FALLBACK_GRANT | allocation_step::FALLBACK_DENY => self.hq_answer(a, state, out),
                allocation_step::DISTRIBUTION | allocation_step::TRANSFER => movements::receive(a, state, out),
                other => Err(ProcessError::Invalid(format!("StockAllocation {}: unknown step {other:?}", a.event_id))),
            },
            Event::StockLedgerEntry(e) => {
                register_store(&e.hq_id, "", &e.event_id, state);
                hierarchy::apply_entry(e, state, out)
            }
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

/// Sends the units of HQ grant `a` straight back to the HQ (the store never takes them): in
/// transit −, unallocated +, the store's figure unchanged.
fn give_back(a: &StockAllocation, order_id: &str, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
    let mut lines = Vec::with_capacity(a.items.len());
    for i in &a.items {
        let on_hand = load_stock(state, &stock_key(&a.hq_id, &a.store_id, &i.product_id))?.on_hand;
        lines.push(hierarchy::Line {
            product_id: i.product_id.clone(),
            previous: on_hand,
            current: on_hand,
            in_transit: -i.quantity,
            unallocated: i.quantity,
        });
    }
    hierarchy::report(&a.hq_id, &a.store_id, change_reason::HQ_RETURN, order_id, &a.event_id, "stock.ledger/in", a.occurred_at, lines, out)
}

/// Fails an `AWAITING_HQ` order (the HQ's answer `a` came) with `INSUFFICIENT_STOCK` naming
/// `short`, as a direct failure would have.
fn fail_awaiting(
    a: &StockAllocation,
    mut r: Reservation,
    short: Vec<FailedItem>,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    r.items.clear();
    r.from_hq.clear();
    r.status = ReservationStatus::Failed;
    for item in &short {
        out.note_as("out_of_stock", item.product_id.clone(), Export::TopN);
    }
    fail(&a.cause_event_id, a.occurred_at, &r, failure_reason::INSUFFICIENT_STOCK, short, state, out)
}

/// Marks `r` live (its units already counted in the stock records), stores it and emits
/// `stock.reserved`, its id derived from the order's `order.created` eventId `cause`.
fn go_live(cause: &str, occurred_at: i64, mut r: Reservation, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
    r.status = ReservationStatus::Live;
    state.put_json(reservation_key(&r.order_id), &r);
    out.emit(
        PORT_RESERVED,
        r.order_id.clone(),
        StockReserved {
            event_id: derive_event_id(cause, "stock.reserved"),
            occurred_at,
            order_id: r.order_id.clone(),
            reservation_id: r.reservation_id.clone(),
            hq_id: r.hq_id.clone(),
            store_id: r.store_id.clone(),
            expires_at: r.expires_at,
            items: r.items.iter().map(|i| ReservedItem { product_id: i.product_id.clone(), reserved: i.quantity }).collect(),
        },
    )?;
    out.note("reservation", "reserved");
    Ok(())
}

/// Ends an `AWAITING_HQ` reservation before the HQ answered: it held nothing at the store, so
/// it is only closed (the HQ's answer then finds it closed and a grant goes back to the HQ).
fn drop_hold(r: &mut Reservation, state: &mut StateTxn) {
    r.from_hq.clear();
    r.status = ReservationStatus::Closed;
    state.put_json(reservation_key(&r.order_id), &*r);
}

/// Gives back to the HQ up to `units[product]` of the HQ units `r` holds (`fromHq`, issue 16):
/// store on hand −= n, reported `HQ_RETURN` (the HQ's unallocated += n). `cause` is the event
/// that released them. Reduces `r.from_hq` accordingly.
fn return_to_hq(
    r: &mut Reservation,
    units: &BTreeMap<String, i64>,
    cause: &str,
    occurred_at: i64,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    let mut lines = Vec::new();
    for f in r.from_hq.iter_mut() {
        let n = units.get(&f.product_id).copied().unwrap_or(0).min(i64::from(f.quantity));
        if n <= 0 {
            continue;
        }
        let key = stock_key(&r.hq_id, &r.store_id, &f.product_id);
        let before = load_stock(state, &key)?;
        let after = StockRecord { on_hand: before.on_hand - n, reserved: before.reserved };
        store_stock(state, key, &after, out);
        reconcile::book(state, (&r.hq_id, &r.store_id, &f.product_id), before.on_hand, -n, 0)?;
        lines.push(hierarchy::Line {
            product_id: f.product_id.clone(),
            previous: before.on_hand,
            current: after.on_hand,
            in_transit: 0,
            unallocated: n,
        });
        f.quantity -= to_i32(n);
    }
    r.from_hq.retain(|f| f.quantity > 0);
    hierarchy::report(&r.hq_id, &r.store_id, change_reason::HQ_RETURN, &r.order_id, cause, "stock.ledger/return", occurred_at, lines, out)
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
    let all: BTreeMap<String, i64> = r.from_hq.iter().map(|f| (f.product_id.clone(), i64::from(f.quantity))).collect();
    return_to_hq(r, &all, cause, occurred_at, state, out)?;
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

/// Answers the order of `failed` (status [`ReservationStatus::Failed`], nothing held) with
/// `stock.reservation.failed` `reason` naming `items`, its id derived from the order's
/// `order.created` eventId `cause` (at once, or after the HQ's answer: the same id), and stores
/// `failed` so the order never reserves later (rule 5). Notes `reservation` with the reason.
fn fail(
    cause: &str,
    occurred_at: i64,
    failed: &Reservation,
    reason: &'static str,
    items: Vec<FailedItem>,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    debug_assert_eq!(failed.status, ReservationStatus::Failed);
    state.put_json(reservation_key(&failed.order_id), failed);
    out.emit(
        PORT_FAILED,
        failed.order_id.clone(),
        StockReservationFailed {
            event_id: derive_event_id(cause, "stock.reservation.failed"),
            occurred_at,
            order_id: failed.order_id.clone(),
            hq_id: failed.hq_id.clone(),
            store_id: failed.store_id.clone(),
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
        from_hq: Vec::new(),
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
        ReservationStatus::AwaitingHq => "awaiting_hq",
    }
}

fn to_i32(v: i64) -> i32 {
    i32::try_from(v.clamp(i64::from(i32::MIN), i64::from(i32::MAX))).expect("clamped")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[path = "hierarchy_tests.rs"]
mod hierarchy_tests;
