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
//! (cancels the answer timer); `order.completed` or any `order.cancelled` (the canceller's own
//! included) closes the saga (cancels both). A timer that fires on an open saga cancels the order
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
//! so an order whose `order.created` never reaches the canceller still ends.
//!
//! **Late events.** Once a saga is closed, its record shrinks to a tombstone
//! ([`Saga::Closed`], the outcome only) and every later event for it is noted `late_event`
//! and ignored, never applied. Expected echoes are silent: the canceller's own `order.cancelled`
//! and the stock reserver's `CANCELLED` release.
//!
//! State (JSON): [`saga_key`] → [`Saga`], [`cancel_key`] → [`CancelRecord`]; timers
//! [`answer_timer_key`], [`saga_timer_key`] (ms since the epoch).

use orderflow_api::events::{
    cancel_reason, failure_reason, release_reason, OrderCancelled, OrderCompleted, OrderCreated, StockReservationFailed,
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
    /// `order.completed` seen (POS payment).
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
}

/// The canceller's record of one order's saga at [`saga_key`]. JSON, tagged by `state`:
/// `{"state":"OPEN","hqId":…,"storeId":…,"createdSeenAt":…,"answered":…}` while running,
/// `{"state":"CLOSED","outcome":"ORDER_COMPLETED"|"ORDER_CANCELLED"}` once closed (all that
/// is needed to recognise late events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Saga {
    /// Running; its timers may be scheduled.
    Open(OpenSaga),
    /// Ended; no timer is left.
    Closed {
        /// How it ended.
        outcome: Outcome,
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
        out.emit(
            PORT_CANCELLED,
            order_id.to_string(),
            OrderCancelled {
                event_id: cancellation_event_id(order_id),
                occurred_at,
                order_id: order_id.to_string(),
                hq_id: hq_id.to_string(),
                store_id: store_id.to_string(),
                reason: reason.to_string(),
                reservation_id,
                customer_message: customer_message(reason).to_string(),
            },
        )?;
        state.put_json(key, &CancelRecord { reason: reason.to_string(), emitted: true });
        close(order_id, Outcome::Cancelled, state)?;
        out.note("compensation", reason.to_string());
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
            None => {
                state.schedule_timer(saga_timer_key(&e.order_id), ctx.now_ms.saturating_add(self.saga_timeout_ms));
                OpenSaga {
                    hq_id: e.hq_id.clone(),
                    store_id: e.store_id.clone(),
                    created_seen_at: None,
                    answered: false,
                    reservation_id: None,
                }
            }
        };
        if !open.answered {
            state.schedule_timer(answer_timer_key(&e.order_id), ctx.now_ms.saturating_add(self.stock_answer_timeout_ms));
        }
        open.created_seen_at = Some(ctx.now_ms);
        state.put_json(key, &Saga::Open(open));
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
            None => {
                state.schedule_timer(saga_timer_key(&e.order_id), ctx.now_ms.saturating_add(self.saga_timeout_ms));
                OpenSaga {
                    hq_id: e.hq_id.clone(),
                    store_id: e.store_id.clone(),
                    created_seen_at: None,
                    answered: false,
                    reservation_id: None,
                }
            }
        };
        open.answered = true;
        open.reservation_id = Some(e.reservation_id.clone());
        state.put_json(key, &Saga::Open(open));
        Ok(())
    }

    fn failed(&self, e: &StockReservationFailed, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
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

    fn completed(&self, e: &OrderCompleted, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderCompleted", &e.event_id, "orderId", &e.order_id)?;
        match closed(&e.order_id, state)? {
            Some(Outcome::Cancelled) => out.note("late_event", "completed_after_cancel"),
            Some(Outcome::Completed) => out.note("late_event", "completed_twice"),
            None => close(&e.order_id, Outcome::Completed, state)?,
        }
        Ok(())
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
        let reservation_id = open.reservation_id.clone();
        if self.compensate(order_id, &open.hq_id, &open.store_id, cancel_reason::SAGA_TIMEOUT, reservation_id, due_ms, state, out)? {
            // Seed 001: a saga cancelled at its timeout is reported, not only counted.
            out.note_as("saga_timeout", label, Export::Logged("saga timed out; order cancelled with SAGA_TIMEOUT"));
        }
        Ok(())
    }
}

/// How the saga of `order_id` ended, or `None` while it runs (or was never seen). An order with
/// a [`CancelRecord`] counts as cancelled even without a saga record (state written before the
/// saga records existed).
fn closed(order_id: &str, state: &StateTxn) -> Result<Option<Outcome>, ProcessError> {
    match state.get_json::<Saga>(&saga_key(order_id))? {
        Some(Saga::Closed { outcome }) => Ok(Some(outcome)),
        _ if state.get(&cancel_key(order_id)).is_some() => Ok(Some(Outcome::Cancelled)),
        _ => Ok(None),
    }
}

