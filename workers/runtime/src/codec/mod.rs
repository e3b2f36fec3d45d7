//! Avro codec of the saga events: [`Event`] ⇄ Kafka record value bytes.
//!
//! Two wire formats are written and recognised by their first byte(s):
//!
//! * **Avro single-object encoding** (Avro specification 1.11+, section "Single-object
//!   encoding"), used when no schema registry is configured:
//!
//!   ```text
//!   offset 0..2   C3 01                      marker (format version 1)
//!   offset 2..10  fingerprint, little-endian CRC-64-AVRO (Rabin) of the schema's
//!                 Parsing Canonical Form (spec: "Schema Fingerprints")
//!   offset 10..   Avro binary encoding of the datum
//!   ```
//!
//! * **Confluent wire format**, used when a schema registry URL is configured:
//!
//!   ```text
//!   offset 0      00                         magic byte
//!   offset 1..5   schema id, big-endian u32 (as assigned by the schema registry)
//!   offset 5..    Avro binary encoding of the datum
//!   ```
//!
//!   Schemas are registered from the `.avsc` files under subject
//!   `TopicRecordNameStrategy` = `<topic>-orderflow.events.<Name>`.
//!
//! The schemas come from `avro/<Name>.avsc`, one per [`Event::SCHEMA_NAMES`] entry. An event is
//! turned into an Avro value with `apache_avro::to_value` and resolved against its schema, so
//! `Option<T>` becomes the union `["null", T]` and `i64` timestamps become `timestamp-millis`.
//! Decoding goes Avro value → JSON (Avro field names) → [`Event::from_json`].
//!
//! Encoding is deterministic: the same event always gives the same bytes (for a given schema id
//! in the Confluent format).
//!
//! # Schema evolution
//!
//! A new version of `avro/<Name>.avsc` must stay able to read data written with every earlier
//! version (Avro schema resolution, "BACKWARD" compatibility): in practice it may only add
//! fields that have a default (or make other changes under which the new schema still reads
//! the old data, such as widening `int` to `long`). The previous version's file moves, unchanged,
//! to `avro/history/<Name>.v<N>.avsc` (`N` = 1, 2, ...: the version it was). The codec always
//! writes the current version, and reads records written with the current version or any listed
//! one: a single-object payload carrying an old fingerprint is read with that old (writer)
//! schema and then resolved against the current schema, so fields added since then get their
//! defaults. [`Codec::load`] refuses (with [`CodecError::Schema`] naming the file) a history
//! file whose name is not `<Name>.v<N>.avsc` for a known event, whose record is named
//! differently, whose fingerprint is not unique, or that the current schema cannot read. With a
//! schema registry, its BACKWARD compatibility check enforces the same rule at registration,
//! and every record carries the id of the schema it was written with.

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use orderflow_api::Event;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};

use crate::deadletter::DeadLetterClass;

pub mod canonical;

/// The two marker bytes that open an Avro single-object encoded payload (format version 1).
pub const SINGLE_OBJECT_MARKER: [u8; 2] = [0xC3, 0x01];
/// Length of the single-object header: marker (2) + little-endian fingerprint (8).
pub const SINGLE_OBJECT_HEADER_LEN: usize = 10;
/// The magic byte that opens a Confluent wire-format payload.
pub const CONFLUENT_MAGIC: u8 = 0x00;
/// Length of the Confluent header: magic byte (1) + big-endian schema id (4).
pub const CONFLUENT_HEADER_LEN: usize = 5;
/// Avro namespace of every event record (`orderflow.events.<Name>` is the full name).
pub const EVENT_NAMESPACE: &str = "orderflow.events";
/// Subdirectory of the Avro directory holding the previous schema versions,
/// `history/<Name>.v<N>.avsc` (decode-only; see "Schema evolution").
pub const HISTORY_DIR: &str = "history";

