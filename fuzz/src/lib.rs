//! Fuzz checks of orderflow: what must hold whatever bytes arrive on an input topic.
//!
//! [`Fuzz::decode`] and [`Fuzz::process`] are the bodies of the cargo-fuzz targets
//! `fuzz_targets/decode.rs` and `fuzz_targets/process.rs` (nightly and libFuzzer, run by
//! `scripts/fuzz.sh`), and of the stable test `tests/fuzz_corpus.rs`, which compiles this file as
//! a module and runs every file of `fuzz/corpus/<target>/` through them on every `cargo test`. A
//! broken property panics with a message naming it; libFuzzer then saves the input as a crash.
//! The seed corpus is written by [`seeds`] (`cargo run --release -p orderflow --example
//! write_fuzz_seed_corpus`).
//!
//! Admission, processing and timers go through `orderflow_runtime::step`, exactly as the live
//! worker runs them: [`Rules`] admit a record (`check_value`, the decode, `check_event`) and
//! [`step::step`] runs each processor over its in-memory state (`orderflow_api::MemoryStore`),
//! with `eventId` dedupe and the due timers fired after the records, on a tokio current-thread
//! runtime. Only the Kafka side (consumer, producer, changelog, sled) is left out.
//!
//! This file is both the crate root of `orderflow-fuzz` and a module of that test and of the
//! example: it names only its own items and the external crates `orderflow_api`,
//! `orderflow_runtime`, `serde_json`, `tokio` and the five worker crates (all dependencies of the
//! `orderflow` package too).
//!
//! # `decode`: one record value
//!
//! `Codec::decode_local` (single-object encoding, schemas from `avro/`, no registry) must not
//! panic, and:
//! * every failure has a dead-letter class ([`CodecError::dead_letter_class`]) among
//!   [`DECODE_CLASSES`], and
//!   the one the header alone decides when it does ([`header_class`]): `not_avro` for a first
//!   byte other than `C3`/`00` or `C3` not followed by `01`, `truncated` for a payload shorter
//!   than its header, `unknown_schema` for an unknown fingerprint or any Confluent-framed payload
//!   (no registry);
//! * a decoded event has the schema its fingerprint names, re-encodes (a worker that forwards it
//!   must be able to), and decodes back equal;
//! * every strict prefix of a decodable payload that keeps the 10-byte header is `truncated`,
//!   and the payload with one more byte is `malformed` (trailing bytes).
//!
//! # `process`: a sequence of records through the five processors
//!
//! The input is split into records by [`split_records`]: each is a control byte (the clock
//! advance before it, [`advance_ms`]), a little-endian `u16` length and that many value bytes
//! (fewer at the end of the input). Starting at [`BASE_TIME_MS`], for each record the clock
//! moves, every processor's due timers fire (a [`step::step`] without records), and then, as the
//! runtime would:
//! * the record is admitted by the topology's [`Rules`] (`[defaults]` and the topics' `schema` of
//!   `topology.toml`), as read from the topic that carries its schema: a value above
//!   `max_record_bytes` is dropped (`oversized`), one that does not decode is dropped (its class
//!   checked as in `decode`), an event of a schema its topic does not carry (`wrong_schema`), with
//!   an empty `eventId` (`invalid`) or whose `occurredAt` is more than `max_clock_skew` ahead of
//!   the clock (`future_timestamp`) is dropped; drops are counted by [`DeadLetterClass`];
//! * the event is fed to **each of the five processors** (one [`step::step`] each, over the
//!   worker's `MemoryStore`, its processor built from `topology.toml` by `orderflow_kinds`),
//!   whatever their inputs, as read from that topic: a superset of what the wiring delivers. The
//!   step's changes are applied to the store, its due timers fire after the record (as live);
//! * what they emit is routed through the topology's wiring to every worker reading the output
//!   topic, one step per delivery, until nothing is left (bounded by [`MAX_DELIVERIES`]).
//!
//! After the last record the clock moves a day ahead so every timer fires. Properties:
//! * no processor panics, and no step stops ([`step::Stop`]: the processor returned
//!   [`CorruptState`](orderflow_api::ProcessError::CorruptState) or
//!   [`UnwiredPort`](orderflow_api::ProcessError::UnwiredPort), or a timer handler failed; each
//!   stops a worker for good, so a poison record would crash-loop it; a step without retries
//!   treats any timer error as fatal); [`Invalid`](orderflow_api::ProcessError::Invalid) and
//!   [`Transient`](orderflow_api::ProcessError::Transient) on an event are allowed
//!   (dead-lettered, counted per worker);
//! * stock reserver (after every record): every stock record has on hand ≥ 0, reserved ≥ 0 and
//!   available = on hand − reserved ≥ 0, and its reserved units equal the units held by the live
//!   reservations of that store and product; no processor reports a broken invariant (a note
//!   exported as `Export::InvariantBroken`: the reserver's `conservation_mismatch`);
//! * every emitted event encodes with its schema and decodes back equal, and carries the record
//!   key its topic declares (`orderId`, `hqId:storeId`, `productId`);
//! * no `eventId` is emitted with two different payloads, as long as the input holds only events
//!   of the topics fed from outside (`external` in `topology.toml`: `order.created`,
//!   `order.completed`, `order.cancelled`, `inventory.adjusted`). Once it holds a forged internal
//!   event (a `StockReserved` the reserver never made, fed straight to the confirmer, canceller
//!   and expirer) this one is no longer checked: derived ids assume internal events are the
//!   workers' own (e.g. the expirer derives its id from the `reservationId` alone, and two forged
//!   reservations may share one). Everything else still is;
//! * the whole run is deterministic: a second run from empty state emits the same records.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use orderflow_api::events::store_key;
use orderflow_api::{Event, Export, MemoryStore, Output, Processor};
use orderflow_runtime::codec::{Codec, SINGLE_OBJECT_HEADER_LEN, SINGLE_OBJECT_MARKER};
use orderflow_runtime::deadletter::DeadLetterClass;
use orderflow_runtime::step::{self, Cause, Input, RetryBudget, Rules, Staged};
use orderflow_runtime::topology::{Topology, WorkerSpec};

