use clap::Parser;
use orderflow_api::events::*;
use orderflow_runtime::codec::Codec;
use serde_json::{json, Value};

use crate::text::hex;

use super::*;

fn w(s: &str) -> Where {
    s.parse().unwrap()
}

#[test]
fn where_compares_scalars_along_dotted_paths() {
    let v = json!({
        "orderId": "O-1", "reason": "INSUFFICIENT_STOCK", "expiresAt": 1700000000000i64, "paid": true, "reservationId": null,
        "storeStock": {"previous": 10, "current": 7},
        "items": [{"productId": "P-1", "quantity": 3}, {"productId": "P-2", "quantity": 1}],
    });
    assert!(w("orderId=O-1").matches(&v));
    assert!(!w("orderId=O-2").matches(&v));
    assert!(w("expiresAt=1700000000000").matches(&v));
    assert!(w("paid=true").matches(&v));
    assert!(w("reservationId=null").matches(&v));
    assert!(w("storeStock.current=7").matches(&v));
    assert!(!w("storeStock=7").matches(&v), "objects never match");
    assert!(!w("items=P-1").matches(&v), "arrays never match");
    assert!(w("items.productId=P-2").matches(&v), "any element");
    assert!(w("items.1.quantity=1").matches(&v));
    assert!(!w("items.0.productId=P-2").matches(&v));
    assert!(!w("items.5.productId=P-1").matches(&v));
    assert!(!w("nope=O-1").matches(&v));
    assert!(!w("orderId.deeper=O-1").matches(&v));
    assert_eq!(w("customerMessage=a=b"), Where { path: vec!["customerMessage".into()], value: "a=b".into() });
    assert!(w("orderId=").matches(&json!({"orderId": ""})));
    assert!("orderId".parse::<Where>().unwrap_err().contains("FIELD=VALUE"));
    assert!("a..b=1".parse::<Where>().unwrap_err().contains("empty field name"));
}

#[derive(Parser, Debug)]
struct TestCli {
    #[command(flatten)]
    tap: TapArgs,
}

fn tap_args(args: &[&str]) -> TapArgs {
    TestCli::try_parse_from([&["t", "order.created"], args].concat()).unwrap().tap
}

#[test]
fn tap_flags_start_and_filter() {
    assert_eq!(tap_start(&tap_args(&[]), (5, 12)), 5);
    assert_eq!(tap_start(&tap_args(&["--from-beginning"]), (5, 12)), 5);
    assert_eq!(tap_start(&tap_args(&["--from-offset", "7"]), (5, 12)), 7);
    assert_eq!(tap_start(&tap_args(&["--from-offset", "1"]), (5, 12)), 5);
    assert_eq!(tap_start(&tap_args(&["--from-offset", "99"]), (5, 12)), 12);
    assert_eq!(tap_start(&tap_args(&["--last", "3"]), (5, 12)), 9);
    assert_eq!(tap_start(&tap_args(&["--last", "30"]), (5, 12)), 5);
    let parse = |args: &[&str]| TestCli::try_parse_from([&["t", "x"], args].concat());
    assert!(parse(&["--last", "1", "--from-beginning"]).is_err());
    assert!(parse(&["--follow", "--until-end"]).is_err());
    assert!(parse(&["--where", "nope"]).is_err());
    let a =
        tap_args(&["--key", "O-1", "--where", "items.productId=P-1", "--where", "customerId=C-1", "--partition", "2", "--partition", "3"]);
    assert_eq!((a.partitions.as_slice(), a.conditions.len()), (&[2, 3][..], 2));
    let created = |order: &str, customer: &str| -> Event {
        OrderCreated {
            event_id: "e".into(),
            occurred_at: 1,
            order_id: order.into(),
            customer_id: customer.into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            items: vec![OrderItem { product_id: "P-1".into(), quantity: 1, unit_price: 1 }],
        }
        .into()
    };
    let raw = |key: &str| Raw {
        at: Coordinates { topic: "order.created".into(), partition: 2, offset: 0 },
        timestamp_ms: Some(0),
        key: Some(key.as_bytes().to_vec()),
        headers: vec![],
        value: None,
    };
    assert!(tap_keeps(&a, &raw("O-1"), &Ok(created("O-1", "C-1"))));
    assert!(!tap_keeps(&a, &raw("O-2"), &Ok(created("O-1", "C-1"))), "--key");
    assert!(!tap_keeps(&a, &raw("O-1"), &Ok(created("O-1", "C-2"))), "every --where must match");
    assert!(!tap_keeps(&a, &raw("O-1"), &Err(None)), "undecodable records never match --where");
    assert!(tap_keeps(&tap_args(&["--key", "O-1"]), &raw("O-1"), &Err(None)));
}

