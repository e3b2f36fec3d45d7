//! The unit step on tokio's paused time: retries wait virtual time, so these run instantly and
//! assert the waits exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use orderflow_api::fixtures::order_created;
use orderflow_api::{Context, Event, MemoryStore, Outputs, ProcessError, Processor, StateTxn};

use super::*;

const T0: i64 = 1_767_225_600_000;

/// A processor scripted by `eventId`: `transient-N-…` fails transiently N times, `invalid-…` is
/// invalid, `corrupt-…` reports corrupt state; anything else emits one `out` record keyed by
/// orderId and schedules timer `t/<eventId>` 1 s later. A timer whose key holds `flaky` fails
/// once per firing attempt counter below 2; `fatal` fails with corrupt state.
#[derive(Default)]
struct Scripted {
    failures: BTreeMap<String, u32>,
    timer_failures: u32,
}

impl Processor for Scripted {
    fn process(&mut self, ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let id = event.event_id().to_string();
        if let Some(n) = id.strip_prefix("transient-").and_then(|r| r.split('-').next()).and_then(|n| n.parse::<u32>().ok()) {
            let seen = self.failures.entry(id.clone()).or_default();
            if *seen < n {
                *seen += 1;
                state.put(b"must-be-discarded".to_vec(), vec![1]);
                return Err(ProcessError::Transient(format!("attempt {seen}")));
            }
        }
        if id.starts_with("invalid-") {
            return Err(ProcessError::Invalid("bad".into()));
        }
        if id.starts_with("corrupt-") {
            return Err(ProcessError::CorruptState { key: "k".into(), message: "unreadable".into() });
        }
        let Event::OrderCreated(o) = event else { unreachable!() };
        out.emit("out", o.order_id.clone(), event.clone())?;
        state.schedule_timer(format!("t/{id}"), ctx.now_ms + 1_000);
        Ok(())
    }

    fn on_timer(&mut self, _ctx: &Context, key: &[u8], _due: i64, _state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let key = String::from_utf8_lossy(key).into_owned();
        if key.contains("fatal") {
            return Err(ProcessError::CorruptState { key, message: "timer".into() });
        }
        if key.contains("flaky") && self.timer_failures < 2 {
            self.timer_failures += 1;
            return Err(ProcessError::Transient("timer".into()));
        }
        out.emit("out", key.clone(), order_created(&format!("fired-{key}"), &key, T0, &[("P", 1)]))?;
        Ok(())
    }
}

fn created(id: &str) -> Result<Event, Rejection> {
    Ok(order_created(id, &format!("O-{id}"), T0, &[("P", 1)]).into())
}

fn input(offset: i64) -> Input<'static> {
    Input { topic: "in", partition: 0, offset }
}

fn policy(attempts: u32) -> RetryPolicy {
    RetryPolicy { attempts, initial_backoff: Duration::from_millis(100), multiplier: 2.0, max_backoff: Duration::from_secs(5) }
}

fn wired() -> Vec<String> {
    vec!["out".to_string()]
}

#[tokio::test(start_paused = true)]
async fn transient_failure_is_retried_with_backoff_then_processed() {
    let states = BTreeMap::from([(0, MemoryStore::default())]);
    let mut retry = RetryBudget::new(policy(3), Duration::from_secs(10));
    let started = tokio::time::Instant::now();
    let staged =
        step(&mut Scripted::default(), &wired(), &states, vec![(input(7), created("transient-2-a"))], At::now(T0), &mut retry, "w").await;
    // Two failures: waits of 100 ms and 200 ms of virtual time.
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(retry.processor_retries, 2);
    assert_eq!(staged.outcomes, vec![Outcome::Processed]);
    assert_eq!(staged.outputs.len(), 1);
    assert_eq!(staged.outputs[0].1, Cause::Input(0));
    let changes = &staged.changes[&0];
    assert!(!changes.writes.contains_key(b"must-be-discarded".as_slice()), "a failed attempt's writes are discarded");
    assert!(changes.writes.contains_key(&orderflow_api::seen_key("transient-2-a")));
    assert_eq!(staged.offsets[&0]["in"], 8);
}

