//! `topology.toml`: topics, workers and broker properties, with a checker that reports every
//! error at once (in the manner of `vector validate`) and a Mermaid renderer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole topology file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub broker: BrokerConfig,
    #[serde(default)]
    pub defaults: Defaults,
    pub topics: BTreeMap<String, TopicSpec>,
    pub workers: BTreeMap<String, WorkerSpec>,
    /// Folder holding the `.avsc` files, relative to the topology file (default `avro`).
    #[serde(default = "default_avro_dir")]
    pub avro_dir: PathBuf,
    /// `[profiles.<name>]`: what one kind of broker needs beyond the defaults, selected with
    /// `ORDERFLOW_PROFILE=<name>` (see [`Profile`]).
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// `[profiles.<name>]`: the per-broker differences, kept in one place. Selected with
/// `ORDERFLOW_PROFILE=<name>` (or `orderflow --profile`), a profile is laid over `[defaults]` and
/// `[broker.properties|producer|consumer]` by [`Topology::apply_profile`]: each field it sets
/// replaces the base value, each librdkafka property it names replaces (or adds) that property,
/// and a property set to `""` is removed. The repository's `topology.toml` is tuned for Apache
/// Kafka and has a `tansu` profile for the transaction-less broker (README "The local brokers").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Replaces `[defaults] guarantee` (a worker's own `guarantee` still wins).
    #[serde(default)]
    pub guarantee: Option<Guarantee>,
    /// Replaces `[defaults] group_protocol`.
    #[serde(default)]
    pub group_protocol: Option<GroupProtocol>,
    /// Replaces `[defaults] static_membership`.
    #[serde(default)]
    pub static_membership: Option<bool>,
    /// Replaces `[defaults] record_headers`.
    #[serde(default)]
    pub record_headers: Option<bool>,
    /// librdkafka properties for every client.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for producers.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties for consumers.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
}

impl Topology {
    /// Lays profile `name` over the defaults and broker properties (see [`Profile`]).
    ///
    /// Errors: [`TopologyError::UnknownProfile`] when the file has no `[profiles.<name>]`.
    pub fn apply_profile(&mut self, name: &str) -> Result<(), TopologyError> {
        let p = self
            .profiles
            .get(name)
            .cloned()
            .ok_or_else(|| TopologyError::UnknownProfile { name: name.to_string(), known: self.profiles.keys().cloned().collect() })?;
        if let Some(g) = p.guarantee {
            self.defaults.guarantee = g;
        }
        if let Some(g) = p.group_protocol {
            self.defaults.group_protocol = g;
        }
        if let Some(s) = p.static_membership {
            self.defaults.static_membership = s;
        }
        if let Some(h) = p.record_headers {
            self.defaults.record_headers = h;
        }
        let overlay = |base: &mut BTreeMap<String, String>, over: &BTreeMap<String, String>| {
            for (k, v) in over {
                if v.is_empty() {
                    base.remove(k);
                } else {
                    base.insert(k.clone(), v.clone());
                }
            }
        };
        overlay(&mut self.broker.properties, &p.properties);
        overlay(&mut self.broker.producer, &p.producer);
        overlay(&mut self.broker.consumer, &p.consumer);
        Ok(())
    }
}

impl Topology {
    /// The dead-letter topic of records read from `topic` (its `dead_letter`, or `<topic>.dlq`).
    pub fn dead_letter_of(&self, topic: &str) -> String {
        self.topics.get(topic).map(|t| t.dead_letter_topic(topic)).unwrap_or_else(|| crate::kafka::dlq_topic(topic))
    }

    /// Every dead-letter topic of the workers' inputs, with the input topics that feed it.
    pub fn dead_letter_topics(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for w in self.workers.values() {
            for input in &w.inputs {
                out.entry(self.dead_letter_of(input)).or_default().insert(input.clone());
            }
        }
        out
    }
}

fn default_avro_dir() -> PathBuf {
    PathBuf::from("avro")
}

/// `[broker]`: where the cluster is and which librdkafka properties every client gets.
/// Its `Debug` output redacts secrets (keys naming a password, secret or key).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `host:port[,host:port]`; overridden by `ORDERFLOW_BOOTSTRAP`.
    pub bootstrap: String,
    /// Confluent schema registry URL; overridden by `ORDERFLOW_REGISTRY_URL`. When absent,
    /// records use Avro single-object encoding with the schemas in `avro/`.
    #[serde(default)]
    pub registry_url: Option<String>,
    /// The compatibility level each subject of the registry is held to (issue 14): `orderflow
    /// schemas register` sets it per subject, `orderflow schemas check` refuses a schema the
    /// registry finds incompatible under it. Default `BACKWARD` (the "Schema evolution" rule of
    /// the codec: a new version reads everything written before).
    #[serde(default)]
    pub schema_compatibility: SchemaCompatibilityLevel,
    /// librdkafka properties for every client (e.g. `security.protocol`, `sasl.*`, `ssl.*`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for producers only.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties for consumers only.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
}

/// A schema registry compatibility level, as the Confluent API names it (`PUT /config/{subject}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SchemaCompatibilityLevel {
    #[default]
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
    None,
}

impl SchemaCompatibilityLevel {
    /// The name the registry API uses, e.g. `BACKWARD_TRANSITIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
            Self::None => "NONE",
        }
    }
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
            m.iter().map(|(k, v)| (k.clone(), if is_secret(k) { "***".to_string() } else { v.clone() })).collect()
        };
        f.debug_struct("BrokerConfig")
            .field("bootstrap", &self.bootstrap)
            .field("registry_url", &self.registry_url)
            .field("schema_compatibility", &self.schema_compatibility)
            .field("properties", &redact(&self.properties))
            .field("producer", &redact(&self.producer))
            .field("consumer", &redact(&self.consumer))
            .finish()
    }
}

/// Whether a librdkafka property holds a secret (never logged).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.ends_with(".key") || k.contains("key.pem") || k.contains("token")
}

/// Processing guarantee of a worker (README "Guarantees"). Never silently downgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Kafka transactions: needs a broker with EndTxn (not tansu 0.6.0).
    ExactlyOnce,
    /// Idempotent producer + state, seen eventIds and input offsets committed together after
    /// the outputs are acknowledged; deterministic output ids. Works on any broker.
    EffectivelyOnce,
    /// Outputs acknowledged before inputs; no state/offset atomicity.
    AtLeastOnce,
}