/// Timeout of each schema registry HTTP call.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that can go wrong while loading schemas, encoding or decoding.
///
/// [`CodecError::is_permanent`] tells a consumer whether retrying the same bytes can help:
/// only [`CodecError::Registry`] is transient.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The payload starts with neither the single-object marker `C3 01` nor the Confluent
    /// magic byte `00`.
    #[error("not Avro: the payload starts with neither the single-object marker C3 01 nor the Confluent magic byte 00")]
    NotAvro,
    /// The payload is shorter than the header of its format (10 bytes for single-object, 5 for
    /// Confluent), or empty.
    #[error("truncated Avro payload: shorter than the single-object (10 bytes) or Confluent (5 bytes) header")]
    Truncated,
    /// A single-object payload carries a fingerprint that none of the loaded schemas has.
    #[error("unknown Avro schema fingerprint {0:#018x} (CRC-64-AVRO of no loaded schema)")]
    UnknownFingerprint(u64),
    /// A Confluent payload carries a schema id that the registry does not know.
    #[error("unknown schema registry id {0}")]
    UnknownSchemaId(u32),
    /// A Confluent payload was met (or a registry operation asked for) but the codec was loaded
    /// without a schema registry URL (or, for the sync path, the id is not cached locally).
    #[error("Confluent-framed Avro payload but no schema registry is configured (or reachable from the sync path)")]
    NoRegistry,
    /// The header was fine but the datum does not decode with its schema (truncated datum,
    /// trailing bytes, bad varint, value that does not fit the event struct, ...).
    #[error("malformed {schema} payload: {message}")]
    Malformed {
        /// Avro record name (or registry full name) of the writer schema.
        schema: String,
        /// What went wrong.
        message: String,
    },
    /// An `.avsc` file is missing or does not parse, or a file under `history/` is misnamed,
    /// duplicates a fingerprint or cannot be read by the current schema.
    #[error("schema file {file}: {message}")]
    Schema {
        /// Path of the schema file.
        file: String,
        /// What went wrong.
        message: String,
    },
    /// The schema registry failed (network, timeout, 5xx, ...). Transient.
    #[error("schema registry error: {0}")]
    Registry(String),
    /// An event could not be encoded with its schema (or the registry rejected the schema as
    /// incompatible/invalid).
    #[error("cannot encode {schema}: {message}")]
    Encode {
        /// Avro record name of the event.
        schema: String,
        /// What went wrong.
        message: String,
    },
}

impl CodecError {
    /// `true` when retrying the same operation with the same input cannot succeed (poison
    /// message, configuration error); `false` only for [`CodecError::Registry`], which may heal.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, CodecError::Registry(_))
    }

    /// The dead-letter error class of a decode failure (`orderflow.dlq.error-class` header and
    /// the `error_class` label of `orderflow_dlq_records_total`): `not_avro`, `truncated` (a
    /// header or a datum cut short, or no value at all), `unknown_schema` (fingerprint or
    /// registry id unknown, or Confluent framing without a registry), `malformed` (the datum
    /// does not decode with its schema), `registry_unavailable` (transient) or `codec` (schema
    /// files or encoding: not a property of the record).
    pub fn class(&self) -> &'static str {
        self.dead_letter_class().as_str()
    }

    /// [`CodecError::class`] as the [`DeadLetterClass`] enum.
    pub fn dead_letter_class(&self) -> DeadLetterClass {
        match self {
            CodecError::NotAvro => DeadLetterClass::NotAvro,
            CodecError::Truncated => DeadLetterClass::Truncated,
            CodecError::UnknownFingerprint(_) | CodecError::UnknownSchemaId(_) | CodecError::NoRegistry => DeadLetterClass::UnknownSchema,
            CodecError::Malformed { message, .. } if is_eof(message) => DeadLetterClass::Truncated,
            CodecError::Malformed { .. } => DeadLetterClass::Malformed,
            CodecError::Registry(_) => DeadLetterClass::RegistryUnavailable,
            CodecError::Schema { .. } | CodecError::Encode { .. } => DeadLetterClass::Codec,
        }
    }
}

/// Whether an Avro read error says the datum ended early (I/O `UnexpectedEof` as apache-avro
/// words it).
fn is_eof(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("fill whole buffer") || m.contains("unexpectedeof") || m.contains("unexpected end")
}

/// One loaded event schema.
#[derive(Debug)]
struct Entry {
    /// Record name = variant name = file stem.
    name: &'static str,
    /// `orderflow.events.<Name>` (as declared in the file).
    full_name: String,
    /// The `.avsc` text, registered as is.
    raw: String,
    schema: Schema,
    /// CRC-64-AVRO of the Parsing Canonical Form ([`canonical::fingerprint`], spec-exact).
    fingerprint: u64,
    /// The fingerprint apache-avro 0.22 computed ([`legacy_fingerprint`]), written by orderflow
    /// before issue 14; decode-only.
    legacy_fingerprint: u64,
    /// Earlier versions (`history/<Name>.v<N>.avsc`), decode-only, ordered by version.
    history: Vec<OldVersion>,
}

/// A previous version of an event schema, only used to read records written with it.
#[derive(Debug)]
struct OldVersion {
    /// `N` of `history/<Name>.v<N>.avsc`.
    version: u32,
    schema: Schema,
    /// CRC-64-AVRO of the Parsing Canonical Form ([`canonical::fingerprint`], spec-exact).
    fingerprint: u64,
    /// apache-avro 0.22's fingerprint of this version ([`legacy_fingerprint`]).
    legacy_fingerprint: u64,
}

/// The writer schema a single-object fingerprint stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WriterRef {
    /// Index of the event's entry (current schema).
    entry: usize,
    /// `None` for the current schema, else the index into that entry's `history`.
    old: Option<usize>,
    /// The fingerprint is apache-avro 0.22's, not the specification's (written before issue 14).
    legacy: bool,
}

