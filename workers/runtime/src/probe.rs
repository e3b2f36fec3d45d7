//! Does the broker implement Kafka transactions? A one-request probe, independent of librdkafka.
//!
//! The `exactly_once` guarantee needs the transaction APIs of KIP-98 / KIP-447. Some
//! Kafka-compatible brokers lack them (tansu 0.6.0 has no `EndTxn`, see `docs/broker.md`), and a
//! librdkafka producer only finds out at its first `commit_transaction` (`UNSUPPORTED_FEATURE`),
//! after it has already produced. [`broker_supports_transactions`] asks up front instead: it sends
//! one `ApiVersions` request and checks that the broker advertises every API the transactional
//! path uses, so a worker can refuse `exactly_once` at start with a clear message rather than
//! silently downgrading.
//!
//! Wire format, from the Kafka protocol guide (<https://kafka.apache.org/protocol.html>):
//!
//! - every message is framed as `Size => INT32` (big-endian, not counting itself) followed by the
//!   message ("Common Request and Response Structure");
//! - request header v1: `request_api_key INT16, request_api_version INT16, correlation_id INT32,
//!   client_id NULLABLE_STRING` (INT16 length, then UTF-8 bytes);
//! - `ApiVersions Request (Version: 0)` has an empty body (api key 18);
//! - response header v0: `correlation_id INT32` (an `ApiVersions` response always uses header v0,
//!   even for flexible versions, so that any client can read it);
//! - `ApiVersions Response (Version: 0) => error_code INT16 [api_keys]` with
//!   `api_keys => api_key INT16 min_version INT16 max_version INT16` and the array as an INT32
//!   count followed by its elements.
//!
//! Version 0 is used because it is the simplest version brokers have answered since KIP-35
//! (Kafka 0.10) and it is not a flexible version, so no tagged fields or compact arrays are
//! involved.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `client_id` sent in the request header.
pub const CLIENT_ID: &str = "orderflow-probe";

/// Api key of `ApiVersions`.
pub const API_VERSIONS_KEY: i16 = 18;

/// The APIs the transactional producer needs (api key, protocol name), in the order
/// librdkafka uses them: `InitProducerId` (22), `AddPartitionsToTxn` (24), `AddOffsetsToTxn`
/// (25), `EndTxn` (26), `TxnOffsetCommit` (28).
pub const TXN_APIS: [(i16, &str); 5] =
    [(22, "InitProducerId"), (24, "AddPartitionsToTxn"), (25, "AddOffsetsToTxn"), (26, "EndTxn"), (28, "TxnOffsetCommit")];

/// Largest response accepted (a v0 `ApiVersions` response is a few hundred bytes; this only guards
/// against talking to something that is not a Kafka broker).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Whether the broker advertises the transaction APIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnSupport {
    /// True when every API of [`TXN_APIS`] is advertised.
    pub supported: bool,
    /// Protocol names of the transaction APIs the broker does not advertise, in [`TXN_APIS`]
    /// order; empty when `supported`.
    pub missing: Vec<&'static str>,
}

/// One entry of an `ApiVersions` response: the broker supports `api_key` in versions
/// `min_version..=max_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiVersionRange {
    /// Api key (see the protocol guide's "Api Keys" table).
    pub api_key: i16,
    /// Lowest supported version.
    pub min_version: i16,
    /// Highest supported version.
    pub max_version: i16,
}