impl Guarantee {
    /// The `snake_case` name used in the topology, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Guarantee::ExactlyOnce => "exactly_once",
            Guarantee::EffectivelyOnce => "effectively_once",
            Guarantee::AtLeastOnce => "at_least_once",
        }
    }

    /// The guarantee named `name` ([`Guarantee::as_str`]), or None.
    pub fn parse(name: &str) -> Option<Guarantee> {
        [Guarantee::ExactlyOnce, Guarantee::EffectivelyOnce, Guarantee::AtLeastOnce].into_iter().find(|g| g.as_str() == name)
    }
}

/// The consumer group protocol (`group.protocol`) the workers' consumers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupProtocol {
    /// The classic protocol (JoinGroup/SyncGroup, client-side assignment): every broker,
    /// session and heartbeat set by the client (`session.timeout.ms`, `heartbeat.interval.ms`).
    #[default]
    Classic,
    /// KIP-848 (Kafka 4.0+, librdkafka 2.12+): incremental, broker-side assignment; session and
    /// heartbeat are the broker's (`group.consumer.*`), so the runtime drops the client's
    /// `session.timeout.ms`, `heartbeat.interval.ms` and `partition.assignment.strategy`.
    Consumer,
}

impl GroupProtocol {
    /// The `group.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }

    /// The protocol named `name` ([`GroupProtocol::as_str`]), or None.
    pub fn parse(name: &str) -> Option<GroupProtocol> {
        [GroupProtocol::Classic, GroupProtocol::Consumer].into_iter().find(|g| g.as_str() == name)
    }
}

/// `[defaults]`: values a worker inherits unless it sets its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default = "default_guarantee")]
    pub guarantee: Guarantee,
    /// Longest a unit of work waits for its first input record (and so how often timers are
    /// checked while idle). A unit then takes the records already fetched, up to `max_batch`, and
    /// is committed (outputs acknowledged, state flushed, offsets committed) as soon as no further
    /// record is at hand: records are never held back to fill a unit.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Most input records in one unit of work.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Root of the sled state stores; overridden by `ORDERFLOW_STATE_DIR`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Static group membership (KIP-345, `group.instance.id` = `<worker>-<instance>`): a pod
    /// restarted under the same instance id takes its partitions back without a rebalance.
    #[serde(default = "default_true")]
    pub static_membership: bool,
    /// Consumer group protocol: `classic` (default) or `consumer` (KIP-848); overridden by
    /// `ORDERFLOW_GROUP_PROTOCOL`. README "Consumer group protocols" has the measured choice.
    #[serde(default)]
    pub group_protocol: GroupProtocol,
    /// Retry policy for transient failures (seed 004: 3 retries with exponential backoff).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Largest input record value, in bytes, a worker processes; a larger one is dead-lettered
    /// as `oversized` without being decoded. Default 1 MiB.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// How far in the future an event's `occurredAt` may lie (clock skew between producers and
    /// workers); an event further ahead is dead-lettered as `future_timestamp`. Default 1 hour.
    #[serde(default = "default_max_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// How long closed business records (a settled reservation, a completed saga) and remembered
    /// `eventId`s are kept before they are forgotten, locally and in the changelog (issue 13:
    /// bounded state; `orderflow_runtime::retention`). Default 7 days
    /// ([`orderflow_api::DEFAULT_STATE_RETENTION`]); at least 1 s. An `eventId` redelivered after
    /// it is processed again, so keep it well above the longest window anything re-sends or
    /// replays into a worker's inputs.
    #[serde(default = "default_state_retention", with = "humantime_serde")]
    pub state_retention: Duration,
    /// Whether output records carry headers: CloudEvents `ce_type`/`ce_id`/`ce_source`, and a W3C
    /// `traceparent` carried from input to output (issue 14; `orderflow_runtime::headers`).
    /// Default true; the tansu profile turns them off (its SQLite engine is slow with headers).
    #[serde(default = "default_true")]
    pub record_headers: bool,
    /// How long an input partition may have records waiting without its position moving before
    /// it is reported stalled (issue 20; `orderflow_runtime::stall`): a warning naming the
    /// partition, its offset and what the worker last saw, `orderflow_partition_status{status=
    /// "stalled"}`, alert `OrderflowPartitionStalled`. Default 3 minutes
    /// ([`crate::stall::DEFAULT_STALL_AFTER`]); at least 5 s and 10 commit intervals, and above
    /// the retry policy's worst case (a record retried in place holds its partition that long).
    #[serde(default = "default_stall_after", with = "humantime_serde")]
    pub stall_after: Duration,
}

/// How transient failures are retried (`[defaults.retry]`, or `[workers.<name>.retry]`).
///
/// Attempt `n` (1-based) after the first waits `min(initial_backoff × multiplier^(n-1),
/// max_backoff)`. Applies to failures that can pass by themselves (schema registry unreachable,
/// a processor's [`orderflow_api::ProcessError::Transient`]); permanent failures (undecodable
/// or invalid records) go straight to the dead-letter topic. A record still failing after
/// `attempts` retries is dead-lettered with its attempt count. The partition waits while a
/// record is retried, so per-key order holds (domain rule 8). Broker unavailability is not
/// counted against `attempts`: produce and commit are retried until the broker returns.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt (seed 004: 3).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Wait before the first retry. Default 100 ms.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Factor between consecutive waits (≥ 1). Default 2.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Cap on one wait. Default 5 s.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            multiplier: default_multiplier(),
            max_backoff: default_max_backoff(),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry `retry` (1-based): `min(initial × multiplier^(retry-1), max)`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(retry.saturating_sub(1).min(64) as i32);
        let wait = self.initial_backoff.as_secs_f64() * factor;
        Duration::from_secs_f64(wait.min(self.max_backoff.as_secs_f64()))
    }

    /// The longest a record can hold its partition: the sum of every wait.
    pub fn worst_case(&self) -> Duration {
        (1..=self.attempts).map(|r| self.backoff(r)).sum()
    }
}

fn default_attempts() -> u32 {
    3
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}
fn default_max_record_bytes() -> usize {
    1 << 20
}
fn default_max_clock_skew() -> Duration {
    Duration::from_secs(3600)
}