pub mod seeds;

/// The dead-letter classes a failed `decode_local` may have (no registry configured).
pub const DECODE_CLASSES: &[DeadLetterClass] =
    &[DeadLetterClass::NotAvro, DeadLetterClass::Truncated, DeadLetterClass::UnknownSchema, DeadLetterClass::Malformed];

/// Clock of the first record of a `process` run, ms since the epoch (2026-01-01T00:00:00Z).
/// The seed corpus stamps its events around it.
pub const BASE_TIME_MS: i64 = 1_767_225_600_000;

/// Upper bound on the deliveries (an event fed to one processor) of one record's cascade; more
/// means two workers keep answering each other.
pub const MAX_DELIVERIES: usize = 100_000;

/// Clock advance before a record with control byte `control`: `control² × 100` ms, so 0 … 255
/// covers 0 to 108 minutes (fine steps near 0, every reservation TTL and saga timeout near 255).
pub fn advance_ms(control: u8) -> i64 {
    let c = i64::from(control);
    c * c * 100
}

/// Splits a `process` input into `(control byte, value)` records: control byte, `u16`
/// little-endian length `n`, `n` value bytes (what is left when fewer remain). A trailing control
/// byte without a length gives an empty value; an empty input gives no record.
pub fn split_records(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut records = Vec::new();
    while let Some((&control, rest)) = data.split_first() {
        let (n, rest) = match rest {
            [lo, hi, rest @ ..] => (usize::from(u16::from_le_bytes([*lo, *hi])), rest),
            _ => (0, &[][..]),
        };
        let n = n.min(rest.len());
        records.push((control, &rest[..n]));
        data = &rest[n..];
    }
    records
}

