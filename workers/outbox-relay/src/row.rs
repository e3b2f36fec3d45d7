//! An outbox row and the relay's rules for it, without a database or a broker: the event a row
//! publishes ([`OutboxRow::event`]), what a failed attempt does to it ([`Failure::apply`], seed
//! 003: exponential backoff, `QUARANTINED` after the 6th failure) and the statuses.

use std::time::Duration;

use orderflow_api::{derive_event_id, Event};
use serde::Serialize;

/// Status of an outbox row (seed 003): `PENDING` waits to be published, `COMPLETED` was
/// acknowledged by the broker, `QUARANTINED` failed `max_attempts` times and waits for an operator
/// (`orderflow outbox requeue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Completed,
    Quarantined,
}

impl Status {
    /// The value stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Completed => "COMPLETED",
            Status::Quarantined => "QUARANTINED",
        }
    }

    /// Parses a `status` column value (case-insensitive).
    ///
    /// Errors: the value, when it is none of the three.
    pub fn parse(s: &str) -> Result<Status, String> {
        match s.to_ascii_uppercase().as_str() {
            "PENDING" => Ok(Status::Pending),
            "COMPLETED" => Ok(Status::Completed),
            "QUARANTINED" => Ok(Status::Quarantined),
            _ => Err(format!("unknown outbox status {s:?} (PENDING, COMPLETED or QUARANTINED)")),
        }
    }
}

/// One row of the `outbox` table (migrations/*/0001_outbox.sql). Times are ms since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxRow {
    /// Assigned by the database; rows of one aggregate are published in `id` order.
    pub id: i64,
    /// The record key (the orderId of an order event) and the unit of ordering.
    pub aggregate_id: String,
    /// The topic the row is published to.
    pub topic: String,
    /// The Avro record name of the event (`OrderCreated`).
    pub event_type: String,
    /// The event's `eventId` when the writer chose it; else derived from the row id.
    pub event_id: Option<String>,
    /// The event as JSON with the Avro field names; `eventId` and `occurredAt` may be left out.
    pub payload: String,
    pub status: Status,
    /// Failed publish attempts so far.
    pub retry_count: i64,
    pub last_error: Option<String>,
    /// Not retried before this time (backoff after a failure).
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub published_at: Option<i64>,
    pub requeued_at: Option<i64>,
    pub requeued_by: Option<String>,
}

/// Why a row's event could not be built or produced: counted against the row (retried with
/// backoff, then quarantined), unlike a database or broker outage, which is waited out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Metric label and stored prefix: `invalid_payload`, `key_mismatch`, `encode`,
    /// `oversized`, `rejected` (the broker refused the record).
    pub class: &'static str,
    pub message: String,
}

/// The retry policy of a relay (seed 003: retried with exponential backoff, quarantined after 6
/// failed attempts).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Failed attempts after which a row is `QUARANTINED` (seed 003: 6).
    pub max_attempts: u32,
    /// Wait after the first failure.
    pub initial_backoff: Duration,
    /// Factor per further failure.
    pub multiplier: f64,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The wait after the `failures`-th failure (1-based): `initial × multiplier^(failures-1)`,
    /// at most `max_backoff`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = self.multiplier.powi(failures.saturating_sub(1).min(64) as i32);
        let ms = (self.initial_backoff.as_millis() as f64 * factor).min(self.max_backoff.as_millis() as f64);
        Duration::from_millis(ms.max(0.0) as u64)
    }
}

/// What a failed attempt leaves in the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterFailure {
    pub status: Status,
    pub retry_count: i64,
    /// `<class>: <message>`, at most [`MAX_ERROR_CHARS`] characters.
    pub last_error: String,
    pub next_attempt_at: i64,
}

/// Longest `last_error` stored (the column is VARCHAR(2000)).
pub const MAX_ERROR_CHARS: usize = 1000;

impl Failure {
    pub fn new(class: &'static str, message: impl Into<String>) -> Failure {
        Failure { class, message: message.into() }
    }

    /// The row's state after this failure at `now_ms`: one more attempt counted; `QUARANTINED`
    /// once `policy.max_attempts` attempts failed, else `PENDING` until the backoff has passed.
    pub fn apply(&self, row: &OutboxRow, policy: &RetryPolicy, now_ms: i64) -> AfterFailure {
        let retry_count = row.retry_count + 1;
        let quarantined = retry_count >= i64::from(policy.max_attempts);
        let wait = policy.backoff(retry_count.clamp(1, i64::from(u32::MAX)) as u32);
        let mut last_error = format!("{}: {}", self.class, self.message);
        if last_error.chars().count() > MAX_ERROR_CHARS {
            last_error = last_error.chars().take(MAX_ERROR_CHARS - 1).chain(['…']).collect();
        }
        AfterFailure {
            status: if quarantined { Status::Quarantined } else { Status::Pending },
            retry_count,
            last_error,
            next_attempt_at: if quarantined { 0 } else { now_ms.saturating_add(wait.as_millis() as i64) },
        }
    }
}

impl OutboxRow {
    /// The row's `eventId`: the `event_id` column, else the payload's `eventId`, else derived
    /// from the row id and topic (UUIDv5, stable across relay restarts and instances).
    pub fn event_id_or_derived(&self, payload: &serde_json::Map<String, serde_json::Value>) -> String {
        if let Some(id) = self.event_id.as_deref().filter(|s| !s.is_empty()) {
            return id.to_string();
        }
        if let Some(id) = payload.get("eventId").and_then(|v| v.as_str()).filter(|s| !s.is_empty()) {
            return id.to_string();
        }
        derive_event_id(&format!("outbox:{}", self.id), &self.topic)
    }

