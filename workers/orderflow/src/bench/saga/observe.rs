//! The orders offered (TPC-H, cycled) and the observer: it follows the saga's answers, plays the
//! POS and tracks each order to its terminal state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use futures::StreamExt as _;
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::topology::Topology;
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use crate::demo::tpch;
use crate::demo::{port_topic, pos_answer, pos_decision, send};

// ------------------------------------------------------------------ orders

/// TPC-H orders, cycled with fresh ids (see the module docs).
pub(super) struct Orders {
    pub(super) pool: Vec<OrderCreated>,
}

impl Orders {
    /// Order number `seq` of the run.
    pub(super) fn nth(&self, seq: u64) -> OrderCreated {
        let len = self.pool.len() as u64;
        let mut o = self.pool[(seq % len) as usize].clone();
        let copy = seq / len;
        if copy > 0 {
            o.order_id = format!("{}-c{copy}", o.order_id);
            o.event_id = format!("{}-c{copy}", o.event_id);
        }
        o
    }
}

// ------------------------------------------------------------------ the observer

/// What the observer knows of one order.
#[derive(Debug, Clone)]
pub(super) struct Track {
    pub(super) seq: u64,
    pub(super) created_ms: i64,
    pub(super) load: usize,
    /// Created after the load's warm-up.
    pub(super) measured: bool,
    pub(super) latency_ms: Option<i64>,
    pub(super) confirmed: bool,
    pub(super) cancelled: Option<String>,
    pub(super) released: bool,
    pub(super) sold: bool,
    pub(super) terminal: bool,
}

impl Track {
    pub(super) fn new(seq: u64, created_ms: i64, load: usize, measured: bool) -> Track {
        Track {
            seq,
            created_ms,
            load,
            measured,
            latency_ms: None,
            confirmed: false,
            cancelled: None,
            released: false,
            sold: false,
            terminal: false,
        }
    }

    /// The terminal state, once the saga is done with the order (see the module docs).
    pub(super) fn terminal_state(&self) -> Option<String> {
        if self.sold {
            return Some("COMPLETED".into());
        }
        match &self.cancelled {
            Some(reason) if self.released || reason == cancel_reason::INSUFFICIENT_STOCK => Some(format!("CANCELLED/{reason}")),
            _ => None,
        }
    }
}

/// Counts of one load.
#[derive(Debug, Default, Clone)]
pub(super) struct LoadCounts {
    pub(super) answered: u64,
    pub(super) terminal: u64,
    pub(super) first_terminal: Option<Instant>,
    pub(super) last_terminal: Option<Instant>,
    pub(super) last_answer: Option<Instant>,
}

/// The observer's book, shared with the offering side.
#[derive(Default)]
pub(super) struct Book {
    pub(super) orders: HashMap<String, Track>,
    pub(super) loads: Vec<LoadCounts>,
    pub(super) outcomes: BTreeMap<String, u64>,
    /// Initial-stock lines applied (their `stock.updated` read).
    pub(super) stock_lines: usize,
}

impl Book {
    pub(super) fn new_load(&mut self) -> usize {
        self.loads.push(LoadCounts::default());
        self.loads.len() - 1
    }

    /// Records an answer (first order.confirmed / order.cancelled) of `tr`, read at `read_ms`.
    fn answered(loads: &mut [LoadCounts], tr: &mut Track, read_ms: i64, now: Instant) {
        if tr.latency_ms.is_none() {
            tr.latency_ms = Some(read_ms - tr.created_ms);
            let l = &mut loads[tr.load];
            l.answered += 1;
            l.last_answer = Some(now);
        }
    }

    fn check_terminal(loads: &mut [LoadCounts], outcomes: &mut BTreeMap<String, u64>, tr: &mut Track, now: Instant) {
        if tr.terminal {
            return;
        }
        if let Some(state) = tr.terminal_state() {
            tr.terminal = true;
            *outcomes.entry(state).or_default() += 1;
            let l = &mut loads[tr.load];
            l.terminal += 1;
            l.first_terminal.get_or_insert(now);
            l.last_terminal = Some(now);
        }
    }
}

/// Records the POS wrote (acknowledged), by topic.
#[derive(Default)]
pub(super) struct PosCounts {
    pub(super) completed: AtomicU64,
    pub(super) cancelled: AtomicU64,
}

