//! Record headers of the workers' outputs (issue 14): what standard tools route, display and
//! trace by, without decoding Avro.
//!
//! Every output record (not changelog or dead-letter records, which have their own) carries:
//!
//! | header           | value                                                               |
//! |------------------|---------------------------------------------------------------------|
//! | `ce_specversion` | `1.0` (CloudEvents Kafka protocol binding, binary content mode)     |
//! | `ce_type`        | the record's Avro full name, e.g. `orderflow.events.StockReserved`  |
//! | `ce_id`          | the event's `eventId`                                               |
//! | `ce_source`      | `orderflow/<worker>`                                                |
//! | `content-type`   | `application/avro` (the value's framing is in its first bytes)      |
//! | `traceparent`    | W3C Trace Context, `00-<trace-id>-<span-id>-<flags>`                |
//! | `tracestate`     | copied from the input when it has one                               |
//!
//! **Trace context.** An output caused by an input record that carries a valid `traceparent`
//! continues that trace (same trace-id and flags, the input's span as parent). Otherwise (an
//! outside producer without tracing, a timer) the trace-id is derived from the event's
//! `orderId` (from its `eventId` when it has none), so every hop of one order lands in one trace
//! even where no context was handed in. Span ids are derived from the trace-id, the worker and the
//! output's `eventId`: a unit replayed after a crash writes the same headers.
//!
//! Off with `record_headers = false` (`[defaults]` or a `[profiles.<name>]`): tansu 0.6.0's
//! SQLite engine slows down with headers, so its profile turns them off.

use orderflow_api::Event;
use uuid::Uuid;

use crate::codec::EVENT_NAMESPACE;

/// The W3C Trace Context header (`00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`).
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context vendor header, passed through unchanged.
pub const TRACESTATE: &str = "tracestate";
/// The CloudEvents event type header (binary content mode of the Kafka protocol binding).
pub const CE_TYPE: &str = "ce_type";
/// Value of `content-type`.
pub const CONTENT_TYPE: &str = "application/avro";

