//! Worker child processes as `bench saga` and `bench recovery` see them: free ports, `/readyz`,
//! `/metrics` samples and log tails.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result};

// ------------------------------------------------------------------ worker processes

// Shared by `bench saga` and `bench recovery`, which run workers as child processes and read
// their `/readyz`, `/metrics` and logs.

/// A free TCP port on 127.0.0.1 (for a child's `--metrics-addr`).
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?.local_addr()?.port())
}

/// `GET path` on 127.0.0.1:`port`: (status, body), `None` when it cannot connect or does not
/// answer within `timeout`.
pub(crate) async fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        parse_http(&String::from_utf8_lossy(&buf))
    };
    tokio::time::timeout(timeout, get).await.ok().flatten()
}

/// (status, body) of an HTTP/1.x response (the body as sent: `Connection: close` answers are
/// not chunked by axum for these small bodies; a chunked one keeps its chunk sizes, which the
/// Prometheus parser skips as unparsable lines).
pub(crate) fn parse_http(text: &str) -> Option<(u16, String)> {
    let status = text.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// The last `n` lines of a log, for error messages.
pub(crate) fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Splits a Prometheus sample line into (name, labels, value); `None` for comments, blank and
/// unparsable lines.
pub(crate) fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let close = r.find('}')?;
        for pair in r[..close].split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=')?;
            labels.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
        rest = &r[close + 1..];
    }
    Some((name, labels, rest.split_whitespace().next()?.parse().ok()?))
}

/// The samples of `name` in a Prometheus text exposition: (labels, value).
pub(crate) fn metric_samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines().filter_map(parse_sample).filter(|(n, _, _)| *n == name).map(|(_, l, v)| (l, v)).collect()
}

/// Σ of every sample of `name` (0 when none).
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    metric_samples(text, name).iter().map(|(_, v)| v).sum()
}

/// Σ of the samples of `name` per value of `label`.
pub(crate) fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (labels, v) in metric_samples(text, name) {
        *out.entry(labels.get(label).cloned().unwrap_or_default()).or_default() += v;
    }
    out
}

/// Creates the benchmark's own topics `names` (not in the topology: the raw baseline's source and
/// sink, the Kafka Streams peer's outputs) with `partitions` partitions, replication 1; one that
/// exists already is left as it is.
///
/// Errors: the admin client, or the broker refusing a topic for another reason.
pub(crate) async fn create_bench_topics(
    broker: &orderflow_runtime::topology::BrokerConfig,
    names: &[String],
    partitions: i32,
) -> Result<()> {
    use orderflow_runtime::kafka::{client_config, Side};
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = client_config(broker, Side::Admin).create()?;
    let topics: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await? {
        match r {
            Err((topic, code)) if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists => {
                anyhow::bail!("cannot create {topic}: {code}")
            }
            _ => {}
        }
    }
    Ok(())
}