#[tokio::test(start_paused = true)]
async fn retries_exhausted_or_budget_spent_dead_letter_as_transient() {
    let states = BTreeMap::from([(0, MemoryStore::default())]);
    let mut retry = RetryBudget::new(policy(1), Duration::from_secs(10));
    let staged =
        step(&mut Scripted::default(), &wired(), &states, vec![(input(0), created("transient-5-a"))], At::now(T0), &mut retry, "w").await;
    assert_eq!(staged.outcomes, vec![Outcome::DeadLettered]);
    assert_eq!(staged.dead_letters[0].1.class, DeadLetterClass::Transient);
    assert_eq!(staged.dead_letters[0].1.attempts, 2);
    // A budget smaller than the first backoff: dead-lettered at once, no wait.
    let mut retry = RetryBudget::new(policy(3), Duration::from_millis(50));
    let started = tokio::time::Instant::now();
    let staged =
        step(&mut Scripted::default(), &wired(), &states, vec![(input(0), created("transient-1-b"))], At::now(T0), &mut retry, "w").await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!((staged.dead_letters[0].1.class, staged.dead_letters[0].1.attempts), (DeadLetterClass::Transient, 1));
    assert!(staged.outputs.is_empty());
}

#[tokio::test(start_paused = true)]
async fn rejections_invalid_events_and_duplicates_are_sorted_per_record() {
    let mut store = MemoryStore::default();
    store.data.insert(orderflow_api::seen_key("dup"), vec![]);
    let states = BTreeMap::from([(0, store)]);
    let records = vec![
        (input(0), Err(Rejection::new(DeadLetterClass::NotAvro, "x"))),
        (input(1), created("invalid-a")),
        (input(2), created("dup")),
        (input(3), created("ok")),
    ];
    let staged = step(&mut Scripted::default(), &wired(), &states, records, At::now(T0), &mut RetryBudget::none(), "w").await;
    assert_eq!(staged.outcomes, vec![Outcome::DeadLettered, Outcome::DeadLettered, Outcome::Duplicate, Outcome::Processed]);
    let classes: Vec<(usize, DeadLetterClass)> = staged.dead_letters.iter().map(|(i, r)| (*i, r.class)).collect();
    assert_eq!(classes, vec![(0, DeadLetterClass::NotAvro), (1, DeadLetterClass::Invalid)]);
    assert_eq!(staged.outputs.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>(), vec![Cause::Input(3)]);
    assert_eq!(staged.offsets[&0]["in"], 4);
}