fn codec() -> Codec {
    Codec::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../avro"), None).unwrap()
}

#[tokio::test]
async fn tap_lines_carry_coordinates_headers_and_the_value_or_the_error() {
    let codec = codec();
    let event: Event = OrderCancelled {
        event_id: "e-1".into(),
        occurred_at: 1_700_000_000_000,
        order_id: "O-1".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        reason: "INSUFFICIENT_STOCK".into(),
        reservation_id: None,
        customer_message: "sorry".into(),
        refund_required: false,
        customer_id: None,
    }
    .into();
    let mut r = Raw {
        at: Coordinates { topic: "order.cancelled".into(), partition: 4, offset: 17 },
        timestamp_ms: Some(1_700_000_000_123),
        key: Some(b"O-1".to_vec()),
        headers: vec![("traceparent".into(), Some(b"00-abc".to_vec())), ("bin".into(), Some(vec![0xff])), ("nil".into(), None)],
        value: Some(codec.encode_local(&event).unwrap()),
    };
    let line = tap_json(&r, &decode(&codec, &r).await, &codec);
    assert_eq!(
        line,
        json!({"topic": "order.cancelled", "partition": 4, "offset": 17, "timestamp": 1_700_000_000_123i64,
               "time": "2023-11-14T22:13:20.123Z", "key": "O-1",
               "headers": {"traceparent": "00-abc", "bin": "0xff", "nil": null},
               "event": "OrderCancelled", "value": event.to_json()})
    );
    r.value = Some(b"not avro at all".to_vec());
    let line = tap_json(&r, &decode(&codec, &r).await, &codec);
    assert_eq!(line["error"]["class"], "not_avro", "{line}");
    assert_eq!(line["value_hex"], hex(b"not avro at all"));
    assert_eq!(line["event"], Value::Null);
    assert!(line.get("value").is_none());
    let mut cut_short = codec.encode_local(&event).unwrap();
    cut_short.truncate(cut_short.len() - 3);
    r.value = Some(cut_short);
    let line = tap_json(&r, &decode(&codec, &r).await, &codec);
    assert_eq!((line["error"]["class"].as_str(), line["event"].as_str()), (Some("truncated"), Some("OrderCancelled")), "{line}");
    r.value = Some(vec![0x5a; 1000]);
    assert_eq!(tap_json(&r, &decode(&codec, &r).await, &codec)["value_hex"].as_str().unwrap().len(), 2 * HEX_BYTES);
    r.value = None;
    let line = tap_json(&r, &decode(&codec, &r).await, &codec);
    assert_eq!((line["error"]["class"].as_str(), line["value_bytes"].clone()), (Some("truncated"), Value::Null));
}

fn cancelled(reason: &str) -> Event {
    OrderCancelled {
        event_id: format!("cancel-{reason}"),
        occurred_at: 0,
        order_id: "O".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        reason: reason.into(),
        reservation_id: None,
        customer_message: String::new(),
        refund_required: false,
        customer_id: None,
    }
    .into()
}

fn confirmed() -> Event {
    OrderConfirmed {
        event_id: "confirm".into(),
        occurred_at: 0,
        order_id: "O".into(),
        reservation_id: "R".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        status: "PAYMENT_WAIT".into(),
        expires_at: 0,
    }
    .into()
}

fn completed() -> Event {
    OrderCompleted {
        event_id: "complete".into(),
        occurred_at: 0,
        order_id: "O".into(),
        reservation_id: "R".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        items: vec![SoldItem { product_id: "P".into(), quantity: 1, actual_price: 5 }],
        total_amount: 5,
    }
    .into()
}

fn created() -> Event {
    OrderCreated {
        event_id: "create".into(),
        occurred_at: 0,
        order_id: "O".into(),
        customer_id: "C".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        items: vec![OrderItem { product_id: "P".into(), quantity: 1, unit_price: 5 }],
    }
    .into()
}