fn default_stall_after() -> Duration {
    crate::stall::DEFAULT_STALL_AFTER
}

fn default_state_retention() -> Duration {
    orderflow_api::DEFAULT_STATE_RETENTION
}

/// Largest `max_batch` [`check`] accepts: a unit's remembered `eventId`s (at most
/// `crate::step::MAX_EVENT_ID_BYTES` each) must fit its commit marker
/// (`crate::changelog::MAX_MARKER_SEEN_BYTES`) to be forgotten with it.
pub const MAX_BATCH_LIMIT: usize = 3_000;

fn default_true() -> bool {
    true
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            guarantee: default_guarantee(),
            commit_interval: default_commit_interval(),
            max_batch: default_max_batch(),
            state_dir: default_state_dir(),
            static_membership: true,
            group_protocol: GroupProtocol::default(),
            retry: RetryPolicy::default(),
            max_record_bytes: default_max_record_bytes(),
            max_clock_skew: default_max_clock_skew(),
            state_retention: default_state_retention(),
            record_headers: true,
            stall_after: default_stall_after(),
        }
    }
}

fn default_guarantee() -> Guarantee {
    Guarantee::EffectivelyOnce
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_max_batch() -> usize {
    2000
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(".state")
}

/// One or several Avro record names a topic may carry.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SchemaRef {
    One(String),
    Many(Vec<String>),
}

