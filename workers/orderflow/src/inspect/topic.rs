//! `orderflow tap`: a topic's records as JSON lines, decoded ([`tap_json`]), filtered by key and by
//! fields ([`Where`]).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use orderflow_api::Event;
use orderflow_runtime::codec::{Codec, CodecError};
use serde_json::{json, Map, Value};

use crate::kafkaio::{blocking, rfc3339, Span};
use crate::text::{hex, text_or_hex};

use super::{find_topic, scanner, Raw, HEX_BYTES};

// ------------------------------------------------------------------------------------------
// Formatting helpers.

/// The decode error of a record: `{"class", "message"}`; a record without a value is
/// `truncated` (as the workers classify it).
pub(super) fn error_json(e: Option<&CodecError>) -> Value {
    match e {
        Some(e) => json!({"class": e.class(), "message": e.to_string()}),
        None => json!({"class": "truncated", "message": "the record has no value (null / tombstone)"}),
    }
}

/// Decodes a record's value: `Ok(None)` for a record without a value is reported as an error.
pub(super) async fn decode(codec: &Codec, r: &Raw) -> Result<Event, Option<CodecError>> {
    match &r.value {
        Some(v) => codec.decode(v).await.map_err(Some),
        None => Err(None),
    }
}

/// The `tap` line of record `r` with its decoded value (`Err(None)`: the record has no value):
///
/// `{"topic", "partition", "offset", "timestamp" (ms since the epoch, null when the record has
/// none), "time" (the same as RFC 3339 UTC), "key" (UTF-8 text, or `0x…` hex, or null),
/// "headers": {name: text | 0x-hex | null} (the last occurrence of a repeated name wins),
/// "event": schema name, "value": the event as JSON (Avro field names)}`.
///
/// When the value does not decode, `"value"` is replaced by `"error": {"class", "message"}`
/// (the dead-letter class of the codec error and its text) and `"value_hex"` (the first 256
/// bytes in hex) plus `"value_bytes"` (the length); `"event"` is then the schema the
/// single-object fingerprint names, or null.
pub fn tap_json(r: &Raw, decoded: &Result<Event, Option<CodecError>>, codec: &Codec) -> Value {
    let headers: Map<String, Value> =
        r.headers.iter().map(|(k, v)| (k.clone(), v.as_deref().map_or(Value::Null, |v| Value::String(text_or_hex(v))))).collect();
    let mut out = json!({
        "topic": r.at.topic,
        "partition": r.at.partition,
        "offset": r.at.offset,
        "timestamp": r.timestamp_ms,
        "time": r.timestamp_ms.map(rfc3339),
        "key": r.key.as_deref().map(text_or_hex),
        "headers": headers,
    });
    match decoded {
        Ok(e) => {
            out["event"] = json!(e.schema_name());
            out["value"] = e.to_json();
        }
        Err(err) => {
            let v = r.value.as_deref().unwrap_or_default();
            out["event"] = json!(codec.schema_name_of(v));
            out["error"] = error_json(err.as_ref());
            out["value_hex"] = json!(hex(&v[..v.len().min(HEX_BYTES)]));
            out["value_bytes"] = json!(r.value.as_ref().map(Vec::len));
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// --where.

/// One `--where PATH=VALUE` condition on the decoded value.
///
/// `PATH` is a dotted field path in Avro field names (`orderId`, `storeStock.current`); a
/// segment that is a number indexes an array (`items.0.productId`), and a segment met on an
/// array otherwise matches when any element matches (`items.productId=P-1`). The field matches
/// when it is a JSON scalar whose text equals `VALUE`: a string as is, a number or boolean as
/// written in JSON (`3`, `true`), null as `null`. Objects and arrays never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Where {
    pub path: Vec<String>,
    pub value: String,
}

impl std::str::FromStr for Where {
    type Err = String;

    /// Parses `a.b=v` (split at the first `=`; the value may be empty or hold `=`).
    fn from_str(s: &str) -> Result<Where, String> {
        let (path, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not FIELD=VALUE (e.g. orderId=O-1, items.productId=P-1)"))?;
        let path: Vec<String> = path.split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("`{s}`: empty field name in the dotted path"));
        }
        Ok(Where { path, value: value.to_string() })
    }
}

impl Where {
    /// Whether the decoded value `v` has the field with the value.
    pub fn matches(&self, v: &Value) -> bool {
        fn at(v: &Value, path: &[String], want: &str) -> bool {
            let Some((first, rest)) = path.split_first() else {
                return match v {
                    Value::String(s) => s == want,
                    Value::Number(n) => n.to_string() == want,
                    Value::Bool(b) => b.to_string() == want,
                    Value::Null => want == "null",
                    Value::Array(_) | Value::Object(_) => false,
                };
            };
            match v {
                Value::Object(m) => m.get(first).is_some_and(|x| at(x, rest, want)),
                Value::Array(a) => match first.parse::<usize>() {
                    Ok(i) => a.get(i).is_some_and(|x| at(x, rest, want)),
                    Err(_) => a.iter().any(|x| at(x, path, want)),
                },
                _ => false,
            }
        }
        at(v, &self.path, &self.value)
    }
}

// ------------------------------------------------------------------------------------------
// tap.

/// `orderflow tap` flags.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("start").args(["from_beginning", "from_offset", "last"])))]
pub struct TapArgs {
    /// The topic to read (any topic on the broker: saga topics, dead-letter topics, ...).
    pub topic: String,
    /// Topology file: the broker and the Avro schemas.
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    pub topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// Only this partition (repeatable); every partition when omitted.
    #[arg(long = "partition")]
    pub partitions: Vec<i32>,
    /// Start at each partition's first record (the default).
    #[arg(long)]
    pub from_beginning: bool,
    /// Start at this offset in each partition (at the low watermark if it is below it).
    #[arg(long, value_name = "N")]
    pub from_offset: Option<i64>,
    /// Start at each partition's last N records.
    #[arg(long, value_name = "N")]
    pub last: Option<i64>,
    /// Keep reading new records until Ctrl-C / SIGTERM.
    #[arg(long, conflicts_with = "until_end")]
    pub follow: bool,
    /// Stop at the high watermarks seen at start (the default).
    #[arg(long)]
    pub until_end: bool,
    /// Only records with this key (compared as UTF-8 text).
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
    /// Only records whose decoded value has FIELD (dotted path) = VALUE (repeatable, all must
    /// match); records that do not decode never match.
    #[arg(long = "where", value_name = "FIELD=VALUE")]
    pub conditions: Vec<Where>,
    /// Stop after printing N records.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// Where a `tap` starts in a partition with watermarks `(low, high)`.
pub fn tap_start(a: &TapArgs, (low, high): (i64, i64)) -> i64 {
    match (a.from_offset, a.last) {
        (Some(n), _) => n.clamp(low, high.max(low)),
        (None, Some(n)) => (high - n.max(0)).max(low),
        (None, None) => low,
    }
}

/// Whether record `r` (decoded as `decoded`) passes `--key` and every `--where`.
pub(super) fn tap_keeps(a: &TapArgs, r: &Raw, decoded: &Result<Event, Option<CodecError>>) -> bool {
    if let Some(k) = &a.key {
        if r.key.as_deref() != Some(k.as_bytes()) {
            return false;
        }
    }
    if a.conditions.is_empty() {
        return true;
    }
    match decoded {
        Ok(e) => {
            let v = e.to_json();
            a.conditions.iter().all(|w| w.matches(&v))
        }
        Err(_) => false,
    }
}

/// `orderflow tap TOPIC`: prints one [`tap_json`] line per record of `TOPIC` (its `--partition`s,
/// all by default) that passes `--key` and `--where`, from `--from-beginning` (default),
/// `--from-offset N` or `--last N`, up to the high watermarks seen at start (`--until-end`,
/// default) or on until Ctrl-C / SIGTERM (`--follow`), at most `--limit` records. Records of
/// one partition come in offset order; partitions are interleaved as they are fetched. A record
/// that does not decode is printed with its error and tap goes on. A summary goes to stderr.
///
/// Errors: topology; unknown topic ([`find_topic`]); a partition the topic does not have;
/// reading made no progress for 20 s while stopping at the end.
pub async fn tap(a: TapArgs) -> Result<()> {
    let loaded = crate::topology::load_topology(&a.topology, a.bootstrap.as_deref())?;
    let codec = Codec::load(&loaded.avro_dir(), loaded.topology.broker.registry_url.as_deref())?;
    let topology = loaded.topology.clone();
    let scanner = {
        let broker = topology.broker.clone();
        blocking(move || scanner(&broker)).await?
    };
    let scanner = std::sync::Arc::new(scanner);
    let (topic, chosen) = (a.topic.clone(), a.partitions.clone());
    let s = scanner.clone();
    let partitions: Vec<(i32, (i64, i64))> = blocking(move || {
        let n = find_topic(&topic, &topology, &s.broker_topics()?)?;
        let chosen: BTreeSet<i32> = if chosen.is_empty() { (0..n).collect() } else { chosen.into_iter().collect() };
        chosen
            .into_iter()
            .map(|p| {
                if !(0..n).contains(&p) {
                    bail!("{topic} has {n} partition(s) (0..={}); there is no partition {p}", n - 1);
                }
                Ok((p, s.watermarks(&topic, p)?))
            })
            .collect()
    })
    .await?;
    let spans: Vec<Span> = partitions
        .iter()
        .map(|&(p, wm)| Span {
            topic: a.topic.clone(),
            partition: p,
            start: tap_start(&a, wm),
            end: if a.follow { None } else { Some(wm.1) },
        })
        .collect();

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Raw>(1024);
    let reader = tokio::task::spawn_blocking(move || {
        let alive = || !tx.is_closed();
        scanner.scan(&spans, alive, |m| tx.blocking_send(Raw::from_message(m)).is_ok())
    });
    let (mut read, mut printed, mut undecodable) = (0usize, 0usize, 0usize);
    let mut stdout = std::io::stdout().lock();
    let interrupted = {
        let print = async {
            while let Some(r) = rx.recv().await {
                read += 1;
                let decoded = decode(&codec, &r).await;
                undecodable += usize::from(decoded.is_err());
                if !tap_keeps(&a, &r, &decoded) {
                    continue;
                }
                let line = tap_json(&r, &decoded, &codec);
                if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                    return; // stdout closed (`| head`): stop quietly.
                }
                printed += 1;
                if a.limit.is_some_and(|l| printed >= l) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = print => false,
            _ = crate::run::terminate_signal() => true,
        }
    };
    drop(rx);
    let scanned = reader.await.context("reader task panicked")?;
    eprintln!(
        "tap {}: {read} record(s) read, {printed} printed, {undecodable} undecodable{}",
        a.topic,
        if interrupted { " (interrupted)" } else { "" }
    );
    scanned
}
