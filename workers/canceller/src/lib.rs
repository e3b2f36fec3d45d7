//! Canceller: the compensation step of the saga (seed 000) and its clocks (seed 001).
//!
//! **Compensation.** A failed reservation (`INSUFFICIENT_STOCK`, seed 000; invalid content,
//! issue 4), an expired one (`RESERVATION_EXPIRED`, seed 004) or a saga that ran out of time
//! (`SAGA_TIMEOUT`, seed 001) cancels the order with an `order.cancelled` carrying the customer
//! push text ([`customer_message`]). Each order is cancelled at most once: the output id is
//! `derive_event_id(orderId, "order.cancelled")` whatever the cause, so even two causes racing
//! produce one cancellation downstream (domain rule 7), and the canceller remembers cancelled
//! orders at [`cancel_key`].
//!
//! **Saga timeouts (seed 001).** "No stock answer within 3 minutes cancels the order
//! (`SAGA_TIMEOUT`); the whole saga is bounded at 10 minutes." Both durations come from the
//! canceller's `stock_answer_timeout` / `saga_timeout` in `topology.toml`. When the canceller
//! processes `order.created` it opens the saga ([`saga_key`]) and schedules two durable timers:
//! [`answer_timer_key`] at `now + stock_answer_timeout` and [`saga_timer_key`] at
//! `now + saga_timeout`. `stock.reserved` or `stock.reservation.failed` is the stock answer
//! (cancels the answer timer); the stock reserver's `order.settled` `SOLD` or any `order.cancelled`
//! (the canceller's own included) closes the saga (cancels both). A timer that fires on an open saga cancels the order
//! with `SAGA_TIMEOUT` and notes `saga_timeout` (`stock_answer` or `saga_bound`); on a closed
//! saga it does nothing.
//!
//! `now` is the runtime's **processing time** (`Context::now_ms`) when the canceller processes
//! `order.created`, not the event's `occurredAt`: after an outage the canceller reads a backlog
//! of old orders, and event time would cancel every one of them at once although the rest of
//! the pipeline (catching up as well) may still answer them. The clocks therefore measure how
//! long the saga has been waiting since the canceller saw it, not since the customer ordered.
//!
//! **Ordering.** The canceller's inputs are consumed independently, so a stock answer can be
//! processed before its `order.created`. The answer is remembered in the open saga record; the
//! later `order.created` then starts no answer timer. A `stock.reserved` seen first also starts
//! the saga bound (the saga is bounded from whichever of its events the canceller sees first),
//! so an order whose `order.created` never reaches the canceller still ends. A
//! `stock.reservation.failed` seen first is held in the open saga
//! ([`OpenSaga::pending_failure`]) and cancelled when `order.created` arrives, with its customer,
//! or at the saga bound without one: the cancellation's payload then does not depend on which
//! input was read first, so a unit re-read in another interleaving (after a rewind under
//! `effectively_once`) writes the same payload under the same `eventId` (issue 19).
//!
//! **Payments (issue 13).** The canceller never reads the POS's `order.completed`: whether a
//! payment sold the order or must be refunded is the stock reserver's verdict (`order.settled`),
//! taken where payment, cancellation and expiry of the order meet in one order. `SOLD` closes the
//! saga as completed, even over an earlier `RESERVATION_EXPIRED` or `SAGA_TIMEOUT` cancellation
//! (a late sale: the units were deducted after all). `REFUND_REQUIRED` emits a second,
//! distinct cancellation ([`refund_event_id`]) with `refundRequired = true`, so every paid order
//! ends with exactly one `SALE` or exactly one refund-required cancellation. Cancellations carry
//! the customer of `order.created` (`customerId`) when the canceller saw it.
//!
//! **Late events.** Once a saga is closed, its record shrinks to a tombstone
//! ([`Saga::Closed`], the outcome only) and every later event for it is noted `late_event`
//! and ignored, never applied. Expected echoes are silent: the canceller's own `order.cancelled`
//! and the stock reserver's `CANCELLED` release.
//!
//! State (JSON): [`saga_key`] → [`Saga`], [`cancel_key`] → [`CancelRecord`]; timers
//! [`answer_timer_key`], [`saga_timer_key`] (ms since the epoch).
//!
//! # Layout
//!
//! - `lib.rs`: [`Config`] (the seed 001 clocks), ports, state and timer keys, the customer
//!   texts ([`customer_message`]) and [`Canceller`].
//! - `tests.rs`: unit tests through `orderflow_api::Harness`.