/// Errors of the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No address to try, or the TCP connection failed.
    #[error("cannot connect to broker {addr}: {source}")]
    Connect {
        /// The `host:port` tried (or the whole bootstrap string when it held none).
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the request or reading the response failed (including the broker closing the
    /// connection mid-response).
    #[error("i/o with broker: {0}")]
    Io(#[from] std::io::Error),
    /// The response is not a well-formed `ApiVersions` v0 response, or carries an error code.
    #[error("kafka protocol: {0}")]
    Protocol(String),
    /// No complete answer within the time allowed (connect, request and response together).
    #[error("no ApiVersions answer from the broker within {0:?}")]
    Timeout(Duration),
}

/// Asks the broker at the first `host:port` of `bootstrap` (a comma-separated
/// `bootstrap.servers` list; a `scheme://` prefix such as `PLAINTEXT://` is ignored) which APIs it
/// supports, with one `ApiVersions` v0 request over plain TCP, and reports whether the transaction
/// APIs of [`TXN_APIS`] are among them.
///
/// Only the first address is tried; TLS/SASL listeners are not supported (the probe would see
/// garbage or a closed connection and return [`ProbeError::Protocol`] / [`ProbeError::Io`]).
/// `timeout` bounds the whole exchange.
///
/// Errors: [`ProbeError::Connect`] (empty list or connection refused), [`ProbeError::Io`],
/// [`ProbeError::Protocol`] (malformed response, wrong correlation id, non-zero error code),
/// [`ProbeError::Timeout`].
pub async fn broker_supports_transactions(bootstrap: &str, timeout: Duration) -> Result<TxnSupport, ProbeError> {
    let addr = first_address(bootstrap).ok_or_else(|| ProbeError::Connect {
        addr: bootstrap.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no host:port in the bootstrap list"),
    })?;
    let apis = tokio::time::timeout(timeout, api_versions(addr)).await.map_err(|_| ProbeError::Timeout(timeout))??;
    Ok(txn_support(&apis))
}

/// The first `host:port` of a comma-separated bootstrap list, without any `scheme://` prefix.
pub fn first_address(bootstrap: &str) -> Option<&str> {
    bootstrap.split(',').map(str::trim).map(|a| a.split_once("://").map_or(a, |(_, rest)| rest)).find(|a| !a.is_empty())
}

/// Connects to `addr` and performs one `ApiVersions` v0 round trip.
async fn api_versions(addr: &str) -> Result<Vec<ApiVersionRange>, ProbeError> {
    let mut stream = TcpStream::connect(addr).await.map_err(|source| ProbeError::Connect { addr: addr.to_string(), source })?;
    let correlation_id = 1;
    stream.write_all(&encode_api_versions_request(correlation_id)).await?;
    stream.flush().await?;
    let size = stream.read_i32().await?;
    if size < 0 || size as usize > MAX_RESPONSE_BYTES {
        return Err(ProbeError::Protocol(format!("response size {size} out of range 0..={MAX_RESPONSE_BYTES}")));
    }
    let mut body = vec![0u8; size as usize];
    stream.read_exact(&mut body).await?;
    decode_api_versions_response(&body, correlation_id)
}

/// Encodes a framed `ApiVersions` v0 request: INT32 size, request header v1 (api key 18,
/// version 0, `correlation_id`, client id [`CLIENT_ID`]) and the empty v0 body.
pub fn encode_api_versions_request(correlation_id: i32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(14 + CLIENT_ID.len());
    msg.extend_from_slice(&API_VERSIONS_KEY.to_be_bytes());
    msg.extend_from_slice(&0i16.to_be_bytes());
    msg.extend_from_slice(&correlation_id.to_be_bytes());
    msg.extend_from_slice(&(CLIENT_ID.len() as i16).to_be_bytes());
    msg.extend_from_slice(CLIENT_ID.as_bytes());
    let mut framed = Vec::with_capacity(4 + msg.len());
    framed.extend_from_slice(&(msg.len() as i32).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed
}

/// Decodes an `ApiVersions` v0 response *without* its INT32 size prefix: response header v0
/// (correlation id, which must equal `expected_correlation_id`), error code (must be 0) and the
/// array of api version ranges. Trailing bytes are rejected.
pub fn decode_api_versions_response(body: &[u8], expected_correlation_id: i32) -> Result<Vec<ApiVersionRange>, ProbeError> {
    let mut r = Reader { buf: body, pos: 0 };
    let correlation_id = r.i32("correlation_id")?;
    if correlation_id != expected_correlation_id {
        return Err(ProbeError::Protocol(format!("correlation id {correlation_id} in the response, {expected_correlation_id} expected")));
    }
    let error_code = r.i16("error_code")?;
    if error_code != 0 {
        // 35 = UNSUPPORTED_VERSION: the broker does not even accept ApiVersions v0.
        return Err(ProbeError::Protocol(format!("ApiVersions error code {error_code}")));
    }
    let count = r.i32("api_keys length")?;
    if count < 0 {
        return Err(ProbeError::Protocol(format!("api_keys length {count} (null array)")));
    }
    let count = count as usize;
    if count.saturating_mul(6) > r.remaining() {
        return Err(ProbeError::Protocol(format!(
            "api_keys length {count} needs {} bytes, {} left",
            count.saturating_mul(6),
            r.remaining()
        )));
    }
    let mut apis = Vec::with_capacity(count);
    for _ in 0..count {
        apis.push(ApiVersionRange { api_key: r.i16("api_key")?, min_version: r.i16("min_version")?, max_version: r.i16("max_version")? });
    }
    if r.remaining() != 0 {
        return Err(ProbeError::Protocol(format!("{} trailing bytes after the v0 response", r.remaining())));
    }
    Ok(apis)
}

/// Which of [`TXN_APIS`] `apis` lacks. An entry counts as advertised when its key is present
/// with `min_version <= max_version`.
pub fn txn_support(apis: &[ApiVersionRange]) -> TxnSupport {
    let missing: Vec<&'static str> = TXN_APIS
        .iter()
        .filter(|(key, _)| !apis.iter().any(|a| a.api_key == *key && a.min_version <= a.max_version))
        .map(|(_, name)| *name)
        .collect();
    TxnSupport { supported: missing.is_empty(), missing }
}

/// Big-endian reader over a response body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take<const N: usize>(&mut self, field: &str) -> Result<[u8; N], ProbeError> {
        let end = self.pos + N;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| ProbeError::Protocol(format!("response truncated at byte {} reading {field}", self.pos)))?;
        self.pos = end;
        Ok(bytes.try_into().expect("slice of length N"))
    }

    fn i16(&mut self, field: &str) -> Result<i16, ProbeError> {
        self.take::<2>(field).map(i16::from_be_bytes)
    }

    fn i32(&mut self, field: &str) -> Result<i32, ProbeError> {
        self.take::<4>(field).map(i32::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a v0 response body (no size prefix).
    fn response(correlation_id: i32, error_code: i16, apis: &[(i16, i16, i16)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&correlation_id.to_be_bytes());
        b.extend_from_slice(&error_code.to_be_bytes());
        b.extend_from_slice(&(apis.len() as i32).to_be_bytes());
        for (k, min, max) in apis {
            b.extend_from_slice(&k.to_be_bytes());
            b.extend_from_slice(&min.to_be_bytes());
            b.extend_from_slice(&max.to_be_bytes());
        }
        b
    }

    #[test]
    fn request_bytes() {
        let got = encode_api_versions_request(7);
        let mut want = vec![
            0, 0, 0, 25, // size: 2 + 2 + 4 + 2 + 15
            0, 18, // api key
            0, 0, // api version
            0, 0, 0, 7, // correlation id
            0, 15, // client id length
        ];
        want.extend_from_slice(b"orderflow-probe");
        assert_eq!(got, want);
    }

    #[test]
    fn decodes_ranges() {
        let body = response(7, 0, &[(0, 0, 9), (18, 0, 3), (26, 0, 3)]);
        let apis = decode_api_versions_response(&body, 7).unwrap();
        assert_eq!(
            apis,
            vec![
                ApiVersionRange { api_key: 0, min_version: 0, max_version: 9 },
                ApiVersionRange { api_key: 18, min_version: 0, max_version: 3 },
                ApiVersionRange { api_key: 26, min_version: 0, max_version: 3 },
            ]
        );
    }

    #[test]
    fn all_txn_apis_supported() {
        let body = response(1, 0, &[(0, 0, 9), (22, 0, 4), (24, 0, 3), (25, 0, 3), (26, 0, 3), (28, 0, 3)]);
        let s = txn_support(&decode_api_versions_response(&body, 1).unwrap());
        assert_eq!(s, TxnSupport { supported: true, missing: vec![] });
    }

    #[test]
    fn reports_missing_apis_in_order() {
        // What tansu 0.6.0 looks like: no EndTxn. Also an entry with an empty range counts as absent.
        let body = response(1, 0, &[(22, 0, 4), (24, 0, 3), (25, 3, 2), (28, 0, 3)]);
        let s = txn_support(&decode_api_versions_response(&body, 1).unwrap());
        assert_eq!(s, TxnSupport { supported: false, missing: vec!["AddOffsetsToTxn", "EndTxn"] });
        let none = txn_support(&[]);
        assert_eq!(none.missing, vec!["InitProducerId", "AddPartitionsToTxn", "AddOffsetsToTxn", "EndTxn", "TxnOffsetCommit"]);
    }

    #[test]
    fn rejects_bad_responses() {
        let wrong_id = decode_api_versions_response(&response(2, 0, &[]), 1).unwrap_err();
        assert!(matches!(wrong_id, ProbeError::Protocol(ref m) if m.contains("correlation id 2")), "{wrong_id}");
        let err = decode_api_versions_response(&response(1, 35, &[]), 1).unwrap_err();
        assert!(matches!(err, ProbeError::Protocol(ref m) if m.contains("35")), "{err}");
        let mut truncated = response(1, 0, &[(22, 0, 4)]);
        truncated.pop();
        assert!(matches!(decode_api_versions_response(&truncated, 1), Err(ProbeError::Protocol(_))));
        let mut huge = response(1, 0, &[]);
        huge[6..10].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(decode_api_versions_response(&huge, 1), Err(ProbeError::Protocol(_))));
        let mut trailing = response(1, 0, &[(22, 0, 4)]);
        trailing.push(0);
        assert!(matches!(decode_api_versions_response(&trailing, 1), Err(ProbeError::Protocol(_))));
        assert!(matches!(decode_api_versions_response(&[], 1), Err(ProbeError::Protocol(_))));
    }

    #[test]
    fn bootstrap_parsing() {
        assert_eq!(first_address("a:1,b:2"), Some("a:1"));
        assert_eq!(first_address(" , PLAINTEXT://b:2 "), Some("b:2"));
        assert_eq!(first_address(" ,"), None);
    }

    /// A fake broker on a local port that answers one request with `reply` (framed).
    async fn fake_broker(reply: Option<Vec<u8>>) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let size = s.read_i32().await.unwrap();
            let mut req = vec![0u8; size as usize];
            s.read_exact(&mut req).await.unwrap();
            match reply {
                Some(body) => {
                    s.write_all(&(body.len() as i32).to_be_bytes()).await.unwrap();
                    s.write_all(&body).await.unwrap();
                }
                None => tokio::time::sleep(Duration::from_secs(5)).await,
            }
            req
        });
        (addr, task)
    }

    #[tokio::test]
    async fn round_trip_with_fake_broker() {
        let (addr, task) = fake_broker(Some(response(1, 0, &[(22, 0, 4), (24, 0, 3), (25, 0, 3), (28, 0, 3)]))).await;
        let s = broker_supports_transactions(&format!("{addr},127.0.0.1:1"), Duration::from_secs(5)).await.unwrap();
        assert_eq!(s, TxnSupport { supported: false, missing: vec!["EndTxn"] });
        let req = task.await.unwrap();
        assert_eq!(req, encode_api_versions_request(1)[4..]);
    }

    #[tokio::test]
    async fn times_out_on_silent_broker() {
        let (addr, _task) = fake_broker(None).await;
        let err = broker_supports_transactions(&addr, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(_)), "{err}");
    }

    #[tokio::test]
    async fn connect_errors() {
        let err = broker_supports_transactions("", Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = broker_supports_transactions(&format!("127.0.0.1:{port}"), Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
    }

    /// librdkafka's mock cluster implements the transactional APIs and advertises them.
    #[tokio::test]
    async fn mock_cluster_advertises_transactions() {
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        let s = broker_supports_transactions(&mock.bootstrap_servers(), Duration::from_secs(10)).await.unwrap();
        assert_eq!(s, TxnSupport { supported: true, missing: vec![] });
        // And the probe sees an API the mock is told to disable.
        mock.apiversion(rdkafka::types::RDKafkaApiKey::EndTxn, None, None).unwrap();
        let s = broker_supports_transactions(&mock.bootstrap_servers(), Duration::from_secs(10)).await.unwrap();
        assert_eq!(s, TxnSupport { supported: false, missing: vec!["EndTxn"] });
    }

    /// Against a real tansu broker, when one is running: set `ORDERFLOW_PROBE_BOOTSTRAP` to its
    /// address (e.g. from `scripts/broker.sh start`). tansu 0.6.0 lacks `EndTxn`.
    #[tokio::test]
    async fn tansu_lacks_end_txn() {
        let Ok(bootstrap) = std::env::var("ORDERFLOW_PROBE_BOOTSTRAP") else {
            eprintln!("ORDERFLOW_PROBE_BOOTSTRAP not set; skipping");
            return;
        };
        let s = broker_supports_transactions(&bootstrap, Duration::from_secs(10)).await.unwrap();
        eprintln!("{bootstrap}: {s:?}");
        assert!(!s.supported);
        assert!(s.missing.contains(&"EndTxn"), "{s:?}");
    }
}