/// The inverse of [`split_records`], for writing seed inputs.
///
/// # Panics
/// If a value is longer than `u16::MAX` bytes.
pub fn frame(records: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (control, value) in records {
        let n = u16::try_from(value.len()).expect("a framed record value is at most 65535 bytes");
        out.push(*control);
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// The dead-letter class the header of `bytes` decides on its own, for a codec without a
/// registry that knows the fingerprints `known`; `None` when the header is a known single-object
/// header and only the datum decides.
pub fn header_class(bytes: &[u8], known: impl Fn(u64) -> bool) -> Option<DeadLetterClass> {
    match bytes {
        [] | [0xC3] => Some(DeadLetterClass::Truncated),
        [0xC3, second, ..] if *second != SINGLE_OBJECT_MARKER[1] => Some(DeadLetterClass::NotAvro),
        [0xC3, ..] if bytes.len() < SINGLE_OBJECT_HEADER_LEN => Some(DeadLetterClass::Truncated),
        [0xC3, ..] => {
            let fp = u64::from_le_bytes(bytes[2..SINGLE_OBJECT_HEADER_LEN].try_into().expect("8 bytes"));
            if known(fp) {
                None
            } else {
                Some(DeadLetterClass::UnknownSchema)
            }
        }
        [0x00, ..] if bytes.len() < 5 => Some(DeadLetterClass::Truncated),
        [0x00, ..] => Some(DeadLetterClass::UnknownSchema),
        _ => Some(DeadLetterClass::NotAvro),
    }
}

/// What one `process` run saw, for reports (the properties are asserted, not returned).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProcessReport {
    /// Records the input split into.
    pub records: usize,
    /// Records dropped by admission, before any processor, by dead-letter class (`oversized`,
    /// the decode classes, `wrong_schema`, `invalid` for an empty `eventId`, `future_timestamp`).
    pub dropped: BTreeMap<DeadLetterClass, usize>,
    /// Records decoded and fed to the processors, by schema name.
    pub fed: BTreeMap<&'static str, usize>,
    /// How many of them are forged internal events (their topic is not `external`).
    pub forged: usize,
    /// Events a processor rejected as invalid (dead-lettered by the runtime), by worker.
    pub invalid: BTreeMap<String, usize>,
    /// Events a processor failed transiently on, by worker.
    pub transient: BTreeMap<String, usize>,
    /// Emitted records, by topic.
    pub emitted: BTreeMap<String, usize>,
    /// Events fed to a processor (admitted records times five, plus routed outputs).
    pub deliveries: usize,
}

/// The loaded codec and topology the checks run against.
pub struct Fuzz {
    codec: Codec,
    topology: Topology,
    /// The admission rules of every topic of the topology.
    rules: Rules,
    /// Schema name → the topic that carries only that schema (`OrderCreated` → `order.created`),
    /// else the first that carries it (`StockAllocation` → `stock.commands`).
    home: BTreeMap<String, String>,
    /// Runs the (async) step on the calling thread (a step without retries never waits).
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Fuzz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fuzz").field("codec", &self.codec).field("rules", &self.rules).field("home", &self.home).finish()
    }
}

/// One worker of the topology in memory: its processor, its state (one partition, 0) and ports.
struct Stage {
    name: String,
    kind: String,
    inputs: Vec<String>,
    /// Port → topic.
    outputs: BTreeMap<String, String>,
    /// The ports of its kind the topology wires, as the live worker gives them to the step.
    wired: Vec<String>,
    processor: Box<dyn Processor>,
    store: MemoryStore,
    /// Offset of the next record fed to it.
    offset: i64,
}

/// Builds the processor of a worker and names its ports, from the kinds registry the `orderflow`
/// binary uses (`orderflow_kinds`).
fn build_processor(spec: &WorkerSpec) -> Option<(Box<dyn Processor>, &'static [&'static str])> {
    Some((orderflow_kinds::build(spec)?, orderflow_kinds::ports(&spec.kind)?))
}

/// One run of the pipeline: the stages, the clock and what was emitted.
struct Run<'a> {
    fuzz: &'a Fuzz,
    stages: Vec<Stage>,
    now: i64,
    /// Every emitted record, in order: (topic, key, event).
    log: Vec<(String, String, Event)>,
    /// eventId → encoded payload of the first emission.
    payloads: BTreeMap<String, Vec<u8>>,
    /// Whether an event of a topic the workers write (not `external`) was fed from the input.
    forged: bool,
    report: ProcessReport,
}