use orderflow_api::events::{
    cancel_reason, failure_reason, release_reason, settlement, OrderCancelled, OrderCreated, OrderSettled, StockReservationFailed,
    StockReservationReleased, StockReserved,
};
use orderflow_api::{derive_event_id, Context, Event, Export, Outputs, ProcessError, Processor, StateTxn};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Port of `order.cancelled` (key orderId).
pub const PORT_CANCELLED: &str = "cancelled";

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_CANCELLED];

/// Seed 001: no stock answer within 3 minutes cancels the order. Milliseconds.
pub const DEFAULT_STOCK_ANSWER_TIMEOUT_MS: i64 = 180_000;
/// Seed 001: the whole saga is bounded at 10 minutes. Milliseconds.
pub const DEFAULT_SAGA_TIMEOUT_MS: i64 = 600_000;

/// The canceller's own settings: the keys of its `[workers.<name>]` entry in `topology.toml`
/// beyond the common ones (parsed by the kinds registry, `orderflow_kinds`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `stock_answer_timeout` (seed 001): how long an order may wait for its stock answer
    /// before it is cancelled with `SAGA_TIMEOUT`; default 3 minutes.
    #[serde(default = "default_stock_answer_timeout", with = "humantime_serde")]
    pub stock_answer_timeout: Duration,
    /// `saga_timeout` (seed 001): the bound on the whole saga; default 10 minutes.
    #[serde(default = "default_saga_timeout", with = "humantime_serde")]
    pub saga_timeout: Duration,
}

fn default_stock_answer_timeout() -> Duration {
    Duration::from_millis(DEFAULT_STOCK_ANSWER_TIMEOUT_MS as u64)
}

fn default_saga_timeout() -> Duration {
    Duration::from_millis(DEFAULT_SAGA_TIMEOUT_MS as u64)
}

impl Default for Config {
    fn default() -> Config {
        Config { stock_answer_timeout: default_stock_answer_timeout(), saga_timeout: default_saga_timeout() }
    }
}

impl Config {
    /// Errors: a stock answer timeout under 1 ms or not shorter than the saga bound.
    pub fn validate(&self) -> Result<(), String> {
        if self.stock_answer_timeout < Duration::from_millis(1) || self.stock_answer_timeout >= self.saga_timeout {
            return Err(format!(
                "stock_answer_timeout {} must be at least 1 ms and shorter than saga_timeout {}",
                humantime::format_duration(self.stock_answer_timeout),
                humantime::format_duration(self.saga_timeout)
            ));
        }
        Ok(())
    }

    /// The processor these settings configure.
    pub fn processor(&self) -> Canceller {
        Canceller::new(orderflow_api::millis(self.stock_answer_timeout), orderflow_api::millis(self.saga_timeout))
    }
}

/// `saga_timeout` note label of a cancellation for a missing stock answer.
pub const TIMEOUT_STOCK_ANSWER: &str = "stock_answer";
/// `saga_timeout` note label of a cancellation at the saga bound.
pub const TIMEOUT_SAGA_BOUND: &str = "saga_bound";

/// Prefix of the stock answer timer keys (see [`answer_timer_key`]).
pub const ANSWER_TIMER_PREFIX: &str = "timeout/answer/";
/// Prefix of the saga bound timer keys (see [`saga_timer_key`]).
pub const SAGA_TIMER_PREFIX: &str = "timeout/saga/";

/// State key marking an order cancelled: `cancel/{orderId}`.
pub fn cancel_key(order_id: &str) -> Vec<u8> {
    format!("cancel/{order_id}").into_bytes()
}

/// State key of an order's saga record ([`Saga`]): `saga/{orderId}`.
pub fn saga_key(order_id: &str) -> Vec<u8> {
    format!("saga/{order_id}").into_bytes()
}

/// Timer key of an order's stock answer deadline: `timeout/answer/{orderId}`.
pub fn answer_timer_key(order_id: &str) -> Vec<u8> {
    format!("{ANSWER_TIMER_PREFIX}{order_id}").into_bytes()
}

/// Timer key of an order's saga bound: `timeout/saga/{orderId}`.
pub fn saga_timer_key(order_id: &str) -> Vec<u8> {
    format!("{SAGA_TIMER_PREFIX}{order_id}").into_bytes()
}

/// The `eventId` of an order's (single) cancellation: `derive_event_id(orderId, "order.cancelled")`.
pub fn cancellation_event_id(order_id: &str) -> String {
    derive_event_id(order_id, "order.cancelled")
}

