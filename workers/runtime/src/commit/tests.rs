//! Each protocol against a fake broker and store that log every call, with failures injected.

use std::cell::RefCell;
use std::collections::BTreeMap;

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::*;

/// Logs calls as strings; fails the send whose number (0-based) is in `fail_send`, the record
/// numbered `fail_record` within it, and the transaction commit when `fail_commit` is set.
#[derive(Default)]
struct Fake {
    log: RefCell<Vec<String>>,
    sends: RefCell<usize>,
    fail_send: Option<usize>,
    fail_commit: Option<TxnErrorClass>,
}

impl Broker for Fake {
    async fn send(&self, records: Vec<OutRecord>) -> Vec<Result<i64, KafkaError>> {
        let n = *self.sends.borrow();
        *self.sends.borrow_mut() += 1;
        let names: Vec<String> =
            records.iter().map(|r| format!("{}{}", r.topic, r.partition.map(|p| format!("[{p}]")).unwrap_or_default())).collect();
        self.log.borrow_mut().push(format!("send {}", names.join(" ")));
        records
            .iter()
            .enumerate()
            .map(|(i, _)| {
                if self.fail_send == Some(n) && i == 0 {
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut))
                } else {
                    Ok(10 * n as i64 + i as i64)
                }
            })
            .collect()
    }
    async fn begin(&self) -> Result<(), TxnError> {
        self.log.borrow_mut().push("begin".into());
        Ok(())
    }
    async fn commit_transaction(&self, offsets: &Offsets) -> Result<(), TxnError> {
        self.log.borrow_mut().push(format!("commit_transaction {offsets:?}"));
        match self.fail_commit {
            Some(class) => Err(TxnError { class, source: KafkaError::ClientCreation("injected".into()), step: "commit_transaction" }),
            None => Ok(()),
        }
    }
    async fn abort(&self) -> Result<(), TxnError> {
        self.log.borrow_mut().push("abort".into());
        Ok(())
    }
    fn commit_offsets(&self, offsets: &Offsets) {
        self.log.borrow_mut().push(format!("commit_offsets {offsets:?}"));
    }
}

#[derive(Default)]
struct Local<'a> {
    log: Option<&'a RefCell<Vec<String>>>,
}

impl LocalState for Local<'_> {
    fn persist(&mut self, partition: i32, changelog_next: i64) -> Result<(), StoreError> {
        self.log.unwrap().borrow_mut().push(format!("persist {partition}@{changelog_next}"));
        Ok(())
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.log.unwrap().borrow_mut().push("flush".into());
        Ok(())
    }
}

/// One output, then partition 3's changelog: a state change and the marker.
fn unit() -> Unit {
    let rec = |k: &str| changelog::Record { key: k.as_bytes().to_vec(), value: Some(vec![1]) };
    Unit {
        records: vec![OutRecord { topic: "out".into(), partition: None, key: Some(b"k".to_vec()), value: Some(vec![0]), headers: vec![] }],
        changelog_topic: "cl".into(),
        changelog: vec![(3, vec![rec("state"), rec("marker")])],
        offsets: BTreeMap::from([(3, BTreeMap::from([("in".to_string(), 8)]))]),
    }
}

fn run(guarantee: Guarantee, fake: &Fake) -> (Result<BTreeMap<i32, i64>, Failure>, Vec<String>) {
    let result = futures::executor::block_on(async { commit(guarantee, fake, &mut Local { log: Some(&fake.log) }, unit()).await });
    (result, fake.log.borrow().clone())
}

const OFFSETS: &str = "{3: {\"in\": 8}}";

#[test]
fn exactly_once_sends_markers_inside_the_transaction_then_persists() {
    let (result, log) = run(Guarantee::ExactlyOnce, &Fake::default());
    assert_eq!(result.unwrap(), BTreeMap::from([(3, 3)]), "changelog offsets 1 and 2 → next 3");
    assert_eq!(
        log,
        vec![
            "begin".to_string(),
            "send out cl[3] cl[3]".into(),
            format!("commit_transaction {OFFSETS}"),
            "persist 3@3".into(),
            "flush".into()
        ]
    );
}

#[test]
fn exactly_once_aborts_on_a_failed_send_or_commit_and_persists_nothing() {
    let (result, log) = run(Guarantee::ExactlyOnce, &Fake { fail_send: Some(0), ..Fake::default() });
    assert!(matches!(result, Err(Failure::Aborted(_))), "{result:?}");
    assert_eq!(log, vec!["begin", "send out cl[3] cl[3]", "abort"]);

    let (result, log) = run(Guarantee::ExactlyOnce, &Fake { fail_commit: Some(TxnErrorClass::Abortable), ..Fake::default() });
    assert!(matches!(result, Err(Failure::Aborted(_))), "{result:?}");
    assert_eq!(log.last().map(String::as_str), Some("abort"));
    assert!(!log.iter().any(|l| l.starts_with("persist")), "{log:?}");

    let (result, log) = run(Guarantee::ExactlyOnce, &Fake { fail_commit: Some(TxnErrorClass::Fatal), ..Fake::default() });
    assert!(matches!(result, Err(Failure::Fatal(_))), "{result:?}");
    assert!(!log.iter().any(|l| l == "abort" || l.starts_with("persist")), "a fenced producer is not aborted: {log:?}");
}

#[test]
fn effectively_once_sends_markers_after_everything_else_then_flushes_then_commits_offsets() {
    let (result, log) = run(Guarantee::EffectivelyOnce, &Fake::default());
    assert_eq!(result.unwrap(), BTreeMap::from([(3, 11)]), "the marker went out in the second send, at offset 10");
    assert_eq!(
        log,
        vec!["send out cl[3]".to_string(), "send cl[3]".into(), "persist 3@11".into(), "flush".into(), format!("commit_offsets {OFFSETS}")]
    );
}

#[test]
fn effectively_once_sends_no_marker_when_an_output_was_not_delivered() {
    let (result, log) = run(Guarantee::EffectivelyOnce, &Fake { fail_send: Some(0), ..Fake::default() });
    match result {
        Err(Failure::NotDelivered { topic, .. }) => assert_eq!(topic, "out"),
        other => panic!("{other:?}"),
    }
    assert_eq!(log, vec!["send out cl[3]"]);
}

#[test]
fn at_least_once_does_not_flush() {
    let (result, log) = run(Guarantee::AtLeastOnce, &Fake::default());
    assert!(result.is_ok());
    assert_eq!(log, vec!["send out cl[3]".to_string(), "send cl[3]".into(), "persist 3@11".into(), format!("commit_offsets {OFFSETS}")]);
}