/// UUIDv5 namespace of the derived trace and span ids (a fixed random UUID).
const TRACE_NAMESPACE: Uuid = Uuid::from_u128(0x6f7a_1c2e_4b8d_4e21_9a53_0d6c_b2f4_8e17);

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a version-00 `traceparent` value; `None` when it is not one (wrong length,
    /// version, non-hex, or an all-zero trace or parent id, which the W3C spec calls invalid).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let s = std::str::from_utf8(value).ok()?;
        let mut parts = s.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let span_id: [u8; 8] = hex(span)?.try_into().ok()?;
        let flags = *hex(flags)?.first().filter(|_| flags.len() == 2)?;
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceParent { trace_id, span_id, flags })
    }

    /// The header value, `00-<trace-id>-<span-id>-<flags>` in lowercase hex.
    pub fn render(&self) -> String {
        format!("00-{}-{}-{:02x}", to_hex(&self.trace_id), to_hex(&self.span_id), self.flags)
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The trace context of an output of `worker`: continues `parent` (the causing input's
/// `traceparent`, if valid) or starts the order's derived trace (module docs).
pub fn trace_of(event: &Event, worker: &str, parent: Option<&[u8]>) -> TraceParent {
    let (trace_id, flags) = match parent.and_then(TraceParent::parse) {
        Some(p) => (p.trace_id, p.flags),
        None => {
            let root = event.order_id().unwrap_or(event.event_id());
            (*Uuid::new_v5(&TRACE_NAMESPACE, root.as_bytes()).as_bytes(), 0x01)
        }
    };
    let mut seed = Vec::with_capacity(16 + worker.len() + event.event_id().len() + 1);
    seed.extend_from_slice(&trace_id);
    seed.extend_from_slice(worker.as_bytes());
    seed.push(0);
    seed.extend_from_slice(event.event_id().as_bytes());
    let span = Uuid::new_v5(&TRACE_NAMESPACE, &seed);
    let span_id: [u8; 8] = span.as_bytes()[..8].try_into().expect("8 bytes");
    // An all-zero span id is invalid; a v5 UUID's first 8 bytes are that with odds 2^-64.
    TraceParent { trace_id, span_id: if span_id == [0; 8] { [1; 8] } else { span_id }, flags }
}

/// The headers of an output `event` of `worker` (module docs), given the causing input record's
/// headers as `(name, value)` pairs (empty for a timer).
pub fn output_headers<'a>(
    event: &Event,
    worker: &str,
    input: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Vec<(String, Option<Vec<u8>>)> {
    let (mut parent, mut state) = (None, None);
    for (name, value) in input {
        match name {
            TRACEPARENT => parent = value,
            TRACESTATE => state = value,
            _ => {}
        }
    }
    let h = |n: &str, v: String| (n.to_string(), Some(v.into_bytes()));
    let mut out = vec![
        h("ce_specversion", "1.0".into()),
        h(CE_TYPE, format!("{EVENT_NAMESPACE}.{}", event.schema_name())),
        h("ce_id", event.event_id().to_string()),
        h("ce_source", format!("orderflow/{worker}")),
        h("content-type", CONTENT_TYPE.into()),
        h(TRACEPARENT, trace_of(event, worker, parent).render()),
    ];
    if let (Some(state), Some(_)) = (state, parent.and_then(TraceParent::parse)) {
        out.push((TRACESTATE.to_string(), Some(state.to_vec())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_api::fixtures;

    #[test]
    fn traceparent_parses_the_w3c_example_and_refuses_invalid_ones() {
        let p = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(p.render(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        for bad in [
            &b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_output_continues_its_inputs_trace_and_keeps_tracestate() {
        let event: Event = fixtures::stock_reserved("e-1", "o-1", "r-1", 1, 2, &[("p", 1)]).into();
        let parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let headers = output_headers(&event, "stock-reserver", [("traceparent", Some(&parent[..])), ("tracestate", Some(&b"k=v"[..]))]);
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).and_then(|(_, v)| v.clone()).map(|v| String::from_utf8(v).unwrap());
        let tp = TraceParent::parse(get("traceparent").unwrap().as_bytes()).unwrap();
        assert_eq!(to_hex(&tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(to_hex(&tp.span_id), "00f067aa0ba902b7", "a span of its own");
        assert_eq!(tp.flags, 0, "flags carried");
        assert_eq!(get("tracestate").as_deref(), Some("k=v"));
        assert_eq!(get("ce_type").as_deref(), Some("orderflow.events.StockReserved"));
        assert_eq!(get("ce_id").as_deref(), Some(event.event_id()));
        assert_eq!(get("ce_source").as_deref(), Some("orderflow/stock-reserver"));
        assert_eq!(get("ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(get("content-type").as_deref(), Some("application/avro"));
    }

    #[test]
    fn without_a_parent_one_order_has_one_derived_trace_and_headers_are_deterministic() {
        let reserved: Event = fixtures::stock_reserved("e-1", "o-1", "r-1", 1, 2, &[("p", 1)]).into();
        let settled: Event = fixtures::order_settled("e-2", "o-1", "SOLD", 3).into();
        let other: Event = fixtures::stock_reserved("e-3", "o-2", "r-2", 1, 2, &[("p", 1)]).into();
        let a = trace_of(&reserved, "stock-reserver", None);
        let b = trace_of(&settled, "order-confirmer", Some(b"not a traceparent"));
        assert_eq!(a.trace_id, b.trace_id, "same order, same trace");
        assert_ne!(a.span_id, b.span_id);
        assert_ne!(trace_of(&other, "stock-reserver", None).trace_id, a.trace_id);
        assert_eq!(a.flags, 1, "sampled");
        assert_eq!(output_headers(&reserved, "w", []), output_headers(&reserved, "w", []));
        assert!(
            output_headers(&reserved, "w", [("tracestate", Some(&b"k=v"[..]))]).iter().all(|(k, _)| k != "tracestate"),
            "no state without a parent"
        );
    }
}