/// Schema registry clients and the ids this codec already knows.
struct Registry {
    url: String,
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    /// Registry id → index of the local entry whose exact schema was registered under it.
    known_ids: RwLock<HashMap<u32, usize>>,
}

/// The Avro codec of the saga events.
///
/// Built once by [`Codec::load`]; `Send + Sync`, share it with `Arc<Codec>`. All methods take
/// `&self`; the registry clients cache schema ids internally.
pub struct Codec {
    entries: Vec<Entry>,
    by_name: HashMap<&'static str, usize>,
    by_full_name: HashMap<String, usize>,
    /// Fingerprints of the current schemas and of every history version.
    by_fingerprint: HashMap<u64, WriterRef>,
    registry: Option<Registry>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("schemas", &self.entries.iter().map(|e| format!("{}={:016x}", e.name, e.fingerprint)).collect::<Vec<_>>())
            .field(
                "history",
                &self
                    .entries
                    .iter()
                    .flat_map(|e| e.history.iter().map(move |h| format!("{}.v{}={:016x}", e.name, h.version, h.fingerprint)))
                    .collect::<Vec<_>>(),
            )
            .field("registry", &self.registry.as_ref().map(|r| &r.url))
            .finish()
    }
}

/// The fingerprint orderflow wrote before issue 14: CRC-64-AVRO of apache-avro 0.22's
/// `canonical_form`, which keeps a logical type's underlying type as `{"type":"long"}` where the
/// specification has `"long"` (so it differs from every other language for any schema with a
/// logical type). Only read, never written: records carrying it are still in topics.
pub fn legacy_fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    let mut le = [0u8; 8];
    le.copy_from_slice(&fp.bytes[..8]);
    u64::from_le_bytes(le)
}

fn srce_message(e: &SRCError) -> String {
    match &e.cause {
        Some(c) => format!("{} ({c})", e.error),
        None => e.error.clone(),
    }
}

fn is_status(e: &SRCError, status: &str) -> bool {
    e.error.contains(&format!("status {status}"))
}

impl Codec {
    /// Loads `avro_dir/<Name>.avsc` for every name in [`Event::SCHEMA_NAMES`] and, when
    /// `registry_url` is given (e.g. `http://localhost:8081`), prepares the schema registry
    /// clients (no network call happens here; schemas are registered on first encode).
    ///
    /// Each schema must be a record named `<Name>`; its CRC-64-AVRO fingerprint is computed from
    /// its Parsing Canonical Form.
    ///
    /// Previous versions are loaded too, decode-only (see "Schema evolution" in the module
    /// docs): every file of `avro_dir/history/` (the directory may be absent) must be named
    /// `<Name>.v<N>.avsc`, `<Name>` one of [`Event::SCHEMA_NAMES`] and `N` ≥ 1 without leading
    /// zeros, hold a record of the same full name as `<Name>.avsc`, and be readable by the
    /// current schema (`SchemaCompatibility::can_read(old, current)` fully compatible). Hidden
    /// files (name starting with `.`) are skipped; anything else is an error, so a typo cannot
    /// silently drop a version. History versions are never used for encoding, nor returned by
    /// [`Codec::schema`] / [`Codec::fingerprint`].
    ///
    /// Errors: [`CodecError::Schema`] naming the file when it is missing, unreadable, not valid
    /// Avro, not a record of the expected name, when two schemas (current or history) share a
    /// fingerprint, or when a history file is misnamed or incompatible with the current schema;
    /// [`CodecError::Registry`] when the registry client cannot be built.
    pub fn load(avro_dir: &Path, registry_url: Option<&str>) -> Result<Codec, CodecError> {
        let mut entries = Vec::with_capacity(Event::SCHEMA_NAMES.len());
        let mut by_name = HashMap::new();
        let mut by_full_name = HashMap::new();
        let mut by_fingerprint: HashMap<u64, WriterRef> = HashMap::new();
        for &name in Event::SCHEMA_NAMES {
            let path = avro_dir.join(format!("{name}.avsc"));
            let file = path.display().to_string();
            let schema_err = |message: String| CodecError::Schema { file: file.clone(), message };
            let raw = std::fs::read_to_string(&path).map_err(|e| schema_err(format!("cannot read: {e}")))?;
            let schema = Schema::parse_str(&raw).map_err(|e| schema_err(format!("invalid Avro schema: {e}")))?;
            let full_name = match &schema {
                Schema::Record(r) => {
                    if r.name.name() != name {
                        return Err(schema_err(format!("record is named {} but the file stem is {name}", r.name.name())));
                    }
                    r.name.fullname(None)
                }
                _ => return Err(schema_err("top-level schema is not a record".to_string())),
            };
            let fingerprint = canonical::fingerprint(&raw).map_err(|e| schema_err(format!("no Parsing Canonical Form: {e}")))?;
            let legacy_fingerprint = legacy_fingerprint(&schema);
            let index = entries.len();
            for (fp, legacy) in [(fingerprint, false), (legacy_fingerprint, true)] {
                match by_fingerprint.get(&fp) {
                    Some(other) if other.entry == index => {} // no logical type: both are equal
                    Some(other) => {
                        let other: &Entry = &entries[other.entry];
                        return Err(schema_err(format!("same fingerprint {fp:#018x} as {}", other.name)));
                    }
                    None => {
                        by_fingerprint.insert(fp, WriterRef { entry: index, old: None, legacy });
                    }
                }
            }
            by_name.insert(name, index);
            by_full_name.insert(full_name.clone(), index);
            entries.push(Entry { name, full_name, raw, schema, fingerprint, legacy_fingerprint, history: Vec::new() });
        }
        load_history(&avro_dir.join(HISTORY_DIR), &mut entries, &by_name, &mut by_fingerprint)?;
        let registry = match registry_url {
            None => None,
            Some(url) => {
                let url = url.trim_end_matches('/').to_string();
                let settings = |u: &str| {
                    SrSettings::new_builder(u.to_string())
                        .set_timeout(REGISTRY_TIMEOUT)
                        .build()
                        .map_err(|e| CodecError::Registry(srce_message(&e)))
                };
                Some(Registry {
                    encoder: AvroEncoder::new(settings(&url)?),
                    decoder: AvroDecoder::new(settings(&url)?),
                    url,
                    known_ids: RwLock::new(HashMap::new()),
                })
            }
        };
        Ok(Codec { entries, by_name, by_full_name, by_fingerprint, registry })
    }