/// The `eventId` of an order's (single) refund-required cancellation (issue 13):
/// `derive_event_id(orderId, "order.cancelled/refund")`. Distinct from
/// [`cancellation_event_id`]: an order cancelled as `RESERVATION_EXPIRED` and then paid gets both.
pub fn refund_event_id(order_id: &str) -> String {
    derive_event_id(order_id, "order.cancelled/refund")
}

/// The customer push text for a cancellation `reason` (a [`cancel_reason`] code).
///
/// `INSUFFICIENT_STOCK` is the seed 000 push text; unknown reasons get a generic text.
pub fn customer_message(reason: &str) -> &'static str {
    match reason {
        cancel_reason::INSUFFICIENT_STOCK => "재고 부족으로 주문이 취소되었습니다. 다른 상품을 확인해보세요.",
        cancel_reason::RESERVATION_EXPIRED => "결제 시간이 초과되어 주문이 취소되었습니다.",
        cancel_reason::PAYMENT_FAILED => "결제에 실패하여 주문이 취소되었습니다.",
        cancel_reason::SAGA_TIMEOUT => "주문 처리 시간이 초과되어 주문이 취소되었습니다.",
        cancel_reason::INVALID_ORDER => "주문 정보가 올바르지 않아 주문이 취소되었습니다.",
        cancel_reason::PAYMENT_AFTER_EXPIRY => "예약 시간이 지나 재고를 확보하지 못해 주문이 취소되었습니다. 결제 금액은 환불됩니다.",
        _ => "주문이 취소되었습니다.",
    }
}

/// The cancellation reason for a `stock.reservation.failed` `reason` (a [`failure_reason`]
/// code): `INSUFFICIENT_STOCK` → `INSUFFICIENT_STOCK` (seed 000); the invalid-content reasons
/// ([`failure_reason::INVALID_CONTENT`]: `INVALID_QUANTITY`, `EMPTY_ORDER`, `DUPLICATE_PRODUCT`,
/// `UNKNOWN_STORE`, `INVALID_PRODUCT`) → `INVALID_ORDER` (issue 4). `None` for a reason this
/// canceller does not know.
pub fn cancel_reason_for_failure(reason: &str) -> Option<&'static str> {
    match reason {
        failure_reason::INSUFFICIENT_STOCK => Some(cancel_reason::INSUFFICIENT_STOCK),
        r if failure_reason::INVALID_CONTENT.contains(&r) => Some(cancel_reason::INVALID_ORDER),
        _ => None,
    }
}

/// What the canceller stores per cancelled order at [`cancel_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRecord {
    /// The cancellation reason as known to the canceller (its own, or the one it observed).
    pub reason: String,
    /// Whether this canceller emitted the `order.cancelled` (false: observed someone else's).
    pub emitted: bool,
}

/// How a saga ended: the outcome in a [`Saga::Closed`] tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The stock reserver settled the order's payment `SOLD` (`order.settled`).
    #[serde(rename = "ORDER_COMPLETED")]
    Completed,
    /// `order.cancelled` emitted or seen (any reason).
    #[serde(rename = "ORDER_CANCELLED")]
    Cancelled,
}

/// An open saga: what a timer needs to cancel the order. Stored as JSON with camelCase names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenSaga {
    /// Store of the order (copied into the cancellation).
    pub hq_id: String,
    /// Store of the order (copied into the cancellation).
    pub store_id: String,
    /// Processing time (ms since the epoch) at which the canceller processed `order.created`;
    /// `None` while only a stock answer that overtook it was seen.
    pub created_seen_at: Option<i64>,
    /// Whether the stock answer (`stock.reserved`) was seen.
    pub answered: bool,
    /// The reservation of the answer, if the stock was reserved (copied into a `SAGA_TIMEOUT`
    /// cancellation so the reserver and confirmer see which reservation it ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    /// The customer of `order.created` (copied into cancellations, issue 13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// A stock failure that overtook `order.created`: its cancellation waits for the order (or
    /// the saga bound), so the cancellation's payload (its `customerId`) does not depend on which
    /// input the canceller happened to read first (issue 19: one `eventId`, one payload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_failure: Option<PendingFailure>,
}

/// A stock failure waiting for its `order.created` ([`OpenSaga::pending_failure`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingFailure {
    /// The cancellation reason (e.g. `INSUFFICIENT_STOCK`).
    pub reason: String,
    /// The failure's `occurredAt` (ms), the cancellation's.
    pub occurred_at: i64,
}