fn reserved() -> Event {
    StockReserved {
        event_id: "reserve".into(),
        occurred_at: 0,
        order_id: "O".into(),
        reservation_id: "R".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        expires_at: 0,
        items: vec![ReservedItem { product_id: "P".into(), reserved: 1 }],
    }
    .into()
}

fn expired() -> Event {
    StockReservationExpired {
        event_id: "expire".into(),
        occurred_at: 0,
        order_id: "O".into(),
        reservation_id: "R".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        expires_at: 0,
    }
    .into()
}

fn released() -> Event {
    StockReservationReleased {
        event_id: "release".into(),
        occurred_at: 0,
        order_id: "O".into(),
        reservation_id: "R".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        reason: "EXPIRED".into(),
        items: vec![ReleasedItem { product_id: "P".into(), released: 1 }],
    }
    .into()
}

fn sale() -> Event {
    StockUpdated {
        event_id: "sale".into(),
        occurred_at: 0,
        hq_id: "H".into(),
        store_id: "S".into(),
        product_id: "P".into(),
        hq_stock: None,
        store_stock: StockLevel { previous: 10, current: 9 },
        change_amount: -1,
        change_reason: "SALE".into(),
        reference_id: "O".into(),
    }
    .into()
}

/// The states after each event of `events`, applied in order.
fn states(events: &[Event]) -> Vec<String> {
    let mut s = OrderState::None;
    events
        .iter()
        .map(|e| {
            s = s.after(e).0;
            s.to_string()
        })
        .collect()
}

#[test]
fn state_after_follows_the_saga() {
    assert_eq!(
        states(&[created(), reserved(), confirmed(), completed(), sale()]),
        ["ORDER_CREATED", "ORDER_CREATED", "ORDER_CONFIRMED/PAYMENT_WAIT", "ORDER_COMPLETED", "ORDER_COMPLETED"]
    );
    let failed: Event = StockReservationFailed {
        event_id: "fail".into(),
        occurred_at: 0,
        order_id: "O".into(),
        hq_id: "H".into(),
        store_id: "S".into(),
        reason: "INSUFFICIENT_STOCK".into(),
        items: vec![FailedItem { product_id: "P".into(), requested: 3, available: 1 }],
    }
    .into();
    assert_eq!(
        states(&[created(), failed, cancelled("INSUFFICIENT_STOCK")]),
        ["ORDER_CREATED", "ORDER_CREATED", "ORDER_CANCELLED(INSUFFICIENT_STOCK)"]
    );
    assert_eq!(
        states(&[created(), reserved(), confirmed(), expired(), released(), cancelled("RESERVATION_EXPIRED")]),
        [
            "ORDER_CREATED",
            "ORDER_CREATED",
            "ORDER_CONFIRMED/PAYMENT_WAIT",
            "ORDER_CONFIRMED/PAYMENT_WAIT",
            "ORDER_CONFIRMED/PAYMENT_WAIT",
            "ORDER_CANCELLED(RESERVATION_EXPIRED)"
        ]
    );
    // Without order.created (retention, or a trace started late), the first event opens it.
    assert_eq!(states(&[reserved()]), ["ORDER_CREATED"]);
    assert_eq!(states(&[cancelled("PAYMENT_FAILED")]), ["ORDER_CANCELLED(PAYMENT_FAILED)"]);
}

#[test]
fn late_events_do_not_reopen_a_closed_order() {
    let done = OrderState::Completed;
    let (s, note) = done.after(&cancelled("RESERVATION_EXPIRED"));
    assert_eq!(s, OrderState::Completed);
    assert!(note.unwrap().contains("late: the order is already ORDER_COMPLETED"));
    let gone = OrderState::Cancelled("SAGA_TIMEOUT".into());
    for e in [confirmed(), completed()] {
        let (s, note) = gone.after(&e);
        assert_eq!(s, gone);
        assert!(note.unwrap().starts_with("late"), "{e:?}");
    }
    assert_eq!(gone.after(&cancelled("PAYMENT_FAILED")), (gone.clone(), Some("cancelled again".into())));
    assert_eq!(gone.after(&released()), (gone.clone(), None));
    assert!(gone.is_terminal() && done.is_terminal() && !OrderState::Confirmed("PAYMENT_WAIT".into()).is_terminal());
}