impl Fuzz {
    /// Loads `topology.toml` and the schemas of its `avro_dir` under `repo_root`.
    ///
    /// Errors: a message naming the file that does not load, or a schema no topic carries.
    pub fn load(repo_root: &Path) -> Result<Fuzz, String> {
        let path = repo_root.join("topology.toml");
        let loaded = orderflow_runtime::topology::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let codec = Codec::load(&loaded.avro_dir(), None).map_err(|e| e.to_string())?;
        let topics: Vec<String> = loaded.topology.topics.keys().cloned().collect();
        let rules = Rules::of(&loaded, &topics);
        let topology = loaded.topology;
        let mut home = BTreeMap::new();
        for (name, spec) in &topology.topics {
            if let Some(schema) = &spec.schema {
                if let [only] = schema.names()[..] {
                    home.insert(only.to_string(), name.clone());
                }
            }
        }
        // A schema no topic carries alone (the stock hierarchy's protocol records, issue 16)
        // lives on the first topic that carries it.
        for name in Event::SCHEMA_NAMES {
            if !home.contains_key(*name) {
                let shared = topology.topics.iter().find(|(_, t)| t.schema.as_ref().is_some_and(|s| s.names().contains(name)));
                let Some((topic, _)) = shared else {
                    return Err(format!("no topic of {} carries {name}", path.display()));
                };
                home.insert(name.to_string(), topic.clone());
            }
        }
        // Source kinds (the outbox relay) run no processor: nothing to fuzz there.
        for (name, spec) in topology.workers.iter().filter(|(_, w)| !w.is_source()) {
            if build_processor(spec).is_none() {
                return Err(format!("worker {name}: unknown kind {}", spec.kind));
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().map_err(|e| format!("tokio runtime: {e}"))?;
        Ok(Fuzz { codec, topology, rules, home, runtime })
    }

    /// The codec (single-object encoding, no registry).
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The topic that carries `schema`, alone where one does (e.g. `order.created` for `OrderCreated`).
    pub fn home_topic(&self, schema: &str) -> Option<&str> {
        self.home.get(schema).map(String::as_str)
    }

    /// The `decode` check of one record value (see the crate docs): returns the event, or the
    /// dead-letter class of the failure.
    ///
    /// # Panics
    /// When a property is broken.
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, DeadLetterClass> {
        let result = self.decode_once(bytes);
        if let Ok(event) = &result {
            self.check_prefixes(bytes, event);
        }
        result
    }

    /// Decodes and checks the class and the round trip, without the prefix properties.
    fn decode_once(&self, bytes: &[u8]) -> Result<Event, DeadLetterClass> {
        let known = |fp: u64| self.codec.schema_name_of(&[&SINGLE_OBJECT_MARKER[..], &fp.to_le_bytes()[..]].concat()).is_some();
        let expected = header_class(bytes, known);
        match self.codec.decode_local(bytes) {
            Err(e) => {
                let class = e.dead_letter_class();
                assert!(DECODE_CLASSES.contains(&class), "decode failure without a dead-letter class of a record: {class} ({e})");
                match expected {
                    Some(want) => assert_eq!(class, want, "the header decides the class: {e}"),
                    None => assert!(
                        matches!(class, DeadLetterClass::Truncated | DeadLetterClass::Malformed),
                        "a known header, then {class}: {e}"
                    ),
                }
                Err(class)
            }
            Ok(event) => {
                assert_eq!(expected, None, "decoded although the header says {expected:?}: {event:?}");
                assert_eq!(self.codec.schema_name_of(bytes), Some(event.schema_name()), "schema of the fingerprint");
                let again =
                    self.codec.encode_local(&event).unwrap_or_else(|e| panic!("a decoded event does not re-encode: {e}: {event:?}"));
                match self.codec.decode_local(&again) {
                    Ok(back) => assert_eq!(back, event, "re-encoded event decodes differently"),
                    Err(e) => panic!("re-encoded event does not decode: {e}: {event:?}"),
                }
                Ok(event)
            }
        }
    }

    /// Every strict prefix keeping the header is `truncated`; one byte more is `malformed`.
    /// Long payloads are cut at 64 spread points plus the last 8.
    fn check_prefixes(&self, bytes: &[u8], event: &Event) {
        let len = bytes.len();
        let cuts: BTreeSet<usize> = if len <= 256 {
            (SINGLE_OBJECT_HEADER_LEN..len).collect()
        } else {
            let span = len - SINGLE_OBJECT_HEADER_LEN;
            (0..64).map(|i| SINGLE_OBJECT_HEADER_LEN + i * span / 64).chain(len.saturating_sub(8)..len).collect()
        };
        for cut in cuts {
            match self.decode_once(&bytes[..cut]) {
                Err(DeadLetterClass::Truncated) => {}
                other => panic!("{} cut to {cut} of {len} bytes: expected truncated, got {other:?}", event.schema_name()),
            }
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        match self.decode_once(&longer) {
            Err(DeadLetterClass::Malformed) => {}
            other => panic!("{} with a trailing byte: expected malformed, got {other:?}", event.schema_name()),
        }
    }

    /// The `process` check of a record sequence (see the crate docs).
    ///
    /// # Panics
    /// When a property is broken.
    pub fn process(&self, data: &[u8]) -> ProcessReport {
        let first = self.run(data);
        let second = self.run(data);
        assert!(first.log == second.log, "two runs of the same input emitted different records");
        first.report
    }

    /// Admits one record value read at `now_ms`, as the worker does (`step::admit` without a
    /// registry): [`Rules::check_value`], the decode with its checks, then
    /// [`Rules::check_event`] as read from the topic that carries the event's schema. Returns that
    /// topic and the event, or the dead-letter class of the drop.
    fn admit(&self, value: &[u8], now_ms: i64) -> Result<(&str, Event), DeadLetterClass> {
        let value = self.rules.check_value(Some(value)).map_err(|r| r.class)?;
        let event = self.decode_once(value)?;
        let topic = self.home[event.schema_name()].as_str();
        self.rules.check_event(topic, &event, now_ms).map_err(|r| r.class)?;
        Ok((topic, event))
    }

    fn stages(&self) -> Vec<Stage> {
        self.topology
            .workers
            .iter()
            .filter(|(_, spec)| !spec.is_source())
            .map(|(name, spec)| {
                let (processor, ports) = build_processor(spec).expect("kinds checked by load");
                Stage {
                    name: name.clone(),
                    kind: spec.kind.clone(),
                    inputs: spec.inputs.clone(),
                    outputs: spec.outputs.clone(),
                    wired: ports.iter().filter(|p| spec.outputs.contains_key(**p)).map(|p| p.to_string()).collect(),
                    processor,
                    store: MemoryStore::default(),
                    offset: 0,
                }
            })
            .collect()
    }

    fn run(&self, data: &[u8]) -> Run<'_> {
        let mut run = Run {
            fuzz: self,
            stages: self.stages(),
            now: BASE_TIME_MS,
            log: Vec::new(),
            payloads: BTreeMap::new(),
            forged: false,
            report: ProcessReport::default(),
        };
        let records = split_records(data);
        run.report.records = records.len();
        for (control, bytes) in records {
            run.advance(advance_ms(control));
            let (topic, event) = match self.admit(bytes, run.now) {
                Ok(admitted) => admitted,
                Err(class) => {
                    *run.report.dropped.entry(class).or_default() += 1;
                    continue;
                }
            };
            *run.report.fed.entry(event.schema_name()).or_default() += 1;
            if self.topology.topics.get(topic).is_some_and(|t| t.external.is_none()) {
                run.forged = true;
                run.report.forged += 1;
            }
            let mut queue = VecDeque::new();
            for i in 0..run.stages.len() {
                queue.extend(run.step(i, Some((topic, &event))));
            }
            run.drain(queue);
            run.check_state();
        }
        // Let every timer fire (reservation TTLs, saga timeouts), twice: a timer's outputs may
        // schedule more.
        for _ in 0..2 {
            run.advance(24 * 3_600_000);
            run.check_state();
        }
        run
    }
}

/// The value of the record key a topic declares (`key` in `topology.toml`) for `event`, if the
/// key names fields this checker knows.
fn declared_key(key: &str, event: &Event) -> Option<String> {
    match (key, event) {
        ("orderId", e) => e.order_id().map(str::to_string),
        ("hqId:storeId", e) => {
            let (hq, store) = e.store();
            Some(store_key(hq, store))
        }
        ("productId", Event::StockUpdated(u)) => Some(u.product_id.clone()),
        _ => None,
    }
}

impl Run<'_> {
    /// Moves the clock by `by_ms` and fires every processor's due timers (a step without
    /// records), routing their outputs.
    fn advance(&mut self, by_ms: i64) {
        self.now = self.now.saturating_add(by_ms);
        let mut queue = VecDeque::new();
        for i in 0..self.stages.len() {
            queue.extend(self.step(i, None));
        }
        self.drain(queue);
    }

    /// One [`step::step`] of stage `i` at the run's clock, over its store (partition 0) with no
    /// retries: `record` is the event read from a topic, if any; the due timers fire after it.
    /// Applies the staged changes, counts the dead letters, and returns the outputs with their
    /// topics.
    ///
    /// # Panics
    /// When the step stops (fatal for the worker) or a processor reports a broken invariant.
    fn step(&mut self, i: usize, record: Option<(&str, &Event)>) -> Vec<(String, Output)> {
        let now = self.now;
        let stage = &mut self.stages[i];
        let mut records = Vec::new();
        if let Some((topic, event)) = record {
            self.report.deliveries += 1;
            records.push((Input { topic, partition: 0, offset: stage.offset }, Ok(event.clone())));
            stage.offset += 1;
        }
        let staged = {
            let states = BTreeMap::from([(0, &stage.store)]);
            let mut retry = RetryBudget::none();
            let step = step::step(stage.processor.as_mut(), &stage.wired, &states, records, step::At::now(now), &mut retry, &stage.name);
            self.fuzz.runtime.block_on(step)
        };
        let Staged { outputs, dead_letters, mut changes, notes, stop, .. } = staged;
        if let Some(stop) = stop {
            match (stop.cause, record) {
                (Cause::Input(_), Some((topic, event))) => {
                    panic!("{} on {} from {topic}: {} (fatal for the worker)", stage.name, event.schema_name(), stop.error)
                }
                (cause, _) => panic!("{}: a timer handler failed (fatal for the worker): {} ({cause:?})", stage.name, stop.error),
            }
        }
        for note in notes {
            assert!(note.export != Export::InvariantBroken, "{} reported a broken invariant: {} {}", stage.name, note.measure, note.label);
        }
        for (_, rejection) in dead_letters {
            let count = match rejection.class {
                DeadLetterClass::Invalid => &mut self.report.invalid,
                DeadLetterClass::Transient => &mut self.report.transient,
                other => panic!("{}: an admitted event dead-lettered as {other}: {}", stage.name, rejection.message),
            };
            *count.entry(stage.name.clone()).or_default() += 1;
        }
        if let Some(c) = changes.remove(&0) {
            stage.store.apply(c);
        }
        outputs.into_iter().map(|(o, _)| (stage.outputs[&o.port].clone(), o)).collect()
    }

    /// Delivers emitted records to every worker reading their topic, until none is left.
    fn drain(&mut self, mut queue: VecDeque<(String, Output)>) {
        let start = self.report.deliveries;
        while let Some((topic, output)) = queue.pop_front() {
            assert!(self.report.deliveries - start <= MAX_DELIVERIES, "more than {MAX_DELIVERIES} deliveries for one record");
            self.check_output(&topic, &output);
            *self.report.emitted.entry(topic.clone()).or_default() += 1;
            for i in 0..self.stages.len() {
                if self.stages[i].inputs.contains(&topic) {
                    let more = self.step(i, Some((&topic, &output.event)));
                    queue.extend(more);
                }
            }
            self.log.push((topic, output.key, output.event));
        }
    }

    /// An emitted record encodes, decodes back, has its topic's key, and its eventId is not
    /// reused with another payload.
    fn check_output(&mut self, topic: &str, output: &Output) {
        let codec = &self.fuzz.codec;
        let event = &output.event;
        let bytes = codec.encode_local(event).unwrap_or_else(|e| panic!("output on {topic} does not encode: {e}: {event:?}"));
        match codec.decode_local(&bytes) {
            Ok(back) => assert_eq!(&back, event, "output on {topic} decodes differently"),
            Err(e) => panic!("output on {topic} does not decode: {e}"),
        }
        let spec = self.fuzz.topology.topics.get(topic).unwrap_or_else(|| panic!("output topic {topic} is not declared"));
        if let Some(schema) = &spec.schema {
            assert!(schema.names().contains(&event.schema_name()), "{} emitted on {topic}, which does not carry it", event.schema_name());
        }
        if let Some(want) = declared_key(&spec.key, event) {
            assert_eq!(output.key, want, "record key of {} on {topic} (declared key {})", event.schema_name(), spec.key);
        }
        match self.payloads.get(event.event_id()) {
            Some(_) if self.forged => {}
            Some(first) => {
                assert!(first == &bytes, "eventId {:?} emitted with two payloads (second on {topic}: {event:?})", event.event_id())
            }
            None => {
                self.payloads.insert(event.event_id().to_string(), bytes);
            }
        }
    }

    /// The state of every stock reserver (notes are checked at each step).
    fn check_state(&self) {
        for stage in self.stages.iter().filter(|s| s.kind == "stock-reserver") {
            check_reserver_state(&stage.name, &stage.store.data);
        }
    }
}

/// Domain rule 2 on one stock reserver's state: every stock record has on hand ≥ 0, reserved ≥ 0,
/// available ≥ 0, and reserved = the units of the live reservations of its store and product.
fn check_reserver_state(worker: &str, data: &BTreeMap<Vec<u8>, Vec<u8>>) {
    use stock_reserver::{Reservation, ReservationStatus, StockRecord, RESERVATION_PREFIX, STOCK_PREFIX};
    let mut held: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    for (key, value) in data.range(RESERVATION_PREFIX.to_vec()..).take_while(|(k, _)| k.starts_with(RESERVATION_PREFIX)) {
        let r: Reservation = serde_json::from_slice(value)
            .unwrap_or_else(|e| panic!("{worker}: reservation {} is not JSON of a Reservation: {e}", String::from_utf8_lossy(key)));
        if r.status == ReservationStatus::Live {
            for item in &r.items {
                assert!(item.quantity > 0, "{worker}: live reservation of {} holds {} of {}", r.order_id, item.quantity, item.product_id);
                *held.entry(stock_reserver::stock_key(&r.hq_id, &r.store_id, &item.product_id)).or_default() += i64::from(item.quantity);
            }
        }
    }
    for (key, value) in data.range(STOCK_PREFIX.to_vec()..).take_while(|(k, _)| k.starts_with(STOCK_PREFIX)) {
        let name = String::from_utf8_lossy(key);
        let s: StockRecord =
            serde_json::from_slice(value).unwrap_or_else(|e| panic!("{worker}: stock record {name} is not JSON of a StockRecord: {e}"));
        assert!(s.on_hand >= 0, "{worker}: {name} on hand {} < 0", s.on_hand);
        assert!(s.reserved >= 0, "{worker}: {name} reserved {} < 0", s.reserved);
        assert!(s.available() >= 0, "{worker}: {name} available {} < 0 (on hand {}, reserved {})", s.available(), s.on_hand, s.reserved);
        let live = held.remove(key).unwrap_or(0);
        assert_eq!(s.reserved, live, "{worker}: {name} reserved {} but its live reservations hold {live}", s.reserved);
    }
    assert!(
        held.is_empty(),
        "{worker}: live reservations hold stock that has no stock record: {:?}",
        held.keys().map(|k| String::from_utf8_lossy(k)).collect::<Vec<_>>()
    );
}