/// The canceller's record of one order's saga at [`saga_key`]. JSON, tagged by `state`:
/// `{"state":"OPEN","hqId":…,"storeId":…,"createdSeenAt":…,"answered":…}` while running,
/// `{"state":"CLOSED","outcome":"ORDER_COMPLETED"|"ORDER_CANCELLED","customerId":…}` once closed
/// (what is needed to recognise late events and address a refund).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Saga {
    /// Running; its timers may be scheduled.
    Open(OpenSaga),
    /// Ended; no timer is left.
    Closed {
        /// How it ended.
        outcome: Outcome,
        /// The customer, kept for a refund-required cancellation after the close (issue 13).
        #[serde(default, rename = "customerId", skip_serializing_if = "Option::is_none")]
        customer_id: Option<String>,
    },
}

/// The canceller worker. See the crate docs.
#[derive(Debug, Clone)]
pub struct Canceller {
    stock_answer_timeout_ms: i64,
    saga_timeout_ms: i64,
}

impl Default for Canceller {
    /// The seed 001 clocks: [`DEFAULT_STOCK_ANSWER_TIMEOUT_MS`] (3 minutes),
    /// [`DEFAULT_SAGA_TIMEOUT_MS`] (10 minutes).
    fn default() -> Self {
        Canceller::new(DEFAULT_STOCK_ANSWER_TIMEOUT_MS, DEFAULT_SAGA_TIMEOUT_MS)
    }
}

impl Canceller {
    /// A canceller that cancels an order with `SAGA_TIMEOUT` when no stock answer came
    /// `stock_answer_timeout_ms` ms after it processed `order.created`, or when the saga is still
    /// open `saga_timeout_ms` ms after that (seed 001: 3 and 10 minutes; `topology.toml`
    /// `stock_answer_timeout` / `saga_timeout`).
    ///
    /// # Panics
    /// If either duration is ≤ 0 (a configuration error).
    pub fn new(stock_answer_timeout_ms: i64, saga_timeout_ms: i64) -> Self {
        assert!(stock_answer_timeout_ms > 0, "stock answer timeout must be positive, got {stock_answer_timeout_ms} ms");
        assert!(saga_timeout_ms > 0, "saga timeout must be positive, got {saga_timeout_ms} ms");
        Canceller { stock_answer_timeout_ms, saga_timeout_ms }
    }

    /// The configured stock answer timeout, ms.
    pub fn stock_answer_timeout_ms(&self) -> i64 {
        self.stock_answer_timeout_ms
    }

    /// The configured saga bound, ms.
    pub fn saga_timeout_ms(&self) -> i64 {
        self.saga_timeout_ms
    }

    /// A new open saga of `order_id` at store (`hq_id`, `store_id`), bounded from now: its
    /// `saga_timeout` timer is scheduled (seed 001; from whichever of its events came first).
    fn open_saga(&self, ctx: &Context, order_id: &str, hq_id: &str, store_id: &str, state: &mut StateTxn) -> OpenSaga {
        state.schedule_timer(saga_timer_key(order_id), ctx.now_ms.saturating_add(self.saga_timeout_ms));
        OpenSaga {
            hq_id: hq_id.to_string(),
            store_id: store_id.to_string(),
            created_seen_at: None,
            answered: false,
            reservation_id: None,
            customer_id: None,
            pending_failure: None,
        }
    }

    /// Emits the order's single cancellation with `reason` and closes its saga. Returns whether it
    /// emitted: an order already cancelled is a `late_event` (`already_cancelled`), one already
    /// completed a `late_event` (`cancel_after_completion`).
    #[allow(clippy::too_many_arguments)]
    fn compensate(
        &self,
        order_id: &str,
        hq_id: &str,
        store_id: &str,
        reason: &str,
        reservation_id: Option<String>,
        occurred_at: i64,
        state: &mut StateTxn,
        out: &mut Outputs,
    ) -> Result<bool, ProcessError> {
        let key = cancel_key(order_id);
        if state.get(&key).is_some() {
            out.note("late_event", "already_cancelled");
            return Ok(false);
        }
        if closed(order_id, state)? == Some(Outcome::Completed) {
            out.note("late_event", "cancel_after_completion");
            return Ok(false);
        }
        emit_cancellation(order_id, (hq_id, store_id), reason, reservation_id, occurred_at, false, state, out)?;
        Ok(true)
    }