    /// `true` when the codec was loaded with a schema registry URL (Confluent format).
    pub fn has_registry(&self) -> bool {
        self.registry.is_some()
    }

    /// The parsed schema of the record `name` (e.g. `"OrderCreated"`), if loaded.
    pub fn schema(&self, name: &str) -> Option<&Schema> {
        self.by_name.get(name).map(|&i| &self.entries[i].schema)
    }

    /// The CRC-64-AVRO fingerprint of record `name`'s canonical form, as written
    /// (little-endian) in bytes 2..10 of a single-object payload.
    pub fn fingerprint(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).map(|&i| self.entries[i].fingerprint)
    }

    /// The previous versions of record `name` loaded from `history/<name>.v<N>.avsc`, as
    /// `(N, fingerprint)` pairs ordered by `N`. These fingerprints are accepted by the decoders
    /// but never written. Empty for an unknown name or a schema without history.
    pub fn history_fingerprints(&self, name: &str) -> Vec<(u32, u64)> {
        self.by_name.get(name).map(|&i| self.entries[i].history.iter().map(|h| (h.version, h.fingerprint)).collect()).unwrap_or_default()
    }

    /// The fingerprints orderflow wrote for record `name` before issue 14 (apache-avro 0.22's,
    /// see [`legacy_fingerprint`]): `(None, current)` then `(Some(N), history version N)`, only
    /// where they differ from the spec-exact ones. Accepted by the decoders, never written.
    pub fn legacy_fingerprints(&self, name: &str) -> Vec<(Option<u32>, u64)> {
        let Some(&i) = self.by_name.get(name) else { return Vec::new() };
        let e = &self.entries[i];
        std::iter::once((None, e.fingerprint, e.legacy_fingerprint))
            .chain(e.history.iter().map(|h| (Some(h.version), h.fingerprint, h.legacy_fingerprint)))
            .filter(|(_, spec, legacy)| spec != legacy)
            .map(|(v, _, legacy)| (v, legacy))
            .collect()
    }

    /// `true` when `bytes` is a single-object payload whose fingerprint is one orderflow wrote
    /// before issue 14 ([`legacy_fingerprint`]): such records still decode, and the workers count
    /// them (`orderflow_legacy_fingerprint_records_total`) so an operator knows when the last one
    /// has aged out. A header lookup, no decoding.
    pub fn is_legacy(&self, bytes: &[u8]) -> bool {
        bytes.len() >= SINGLE_OBJECT_HEADER_LEN
            && bytes[..2] == SINGLE_OBJECT_MARKER
            && self.by_fingerprint.get(&u64::from_le_bytes(bytes[2..10].try_into().expect("8 bytes"))).is_some_and(|w| w.legacy)
    }

    fn entry_of(&self, event: &Event) -> Result<&Entry, CodecError> {
        let name = event.schema_name();
        self.by_name
            .get(name)
            .map(|&i| &self.entries[i])
            .ok_or_else(|| CodecError::Encode { schema: name.to_string(), message: "no schema loaded for this event".to_string() })
    }

    /// The Avro binary encoding of `event` (no header), serialized straight against its schema
    /// (apache-avro's schema-aware serializer: union branches and logical types are picked from
    /// the schema as the fields are written). Issue 18's profile: the former path, event → Avro
    /// `Value` → `resolve` against the schema → validate → encode, took ~15 % of the stock
    /// reserver's CPU; this one writes the same bytes (`codec::tests`).
    fn datum(entry: &Entry, event: &Event) -> Result<Vec<u8>, CodecError> {
        let err = |message: String| CodecError::Encode { schema: entry.name.to_string(), message };
        let writer = GenericDatumWriter::builder(&entry.schema).build().map_err(|e| err(format!("schema: {e}")))?;
        event_datum(&writer, event).map_err(|e| err(format!("does not fit the schema: {e}")))
    }

    /// Encodes `event` in Avro single-object encoding: `C3 01`, the 8-byte little-endian
    /// CRC-64-AVRO fingerprint, the Avro binary datum. Sync, no registry involved.
    ///
    /// Errors: [`CodecError::Encode`] when the event does not fit its schema.
    pub fn encode_local(&self, event: &Event) -> Result<Vec<u8>, CodecError> {
        let entry = self.entry_of(event)?;
        let datum = Self::datum(entry, event)?;
        let mut out = Vec::with_capacity(SINGLE_OBJECT_HEADER_LEN + datum.len());
        out.extend_from_slice(&SINGLE_OBJECT_MARKER);
        out.extend_from_slice(&entry.fingerprint.to_le_bytes());
        out.extend_from_slice(&datum);
        Ok(out)
    }

    /// Encodes `event` for `topic`.
    ///
    /// * Without registry: single-object encoding, see [`Codec::encode_local`] (`topic` unused).
    /// * With registry: Confluent wire format `00`, 4-byte big-endian schema id, Avro binary
    ///   datum. The `.avsc` text is registered (idempotently; cached after the first call) under
    ///   subject `<topic>-orderflow.events.<Name>` (TopicRecordNameStrategy).
    ///
    /// Errors: [`CodecError::Encode`] when the event does not fit its schema or the registry
    /// rejects the schema (HTTP 409 incompatible / 422 invalid); [`CodecError::Registry`] for
    /// other registry failures (transient: retry).
    pub async fn encode(&self, topic: &str, event: &Event) -> Result<Vec<u8>, CodecError> {
        let Some(registry) = &self.registry else {
            return self.encode_local(event);
        };
        let entry = self.entry_of(event)?;
        let datum = Self::datum(entry, event)?;
        let supplied = SuppliedSchema::new(Some(entry.full_name.clone()), SchemaType::Avro, entry.raw.clone());
        let strategy = SubjectNameStrategy::TopicRecordNameStrategyWithSchema(topic.to_string(), supplied);
        let subject = strategy.get_subject().map_err(|e| CodecError::Registry(srce_message(&e)))?;
        let registered = match registry.encoder.get_schema_and_id(&subject, strategy).await {
            Ok(s) => s,
            Err(e) => {
                // Non-retriable failures are cached by the client; drop them so a retry
                // really asks the registry again.
                registry.encoder.remove_errors_from_cache();
                return Err(if is_status(&e, "409") || is_status(&e, "422") {
                    CodecError::Encode {
                        schema: entry.name.to_string(),
                        message: format!("schema registry rejected the schema for subject {subject}: {}", srce_message(&e)),
                    }
                } else {
                    CodecError::Registry(format!("registering {subject}: {}", srce_message(&e)))
                });
            }
        };
        let index = self.by_name[entry.name];
        let cached = registry.known_ids.read().unwrap_or_else(|p| p.into_inner()).get(&registered.id) == Some(&index);
        if !cached {
            registry.known_ids.write().unwrap_or_else(|p| p.into_inner()).insert(registered.id, index);
        }
        let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + datum.len());
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&registered.id.to_be_bytes());
        out.extend_from_slice(&datum);
        Ok(out)
    }

    /// The record name of a single-object payload (from its fingerprint), without decoding the
    /// datum. `None` for other formats, truncated headers and unknown fingerprints.
    pub fn schema_name_of(&self, bytes: &[u8]) -> Option<&str> {
        if bytes.len() < SINGLE_OBJECT_HEADER_LEN || bytes[..2] != SINGLE_OBJECT_MARKER {
            return None;
        }
        let fp = u64::from_le_bytes(bytes[2..10].try_into().ok()?);
        self.by_fingerprint.get(&fp).map(|w| self.entries[w.entry].name)
    }

    /// Sync decode, without any network call.
    ///
    /// Handles single-object payloads (`C3 01` + fingerprint of the current schema or of a
    /// history version, resolved to the current schema so added fields get their defaults) and
    /// Confluent payloads whose
    /// schema id this codec registered itself (by an earlier [`Codec::encode`]) or already
    /// resolved (by an earlier [`Codec::decode`]).
    ///
    /// Errors: [`CodecError::Truncated`] (empty or shorter than the header),
    /// [`CodecError::NotAvro`], [`CodecError::UnknownFingerprint`],
    /// [`CodecError::NoRegistry`] (Confluent payload with an id not cached locally),
    /// [`CodecError::Malformed`] (datum does not decode or does not fit the event).
    pub fn decode_local(&self, bytes: &[u8]) -> Result<Event, CodecError> {
        match bytes.first() {
            None => Err(CodecError::Truncated),
            Some(&0xC3) => {
                if bytes.len() >= 2 && bytes[1] != SINGLE_OBJECT_MARKER[1] {
                    return Err(CodecError::NotAvro);
                }
                if bytes.len() < SINGLE_OBJECT_HEADER_LEN {
                    return Err(CodecError::Truncated);
                }
                let fp = u64::from_le_bytes(bytes[2..10].try_into().expect("8 bytes"));
                let &writer = self.by_fingerprint.get(&fp).ok_or(CodecError::UnknownFingerprint(fp))?;
                let entry = &self.entries[writer.entry];
                let schema = match writer.old {
                    None => &entry.schema,
                    Some(old) => &entry.history[old].schema,
                };
                decode_datum(entry, schema, &bytes[SINGLE_OBJECT_HEADER_LEN..])
            }
            Some(&CONFLUENT_MAGIC) => {
                let (id, datum) = split_confluent(bytes)?;
                let registry = self.registry.as_ref().ok_or(CodecError::NoRegistry)?;
                let known = registry.known_ids.read().unwrap_or_else(|p| p.into_inner()).get(&id).copied();
                match known {
                    Some(index) => {
                        let entry = &self.entries[index];
                        decode_datum(entry, &entry.schema, datum)
                    }
                    None => Err(CodecError::NoRegistry),
                }
            }
            Some(_) => Err(CodecError::NotAvro),
        }
    }

    /// Decodes a payload in either format, recognised by its first byte(s):
    ///
    /// * `C3 01` → single-object, schema looked up by fingerprint, current or history version
    ///   ([`Codec::decode_local`]);
    /// * `00` → Confluent: the writer schema is fetched from the registry by id (cached), and
    ///   the datum is resolved (Avro schema resolution) to the local schema of the same record
    ///   full name, so compatible evolutions decode;
    /// * anything else → [`CodecError::NotAvro`].
    ///
    /// Errors: as [`Codec::decode_local`], plus [`CodecError::NoRegistry`] (Confluent payload,
    /// codec without registry), [`CodecError::UnknownSchemaId`] (registry answers 404),
    /// [`CodecError::Malformed`] (registry schema names no orderflow event),
    /// [`CodecError::Registry`] (other registry failures, transient).
    pub async fn decode(&self, bytes: &[u8]) -> Result<Event, CodecError> {
        if bytes.first() != Some(&CONFLUENT_MAGIC) {
            return self.decode_local(bytes);
        }
        let (id, datum) = split_confluent(bytes)?;
        let registry = self.registry.as_ref().ok_or(CodecError::NoRegistry)?;
        let known = registry.known_ids.read().unwrap_or_else(|p| p.into_inner()).get(&id).copied();
        if let Some(index) = known {
            let entry = &self.entries[index];
            return decode_datum(entry, &entry.schema, datum);
        }
        let writer = match registry.decoder.get_schema(id).await {
            Ok(s) => s,
            Err(e) if is_status(&e, "404") => return Err(CodecError::UnknownSchemaId(id)),
            Err(e) => {
                registry.decoder.remove_errors_from_cache();
                return Err(CodecError::Registry(format!("fetching schema id {id}: {}", srce_message(&e))));
            }
        };
        let full_name = writer.parsed.name().map(|n| n.fullname(None)).unwrap_or_else(|| "<unnamed>".to_string());
        let Some(&index) = self.by_full_name.get(&full_name) else {
            return Err(CodecError::Malformed { schema: full_name, message: format!("schema id {id} is not an orderflow event record") });
        };
        let entry = &self.entries[index];
        if canonical::fingerprint(&writer.raw).ok() == Some(entry.fingerprint) {
            registry.known_ids.write().unwrap_or_else(|p| p.into_inner()).insert(id, index);
            decode_datum(entry, &entry.schema, datum)
        } else {
            decode_datum(entry, &writer.parsed, datum)
        }
    }
}