    /// The event this row publishes: the payload (a JSON object with the Avro field names) as
    /// `event_type`, with `eventId` ([`OutboxRow::event_id_or_derived`]) and, when absent,
    /// `occurredAt` = `created_at`. `key_field`, the topic's key field from the topology
    /// (`orderId`), must hold `aggregate_id` when the payload has it.
    ///
    /// Errors: [`Failure`] `invalid_payload` (not JSON, not an object, does not fit the record) or
    /// `key_mismatch`.
    pub fn event(&self, key_field: Option<&str>) -> Result<Event, Failure> {
        let value: serde_json::Value =
            serde_json::from_str(&self.payload).map_err(|e| Failure::new("invalid_payload", format!("payload is not JSON: {e}")))?;
        let serde_json::Value::Object(mut object) = value else {
            return Err(Failure::new("invalid_payload", "payload is not a JSON object"));
        };
        if let Some(field) = key_field {
            if let Some(v) = object.get(field) {
                if v.as_str() != Some(self.aggregate_id.as_str()) {
                    return Err(Failure::new(
                        "key_mismatch",
                        format!("payload {field} {v} is not the row's aggregate_id {:?}", self.aggregate_id),
                    ));
                }
            }
        }
        let event_id = self.event_id_or_derived(&object);
        object.insert("eventId".into(), event_id.into());
        object.entry("occurredAt").or_insert(self.created_at.into());
        Event::from_json(&self.event_type, serde_json::Value::Object(object))
            .map_err(|e| Failure::new("invalid_payload", format!("payload does not fit {}: {e}", self.event_type)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(payload: &str) -> OutboxRow {
        OutboxRow {
            id: 7,
            aggregate_id: "O-1".into(),
            topic: "order.created".into(),
            event_type: "OrderCreated".into(),
            event_id: None,
            payload: payload.into(),
            status: Status::Pending,
            retry_count: 0,
            last_error: None,
            next_attempt_at: 0,
            created_at: 1_000,
            published_at: None,
            requeued_at: None,
            requeued_by: None,
        }
    }

    const ORDER: &str =
        r#"{"orderId":"O-1","customerId":"C-1","hqId":"HQ","storeId":"S","items":[{"productId":"P","quantity":2,"unitPrice":100}]}"#;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 6, initial_backoff: Duration::from_secs(1), multiplier: 2.0, max_backoff: Duration::from_secs(10) }
    }

    #[test]
    fn event_takes_ids_and_times_in_order_of_precedence() {
        let r = row(ORDER);
        let e = r.event(Some("orderId")).unwrap();
        assert_eq!(e.event_id(), derive_event_id("outbox:7", "order.created"));
        assert_eq!(e.occurred_at(), 1_000);
        let with_payload_id = row(&ORDER.replace("{\"orderId\"", "{\"eventId\":\"E-P\",\"occurredAt\":5,\"orderId\""));
        let e = with_payload_id.event(Some("orderId")).unwrap();
        assert_eq!((e.event_id(), e.occurred_at()), ("E-P", 5));
        let with_column = OutboxRow { event_id: Some("E-C".into()), ..with_payload_id };
        assert_eq!(with_column.event(Some("orderId")).unwrap().event_id(), "E-C");
    }

    #[test]
    fn bad_payloads_are_row_failures() {
        assert_eq!(row("{not json").event(None).unwrap_err().class, "invalid_payload");
        assert_eq!(row("[1]").event(None).unwrap_err().class, "invalid_payload");
        assert_eq!(row(r#"{"orderId":"O-1"}"#).event(None).unwrap_err().class, "invalid_payload");
        assert_eq!(row(&ORDER.replace("O-1", "O-2")).event(Some("orderId")).unwrap_err().class, "key_mismatch");
        let unknown = OutboxRow { event_type: "NoSuchEvent".into(), ..row(ORDER) };
        assert_eq!(unknown.event(None).unwrap_err().class, "invalid_payload");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy();
        let waits: Vec<u64> = (1..=6).map(|n| p.backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
    }

    /// Seed 003 scenario 6.2: the 6th failed attempt quarantines the row; before it, the row
    /// stays pending until its backoff has passed.
    #[test]
    fn sixth_failure_quarantines() {
        let p = policy();
        let f = Failure::new("oversized", "too big");
        let mut r = row(ORDER);
        for n in 1..=5 {
            let after = f.apply(&r, &p, 100_000);
            assert_eq!((after.status, after.retry_count), (Status::Pending, n));
            assert_eq!(after.next_attempt_at, 100_000 + p.backoff(n as u32).as_millis() as i64);
            assert_eq!(after.last_error, "oversized: too big");
            r.retry_count = after.retry_count;
        }
        let after = f.apply(&r, &p, 100_000);
        assert_eq!((after.status, after.retry_count), (Status::Quarantined, 6));
    }

    #[test]
    fn long_errors_are_cut() {
        let after = Failure::new("rejected", "x".repeat(5000)).apply(&row(ORDER), &policy(), 0);
        assert_eq!(after.last_error.chars().count(), MAX_ERROR_CHARS);
    }

    #[test]
    fn statuses_round_trip() {
        for s in [Status::Pending, Status::Completed, Status::Quarantined] {
            assert_eq!(Status::parse(s.as_str()), Ok(s));
        }
        assert!(Status::parse("DONE").is_err());
    }
}