    fn created(&self, ctx: &Context, e: &OrderCreated, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderCreated", &e.event_id, "orderId", &e.order_id)?;
        orderflow_api::require("OrderCreated", &e.event_id, "hqId", &e.hq_id)?;
        orderflow_api::require("OrderCreated", &e.event_id, "storeId", &e.store_id)?;
        let key = saga_key(&e.order_id);
        let mut open = match state.get_json::<Saga>(&key)? {
            Some(Saga::Closed { .. }) => {
                out.note("late_event", "created_after_close");
                return Ok(());
            }
            Some(Saga::Open(open)) if open.created_seen_at.is_some() => {
                out.note("late_event", "duplicate_order");
                return Ok(());
            }
            // A stock answer overtook the order: its bound runs already; no answer timer.
            Some(Saga::Open(open)) => open,
            None => self.open_saga(ctx, &e.order_id, &e.hq_id, &e.store_id, state),
        };
        open.customer_id = Some(e.customer_id.clone()).filter(|c| !c.is_empty());
        if !open.answered {
            state.schedule_timer(answer_timer_key(&e.order_id), ctx.now_ms.saturating_add(self.stock_answer_timeout_ms));
        }
        open.created_seen_at = Some(ctx.now_ms);
        let pending = open.pending_failure.take();
        let (hq, store) = (open.hq_id.clone(), open.store_id.clone());
        state.put_json(key, &Saga::Open(open));
        if let Some(p) = pending {
            // The failure that overtook this order: cancelled now, with the order's customer.
            cancel_timer(saga_timer_key(&e.order_id), state);
            self.compensate(&e.order_id, &hq, &store, &p.reason, None, p.occurred_at, state, out)?;
        }
        Ok(())
    }

    fn reserved(&self, ctx: &Context, e: &StockReserved, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReserved", &e.event_id, "orderId", &e.order_id)?;
        let key = saga_key(&e.order_id);
        let mut open = match state.get_json::<Saga>(&key)? {
            Some(Saga::Closed { .. }) => {
                out.note("late_event", "stock_reserved_after_close");
                return Ok(());
            }
            Some(Saga::Open(open)) if open.answered => {
                out.note("late_event", "stock_answered_twice");
                return Ok(());
            }
            Some(Saga::Open(open)) => {
                cancel_timer(answer_timer_key(&e.order_id), state);
                open
            }
            // The answer overtook order.created: the saga is bounded from now.
            None => self.open_saga(ctx, &e.order_id, &e.hq_id, &e.store_id, state),
        };
        open.answered = true;
        open.reservation_id = Some(e.reservation_id.clone());
        state.put_json(key, &Saga::Open(open));
        Ok(())
    }

    fn failed(&self, ctx: &Context, e: &StockReservationFailed, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReservationFailed", &e.event_id, "orderId", &e.order_id)?;
        let reason = match cancel_reason_for_failure(&e.reason) {
            Some(r) => r,
            None => {
                // A reason newer than this canceller: still a failed reservation, so the order
                // is cancelled as a stock failure (the behaviour before issue 4) and reported.
                out.note("unknown_failure_reason", "OTHER");
                cancel_reason::INSUFFICIENT_STOCK
            }
        };
        // A failure that overtook its order.created waits for it (or the saga bound), so the
        // cancellation always carries the order's customer (`OpenSaga::pending_failure`).
        let key = saga_key(&e.order_id);
        let open = match state.get_json::<Saga>(&key)? {
            Some(Saga::Open(open)) if open.created_seen_at.is_some() => None,
            Some(Saga::Open(open)) => Some(open),
            Some(Saga::Closed { .. }) => None,
            None if state.get(&cancel_key(&e.order_id)).is_some() => None,
            None => Some(self.open_saga(ctx, &e.order_id, &e.hq_id, &e.store_id, state)),
        };
        if let Some(mut open) = open {
            if open.answered {
                out.note("late_event", "stock_answered_twice");
                return Ok(());
            }
            open.answered = true;
            open.pending_failure = Some(PendingFailure { reason: reason.to_string(), occurred_at: e.occurred_at });
            state.put_json(key, &Saga::Open(open));
            return Ok(());
        }
        // A failure is a stock answer; compensate closes the saga and its timers.
        self.compensate(&e.order_id, &e.hq_id, &e.store_id, reason, None, e.occurred_at, state, out)?;
        Ok(())
    }