/// Parses a history file name `<Name>.v<N>.avsc` into (`<Name>` as listed in
/// [`Event::SCHEMA_NAMES`], `N`), or says what is wrong with it.
fn parse_history_file_name(file_name: &str) -> Result<(&'static str, u32), String> {
    const EXPECTED: &str = "expected <Name>.v<N>.avsc with <Name> an event record name and N >= 1";
    let stem = file_name.strip_suffix(".avsc").ok_or_else(|| format!("not an .avsc file; {EXPECTED}"))?;
    let (name, version) = stem.rsplit_once(".v").ok_or_else(|| format!("no .v<N> version suffix; {EXPECTED}"))?;
    let name = Event::SCHEMA_NAMES
        .iter()
        .copied()
        .find(|&n| n == name)
        .ok_or_else(|| format!("{name:?} is not an event record name (one of {}); {EXPECTED}", Event::SCHEMA_NAMES.join(", ")))?;
    let valid = !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()) && !version.starts_with('0');
    let version = version
        .parse::<u32>()
        .ok()
        .filter(|_| valid)
        .ok_or_else(|| format!("version {version:?} is not an integer >= 1 without leading zeros; {EXPECTED}"))?;
    Ok((name, version))
}

/// Loads every `history/<Name>.v<N>.avsc` of `dir` (absent directory = no history) into the
/// `history` of the entry `<Name>` and registers its fingerprint, after validating it (see
/// [`Codec::load`]).
fn load_history(
    dir: &Path,
    entries: &mut [Entry],
    by_name: &HashMap<&'static str, usize>,
    by_fingerprint: &mut HashMap<u64, WriterRef>,
) -> Result<(), CodecError> {
    let dir_err = |message: String| CodecError::Schema { file: dir.display().to_string(), message };
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(dir_err(format!("cannot list the schema history directory: {e}"))),
    };
    let mut paths = Vec::new();
    for item in listing {
        paths.push(item.map_err(|e| dir_err(format!("cannot list the schema history directory: {e}")))?.path());
    }
    paths.sort(); // deterministic: the first bad file by name is reported
    let mut files = Vec::new();
    for path in paths {
        let schema_err = |message: String| CodecError::Schema { file: path.display().to_string(), message };
        let file_name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| schema_err("file name is not UTF-8".to_string()))?;
        if file_name.starts_with('.') {
            continue;
        }
        if !path.is_file() {
            return Err(schema_err("not a regular file; the schema history directory holds only <Name>.v<N>.avsc files".to_string()));
        }
        let (name, version) = parse_history_file_name(file_name).map_err(|m| schema_err(format!("misnamed schema history file: {m}")))?;
        files.push((by_name[name], version, path));
    }
    // Each entry's history ends up ordered by version.
    files.sort();
    for (index, version, path) in files {
        let file = path.display().to_string();
        let schema_err = |message: String| CodecError::Schema { file: file.clone(), message };
        let current = &entries[index];
        let name = current.name;
        let raw = std::fs::read_to_string(&path).map_err(|e| schema_err(format!("cannot read: {e}")))?;
        let schema = Schema::parse_str(&raw).map_err(|e| schema_err(format!("invalid Avro schema: {e}")))?;
        match &schema {
            Schema::Record(r) if r.name.fullname(None) == current.full_name => {}
            Schema::Record(r) => {
                return Err(schema_err(format!(
                    "record is named {} but {name}.avsc declares {}; a history version must keep the record's full name",
                    r.name.fullname(None),
                    current.full_name
                )))
            }
            _ => return Err(schema_err("top-level schema is not a record".to_string())),
        }
        let fingerprint = canonical::fingerprint(&raw).map_err(|e| schema_err(format!("no Parsing Canonical Form: {e}")))?;
        let legacy_fingerprint = legacy_fingerprint(&schema);
        for fp in [fingerprint, legacy_fingerprint] {
            if let Some(other) = by_fingerprint.get(&fp) {
                let other_entry = &entries[other.entry];
                let other_file = match other.old {
                    None => format!("{}.avsc", other_entry.name),
                    Some(old) => format!("{HISTORY_DIR}/{}.v{}.avsc", other_entry.name, other_entry.history[old].version),
                };
                return Err(schema_err(format!(
                    "same fingerprint {fp:#018x} as {other_file} (identical Parsing Canonical Form: not a distinct version)"
                )));
            }
        }
        match SchemaCompatibility::can_read(&schema, &current.schema) {
            Ok(Compatibility::Full) => {}
            Ok(Compatibility::Partial) => {
                return Err(schema_err(format!(
                    "the current {name}.avsc can read only part of the data written with version {version} (enum symbols or union \
                     branches were removed); a new version must be able to read every record of the previous ones"
                )))
            }
            Err(e) => {
                return Err(schema_err(format!(
                    "the current {name}.avsc cannot read data written with version {version}: {e}; a new version may only add fields \
                     with defaults (or make other reader-compatible changes)"
                )))
            }
        }
        let entry = &mut entries[index];
        let old = Some(entry.history.len());
        by_fingerprint.insert(fingerprint, WriterRef { entry: index, old, legacy: false });
        by_fingerprint.entry(legacy_fingerprint).or_insert(WriterRef { entry: index, old, legacy: true });
        entry.history.push(OldVersion { version, schema, fingerprint, legacy_fingerprint });
    }
    Ok(())
}