#[tokio::test(start_paused = true)]
async fn due_timers_fire_after_the_records_each_naming_its_timer() {
    let mut p0 = MemoryStore::default();
    p0.timers.insert(b"a".to_vec(), T0 - 5);
    p0.timers.insert(b"later".to_vec(), T0 + 1);
    let mut p1 = MemoryStore::default();
    p1.timers.insert(b"flaky".to_vec(), T0);
    let states = BTreeMap::from([(0, p0), (1, p1)]);
    let mut retry = RetryBudget::new(policy(3), Duration::from_secs(10));
    let started = tokio::time::Instant::now();
    let staged = step(&mut Scripted::default(), &wired(), &states, vec![], At::now(T0), &mut retry, "w").await;
    assert_eq!(started.elapsed(), Duration::from_millis(300), "the flaky timer failed twice: 100 + 200 ms");
    assert_eq!(staged.timers_fired, 2);
    let causes: Vec<Cause> = staged.outputs.iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(
        causes,
        vec![
            Cause::Timer { partition: 0, key: b"a".to_vec(), due_ms: T0 - 5 },
            Cause::Timer { partition: 1, key: b"flaky".to_vec(), due_ms: T0 }
        ]
    );
    assert_eq!(staged.changes[&0].timers.get(b"a".as_slice()), Some(&None), "a fired timer is removed");
    assert!(!staged.changes[&0].timers.contains_key(b"later".as_slice()));
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_leaves_due_timers_for_a_later_unit() {
    let mut p0 = MemoryStore::default();
    p0.timers.insert(b"flaky".to_vec(), T0);
    let states = BTreeMap::from([(0, p0)]);
    let mut retry = RetryBudget::new(policy(3), Duration::from_millis(150));
    let staged = step(&mut Scripted::default(), &wired(), &states, vec![], At::now(T0), &mut retry, "w").await;
    assert!(staged.stop.is_none());
    assert_eq!(staged.timers_fired, 0);
    assert!(staged.changes[&0].timers.is_empty(), "the timer stays scheduled");
}

#[tokio::test(start_paused = true)]
async fn a_fatal_failure_stops_the_step_where_it_happened() {
    let states = BTreeMap::from([(0, MemoryStore::default())]);
    let records = vec![(input(0), created("ok")), (input(1), created("corrupt-a")), (input(2), created("never"))];
    let staged = step(&mut Scripted::default(), &wired(), &states, records, At::now(T0 + 10_000), &mut RetryBudget::none(), "w").await;
    assert_eq!(staged.outcomes, vec![Outcome::Processed, Outcome::NotReached, Outcome::NotReached]);
    let stop = staged.stop.expect("stopped");
    assert_eq!(stop.cause, Cause::Input(1));
    assert!(matches!(stop.error, ProcessError::CorruptState { .. }));
    assert_eq!(staged.timers_fired, 0, "no timers fire after a stop");

    let mut p0 = MemoryStore::default();
    p0.timers.insert(b"fatal".to_vec(), T0);
    let states = BTreeMap::from([(0, p0)]);
    let staged = step(&mut Scripted::default(), &wired(), &states, vec![], At::now(T0), &mut RetryBudget::none(), "w").await;
    assert_eq!(staged.stop.map(|s| s.cause), Some(Cause::Timer { partition: 0, key: b"fatal".to_vec(), due_ms: T0 }));
    assert!(staged.changes[&0].timers.is_empty(), "the failing timer stays scheduled");
}

#[test]
fn admission_rules_name_their_class() {
    let rules = Rules {
        max_record_bytes: 4,
        max_clock_skew_ms: 1_000,
        schemas: BTreeMap::from([("in".to_string(), vec!["OrderCreated".to_string()])]),
    };
    assert_eq!(rules.check_value(None).unwrap_err().class, DeadLetterClass::Truncated);
    assert_eq!(rules.check_value(Some(&[0; 5])).unwrap_err().class, DeadLetterClass::Oversized);
    assert_eq!(rules.check_value(Some(&[0; 4])), Ok(&[0u8; 4][..]));
    let ok: Event = order_created("e", "O", T0, &[("P", 1)]).into();
    assert_eq!(rules.check_event("in", &ok, T0 - 1_000), Ok(()));
    assert_eq!(rules.check_event("in", &ok, T0 - 1_001).unwrap_err().class, DeadLetterClass::FutureTimestamp);
    let empty: Event = order_created("", "O", T0, &[("P", 1)]).into();
    assert_eq!(rules.check_event("in", &empty, T0).unwrap_err().class, DeadLetterClass::Invalid);
    let other: Event = orderflow_api::fixtures::order_cancelled("c", "O", "X", T0).into();
    assert_eq!(rules.check_event("in", &other, T0).unwrap_err().class, DeadLetterClass::WrongSchema);
    assert_eq!(rules.check_event("elsewhere", &other, T0), Ok(()), "a topic without a schema carries any");
    let long: Event = order_created(&"x".repeat(MAX_EVENT_ID_BYTES + 1), "O", T0, &[("P", 1)]).into();
    assert_eq!(rules.check_event("in", &long, T0).unwrap_err().class, DeadLetterClass::Invalid);
}

#[tokio::test(start_paused = true)]
async fn the_retention_sweep_is_armed_by_records_and_forgets_old_markers_without_the_processor() {
    let retention_ms = 60_000;
    let at = |now_ms| At { now_ms, retention_ms };
    // A partition whose committed state remembers `old` (seen at T0) through an indexed marker.
    let mut p0 = MemoryStore::default();
    let mut committed = Changes::default();
    let seen = vec![(orderflow_api::seen_key("old"), T0.to_be_bytes().to_vec())];
    committed.writes.insert(seen[0].0.clone(), Some(seen[0].1.clone()));
    retention::index(b"m-unit-1", &seen, &mut committed);
    p0.apply(committed);
    let states = BTreeMap::from([(0, p0.clone())]);
    let staged =
        step(&mut Scripted::default(), &wired(), &states, vec![(input(0), created("new"))], at(T0), &mut RetryBudget::none(), "w").await;
    let first_sweep = T0 + retention::sweep_interval_ms(retention_ms);
    assert_eq!(staged.changes[&0].timers.get(retention::SWEEP_TIMER), Some(&Some(first_sweep)), "armed by the first records");
    p0.apply(staged.changes.into_values().next().unwrap());
    // Later sweeps keep `old` until the retention has passed since it was seen.
    let states = BTreeMap::from([(0, p0.clone())]);
    let staged = step(&mut Scripted::default(), &wired(), &states, vec![], at(T0 + retention_ms - 1), &mut RetryBudget::none(), "w").await;
    assert_eq!(staged.swept, retention::Swept::default());
    assert_eq!(staged.timers_fired, 1, "the processor's own timer (t/new) fired; the sweep is not counted");
    let states = BTreeMap::from([(0, p0)]);
    let staged = step(&mut Scripted::default(), &wired(), &states, vec![], at(T0 + retention_ms), &mut RetryBudget::none(), "w").await;
    assert_eq!(staged.swept, retention::Swept { markers: 1, ids: 1 });
    assert_eq!(staged.changes[&0].writes.get(&orderflow_api::seen_key("old")), Some(&None));
    assert!(staged.outputs.iter().all(|(o, _)| !o.key.contains("sweep")), "the sweep never reaches the processor");
}