/// Closes the saga of `order_id` with `outcome`: cancels its timers and shrinks its record to
/// the [`Saga::Closed`] tombstone. No-op when it is closed already.
fn close(order_id: &str, outcome: Outcome, state: &mut StateTxn) -> Result<(), ProcessError> {
    let key = saga_key(order_id);
    if let Some(Saga::Closed { .. }) = state.get_json::<Saga>(&key)? {
        return Ok(());
    }
    cancel_timer(answer_timer_key(order_id), state);
    cancel_timer(saga_timer_key(order_id), state);
    state.put_json(key, &Saga::Closed { outcome });
    Ok(())
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
    /// - `OrderCompleted` → closes the saga, no output.
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
    fn process(&mut self, ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        match event {
            Event::OrderCreated(e) => self.created(ctx, e, state, out),
            Event::StockReserved(e) => self.reserved(ctx, e, state, out),
            Event::StockReservationFailed(e) => self.failed(e, state, out),
            Event::StockReservationReleased(e) => self.released(e, state, out),
            Event::OrderCancelled(e) => self.cancelled(e, state, out),
            Event::OrderCompleted(e) => self.completed(e, state, out),
            _ => Ok(()),
        }
    }

    /// Timer [`answer_timer_key`] on an open, unanswered saga → `order.cancelled` `SAGA_TIMEOUT`
    /// and note `saga_timeout`/`stock_answer`; timer [`saga_timer_key`] on an open saga → the
    /// same with note `saga_timeout`/`saga_bound`. `occurredAt` is the timer's deadline
    /// `due_ms`, so the output depends on the stored state only. A timer for a closed or unknown
    /// saga, or a foreign key, does nothing.
    fn on_timer(&mut self, _ctx: &Context, key: &[u8], due_ms: i64, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let Ok(key) = std::str::from_utf8(key) else { return Ok(()) };
        if let Some(order_id) = key.strip_prefix(ANSWER_TIMER_PREFIX) {
            self.timed_out(order_id, TIMEOUT_STOCK_ANSWER, due_ms, state, out)
        } else if let Some(order_id) = key.strip_prefix(SAGA_TIMER_PREFIX) {
            self.timed_out(order_id, TIMEOUT_SAGA_BOUND, due_ms, state, out)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_api::fixtures::*;
    use orderflow_api::{Harness, Output};

    fn harness() -> Harness<Canceller> {
        Harness::new(Canceller::default(), PORTS)
    }

    fn failed(id: &str, order_id: &str) -> StockReservationFailed {
        stock_reservation_failed(id, order_id, 1_000, &[("P-001", 10, 5)])
    }

    fn released(id: &str, order_id: &str, reason: &str) -> StockReservationReleased {
        stock_reservation_released(id, order_id, "R-1", reason, 301_000, &[("P-001", 2)])
    }

    fn pos_cancel(id: &str, order_id: &str) -> OrderCancelled {
        OrderCancelled {
            reservation_id: Some("R-1".into()),
            customer_message: customer_message("PAYMENT_FAILED").into(),
            ..order_cancelled(id, order_id, "PAYMENT_FAILED", 2_000)
        }
    }

    fn late(h: &Harness<Canceller>) -> Vec<String> {
        h.notes.iter().filter(|n| n.measure == "late_event").map(|n| n.label.clone()).collect()
    }

    #[test]
    fn customer_messages() {
        assert_eq!(customer_message("INSUFFICIENT_STOCK"), "재고 부족으로 주문이 취소되었습니다. 다른 상품을 확인해보세요.");
        assert_eq!(customer_message("RESERVATION_EXPIRED"), "결제 시간이 초과되어 주문이 취소되었습니다.");
        assert_eq!(customer_message("PAYMENT_FAILED"), "결제에 실패하여 주문이 취소되었습니다.");
        assert_eq!(customer_message("SAGA_TIMEOUT"), "주문 처리 시간이 초과되어 주문이 취소되었습니다.");
        assert_eq!(customer_message("INVALID_ORDER"), "주문 정보가 올바르지 않아 주문이 취소되었습니다.");
        assert_eq!(customer_message("???"), "주문이 취소되었습니다.");
    }

    #[test]
    fn insufficient_stock_cancels_with_seed_000_message() {
        let mut h = harness();
        let outs = h.feed("stock.reservation.failed", failed("f1", "O-1"), 7).unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), ("cancelled", "O-1"));
        let Event::OrderCancelled(c) = &outs[0].event else { panic!() };
        assert_eq!(c.event_id, derive_event_id("O-1", "order.cancelled"));
        assert_eq!(c.reason, "INSUFFICIENT_STOCK");
        assert_eq!(c.customer_message, "재고 부족으로 주문이 취소되었습니다. 다른 상품을 확인해보세요.");
        assert_eq!(c.reservation_id, None);
        assert_eq!((c.hq_id.as_str(), c.store_id.as_str(), c.occurred_at), ("HQ-1", "S-1", 1_000));
        assert!(h.notes.iter().any(|n| n.measure == "compensation" && n.label == "INSUFFICIENT_STOCK"));
        let rec: CancelRecord = h.store.get_json(&cancel_key("O-1")).unwrap();
        assert!(rec.emitted);
    }

    #[test]
    fn expiry_release_cancels_with_reservation_expired() {
        let mut h = harness();
        let outs = h.feed("t", released("r1", "O-1", "EXPIRED"), 0).unwrap();
        let Event::OrderCancelled(c) = &outs[0].event else { panic!() };
        assert_eq!(c.reason, "RESERVATION_EXPIRED");
        assert_eq!(c.reservation_id.as_deref(), Some("R-1"));
        assert_eq!(c.customer_message, "결제 시간이 초과되어 주문이 취소되었습니다.");
        assert_eq!(c.event_id, cancellation_event_id("O-1"));
        assert_eq!(c.occurred_at, 301_000);
    }

    #[test]
    fn one_cancellation_per_order() {
        let mut h = harness();
        let first = h.feed("t", failed("f1", "O-1"), 0).unwrap();
        assert_eq!(first.len(), 1);
        // Duplicate eventId: no effect at all.
        assert!(h.feed("t", failed("f1", "O-1"), 0).unwrap().is_empty());
        assert!(late(&h).is_empty());
        // Another cause for the same order: late, no second cancellation.
        assert!(h.feed("t", failed("f2", "O-1"), 0).unwrap().is_empty());
        assert!(h.feed("t", released("r1", "O-1", "EXPIRED"), 0).unwrap().is_empty());
        assert_eq!(late(&h), vec!["already_cancelled", "already_cancelled"]);
        // Its own output wired back is silent.
        let Event::OrderCancelled(own) = first[0].event.clone() else { panic!() };
        assert!(h.feed("order.cancelled", own, 0).unwrap().is_empty());
        assert_eq!(late(&h).len(), 2);
    }

    #[test]
    fn cancellation_by_someone_else_suppresses_compensation() {
        let mut h = harness();
        assert!(h.feed("t", pos_cancel("p1", "O-1"), 0).unwrap().is_empty());
        let rec: CancelRecord = h.store.get_json(&cancel_key("O-1")).unwrap();
        assert_eq!(rec, CancelRecord { reason: "PAYMENT_FAILED".into(), emitted: false });
        assert!(h.feed("t", released("r1", "O-1", "EXPIRED"), 0).unwrap().is_empty());
        assert_eq!(late(&h), vec!["already_cancelled"]);
        // A second foreign cancellation is late.
        h.feed("t", pos_cancel("p2", "O-1"), 0).unwrap();
        assert_eq!(late(&h), vec!["already_cancelled", "cancelled_twice"]);
    }

    #[test]
    fn release_for_cancelled_marks_without_output() {
        let mut h = harness();
        assert!(h.feed("t", released("r1", "O-1", "CANCELLED"), 0).unwrap().is_empty());
        assert!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).is_some());
        assert!(h.feed("t", failed("f1", "O-1"), 0).unwrap().is_empty());
        assert!(matches!(h.feed("t", released("r2", "O-2", "WHATEVER"), 0), Err(ProcessError::Invalid(_))));
    }

    #[test]
    fn outputs_are_deterministic_in_the_input() {
        let run = |now| {
            let mut h = harness();
            let mut outs = h.feed("t", failed("f1", "O-1"), now).unwrap();
            outs.extend(h.feed("t", released("r1", "O-2", "EXPIRED"), now + 5).unwrap());
            outs
        };
        let a = run(1);
        assert_eq!(a.len(), 2);
        assert_eq!(a, run(123_456));
    }

    #[test]
    fn empty_order_id_is_invalid_and_other_events_ignored() {
        let mut h = harness();
        assert!(matches!(h.feed("t", failed("f1", ""), 0), Err(ProcessError::Invalid(_))));
        let ev = stock_reservation_expired("x", "O-1", "R", 0);
        assert!(h.feed("stock.reservation.failed", ev, 0).unwrap().is_empty());
        assert!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).is_none());
    }

    // ---------------------------------------------------------------- saga timeouts (seed 001)

    /// Processing time at which the canceller reads `order.created` in these tests, far from the
    /// events' `occurredAt` (1_000): the clocks run on processing time.
    const T0: i64 = 1_000_000;
    const ANSWER: i64 = DEFAULT_STOCK_ANSWER_TIMEOUT_MS;
    const BOUND: i64 = DEFAULT_SAGA_TIMEOUT_MS;

    fn created(id: &str, order_id: &str) -> OrderCreated {
        order_created(id, order_id, 1_000, &[("P-001", 2)])
    }

    fn reserved(id: &str, order_id: &str) -> StockReserved {
        stock_reserved(id, order_id, "R-1", 1_000, 301_000, &[("P-001", 2)])
    }

    fn completed(id: &str, order_id: &str) -> OrderCompleted {
        order_completed(id, order_id, "R-1", 5_000)
    }

    fn notes(h: &Harness<Canceller>, measure: &str) -> Vec<String> {
        h.notes.iter().filter(|n| n.measure == measure).map(|n| n.label.clone()).collect()
    }

    fn saga(h: &Harness<Canceller>, order_id: &str) -> Option<Saga> {
        h.store.get_json(&saga_key(order_id))
    }

    fn timers(h: &Harness<Canceller>) -> Vec<(String, i64)> {
        h.store.timers.iter().map(|(k, at)| (String::from_utf8_lossy(k).into_owned(), *at)).collect()
    }

    fn only_cancellation(outs: &[Output]) -> OrderCancelled {
        assert_eq!(outs.len(), 1, "{outs:?}");
        assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_CANCELLED, "O-1"));
        let Event::OrderCancelled(c) = &outs[0].event else { panic!("{outs:?}") };
        c.clone()
    }

    fn closed_cancelled() -> Option<Saga> {
        Some(Saga::Closed { outcome: Outcome::Cancelled })
    }

    #[test]
    fn defaults_are_the_seed_001_clocks_and_configuration_is_checked() {
        let c = Canceller::default();
        assert_eq!((c.stock_answer_timeout_ms(), c.saga_timeout_ms()), (180_000, 600_000));
        let c = Canceller::new(3_000, 8_000);
        assert_eq!((c.stock_answer_timeout_ms(), c.saga_timeout_ms()), (3_000, 8_000));
        assert!(std::panic::catch_unwind(|| Canceller::new(0, 1)).is_err());
        assert!(std::panic::catch_unwind(|| Canceller::new(1, -1)).is_err());
        assert_eq!(saga_key("O-1"), b"saga/O-1".to_vec());
        assert_eq!(answer_timer_key("O-1"), b"timeout/answer/O-1".to_vec());
        assert_eq!(saga_timer_key("O-1"), b"timeout/saga/O-1".to_vec());
    }

    #[test]
    fn order_created_starts_both_clocks_on_processing_time() {
        let mut h = harness();
        assert!(h.feed("order.created", created("c1", "O-1"), T0).unwrap().is_empty());
        // occurredAt is 1_000; the deadlines count from T0, when the canceller read the order.
        assert_eq!(timers(&h), vec![("timeout/answer/O-1".into(), T0 + ANSWER), ("timeout/saga/O-1".into(), T0 + BOUND)]);
        let Some(Saga::Open(open)) = saga(&h, "O-1") else { panic!("{:?}", saga(&h, "O-1")) };
        assert_eq!(
            open,
            OpenSaga { hq_id: HQ.into(), store_id: STORE.into(), created_seen_at: Some(T0), answered: false, reservation_id: None }
        );
        let json = String::from_utf8(h.store.data[&saga_key("O-1")].clone()).unwrap();
        assert_eq!(json, format!(r#"{{"state":"OPEN","hqId":"HQ-1","storeId":"S-1","createdSeenAt":{T0},"answered":false}}"#));
    }

    #[test]
    fn no_stock_answer_cancels_with_saga_timeout_exactly_at_the_answer_timeout() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        assert!(h.advance(T0 + ANSWER - 1).unwrap().is_empty(), "not a millisecond early");
        assert!(notes(&h, "saga_timeout").is_empty());
        let c = only_cancellation(&h.advance(T0 + ANSWER).unwrap());
        assert_eq!(c.event_id, cancellation_event_id("O-1"));
        assert_eq!((c.reason.as_str(), c.reservation_id.as_deref()), ("SAGA_TIMEOUT", None));
        assert_eq!(c.customer_message, "주문 처리 시간이 초과되어 주문이 취소되었습니다.");
        assert_eq!((c.hq_id.as_str(), c.store_id.as_str(), c.occurred_at), (HQ, STORE, T0 + ANSWER), "occurredAt = the deadline");
        assert_eq!(notes(&h, "saga_timeout"), vec!["stock_answer"]);
        assert_eq!(notes(&h, "compensation"), vec!["SAGA_TIMEOUT"]);
        // Closed: no timer left, the record shrunk to a tombstone, the bound never fires.
        assert!(timers(&h).is_empty(), "{:?}", timers(&h));
        assert_eq!(saga(&h, "O-1"), closed_cancelled());
        assert_eq!(String::from_utf8(h.store.data[&saga_key("O-1")].clone()).unwrap(), r#"{"state":"CLOSED","outcome":"ORDER_CANCELLED"}"#);
        assert!(h.advance(T0 + BOUND).unwrap().is_empty());
        assert_eq!(
            h.store.get_json::<CancelRecord>(&cancel_key("O-1")).unwrap(),
            CancelRecord { reason: "SAGA_TIMEOUT".into(), emitted: true }
        );
    }

    #[test]
    fn configured_clocks_are_used() {
        let mut h = Harness::new(Canceller::new(3_000, 8_000), PORTS);
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        assert!(h.advance(T0 + 2_999).unwrap().is_empty());
        assert_eq!(only_cancellation(&h.advance(T0 + 3_000).unwrap()).reason, "SAGA_TIMEOUT");
        let mut h = Harness::new(Canceller::new(3_000, 8_000), PORTS);
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
        assert!(h.advance(T0 + 7_999).unwrap().is_empty());
        assert_eq!(only_cancellation(&h.advance(T0 + 8_000).unwrap()).occurred_at, T0 + 8_000);
        assert_eq!(notes(&h, "saga_timeout"), vec!["saga_bound"]);
    }

    #[test]
    fn an_answer_in_time_cancels_the_answer_timer() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        assert!(h.feed("stock.reserved", reserved("r1", "O-1"), T0 + ANSWER - 1).unwrap().is_empty());
        assert_eq!(timers(&h), vec![("timeout/saga/O-1".into(), T0 + BOUND)], "only the bound is left");
        let Some(Saga::Open(open)) = saga(&h, "O-1") else { panic!() };
        assert!(open.answered);
        assert_eq!(open.reservation_id.as_deref(), Some("R-1"));
        assert!(h.advance(T0 + ANSWER).unwrap().is_empty());
        assert!(h.advance(T0 + BOUND - 1).unwrap().is_empty());
        assert!(notes(&h, "saga_timeout").is_empty());
        assert!(notes(&h, "late_event").is_empty());
    }

    #[test]
    fn a_stock_failure_in_time_cancels_for_stock_and_stops_both_clocks() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        let c = only_cancellation(&h.feed("stock.reservation.failed", failed("f1", "O-1"), T0 + 10).unwrap());
        assert_eq!(c.reason, "INSUFFICIENT_STOCK");
        assert!(timers(&h).is_empty());
        assert_eq!(saga(&h, "O-1"), closed_cancelled());
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
        assert!(notes(&h, "saga_timeout").is_empty());
    }

    #[test]
    fn the_bound_cancels_a_reserved_order_never_completed_or_expired() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 5).unwrap();
        assert!(h.advance(T0 + BOUND - 1).unwrap().is_empty());
        let c = only_cancellation(&h.advance(T0 + BOUND).unwrap());
        assert_eq!((c.reason.as_str(), c.reservation_id.as_deref(), c.occurred_at), ("SAGA_TIMEOUT", Some("R-1"), T0 + BOUND));
        assert_eq!(notes(&h, "saga_timeout"), vec!["saga_bound"]);
        assert!(timers(&h).is_empty());
        assert_eq!(saga(&h, "O-1"), closed_cancelled());
        // The stock reserver releases on it and says so: the expected echo, silent.
        assert!(h.feed("order.cancelled", c, T0 + BOUND + 1).unwrap().is_empty());
        assert!(h.feed("stock.reservation.released", released("x1", "O-1", "CANCELLED"), T0 + BOUND + 2).unwrap().is_empty());
        assert!(notes(&h, "late_event").is_empty());
    }

    #[test]
    fn the_bound_also_cancels_an_order_that_never_got_an_answer_when_it_is_shorter() {
        // Answer timeout longer than the bound: the bound fires first, the answer timer is dropped.
        let mut h = Harness::new(Canceller::new(9_000, 8_000), PORTS);
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        only_cancellation(&h.advance(T0 + 8_000).unwrap());
        assert_eq!(notes(&h, "saga_timeout"), vec!["saga_bound"]);
        assert!(timers(&h).is_empty());
        assert!(h.advance(T0 + 9_000).unwrap().is_empty());
    }

    #[test]
    fn both_deadlines_passed_at_once_cancel_once() {
        // The runtime was stopped past both deadlines: they fire in one pass, earliest first.
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        let c = only_cancellation(&h.advance(T0 + 5 * BOUND).unwrap());
        assert_eq!((c.reason.as_str(), c.occurred_at), ("SAGA_TIMEOUT", T0 + ANSWER));
        assert_eq!(notes(&h, "saga_timeout"), vec!["stock_answer"]);
        assert!(timers(&h).is_empty());
    }

    #[test]
    fn completion_closes_the_saga_and_no_timer_fires() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
        assert!(h.feed("order.completed", completed("d1", "O-1"), T0 + 2).unwrap().is_empty());
        assert!(timers(&h).is_empty());
        assert_eq!(saga(&h, "O-1"), Some(Saga::Closed { outcome: Outcome::Completed }));
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
        assert!(notes(&h, "saga_timeout").is_empty());
        assert!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).is_none());
    }

    #[test]
    fn any_cancellation_closes_the_saga_and_no_timer_fires() {
        // POS payment failure, before the stock answer.
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        assert!(h.feed("order.cancelled", pos_cancel("p1", "O-1"), T0 + 1).unwrap().is_empty());
        assert!(timers(&h).is_empty());
        assert_eq!(saga(&h, "O-1"), closed_cancelled());
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
        // Expiry after the answer.
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
        let c = only_cancellation(&h.feed("stock.reservation.released", released("x1", "O-1", "EXPIRED"), T0 + 2).unwrap());
        assert_eq!(c.reason, "RESERVATION_EXPIRED");
        assert!(timers(&h).is_empty());
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
        assert!(notes(&h, "saga_timeout").is_empty());
        // The reserver's release for a cancellation it saw before the canceller did.
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("stock.reservation.released", released("x1", "O-1", "CANCELLED"), T0 + 1).unwrap();
        assert!(timers(&h).is_empty());
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    }

    #[test]
    fn a_stock_answer_before_order_created_leaves_no_answer_timer() {
        let mut h = harness();
        assert!(h.feed("stock.reserved", reserved("r1", "O-1"), T0).unwrap().is_empty());
        assert_eq!(timers(&h), vec![("timeout/saga/O-1".into(), T0 + BOUND)], "bounded from the first sight of the saga");
        assert!(h.feed("order.created", created("c1", "O-1"), T0 + 100).unwrap().is_empty());
        assert_eq!(timers(&h), vec![("timeout/saga/O-1".into(), T0 + BOUND)], "no answer timer, bound unchanged");
        let Some(Saga::Open(open)) = saga(&h, "O-1") else { panic!() };
        assert_eq!((open.created_seen_at, open.answered), (Some(T0 + 100), true));
        assert!(h.advance(T0 + 100 + ANSWER).unwrap().is_empty());
        // Completed in time: nothing left.
        h.feed("order.completed", completed("d1", "O-1"), T0 + 200).unwrap();
        assert!(timers(&h).is_empty());
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
        assert!(notes(&h, "late_event").is_empty());
    }

    #[test]
    fn a_stock_answer_before_order_created_is_still_bounded() {
        let mut h = harness();
        h.feed("stock.reserved", reserved("r1", "O-1"), T0).unwrap();
        h.feed("order.created", created("c1", "O-1"), T0 + 100).unwrap();
        assert!(h.advance(T0 + BOUND - 1).unwrap().is_empty());
        let c = only_cancellation(&h.advance(T0 + BOUND).unwrap());
        assert_eq!((c.reason.as_str(), c.reservation_id.as_deref()), ("SAGA_TIMEOUT", Some("R-1")));
        assert_eq!(notes(&h, "saga_timeout"), vec!["saga_bound"]);
    }

    #[test]
    fn a_stock_failure_before_order_created_leaves_no_timer() {
        let mut h = harness();
        only_cancellation(&h.feed("stock.reservation.failed", failed("f1", "O-1"), T0).unwrap());
        assert!(h.feed("order.created", created("c1", "O-1"), T0 + 100).unwrap().is_empty());
        assert!(timers(&h).is_empty(), "{:?}", timers(&h));
        assert_eq!(notes(&h, "late_event"), vec!["created_after_close"]);
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    }

    #[test]
    fn late_events_after_a_saga_timeout_are_noted_and_ignored() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        let c = only_cancellation(&h.advance(T0 + ANSWER).unwrap());
        let store = h.store.clone();
        // The reserver answers late: the reservation is not adopted, the saga stays closed.
        assert!(h.feed("stock.reserved", reserved("r1", "O-1"), T0 + ANSWER + 1).unwrap().is_empty());
        assert!(h.feed("order.completed", completed("d1", "O-1"), T0 + ANSWER + 2).unwrap().is_empty());
        assert!(h.feed("order.created", created("c2", "O-1"), T0 + ANSWER + 3).unwrap().is_empty());
        // The expected echoes are silent: the canceller's own cancellation and the release of
        // the late reservation.
        assert!(h.feed("order.cancelled", c, T0 + ANSWER + 4).unwrap().is_empty());
        assert!(h.feed("stock.reservation.released", released("x1", "O-1", "CANCELLED"), T0 + ANSWER + 5).unwrap().is_empty());
        assert_eq!(notes(&h, "late_event"), vec!["stock_reserved_after_close", "completed_after_cancel", "created_after_close"]);
        assert!(timers(&h).is_empty());
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
        // Nothing was applied: the state is the tombstone and the cancel record, as before (bar
        // the remembered eventIds).
        let business = |s: &orderflow_api::MemoryStore| {
            s.data.iter().filter(|(k, _)| !k.starts_with(b"\x00")).map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()
        };
        assert_eq!(business(&h.store), business(&store));
    }

    #[test]
    fn late_events_after_completion_are_noted_and_ignored() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
        h.feed("order.completed", completed("d1", "O-1"), T0 + 2).unwrap();
        assert!(h.feed("stock.reservation.failed", failed("f1", "O-1"), T0 + 3).unwrap().is_empty());
        assert!(h.feed("stock.reservation.released", released("x1", "O-1", "EXPIRED"), T0 + 4).unwrap().is_empty());
        assert!(h.feed("order.cancelled", pos_cancel("p1", "O-1"), T0 + 5).unwrap().is_empty());
        assert!(h.feed("stock.reserved", reserved("r2", "O-1"), T0 + 6).unwrap().is_empty());
        assert!(h.feed("order.completed", completed("d2", "O-1"), T0 + 7).unwrap().is_empty());
        assert_eq!(
            notes(&h, "late_event"),
            vec![
                "cancel_after_completion",
                "cancel_after_completion",
                "cancelled_after_completion",
                "stock_reserved_after_close",
                "completed_twice"
            ]
        );
        assert_eq!(saga(&h, "O-1"), Some(Saga::Closed { outcome: Outcome::Completed }));
        assert!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).is_none());
        assert!(notes(&h, "compensation").is_empty());
    }

    #[test]
    fn a_saga_timeout_is_emitted_once_even_when_a_stock_failure_arrives_after() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        assert_eq!(only_cancellation(&h.advance(T0 + ANSWER).unwrap()).reason, "SAGA_TIMEOUT");
        assert!(h.feed("stock.reservation.failed", failed("f1", "O-1"), T0 + ANSWER + 1).unwrap().is_empty());
        assert!(h.feed("stock.reservation.released", released("x1", "O-1", "EXPIRED"), T0 + ANSWER + 2).unwrap().is_empty());
        assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
        assert_eq!(notes(&h, "compensation"), vec!["SAGA_TIMEOUT"]);
        assert_eq!(notes(&h, "late_event"), vec!["already_cancelled", "already_cancelled"]);
        assert_eq!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).unwrap().reason, "SAGA_TIMEOUT");
    }

    #[test]
    fn a_second_order_created_for_an_open_saga_changes_no_clock() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("order.created", created("c1-resent", "O-1"), T0 + 50_000).unwrap();
        assert_eq!(notes(&h, "late_event"), vec!["duplicate_order"]);
        assert_eq!(timers(&h), vec![("timeout/answer/O-1".into(), T0 + ANSWER), ("timeout/saga/O-1".into(), T0 + BOUND)]);
        // The same eventId again is dropped before the worker.
        h.feed("order.created", created("c1", "O-1"), T0 + 60_000).unwrap();
        assert_eq!(notes(&h, "late_event").len(), 1);
    }

    #[test]
    fn timers_survive_a_restart_and_are_per_order() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("order.created", created("c2", "O-2"), T0 + 10).unwrap();
        h.feed("stock.reserved", reserved("r2", "O-2"), T0 + 20).unwrap();
        // A new process over the same durable state.
        let mut restarted = harness();
        restarted.store = h.store.clone();
        let c = only_cancellation(&restarted.advance(T0 + ANSWER + 10).unwrap());
        assert_eq!(c.order_id, "O-1");
        assert_eq!(timers(&restarted), vec![("timeout/saga/O-2".into(), T0 + 10 + BOUND)]);
    }

    #[test]
    fn a_timer_for_a_closed_or_unknown_saga_or_a_foreign_key_does_nothing() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("order.completed", completed("d1", "O-1"), T0 + 1).unwrap();
        // Re-arm the timers behind the canceller's back: they find the saga closed.
        h.store.timers.insert(answer_timer_key("O-1"), T0 + 5);
        h.store.timers.insert(saga_timer_key("O-1"), T0 + 6);
        h.store.timers.insert(answer_timer_key("O-404"), T0 + 7);
        h.store.timers.insert(b"something/else".to_vec(), T0 + 8);
        h.store.timers.insert(vec![0xff, 0xfe], T0 + 9);
        assert!(h.advance(T0 + 10).unwrap().is_empty());
        assert!(h.store.timers.is_empty());
        assert!(notes(&h, "saga_timeout").is_empty());
    }

    #[test]
    fn order_created_without_ids_is_invalid() {
        let mut h = harness();
        for ev in [
            OrderCreated { order_id: String::new(), ..created("c1", "O-1") },
            OrderCreated { hq_id: String::new(), ..created("c2", "O-1") },
            OrderCreated { store_id: String::new(), ..created("c3", "O-1") },
        ] {
            assert!(matches!(h.feed("order.created", ev, T0), Err(ProcessError::Invalid(_))));
        }
        assert!(timers(&h).is_empty());
        // Invalid content is the reserver's to answer: the canceller opens the saga as usual.
        h.feed("order.created", OrderCreated { items: vec![], ..created("c4", "O-1") }, T0).unwrap();
        assert_eq!(timers(&h).len(), 2);
    }

    #[test]
    fn timeout_outputs_depend_on_the_state_only() {
        let run = || {
            let mut h = harness();
            h.feed("order.created", created("c1", "O-1"), T0).unwrap();
            h.feed("order.created", created("c2", "O-2"), T0).unwrap();
            h.feed("stock.reserved", reserved("r2", "O-2"), T0 + 1).unwrap();
            let mut outs = h.advance(T0 + ANSWER + 123).unwrap();
            outs.extend(h.advance(T0 + BOUND + 456).unwrap());
            outs
        };
        let a = run();
        assert_eq!(a.len(), 2);
        assert_eq!(a, run());
    }

    // ---------------------------------------------------------------- failure reasons (issue 4)

    #[test]
    fn failure_reasons_map_to_cancellation_reasons() {
        assert_eq!(cancel_reason_for_failure("INSUFFICIENT_STOCK"), Some("INSUFFICIENT_STOCK"));
        for r in ["INVALID_QUANTITY", "EMPTY_ORDER", "DUPLICATE_PRODUCT", "UNKNOWN_STORE", "INVALID_PRODUCT"] {
            assert_eq!(cancel_reason_for_failure(r), Some("INVALID_ORDER"), "{r}");
        }
        assert_eq!(failure_reason::INVALID_CONTENT.len(), 5);
        assert_eq!(cancel_reason_for_failure("SOMETHING_NEW"), None);
    }

    #[test]
    fn invalid_content_failures_cancel_with_invalid_order() {
        for (i, r) in failure_reason::INVALID_CONTENT.iter().enumerate() {
            let mut h = harness();
            h.feed("order.created", created("c1", "O-1"), T0).unwrap();
            let ev = StockReservationFailed { reason: r.to_string(), ..failed(&format!("f{i}"), "O-1") };
            let c = only_cancellation(&h.feed("stock.reservation.failed", ev, T0 + 1).unwrap());
            assert_eq!(c.reason, "INVALID_ORDER", "{r}");
            assert_eq!(c.customer_message, "주문 정보가 올바르지 않아 주문이 취소되었습니다.");
            assert_eq!((c.event_id, c.reservation_id), (cancellation_event_id("O-1"), None));
            assert_eq!(notes(&h, "compensation"), vec!["INVALID_ORDER"]);
            assert!(timers(&h).is_empty(), "a failure is an answer and ends the saga");
        }
    }

    #[test]
    fn an_unknown_failure_reason_still_cancels_and_is_reported() {
        let mut h = harness();
        let ev = StockReservationFailed { reason: "SOMETHING_NEW".into(), ..failed("f1", "O-1") };
        let c = only_cancellation(&h.feed("stock.reservation.failed", ev, T0).unwrap());
        assert_eq!(c.reason, "INSUFFICIENT_STOCK");
        assert_eq!(notes(&h, "unknown_failure_reason"), vec!["OTHER"]);
    }
}