/// Splits a Confluent payload into (schema id, datum).
fn split_confluent(bytes: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    if bytes.len() < CONFLUENT_HEADER_LEN {
        return Err(CodecError::Truncated);
    }
    let id = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes"));
    Ok((id, &bytes[CONFLUENT_HEADER_LEN..]))
}

/// The datum as a [`std::io::Read`] that remembers whether the decoder asked for bytes past its
/// end (a complete Avro datum is read exactly, never beyond).
struct EofTracking<'a> {
    rest: &'a [u8],
    hit_eof: bool,
}

impl std::io::Read for EofTracking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::Read::read(&mut self.rest, buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof = true;
        }
        Ok(n)
    }
}

/// Decodes `datum` written with `writer` into the event of `entry`. When the writer schema is
/// not the current one (history version, other registry version) the value is resolved to the
/// current schema (Avro schema resolution: reader defaults fill added fields). Trailing bytes
/// are an error.
fn decode_datum(entry: &Entry, writer: &Schema, datum: &[u8]) -> Result<Event, CodecError> {
    let malformed = |message: String| CodecError::Malformed { schema: entry.name.to_string(), message };
    let mut input = EofTracking { rest: datum, hit_eof: false };
    let reader = GenericDatumReader::builder(writer).build().map_err(|e| malformed(format!("schema: {e}")))?;
    let value = reader.read_value(&mut input).map_err(|e| malformed(format!("datum: {e}")))?;
    // apache-avro returns a null (or a null union branch) instead of an error when the datum
    // ends inside a string or a boolean or before a union index: the decoder asked for bytes
    // past the end, or (belt and braces) the value does not fit the writer schema. Checked
    // before resolution, so a cut stays "truncated" whatever the writer version.
    if input.hit_eof || !value.validate(writer) {
        return Err(malformed("datum: unexpected end of data inside a string, boolean or union index".to_string()));
    }
    if !input.rest.is_empty() {
        return Err(malformed(format!("{} trailing byte(s) after the datum", input.rest.len())));
    }
    let value = if std::ptr::eq(writer, &entry.schema) {
        value
    } else {
        value.resolve(&entry.schema).map_err(|e| malformed(format!("cannot resolve to the current {} schema: {e}", entry.name)))?
    };
    let json = avro_to_json(value).map_err(malformed)?;
    Event::from_json(entry.name, json).map_err(malformed)
}