    fn released(&self, e: &StockReservationReleased, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReservationReleased", &e.event_id, "orderId", &e.order_id)?;
        match e.reason.as_str() {
            release_reason::EXPIRED => {
                self.compensate(
                    &e.order_id,
                    &e.hq_id,
                    &e.store_id,
                    cancel_reason::RESERVATION_EXPIRED,
                    Some(e.reservation_id.clone()),
                    e.occurred_at,
                    state,
                    out,
                )?;
                Ok(())
            }
            // Released because the order was already cancelled: remember it, nothing to emit.
            release_reason::CANCELLED => {
                if closed(&e.order_id, state)? == Some(Outcome::Completed) {
                    out.note("late_event", "released_after_completion");
                    return Ok(());
                }
                mark_observed(&e.order_id, &e.reason, state)?;
                close(&e.order_id, Outcome::Cancelled, state)
            }
            // The units a payment did not sell went back to stock; the order itself was sold
            // (its order.settled closes the saga): nothing to cancel.
            release_reason::UNSOLD => Ok(()),
            other => Err(ProcessError::Invalid(format!("StockReservationReleased {}: unknown reason {other:?}", e.event_id))),
        }
    }

    fn cancelled(&self, e: &OrderCancelled, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderCancelled", &e.event_id, "orderId", &e.order_id)?;
        if closed(&e.order_id, state)? == Some(Outcome::Completed) {
            out.note("late_event", "cancelled_after_completion");
            return Ok(());
        }
        let own_echo = e.event_id == cancellation_event_id(&e.order_id);
        if !mark_observed(&e.order_id, &e.reason, state)? && !own_echo {
            out.note("late_event", "cancelled_twice");
        }
        close(&e.order_id, Outcome::Cancelled, state)
    }

    /// `order.settled`, the stock reserver's verdict on a payment (issue 13). `SOLD` closes the
    /// saga as completed, also over an earlier cancellation (a late sale: the customer paid and
    /// the units were deducted; noted `late_sale_after_cancel`). `REFUND_REQUIRED` emits the
    /// order's refund-required cancellation ([`refund_event_id`], `refundRequired = true`, reason
    /// from the verdict, `PAYMENT_AFTER_EXPIRY`) whether or not the order was cancelled before,
    /// and closes the saga as cancelled.
    ///
    /// Errors: `Invalid` for an empty `orderId` or an unknown outcome.
    fn settled(&self, e: &OrderSettled, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderSettled", &e.event_id, "orderId", &e.order_id)?;
        match e.outcome.as_str() {
            settlement::SOLD => match closed(&e.order_id, state)? {
                None => close(&e.order_id, Outcome::Completed, state),
                Some(Outcome::Completed) => {
                    out.note("late_event", "settled_twice");
                    Ok(())
                }
                Some(Outcome::Cancelled) => {
                    out.note("settlement", "late_sale_after_cancel");
                    let customer_id = customer_of(&e.order_id, state)?;
                    state.put_json(saga_key(&e.order_id), &Saga::Closed { outcome: Outcome::Completed, customer_id });
                    Ok(())
                }
            },
            settlement::REFUND_REQUIRED => {
                let reason = e.reason.as_deref().unwrap_or(cancel_reason::PAYMENT_AFTER_EXPIRY);
                let reservation_id = Some(e.reservation_id.clone()).filter(|r| !r.is_empty());
                emit_cancellation(&e.order_id, (&e.hq_id, &e.store_id), reason, reservation_id, e.occurred_at, true, state, out)
            }
            other => Err(ProcessError::Invalid(format!("OrderSettled {}: unknown outcome {other:?}", e.event_id))),
        }
    }

    /// A saga timer fired: cancels the order with `SAGA_TIMEOUT` if its saga is still open (and,
    /// for the answer timer, still unanswered); otherwise does nothing.
    fn timed_out(
        &self,
        order_id: &str,
        label: &'static str,
        due_ms: i64,
        state: &mut StateTxn,
        out: &mut Outputs,
    ) -> Result<(), ProcessError> {
        let Some(Saga::Open(open)) = state.get_json::<Saga>(&saga_key(order_id))? else {
            return Ok(());
        };
        if label == TIMEOUT_STOCK_ANSWER && open.answered {
            return Ok(());
        }
        if let Some(p) = &open.pending_failure {
            // Its order.created never came within the bound: the failure is the answer.
            self.compensate(order_id, &open.hq_id, &open.store_id, &p.reason, None, p.occurred_at, state, out)?;
            return Ok(());
        }
        let reservation_id = open.reservation_id.clone();
        if self.compensate(order_id, &open.hq_id, &open.store_id, cancel_reason::SAGA_TIMEOUT, reservation_id, due_ms, state, out)? {
            // Seed 001: a saga cancelled at its timeout is reported, not only counted.
            out.note_as("saga_timeout", label, Export::Logged("saga timed out; order cancelled with SAGA_TIMEOUT"));
        }
        Ok(())
    }
}