impl SchemaRef {
    /// The record names, in file order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            SchemaRef::One(s) => vec![s.as_str()],
            SchemaRef::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `[topics."name"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Partition count; co-partitioned inputs of one worker must agree.
    pub partitions: i32,
    /// What the record key is (documentation and `topology graph`), e.g. `orderId`.
    pub key: String,
    /// Avro record name(s) in `avro/` the topic carries.
    #[serde(default)]
    pub schema: Option<SchemaRef>,
    /// `delete` (default) or `compact`.
    #[serde(default = "default_cleanup")]
    pub cleanup_policy: String,
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Name of the producer outside this topology, for topics fed from outside.
    #[serde(default)]
    pub external: Option<String>,
    /// Dead-letter topic of records read from this topic; default `<topic>.dlq`.
    #[serde(default)]
    pub dead_letter: Option<String>,
}

impl TopicSpec {
    /// The dead-letter topic of records read from topic `name`: `dead_letter`, or `<name>.dlq`.
    pub fn dead_letter_topic(&self, name: &str) -> String {
        self.dead_letter.clone().unwrap_or_else(|| crate::kafka::dlq_topic(name))
    }
}

fn default_cleanup() -> String {
    "delete".into()
}
fn default_replication() -> i32 {
    1
}

/// `[workers.name]`: the keys every worker has; the rest of the entry is its kind's own
/// settings ([`WorkerSpec::settings`]), parsed and checked by the kind's config type beside its
/// crate (e.g. `stock_reserver::Config`), through [`KindInfo::settings`].
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSpec {
    /// Which processor runs: a kind of the kinds registry (`orderflow_kinds::KINDS`).
    pub kind: String,
    /// Input topics (co-partitioned).
    pub inputs: Vec<String>,
    /// Output port → topic.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Consumer group; default `orderflow-<worker name>`.
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub guarantee: Option<Guarantee>,
    #[serde(default, with = "humantime_serde")]
    pub commit_interval: Option<Duration>,
    #[serde(default)]
    pub max_batch: Option<usize>,
    /// Retry policy of this worker; default `[defaults.retry]`.
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    /// `state_retention` of this worker; default `[defaults]`'s.
    #[serde(default, with = "humantime_serde")]
    pub state_retention: Option<Duration>,
    /// `stall_after` of this worker; default `[defaults]`'s.
    #[serde(default, with = "humantime_serde")]
    pub stall_after: Option<Duration>,
    /// Every other key of the entry: the kind's own settings (e.g. `reservation_ttl` of the
    /// stock reserver), unchecked here; [`check`] has the kind parse them.
    #[serde(flatten)]
    pub settings: toml::Table,
}

impl WorkerSpec {
    /// Whether the worker reads no topic (a source kind, the outbox relay: `check` allows empty
    /// inputs only for those): no consumer group, changelog or state store.
    pub fn is_source(&self) -> bool {
        self.inputs.is_empty()
    }

    /// The consumer group of worker `name`.
    pub fn group_id(&self, name: &str) -> String {
        self.group.clone().unwrap_or_else(|| format!("orderflow-{name}"))
    }
    /// Effective guarantee.
    pub fn guarantee(&self, d: &Defaults) -> Guarantee {
        self.guarantee.unwrap_or(d.guarantee)
    }
    /// Effective commit interval.
    pub fn commit_interval(&self, d: &Defaults) -> Duration {
        self.commit_interval.unwrap_or(d.commit_interval)
    }
    /// Effective unit size.
    pub fn max_batch(&self, d: &Defaults) -> usize {
        self.max_batch.unwrap_or(d.max_batch)
    }
    /// Effective retry policy.
    pub fn retry(&self, d: &Defaults) -> RetryPolicy {
        self.retry.unwrap_or(d.retry)
    }
    /// Effective stall threshold (`stall_after`).
    pub fn stall_after(&self, d: &Defaults) -> Duration {
        self.stall_after.unwrap_or(d.stall_after)
    }
    /// Effective state retention, in ms.
    pub fn retention_ms(&self, d: &Defaults) -> i64 {
        orderflow_api::millis(self.state_retention.unwrap_or(d.state_retention))
    }
    /// Sets the kind setting `key` to the duration `d` (written as `humantime` text, e.g. `1h`),
    /// as if the topology said so: the `--reservation-ttl` overrides.
    pub fn set_duration(&mut self, key: &str, d: Duration) {
        self.settings.insert(key.to_string(), toml::Value::String(humantime::format_duration(d).to_string()));
    }
}

/// A kind's settings parser ([`KindInfo::settings`]): the worker's settings table in, the
/// settings that must agree across workers (`(name, value as text)`) or an error message out.
pub type SettingsCheck = fn(&toml::Table) -> Result<Vec<(&'static str, String)>, String>;

/// What the checker knows of a worker kind.
#[derive(Debug, Clone, Copy)]
pub struct KindInfo {
    /// Kind name as written in `kind = "..."`.
    pub name: &'static str,
    /// Output ports the processor emits on; each must be wired.
    pub ports: &'static [&'static str],
    /// Parses a worker's kind settings ([`WorkerSpec::settings`]) with the kind's config type
    /// and checks them. Returns the settings that must agree across every worker that has
    /// them, as `(name, effective value as text)` (e.g. `("reservation_ttl", "5m")`: the stock
    /// reserver and the reservation expirer must use one TTL, seed 004).
    ///
    /// Errors: a message naming the unknown key, the bad value or the broken rule.
    pub settings: SettingsCheck,
    /// Whether the kind may read external topics (`external` set): it keeps no state per record
    /// key and keys its outputs from the event's own fields, so an outside producer's
    /// partitioner cannot split a key over two partitions' states (issue 19). Only the
    /// deduplicator; every joining kind reads the repartition topics it writes.
    pub reads_external: bool,
    /// Whether the kind's input is outside Kafka (the outbox relay reads a database table): it
    /// has no input topics, no consumer group and no state store; it only produces.
    pub source: bool,
}

impl KindInfo {
    /// A [`KindInfo::settings`] for kinds that have no settings: any key is unknown.
    pub fn no_settings(settings: &toml::Table) -> Result<Vec<(&'static str, String)>, String> {
        match settings.keys().next() {
            Some(k) => Err(format!("unknown key `{k}` (this kind has no settings of its own)")),
            None => Ok(Vec::new()),
        }
    }
}

/// One problem found in the topology, with what it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `worker <name>`, `topic <name>` or `file`.
    pub subject: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// Errors loading a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
    /// `ORDERFLOW_PROFILE` names a profile the file does not define.
    #[error("ORDERFLOW_PROFILE={name}: the topology has no [profiles.{name}] (it has: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownProfile { name: String, known: Vec<String> },
    /// `ORDERFLOW_GUARANTEE` or `ORDERFLOW_GROUP_PROTOCOL` holds an unknown value.
    #[error("{var}={value}: expected one of {expected}")]
    BadOverride { var: &'static str, value: String, expected: &'static str },
}

/// A topology read from disk, with the folder it came from (to resolve `avro_dir`).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub topology: Topology,
    pub path: PathBuf,
    /// Unknown keys found while parsing (reported by [`check`]).
    pub unknown_keys: Vec<String>,
}

impl Loaded {
    /// Absolute-ish path of the Avro schema folder.
    pub fn avro_dir(&self) -> PathBuf {
        let base = self.path.parent().unwrap_or(Path::new("."));
        base.join(&self.topology.avro_dir)
    }
}

/// Reads and parses `path`, collecting every unknown key instead of stopping at the first, then
/// applies the profile named by `ORDERFLOW_PROFILE` ([`Topology::apply_profile`]) and the
/// environment overrides: `ORDERFLOW_BOOTSTRAP`, `ORDERFLOW_REGISTRY_URL`, `ORDERFLOW_STATE_DIR`,
/// `ORDERFLOW_GUARANTEE` and `ORDERFLOW_GROUP_PROTOCOL` (the defaults' values), and
/// `ORDERFLOW_KAFKA_<PROPERTY>` for any librdkafka property, e.g. `ORDERFLOW_KAFKA_SASL_PASSWORD`
/// → `sasl.password`. Empty variables are ignored.
///
/// Errors: unreadable file, TOML syntax or type errors (with line and column), an unknown
/// profile, an unknown guarantee or group protocol name.
pub fn load(path: &Path) -> Result<Loaded, TopologyError> {
    let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read { path: path.to_path_buf(), source })?;
    let mut loaded = parse(&text, path)?;
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(name) = var("ORDERFLOW_PROFILE") {
        loaded.topology.apply_profile(&name)?;
    }
    if let Some(v) = var("ORDERFLOW_GUARANTEE") {
        loaded.topology.defaults.guarantee = Guarantee::parse(&v).ok_or(TopologyError::BadOverride {
            var: "ORDERFLOW_GUARANTEE",
            value: v,
            expected: "exactly_once, effectively_once, at_least_once",
        })?;
    }
    if let Some(v) = var("ORDERFLOW_GROUP_PROTOCOL") {
        loaded.topology.defaults.group_protocol = GroupProtocol::parse(&v).ok_or(TopologyError::BadOverride {
            var: "ORDERFLOW_GROUP_PROTOCOL",
            value: v,
            expected: "classic, consumer",
        })?;
    }
    if let Ok(v) = std::env::var("ORDERFLOW_BOOTSTRAP") {
        loaded.topology.broker.bootstrap = v;
    }
    if let Ok(v) = std::env::var("ORDERFLOW_REGISTRY_URL") {
        loaded.topology.broker.registry_url = Some(v).filter(|s| !s.is_empty());
    }
    if let Ok(v) = std::env::var("ORDERFLOW_STATE_DIR") {
        loaded.topology.defaults.state_dir = PathBuf::from(v);
    }
    // Per-environment librdkafka properties, credentials included, without putting them in
    // the file: ORDERFLOW_KAFKA_SASL_PASSWORD=... sets `sasl.password` for every client.
    for (k, v) in std::env::vars() {
        if let Some(prop) = k.strip_prefix("ORDERFLOW_KAFKA_") {
            loaded.topology.broker.properties.insert(prop.to_ascii_lowercase().replace('_', "."), v);
        }
    }
    Ok(loaded)
}

/// Parses topology text. Unknown keys do not fail here: they are collected (all of them, where
/// `deny_unknown_fields` would stop at the first) and reported by [`check`].
///
/// Errors: TOML syntax errors and wrong value types.
pub fn parse(text: &str, path: &Path) -> Result<Loaded, TopologyError> {
    let parse_err = |message: String| TopologyError::Parse { path: path.to_path_buf(), message };
    let mut value: toml::Value = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
    let unknown_keys = unknown_keys(&value);
    strip_unknown(&mut value);
    let topology = Topology::deserialize(value).map_err(|e| parse_err(e.to_string()))?;
    Ok(Loaded { topology, path: path.to_path_buf(), unknown_keys })
}

const TOP_KEYS: &[&str] = &["broker", "defaults", "topics", "workers", "avro_dir", "profiles"];
const PROFILE_KEYS: &[&str] = &["guarantee", "group_protocol", "static_membership", "record_headers", "properties", "producer", "consumer"];
const BROKER_KEYS: &[&str] = &["bootstrap", "registry_url", "schema_compatibility", "properties", "producer", "consumer"];
const DEFAULT_KEYS: &[&str] = &[
    "guarantee",
    "commit_interval",
    "max_batch",
    "state_dir",
    "static_membership",
    "group_protocol",
    "retry",
    "max_record_bytes",
    "max_clock_skew",
    "state_retention",
    "record_headers",
    "stall_after",
];
const TOPIC_KEYS: &[&str] = &["partitions", "key", "schema", "cleanup_policy", "replication_factor", "external", "dead_letter"];
const RETRY_KEYS: &[&str] = &["attempts", "initial_backoff", "multiplier", "max_backoff"];

fn retain(v: &mut toml::Value, keys: &[&str]) {
    if let Some(t) = v.as_table_mut() {
        t.retain(|k, _| keys.contains(&k));
    }
}

fn strip_unknown(v: &mut toml::Value) {
    retain(v, TOP_KEYS);
    if let Some(b) = v.get_mut("broker") {
        retain(b, BROKER_KEYS);
    }
    if let Some(d) = v.get_mut("defaults") {
        retain(d, DEFAULT_KEYS);
        if let Some(r) = d.get_mut("retry") {
            retain(r, RETRY_KEYS);
        }
    }
    // A worker entry's keys beyond the common ones are its kind's settings: kept for the kind.
    for (section, keys) in [("topics", Some(TOPIC_KEYS)), ("workers", None), ("profiles", Some(PROFILE_KEYS))] {
        if let Some(t) = v.get_mut(section).and_then(|t| t.as_table_mut()) {
            for (_, item) in t.iter_mut() {
                if let Some(keys) = keys {
                    retain(item, keys);
                }
                if let Some(r) = item.get_mut("retry") {
                    retain(r, RETRY_KEYS);
                }
            }
        }
    }
}

/// Every key of `v` that the topology format does not know, as a dotted path.
fn unknown_keys(v: &toml::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut scan = |prefix: &str, v: Option<&toml::Value>, keys: &[&str]| {
        if let Some(t) = v.and_then(|v| v.as_table()) {
            for k in t.keys() {
                if !keys.contains(&k.as_str()) {
                    out.push(if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") });
                }
            }
        }
    };
    scan("", Some(v), TOP_KEYS);
    scan("broker", v.get("broker"), BROKER_KEYS);
    scan("defaults", v.get("defaults"), DEFAULT_KEYS);
    scan("defaults.retry", v.get("defaults").and_then(|d| d.get("retry")), RETRY_KEYS);
    // A worker entry's other keys are its kind's settings, which the kind checks ([`check`]).
    for (section, keys) in [("topics", Some(TOPIC_KEYS)), ("workers", None), ("profiles", Some(PROFILE_KEYS))] {
        if let Some(t) = v.get(section).and_then(|t| t.as_table()) {
            for (name, item) in t {
                if let Some(keys) = keys {
                    scan(&format!("{section}.\"{name}\""), Some(item), keys);
                }
                scan(&format!("{section}.\"{name}\".retry"), item.get("retry"), RETRY_KEYS);
            }
        }
    }
    out
}

fn check_max_batch(max_batch: usize, p: &mut dyn FnMut(String)) {
    if max_batch == 0 || max_batch > MAX_BATCH_LIMIT {
        p(format!(
            "max_batch {max_batch} must be between 1 and {MAX_BATCH_LIMIT} (a unit's remembered eventIds must fit its commit marker)"
        ));
    }
}

/// `stall_after` must stay well above what a healthy partition can take without moving: 5 s,
/// 10 commit intervals, the retry policy's worst case (a record retried in place).
fn check_stall_after(stall_after: Duration, commit_interval: Duration, retry: &RetryPolicy, p: &mut dyn FnMut(String)) {
    let floor = Duration::from_secs(5).max(commit_interval * 10).max(retry.worst_case());
    if stall_after < floor {
        p(format!(
            "stall_after {} must be at least {} (5s, 10 commit intervals and the retry policy's worst case)",
            humantime::format_duration(stall_after),
            humantime::format_duration(floor)
        ));
    }
}

fn check_retention(retention: Duration, p: &mut dyn FnMut(String)) {
    if retention < Duration::from_secs(1) {
        p(format!("state_retention {} must be at least 1s", humantime::format_duration(retention)));
    }
}

/// Checks the wiring against the known worker kinds and the schema folder; returns every problem
/// found (empty when the topology is sound). Rules: no unknown keys; every worker kind known;
/// every input and output names a declared topic; every port of the kind wired and no port the
/// kind lacks; every topic has a schema whose `.avsc` exists; no topic produced by two workers;
/// inputs of a worker co-partitioned; each worker's kind settings accepted by its kind
/// ([`KindInfo::settings`]), and the settings kinds share (the reservation TTL) equal wherever
/// they apply; sane numbers.
pub fn check(loaded: &Loaded, kinds: &[KindInfo]) -> Vec<Problem> {
    let t = &loaded.topology;
    let mut problems = Vec::new();
    let mut p = |subject: String, message: String| problems.push(Problem { subject, message });
    for k in &loaded.unknown_keys {
        p("file".into(), format!("unknown key `{k}`"));
    }
    let avro_dir = loaded.avro_dir();
    for (name, topic) in &t.topics {
        let subject = format!("topic {name}");
        if topic.partitions < 1 {
            p(subject.clone(), format!("partitions must be ≥ 1, got {}", topic.partitions));
        }
        if !matches!(topic.cleanup_policy.as_str(), "delete" | "compact" | "compact,delete") {
            p(subject.clone(), format!("cleanup_policy must be delete, compact or compact,delete, got `{}`", topic.cleanup_policy));
        }
        match &topic.schema {
            None => p(subject.clone(), "has no schema".into()),
            Some(s) if s.names().is_empty() => p(subject.clone(), "has an empty schema list".into()),
            Some(s) => {
                for schema in s.names() {
                    if !avro_dir.join(format!("{schema}.avsc")).is_file() {
                        p(subject.clone(), format!("schema `{schema}` has no file {}", avro_dir.join(format!("{schema}.avsc")).display()));
                    }
                }
            }
        }
    }
    let mut producers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut agreed: BTreeMap<&'static str, Vec<(&str, String)>> = BTreeMap::new();
    for (name, w) in &t.workers {
        let subject = format!("worker {name}");
        let kind = kinds.iter().find(|k| k.name == w.kind);
        if kind.is_none() {
            p(
                subject.clone(),
                format!("unknown kind `{}` (known: {})", w.kind, kinds.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")),
            );
        }
        let source = kind.is_some_and(|k| k.source);
        if w.inputs.is_empty() && !source {
            p(subject.clone(), "has no inputs".into());
        }
        if source && !w.inputs.is_empty() {
            p(subject.clone(), format!("kind `{}` reads no topics (its input is a database table): inputs must be []", w.kind));
        }
        let mut partitions = BTreeSet::new();
        for input in &w.inputs {
            match t.topics.get(input) {
                None => p(subject.clone(), format!("input `{input}` is not a declared topic")),
                Some(topic) => {
                    partitions.insert(topic.partitions);
                }
            }
        }
        if partitions.len() > 1 {
            p(
                subject.clone(),
                format!("inputs are not co-partitioned (partition counts {partitions:?}); state is sharded by input partition"),
            );
        }
        if let Some(k) = kind.filter(|k| !k.reads_external) {
            for input in w.inputs.iter().filter(|i| t.topics.get(*i).is_some_and(|s| s.external.is_some())) {
                p(
                    subject.clone(),
                    format!(
                        "kind `{}` joins by key but reads external topic `{input}`, which an outside producer partitions \
                         (its partitioner may differ from orderflow's): read it through a repartition topic the deduplicator writes",
                        k.name
                    ),
                );
            }
        }
        for (port, topic) in &w.outputs {
            if !t.topics.contains_key(topic) {
                p(subject.clone(), format!("output `{port}` goes to `{topic}`, which is not a declared topic"));
            }
            // A worker writing to its own input (the stock reserver's HQ/store protocol on
            // `stock.commands`, issue 16) is a loop, not a second owner of the topic.
            if !w.inputs.contains(topic) {
                producers.entry(topic.as_str()).or_default().push(name.as_str());
            }
            if let Some(k) = kind {
                if !k.ports.contains(&port.as_str()) {
                    p(subject.clone(), format!("kind `{}` has no output port `{port}` (ports: {})", k.name, k.ports.join(", ")));
                }
            }
        }
        if let Some(k) = kind {
            for port in k.ports {
                if !w.outputs.contains_key(*port) {
                    p(subject.clone(), format!("output port `{port}` is not wired to a topic"));
                }
            }
            match (k.settings)(&w.settings) {
                Ok(shared) => {
                    for (key, value) in shared {
                        agreed.entry(key).or_default().push((name.as_str(), value));
                    }
                }
                Err(e) => p(subject.clone(), format!("kind `{}`: {e}", k.name)),
            }
        }
        if let Some(r) = &w.retry {
            check_retry(&t.broker, r, &mut |m| p(subject.clone(), m));
        }
        if let Some(m) = w.max_batch {
            check_max_batch(m, &mut |m| p(subject.clone(), m));
        }
        if let Some(r) = w.state_retention {
            check_retention(r, &mut |m| p(subject.clone(), m));
        }
        if w.commit_interval.is_some_and(|d| d.is_zero()) {
            p(subject.clone(), "commit_interval must be > 0".into());
        }
        check_stall_after(w.stall_after(&t.defaults), w.commit_interval(&t.defaults), &w.retry(&t.defaults), &mut |m| {
            p(subject.clone(), m)
        });
    }
    for (topic, ws) in &producers {
        if ws.len() > 1 {
            p(format!("topic {topic}"), format!("has several producing workers: {}", ws.join(", ")));
        }
    }
    for (key, values) in &agreed {
        let (first, value) = &values[0];
        for (name, other) in &values[1..] {
            if other != value {
                p(format!("worker {name}"), format!("{key} {other} differs from worker {first}'s {value}"));
            }
        }
    }
    check_max_batch(t.defaults.max_batch, &mut |m| p("defaults".into(), m));
    check_retention(t.defaults.state_retention, &mut |m| p("defaults".into(), m));
    if t.defaults.max_record_bytes == 0 {
        p("defaults".into(), "max_record_bytes must be ≥ 1".into());
    }
    check_retry(&t.broker, &t.defaults.retry, &mut |m| p("defaults".into(), m));
    for (name, topic) in &t.topics {
        if let Some(dlq) = &topic.dead_letter {
            if dlq.is_empty() || t.topics.contains_key(dlq) {
                p(format!("topic {name}"), format!("dead_letter `{dlq}` must be a topic of its own, not empty nor a declared topic"));
            }
        }
    }
    problems
}

/// The consumers' `max.poll.interval.ms` (librdkafka default 300 s): how long a worker may go
/// without polling before its group evicts it.
pub fn max_poll_interval(broker: &BrokerConfig) -> Duration {
    let ms = broker
        .consumer
        .get("max.poll.interval.ms")
        .or_else(|| broker.properties.get("max.poll.interval.ms"))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(300_000);
    Duration::from_millis(ms)
}

/// A retry policy must be finite and short enough that a record being retried never holds the
/// consumer past `max.poll.interval.ms` (which would make the group evict the member).
fn check_retry(broker: &BrokerConfig, r: &RetryPolicy, p: &mut dyn FnMut(String)) {
    if r.attempts > 20 {
        p(format!("retry.attempts must be ≤ 20, got {}", r.attempts));
    }
    if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
        p(format!("retry.multiplier must be ≥ 1, got {}", r.multiplier));
    }
    if r.initial_backoff > r.max_backoff {
        p("retry.initial_backoff must not exceed retry.max_backoff".into());
    }
    let poll = max_poll_interval(broker).as_millis();
    if r.multiplier.is_finite() && r.worst_case() * 2 > max_poll_interval(broker) {
        p(format!(
            "retry waits up to {} per record, more than half of max.poll.interval.ms ({poll} ms): the group would evict the member",
            humantime::format_duration(r.worst_case())
        ));
    }
}

/// Loads and checks; the error lists every problem.
pub fn load_checked(path: &Path, kinds: &[KindInfo]) -> Result<Loaded, TopologyError> {
    let loaded = load(path)?;
    let problems = check(&loaded, kinds);
    if problems.is_empty() {
        Ok(loaded)
    } else {
        Err(TopologyError::Invalid { path: path.to_path_buf(), problems })
    }
}

/// The wiring as a Mermaid flowchart: topics as rounded nodes, workers as boxes, edges labelled
/// with output ports; external producers as dashed inputs.
pub fn mermaid(t: &Topology) -> String {
    let id = |s: &str| s.replace(['.', '-', ':'], "_");
    let mut out = String::from("flowchart LR\n");
    for (name, topic) in &t.topics {
        out.push_str(&format!("    t_{}([\"{name}<br/><small>key {} · {} partitions</small>\"])\n", id(name), topic.key, topic.partitions));
    }
    for (name, w) in &t.workers {
        out.push_str(&format!("    w_{}[\"{name}<br/><small>{}</small>\"]\n", id(name), w.kind));
    }
    for (name, topic) in &t.topics {
        if let Some(ext) = &topic.external {
            out.push_str(&format!("    x_{}>\"{ext}\"] -.-> t_{}\n", id(name), id(name)));
        }
    }
    for (name, w) in &t.workers {
        for input in &w.inputs {
            out.push_str(&format!("    t_{} --> w_{}\n", id(input), id(name)));
        }
        for (port, topic) in &w.outputs {
            out.push_str(&format!("    w_{} -- {port} --> t_{}\n", id(name), id(topic)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind whose one setting, `reservation_ttl` (text), must agree across workers.
    fn ttl_settings(t: &toml::Table) -> Result<Vec<(&'static str, String)>, String> {
        match t.iter().find(|(k, _)| *k != "reservation_ttl") {
            Some((k, _)) => Err(format!("unknown key `{k}`")),
            None => Ok(vec![("reservation_ttl", t.get("reservation_ttl").and_then(|v| v.as_str()).unwrap_or("5m").to_string())]),
        }
    }

    const KINDS: &[KindInfo] = &[
        KindInfo { name: "a", ports: &["out"], settings: KindInfo::no_settings, reads_external: true, source: false },
        KindInfo { name: "ttl", ports: &["out"], settings: ttl_settings, reads_external: true, source: false },
    ];

    fn write(dir: &Path, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir.join("avro")).unwrap();
        std::fs::write(dir.join("avro/S.avsc"), "{}").unwrap();
        let path = dir.join("topology.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const GOOD: &str = r#"
[broker]
bootstrap = "x:1"
[topics.in]
partitions = 2
key = "k"
schema = "S"
external = "outside"
[topics.out]
partitions = 2
key = "k"
schema = "S"
[workers.w]
kind = "a"
inputs = ["in"]
outputs = { out = "out" }
"#;

    #[test]
    fn a_joining_kind_may_not_read_an_external_topic() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(&write(dir.path(), GOOD)).unwrap();
        let joining = [KindInfo { reads_external: false, ..KINDS[0] }];
        let problems: Vec<String> = check(&loaded, &joining).iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].starts_with("worker w: kind `a` joins by key but reads external topic `in`"), "{problems:#?}");
    }

    #[test]
    fn a_sound_topology_has_no_problems_and_graphs() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(&write(dir.path(), GOOD)).unwrap();
        assert_eq!(check(&loaded, KINDS), vec![]);
        let g = mermaid(&loaded.topology);
        assert!(g.contains("t_in --> w_w") && g.contains("w_w -- out --> t_out"), "{g}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_subject() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
[broker]
bootstrap = "x:1"
colour = "blue"
[topics.in]
partitions = 2
key = "k"
[topics.out]
partitions = 3
key = "k"
schema = "Missing"
speed = 1
[workers.w1]
kind = "a"
inputs = ["in", "out"]
outputs = { out = "out" }
[workers.w2]
kind = "a"
inputs = ["in"]
outputs = { out = "out", extra = "nowhere" }
[workers.w3]
kind = "ttl"
inputs = ["in"]
outputs = {}
reservation_ttl = "1m"
[workers.w4]
kind = "zzz"
inputs = ["ghost"]
[workers.w5]
kind = "a"
inputs = ["in"]
outputs = { out = "out" }
"#;
        let loaded = load(&write(dir.path(), text)).unwrap();
        let problems: Vec<String> = check(&loaded, KINDS).iter().map(|p| p.to_string()).collect();
        let expect = [
            "file: unknown key `broker.colour`",
            "file: unknown key `topics.\"out\".speed`",
            "topic in: has no schema",
            "topic out: schema `Missing` has no file",
            "worker w1: inputs are not co-partitioned",
            "worker w2: output `extra` goes to `nowhere`",
            "worker w2: kind `a` has no output port `extra`",
            "worker w3: output port `out` is not wired to a topic",
            "worker w4: unknown kind `zzz`",
            "worker w4: input `ghost` is not a declared topic",
            // w1 reads `out` too: a loop, not a second owner (issue 16).
            "topic out: has several producing workers: w2, w5",
        ];
        for e in expect {
            assert!(problems.iter().any(|p| p.starts_with(e)), "missing `{e}` in {problems:#?}");
        }
    }

    #[test]
    fn retry_timeouts_and_dead_letter_rules_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