/// Issue 13: the stock reserver's verdict has the last word on a paid order.
#[test]
fn the_verdict_completes_a_late_sale_and_a_refund_cancels_a_paid_order() {
    let settled = |outcome: &str, late: bool| -> Event {
        OrderSettled { late, ..orderflow_api::fixtures::order_settled("s", "O", outcome, 0) }.into()
    };
    let gone = OrderState::Cancelled("RESERVATION_EXPIRED".into());
    let (s, note) = gone.after(&settled(settlement::SOLD, true));
    assert_eq!(s, OrderState::Completed);
    assert!(note.unwrap().starts_with("late sale"));
    let refund: Event = OrderCancelled {
        refund_required: true,
        ..orderflow_api::fixtures::order_cancelled("r", "O", cancel_reason::PAYMENT_AFTER_EXPIRY, 0)
    }
    .into();
    let (s, note) = OrderState::Completed.after(&refund);
    assert_eq!(s, OrderState::Cancelled(cancel_reason::PAYMENT_AFTER_EXPIRY.into()));
    assert!(note.unwrap().starts_with("refund required"));
    assert_eq!(OrderState::Confirmed("PAYMENT_WAIT".into()).after(&settled(settlement::SOLD, false)), (OrderState::Completed, None));
}

fn raw(topic: &str, partition: i32, offset: i64, ts: i64) -> Raw {
    Raw { at: Coordinates { topic: topic.into(), partition, offset }, timestamp_ms: Some(ts), key: None, headers: vec![], value: None }
}

#[test]
fn timeline_sorts_by_time_then_cause_and_marks_repartitioned_copies() {
    let (steps, state) = timeline(vec![
        (raw("stock.updated", 2, 9, 150), sale()),
        (raw("order.completed", 1, 0, 140), completed()),
        (raw("stock.commands", 5, 3, 101), created()),
        (raw("order.confirmed", 1, 0, 120), confirmed()),
        // Same millisecond: the cause first.
        (raw("stock.reserved", 1, 0, 100), reserved()),
        (raw("order.created", 1, 0, 100), created()),
        (raw("stock.commands", 5, 4, 141), completed()),
    ]);
    let got: Vec<(&str, &str, Option<&str>)> =
        steps.iter().map(|s| (s.topic.as_str(), s.state_after.as_str(), s.copy_of.as_deref())).collect();
    assert_eq!(
        got,
        vec![
            ("order.created", "ORDER_CREATED", None),
            ("stock.reserved", "ORDER_CREATED", None),
            ("stock.commands", "ORDER_CREATED", Some("order.created[1]@0")),
            ("order.confirmed", "ORDER_CONFIRMED/PAYMENT_WAIT", None),
            ("order.completed", "ORDER_COMPLETED", None),
            ("stock.commands", "ORDER_COMPLETED", Some("order.completed[1]@0")),
            ("stock.updated", "ORDER_COMPLETED", None),
        ]
    );
    assert_eq!(state, OrderState::Completed);
    assert_eq!(steps[0].time, "1970-01-01T00:00:00.100Z");
    assert!(steps[6].detail.contains("SALE P -1, store 10 → 9"), "{}", steps[6].detail);
    assert!(steps[1].detail.contains("reservation R"), "{}", steps[1].detail);
}

#[test]
fn unknown_topics_are_named() {
    let t = orderflow_runtime::topology::parse(
        "[broker]\nbootstrap = \"x:1\"\n[topics.a]\npartitions = 2\nkey = \"orderId\"\n[workers.w]\nkind = \"k\"\ninputs = [\"a\"]\n",
        std::path::Path::new("t.toml"),
    )
    .unwrap()
    .topology;
    let broker = BTreeMap::from([("b".to_string(), 3)]);
    assert_eq!(find_topic("b", &t, &broker).unwrap(), 3);
    assert!(find_topic("a", &t, &broker).unwrap_err().to_string().contains("does not exist on the broker yet"));
    assert!(find_topic("a.dlq", &t, &broker).unwrap_err().to_string().contains("declared in the topology"));
    assert_eq!(
        find_topic("zz", &t, &broker).unwrap_err().to_string(),
        "unknown topic zz: not on the broker and not a topic of the topology (a)"
    );
}