/// Serde-serialises the event struct into an (unresolved) Avro value.
/// `event` serialized by `writer` (its record's schema).
fn event_datum(writer: &GenericDatumWriter<'_>, event: &Event) -> Result<Vec<u8>, apache_avro::Error> {
    match event {
        Event::OrderCreated(e) => writer.write_ser_to_vec(e),
        Event::StockReserved(e) => writer.write_ser_to_vec(e),
        Event::StockReservationFailed(e) => writer.write_ser_to_vec(e),
        Event::OrderConfirmed(e) => writer.write_ser_to_vec(e),
        Event::OrderCancelled(e) => writer.write_ser_to_vec(e),
        Event::OrderCompleted(e) => writer.write_ser_to_vec(e),
        Event::StockUpdated(e) => writer.write_ser_to_vec(e),
        Event::StockReservationExpired(e) => writer.write_ser_to_vec(e),
        Event::StockReservationReleased(e) => writer.write_ser_to_vec(e),
        Event::InventoryAdjusted(e) => writer.write_ser_to_vec(e),
        Event::OrderSettled(e) => writer.write_ser_to_vec(e),
        Event::StockAllocation(e) => writer.write_ser_to_vec(e),
        Event::StockLedgerEntry(e) => writer.write_ser_to_vec(e),
    }
}