[broker]
bootstrap = "x:1"
[broker.consumer]
"max.poll.interval.ms" = "10000"
[defaults.retry]
attempts = 3
initial_backoff = "2s"
multiplier = 0.5
max_backoff = "1s"
[topics.in]
partitions = 2
key = "k"
schema = "S"
dead_letter = "out"
[topics.out]
partitions = 2
key = "k"
schema = "S"
[workers.w]
kind = "ttl"
inputs = ["in"]
outputs = { out = "out" }
reservation_ttl = "10m"
[workers.w.retry]
attempts = 50
max_backoff = "30s"
colour = "red"
[workers.a]
kind = "a"
inputs = ["in"]
outputs = {}
saga_timeout = "3m"
state_retention = "500ms"
max_batch = 3001
stall_after = "2s"
"#;
        let kinds: &[KindInfo] =
            &[KindInfo { name: "a", ports: &[], settings: KindInfo::no_settings, reads_external: true, source: false }, KINDS[1]];
        let loaded = load(&write(dir.path(), text)).unwrap();
        let problems: Vec<String> = check(&loaded, kinds).iter().map(|p| p.to_string()).collect();
        let expect = [
            "file: unknown key `workers.\"w\".retry.colour`",
            "defaults: retry.multiplier must be ≥ 1",
            "defaults: retry.initial_backoff must not exceed retry.max_backoff",
            "worker w: retry.attempts must be ≤ 20",
            "worker w: retry waits up to",
            "worker a: kind `a`: unknown key `saga_timeout` (this kind has no settings of its own)",
            "topic in: dead_letter `out` must be a topic of its own",
            "worker a: state_retention 500ms must be at least 1s",
            "worker a: max_batch 3001 must be between 1 and 3000",
            "worker a: stall_after 2s must be at least 5s (5s, 10 commit intervals and the retry policy's worst case)",
            // 50 retries of up to 30 s hold a record far longer than the default 3 minutes.
            "worker w: stall_after 3m must be at least",
        ];
        for e in expect {
            assert!(problems.iter().any(|p| p.starts_with(e)), "missing `{e}` in {problems:#?}");
        }
        let t = &loaded.topology;
        assert_eq!(t.dead_letter_of("out"), "out.dlq");
        let r = t.workers["w"].retry(&t.defaults);
        assert_eq!((r.attempts, r.initial_backoff, r.max_backoff), (50, Duration::from_millis(100), Duration::from_secs(30)));
        assert_eq!(t.workers["w"].retention_ms(&t.defaults), orderflow_api::millis(orderflow_api::DEFAULT_STATE_RETENTION));
        assert_eq!(t.workers["a"].retention_ms(&t.defaults), 500);
        assert_eq!(t.workers["a"].stall_after(&t.defaults), Duration::from_secs(2));
        assert_eq!(t.workers["w"].stall_after(&t.defaults), crate::stall::DEFAULT_STALL_AFTER);
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let r = RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(500),
        };
        let waits: Vec<u128> = (1..=5).map(|n| r.backoff(n).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        assert_eq!(r.worst_case(), Duration::from_millis(1700));
    }

    #[test]
    fn a_profile_replaces_what_it_names_and_removes_empty_properties() {
        let text = format!(
            "{GOOD}\n[broker.consumer]\n\"fetch.wait.max.ms\" = \"500\"\n\"session.timeout.ms\" = \"30000\"\n\
             [profiles.slow]\nguarantee = \"effectively_once\"\ngroup_protocol = \"consumer\"\n\
             [profiles.slow.consumer]\n\"fetch.wait.max.ms\" = \"50\"\n\"session.timeout.ms\" = \"\"\n\
             [profiles.slow.producer]\n\"batch.size\" = \"65536\"\n"
        );
        let mut loaded = parse(&text, Path::new("t.toml")).unwrap();
        assert!(loaded.unknown_keys.is_empty(), "{:?}", loaded.unknown_keys);
        let t = &mut loaded.topology;
        assert_eq!(t.defaults.guarantee, Guarantee::EffectivelyOnce, "the built-in default when [defaults] names none");
        t.apply_profile("slow").unwrap();
        assert_eq!(t.defaults.guarantee, Guarantee::EffectivelyOnce);
        assert_eq!(t.defaults.group_protocol, GroupProtocol::Consumer);
        assert_eq!(t.broker.consumer.get("fetch.wait.max.ms").map(String::as_str), Some("50"));
        assert!(!t.broker.consumer.contains_key("session.timeout.ms"), "an empty value removes the property");
        assert_eq!(t.broker.producer.get("batch.size").map(String::as_str), Some("65536"));
        let err = t.apply_profile("nope").unwrap_err().to_string();
        assert!(err.contains("[profiles.nope]") && err.contains("slow"), "{err}");
    }

    #[test]
    fn unknown_profile_keys_are_reported() {
        let text = format!("{GOOD}\n[profiles.p]\nguarantee = \"exactly_once\"\nsession_timeout = \"1s\"\n");
        let loaded = parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(loaded.unknown_keys, vec!["profiles.\"p\".session_timeout".to_string()]);
    }

    #[test]
    fn guarantee_and_group_protocol_names_parse() {
        assert_eq!(Guarantee::parse("exactly_once"), Some(Guarantee::ExactlyOnce));
        assert_eq!(Guarantee::parse("effectively_once"), Some(Guarantee::EffectivelyOnce));
        assert_eq!(Guarantee::parse("once"), None);
        assert_eq!(GroupProtocol::parse("consumer"), Some(GroupProtocol::Consumer));
        assert_eq!(GroupProtocol::parse("classic"), Some(GroupProtocol::Classic));
        assert_eq!(GroupProtocol::parse("eager"), None);
    }

    #[test]
    fn secrets_are_redacted_from_debug_output() {
        let b = BrokerConfig {
            bootstrap: "b:1".into(),
            registry_url: None,
            schema_compatibility: Default::default(),
            properties: BTreeMap::from([("sasl.password".into(), "hunter2".into()), ("sasl.username".into(), "svc".into())]),
            producer: BTreeMap::new(),
            consumer: BTreeMap::from([("ssl.key.password".into(), "pw".into())]),
        };
        let text = format!("{b:?}");
        assert!(!text.contains("hunter2") && !text.contains("\"pw\""), "{text}");
        assert!(text.contains("svc"), "{text}");
    }

    #[test]
    fn differing_reservation_ttls_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{GOOD}\n[workers.t1]\nkind = \"ttl\"\ninputs = [\"in\"]\noutputs = {{ out = \"out\" }}\nreservation_ttl = \"1m\"\n[workers.t2]\nkind = \"ttl\"\ninputs = [\"in\"]\nreservation_ttl = \"2m\"\n");
        let loaded = load(&write(dir.path(), &text)).unwrap();
        let problems: Vec<String> = check(&loaded, KINDS).iter().map(|p| p.to_string()).collect();
        assert!(problems.iter().any(|p| p.contains("reservation_ttl 2m differs")), "{problems:#?}");
    }
}