/// Emits the `order.cancelled` of `order_id` for `reason`: the refund-required one
/// ([`refund_event_id`], `refundRequired = true`) when `refund`, else the order's single
/// cancellation ([`cancellation_event_id`]); with the customer push text and the saga's customer.
/// Then records the cancellation (unless one is recorded), closes the saga and notes
/// `compensation`.
#[allow(clippy::too_many_arguments)]
fn emit_cancellation(
    order_id: &str,
    (hq_id, store_id): (&str, &str),
    reason: &str,
    reservation_id: Option<String>,
    occurred_at: i64,
    refund: bool,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    out.emit(
        PORT_CANCELLED,
        order_id.to_string(),
        OrderCancelled {
            event_id: if refund { refund_event_id(order_id) } else { cancellation_event_id(order_id) },
            occurred_at,
            order_id: order_id.to_string(),
            hq_id: hq_id.to_string(),
            store_id: store_id.to_string(),
            reason: reason.to_string(),
            reservation_id,
            customer_message: customer_message(reason).to_string(),
            refund_required: refund,
            customer_id: customer_of(order_id, state)?,
        },
    )?;
    let key = cancel_key(order_id);
    if state.get(&key).is_none() {
        state.put_json(key, &CancelRecord { reason: reason.to_string(), emitted: true });
    }
    close(order_id, Outcome::Cancelled, state)?;
    out.note("compensation", reason.to_string());
    Ok(())
}

/// How the saga of `order_id` ended, or `None` while it runs (or was never seen). An order with
/// a [`CancelRecord`] counts as cancelled even without a saga record (state written before the
/// saga records existed).
fn closed(order_id: &str, state: &StateTxn) -> Result<Option<Outcome>, ProcessError> {
    match state.get_json::<Saga>(&saga_key(order_id))? {
        Some(Saga::Closed { outcome, .. }) => Ok(Some(outcome)),
        _ if state.get(&cancel_key(order_id)).is_some() => Ok(Some(Outcome::Cancelled)),
        _ => Ok(None),
    }
}

/// Closes the saga of `order_id` with `outcome`: cancels its timers and shrinks its record to
/// the [`Saga::Closed`] tombstone (keeping the customer). No-op when it is closed already.
fn close(order_id: &str, outcome: Outcome, state: &mut StateTxn) -> Result<(), ProcessError> {
    let key = saga_key(order_id);
    let customer_id = match state.get_json::<Saga>(&key)? {
        Some(Saga::Closed { .. }) => return Ok(()),
        Some(Saga::Open(open)) => open.customer_id,
        None => None,
    };
    cancel_timer(answer_timer_key(order_id), state);
    cancel_timer(saga_timer_key(order_id), state);
    state.put_json(key, &Saga::Closed { outcome, customer_id });
    Ok(())
}

/// Issue 13 (bounded state): once the saga of `order_id` is closed, its records (the saga's and
/// the cancellation's) are forgotten `state_retention` after they were last written; until then
/// late and repeated events for the order are still recognised.
fn forget_when_closed(ctx: &Context, order_id: &str, state: &mut StateTxn) -> Result<(), ProcessError> {
    if closed(order_id, state)?.is_none() {
        return Ok(());
    }
    for key in [saga_key(order_id), cancel_key(order_id)] {
        if state.changes().writes.get(&key).is_some_and(Option::is_some) {
            orderflow_api::forget_later(ctx, state, &key);
        }
    }
    Ok(())
}

/// The customer of `order_id` as its saga record knows it (open or closed), if any.
fn customer_of(order_id: &str, state: &StateTxn) -> Result<Option<String>, ProcessError> {
    Ok(match state.get_json::<Saga>(&saga_key(order_id))? {
        Some(Saga::Open(open)) => open.customer_id,
        Some(Saga::Closed { customer_id, .. }) => customer_id,
        None => None,
    })
}

/// Cancels timer `key` if it is scheduled (no state change otherwise).
fn cancel_timer(key: Vec<u8>, state: &mut StateTxn) {
    if state.timer(&key).is_some() {
        state.cancel_timer(&key);
    }
}

/// Marks `order_id` cancelled by someone else; returns false if it already was.
fn mark_observed(order_id: &str, reason: &str, state: &mut StateTxn) -> Result<bool, ProcessError> {
    let key = cancel_key(order_id);
    if state.get_json::<CancelRecord>(&key)?.is_some() {
        return Ok(false);
    }
    state.put_json(key, &CancelRecord { reason: reason.to_string(), emitted: false });
    Ok(true)
}