/// Avro value → JSON with the Avro field names: unions are unwrapped (null → `null`),
/// timestamps and other integer logical types become numbers, enums strings.
fn avro_to_json(value: Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match value {
        Value::Null => J::Null,
        Value::Boolean(b) => J::Bool(b),
        Value::Int(n) | Value::Date(n) | Value::TimeMillis(n) => J::from(n),
        Value::Long(n)
        | Value::TimeMicros(n)
        | Value::TimestampMillis(n)
        | Value::TimestampMicros(n)
        | Value::TimestampNanos(n)
        | Value::LocalTimestampMillis(n)
        | Value::LocalTimestampMicros(n)
        | Value::LocalTimestampNanos(n) => J::from(n),
        Value::Float(x) => J::from(f64::from(x)),
        Value::Double(x) => J::from(x),
        Value::String(s) | Value::Enum(_, s) => J::String(s),
        Value::Bytes(b) | Value::Fixed(_, b) => J::from(b),
        Value::Uuid(u) => J::String(u.to_string()),
        Value::Union(_, inner) => avro_to_json(*inner)?,
        Value::Array(items) => J::Array(items.into_iter().map(avro_to_json).collect::<Result<_, _>>()?),
        Value::Map(map) => J::Object(map.into_iter().map(|(k, v)| Ok((k, avro_to_json(v)?))).collect::<Result<_, String>>()?),
        Value::Record(fields) => J::Object(fields.into_iter().map(|(k, v)| Ok((k, avro_to_json(v)?))).collect::<Result<_, String>>()?),
        other => return Err(format!("unsupported Avro value {other:?}")),
    })
}

#[cfg(test)]
mod tests;