/// Topics the observer and the POS use.
#[derive(Clone)]
pub(super) struct SagaTopics {
    pub(super) confirmed: String,
    pub(super) cancelled: String,
    pub(super) released: String,
    pub(super) updated: String,
    pub(super) completed: String,
}

impl SagaTopics {
    pub(super) fn of(t: &Topology) -> Result<SagaTopics> {
        Ok(SagaTopics {
            confirmed: port_topic(t, "order-confirmer", "confirmed")?,
            cancelled: port_topic(t, "canceller", "cancelled")?,
            released: port_topic(t, "stock-reserver", "released")?,
            updated: port_topic(t, "stock-reserver", "updated")?,
            completed: "order.completed".into(),
        })
    }
}

/// Reads the saga's answers from the beginning, updates `book` and plays the POS.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_observer(
    t: &Topology,
    topics: SagaTopics,
    codec: Arc<Codec>,
    producer: FutureProducer,
    book: Arc<Mutex<Book>>,
    orders: Arc<Orders>,
    pos: Arc<PosCounts>,
    complete_pct: u32,
) -> Result<tokio::task::JoinHandle<()>> {
    let observer: StreamConsumer =
        client_config(&t.broker, Side::Consumer).set("group.id", format!("orderflow-bench-saga-observer-{}", now_ms())).create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in [&topics.confirmed, &topics.cancelled, &topics.released, &topics.updated] {
        let partitions = t.topics.get(topic).map(|s| s.partitions).unwrap_or(1);
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    observer.assign(&tpl)?;
    Ok(tokio::spawn(async move {
        let mut stream = observer.stream();
        while let Some(msg) = stream.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "observer consumer error");
                    continue;
                }
            };
            let Ok(event) = codec.decode(msg.payload().unwrap_or_default()).await else { continue };
            let (read_ms, now) = (now_ms(), Instant::now());
            let mut pos_action = None;
            {
                let mut guard = book.lock().expect("book");
                let b = &mut *guard;
                let order_id = match &event {
                    Event::OrderConfirmed(e) => &e.order_id,
                    Event::OrderCancelled(e) => &e.order_id,
                    Event::StockReservationReleased(e) => &e.order_id,
                    Event::StockUpdated(u) if u.change_reason == change_reason::SALE => &u.reference_id,
                    Event::StockUpdated(u) => {
                        if u.reference_id == tpch::INITIAL_STOCK_REFERENCE {
                            b.stock_lines += 1;
                        }
                        continue;
                    }
                    _ => continue,
                };
                let Some(tr) = b.orders.get_mut(order_id) else { continue };
                match &event {
                    Event::OrderConfirmed(e) => {
                        Book::answered(&mut b.loads, tr, read_ms, now);
                        if !tr.confirmed {
                            tr.confirmed = true;
                            pos_action = Some((pos_decision(&e.order_id, complete_pct, 100 - complete_pct), tr.seq, e.clone()));
                        }
                    }
                    Event::OrderCancelled(e) => {
                        Book::answered(&mut b.loads, tr, read_ms, now);
                        tr.cancelled.get_or_insert_with(|| e.reason.clone());
                    }
                    Event::StockReservationReleased(_) => tr.released = true,
                    _ => tr.sold = true,
                }
                Book::check_terminal(&mut b.loads, &mut b.outcomes, tr, now);
            }
            if let Some((decision, seq, confirmed)) = pos_action {
                let order = orders.nth(seq);
                if let Some((topic, event)) = pos_answer(decision, &order, &confirmed, &topics.completed, &topics.cancelled) {
                    // In the background: reading answers never waits for the POS's acknowledgement.
                    let (producer, codec, pos) = (producer.clone(), codec.clone(), pos.clone());
                    let completed = topic == topics.completed;
                    tokio::spawn(async move {
                        match send(&producer, &codec, &topic, &order.order_id, &event).await {
                            Ok(()) if completed => pos.completed.fetch_add(1, Ordering::Relaxed),
                            Ok(()) => pos.cancelled.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                tracing::error!(error = %e, "POS could not produce");
                                0
                            }
                        };
                    });
                }
            }
        }
    }))
}