impl Processor for Canceller {
    /// Dispatches on the event variant:
    /// - `OrderCreated` → opens the saga (processing time `ctx.now_ms`): timer
    ///   [`answer_timer_key`] at `now + stock_answer_timeout` unless the answer came first, timer
    ///   [`saga_timer_key`] at `now + saga_timeout` unless a stock answer started it already. On a
    ///   closed saga: `late_event` `created_after_close`; a second `order.created` for an open
    ///   one: `duplicate_order`.
    /// - `StockReserved` → the stock answer: cancels the answer timer and remembers the
    ///   reservation; seen before `order.created`, it opens the saga and starts its bound. On a
    ///   closed saga: `late_event` `stock_reserved_after_close`.
    /// - `StockReservationFailed` → `order.cancelled` with [`cancel_reason_for_failure`] of its
    ///   reason (`INSUFFICIENT_STOCK`, or `INVALID_ORDER` for invalid content; an unknown reason
    ///   cancels as `INSUFFICIENT_STOCK` and notes `unknown_failure_reason`), no reservationId.
    /// - `StockReservationReleased` reason `EXPIRED` → `order.cancelled` reason
    ///   `RESERVATION_EXPIRED` with the reservationId; reason `CANCELLED` → marks the order
    ///   cancelled and closes the saga, no output.
    /// - `OrderCancelled` (anyone's, including this worker's own output) → marks the order
    ///   cancelled and closes the saga, no output.
    /// - `OrderSettled` (the stock reserver's verdict on a payment, issue 13) → `SOLD` closes the
    ///   saga as completed; `REFUND_REQUIRED` emits the refund-required cancellation
    ///   ([`refund_event_id`]). The POS's `order.completed` itself is ignored: a payment's outcome
    ///   is the reserver's to decide.
    ///
    /// Outputs: key orderId, id [`cancellation_event_id`], `occurredAt` of the cause (a timer's
    /// deadline for `SAGA_TIMEOUT`). A cause for an already-cancelled order is a `late_event`
    /// (`already_cancelled`), for a completed one `cancel_after_completion`; a second foreign
    /// cancellation is `cancelled_twice`; the canceller's own echo and the reserver's
    /// `CANCELLED` release are expected and silent. Other events are ignored.
    ///
    /// Errors: [`ProcessError::Invalid`] for an empty `orderId` (and an `order.created` with an
    /// empty `hqId` or `storeId`: it has no store to cancel in) or an unknown release reason;
    /// [`ProcessError::UnwiredPort`] when `cancelled` is not wired.
    ///
    /// A closed saga's records are forgotten after the worker's `state_retention` (issue 13).
    fn process(&mut self, ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        match event {
            Event::OrderCreated(e) => self.created(ctx, e, state, out),
            Event::StockReserved(e) => self.reserved(ctx, e, state, out),
            Event::StockReservationFailed(e) => self.failed(ctx, e, state, out),
            Event::StockReservationReleased(e) => self.released(e, state, out),
            Event::OrderCancelled(e) => self.cancelled(e, state, out),
            Event::OrderSettled(e) => self.settled(e, state, out),
            _ => Ok(()),
        }?;
        match event.order_id() {
            Some(order_id) => forget_when_closed(ctx, order_id, state),
            None => Ok(()),
        }
    }

    /// Timer [`answer_timer_key`] on an open, unanswered saga → `order.cancelled` `SAGA_TIMEOUT`
    /// and note `saga_timeout`/`stock_answer`; timer [`saga_timer_key`] on an open saga → the
    /// same with note `saga_timeout`/`saga_bound`. `occurredAt` is the timer's deadline
    /// `due_ms`, so the output depends on the stored state only. A timer for a closed or unknown
    /// saga, or a foreign key, does nothing.
    fn on_timer(&mut self, ctx: &Context, key: &[u8], due_ms: i64, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let Ok(key) = std::str::from_utf8(key) else { return Ok(()) };
        let (order_id, label) = if let Some(order_id) = key.strip_prefix(ANSWER_TIMER_PREFIX) {
            (order_id, TIMEOUT_STOCK_ANSWER)
        } else if let Some(order_id) = key.strip_prefix(SAGA_TIMER_PREFIX) {
            (order_id, TIMEOUT_SAGA_BOUND)
        } else {
            return Ok(());
        };
        self.timed_out(order_id, label, due_ms, state, out)?;
        forget_when_closed(ctx, order_id, state)
    }
}

#[cfg(test)]
mod tests;
