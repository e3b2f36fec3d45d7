//! `orderflow schemas`: the event schemas of `avro/` as other languages and a schema registry see
//! them (issue 14).
//!
//! - `list`: per schema, the spec-exact fingerprint written in single-object headers, the
//!   pre-issue-14 (apache-avro 0.22) fingerprint still decoded, the history versions, and the
//!   registry subjects it is registered under.
//! - `register`: registers every subject's schema (with `--history`, each `history/<Name>.v<N>`
//!   first, in version order) after setting the subject's compatibility level to
//!   `[broker] schema_compatibility` (default `BACKWARD`).
//! - `check`: asks the registry whether each schema is compatible with what the subject holds
//!   (`POST /compatibility/subjects/{subject}/versions/latest`) under the subject's level, and
//!   that the level is the configured one; exit 1 on any incompatible schema or level mismatch.
//!   A subject the registry does not have yet is new, not a problem.
//!
//! Subjects follow `TopicRecordNameStrategy`, as the codec registers them when it encodes:
//! `<topic>-orderflow.events.<Name>` for each topic of the topology and each schema it carries.
//! The registry is the topology's `registry_url` (or `ORDERFLOW_REGISTRY_URL`, or `--registry`):
//! any Confluent-compatible API (Confluent Schema Registry, Apicurio's `/apis/ccompat/v7`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use orderflow_api::Event;
use orderflow_runtime::codec::{Codec, EVENT_NAMESPACE, HISTORY_DIR};
use orderflow_runtime::topology::{Loaded, SchemaCompatibilityLevel};
use serde_json::{json, Value};

use crate::topology::load_topology;

/// Media type of the Confluent schema registry API.
const REGISTRY_JSON: &str = "application/vnd.schemaregistry.v1+json";
/// Timeout of each registry call.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(10);

/// `orderflow schemas` flags.
#[derive(clap::Args, Debug)]
pub struct SchemasArgs {
    #[command(subcommand)]
    action: SchemasAction,
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY", global = true)]
    topology: PathBuf,
    /// Schema directory instead of the topology's `avro_dir` (e.g. a proposed change).
    #[arg(long, global = true)]
    avro_dir: Option<PathBuf>,
    /// Registry base URL instead of the topology's `registry_url` / ORDERFLOW_REGISTRY_URL.
    #[arg(long, global = true)]
    registry: Option<String>,
}

/// `orderflow schemas` actions.
#[derive(clap::Subcommand, Debug)]
enum SchemasAction {
    /// Print each schema's fingerprints (spec-exact, legacy), history versions and subjects.
    List {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Register every subject's schema under its compatibility level (refused by the registry,
    /// HTTP 409, when incompatible).
    Register {
        /// Register each history version first, oldest first (seeds a registry with the whole
        /// evolution, so the current schemas are checked against all of it).
        #[arg(long)]
        history: bool,
    },
    /// Check each schema against what the registry holds; exit 1 on any incompatibility.
    Check,
}

/// One subject: the topic and the record it carries.
struct Subject {
    topic: String,
    name: &'static str,
}

impl Subject {
    fn subject(&self) -> String {
        format!("{}-{EVENT_NAMESPACE}.{}", self.topic, self.name)
    }
}

/// The subjects of the topology: every (topic, schema) pair, topics in name order.
fn subjects(loaded: &Loaded) -> Result<Vec<Subject>> {
    let mut out = Vec::new();
    for (topic, spec) in &loaded.topology.topics {
        for name in spec.schema.as_ref().map(|s| s.names()).unwrap_or_default() {
            let name = Event::SCHEMA_NAMES
                .iter()
                .copied()
                .find(|n| *n == name)
                .ok_or_else(|| anyhow!("topic {topic} names schema {name}, which is no orderflow event"))?;
            out.push(Subject { topic: topic.clone(), name });
        }
    }
    Ok(out)
}

/// The text of `<dir>/<name>.avsc` (registered as is).
fn schema_text(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(format!("{name}.avsc"));
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Runs `orderflow schemas`.
///
/// Errors: topology or schemas that do not load ([`Codec::load`] validates every file and the
/// history chain); registry unreachable or answering an error; for `check`, any incompatible
/// schema or level mismatch (after printing them all).
pub async fn run(args: SchemasArgs) -> Result<()> {
    let loaded = load_topology(&args.topology, None)?;
    let dir = args.avro_dir.clone().unwrap_or_else(|| loaded.avro_dir());
    let codec = Codec::load(&dir, None)?;
    let subjects = subjects(&loaded)?;
    let level = loaded.topology.broker.schema_compatibility;
    let registry = || -> Result<Registry> {
        let url = args.registry.clone().or_else(|| loaded.topology.broker.registry_url.clone()).ok_or_else(|| {
            anyhow!("no schema registry: set [broker] registry_url in the topology, ORDERFLOW_REGISTRY_URL or --registry")
        })?;
        Registry::new(&url)
    };
    match args.action {
        SchemasAction::List { json } => list(&codec, &subjects, json),
        SchemasAction::Register { history } => register(&registry()?, &dir, &codec, &subjects, level, history).await,
        SchemasAction::Check => check(&registry()?, &dir, &subjects, level).await,
    }
}

fn list(codec: &Codec, subjects: &[Subject], as_json: bool) -> Result<()> {
    let hex = |fp: u64| format!("{fp:016x}");
    let rows: Vec<Value> = Event::SCHEMA_NAMES
        .iter()
        .map(|&name| {
            let legacy: Vec<Value> =
                codec.legacy_fingerprints(name).into_iter().map(|(v, fp)| json!({ "version": v, "fingerprint": hex(fp) })).collect();
            json!({
                "schema": format!("{EVENT_NAMESPACE}.{name}"),
                "fingerprint": codec.fingerprint(name).map(hex),
                "legacy_fingerprints": legacy,
                "history": codec.history_fingerprints(name).into_iter().map(|(v, fp)| json!({ "version": v, "fingerprint": hex(fp) })).collect::<Vec<_>>(),
                "subjects": subjects.iter().filter(|s| s.name == name).map(Subject::subject).collect::<Vec<_>>(),
            })
        })
        .collect();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!({ "schemas": rows }))?);
        return Ok(());
    }
    println!("{:<42} {:<16}  {:<16}  history / subjects", "schema", "fingerprint", "legacy (<= 0.22)");
    for r in &rows {
        let legacy =
            r["legacy_fingerprints"].as_array().and_then(|l| l.iter().find(|x| x["version"].is_null())).map(|x| x["fingerprint"].clone());
        println!(
            "{:<42} {:<16}  {:<16}  {}",
            r["schema"].as_str().unwrap_or_default(),
            r["fingerprint"].as_str().unwrap_or_default(),
            legacy.as_ref().and_then(Value::as_str).unwrap_or("(same)"),
            r["subjects"].as_array().map(|s| s.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default()
        );
        for h in r["history"].as_array().into_iter().flatten() {
            println!("  v{}: {}", h["version"], h["fingerprint"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

async fn register(
    registry: &Registry,
    dir: &Path,
    codec: &Codec,
    subjects: &[Subject],
    level: SchemaCompatibilityLevel,
    history: bool,
) -> Result<()> {
    for s in subjects {
        let subject = s.subject();
        registry.set_level(&subject, level).await?;
        if history {
            for (version, _) in codec.history_fingerprints(s.name) {
                let path = dir.join(HISTORY_DIR).join(format!("{}.v{version}.avsc", s.name));
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                let id = registry.register(&subject, &text).await.with_context(|| format!("{subject}: history version {version}"))?;
                println!("{subject}: v{version} (history) id {id}");
            }
        }
        let id = registry.register(&subject, &schema_text(dir, s.name)?).await?;
        println!("{subject}: {} id {id} ({})", s.name, level.as_str());
    }
    Ok(())
}

async fn check(registry: &Registry, dir: &Path, subjects: &[Subject], level: SchemaCompatibilityLevel) -> Result<()> {
    let mut problems = Vec::new();
    for s in subjects {
        let subject = s.subject();
        let text = schema_text(dir, s.name)?;
        if !registry.has_subject(&subject).await? {
            println!("{subject}: new (not registered yet)");
            continue;
        }
        let held = registry.level(&subject).await?;
        if held.as_deref() != Some(level.as_str()) {
            problems.push(format!(
                "{subject}: the registry holds it to {} but the topology says {} (orderflow schemas register sets it)",
                held.as_deref().unwrap_or("no level"),
                level.as_str()
            ));
        }
        match registry.compatible(&subject, &text).await? {
            (true, _) => println!("{subject}: compatible ({})", held.as_deref().unwrap_or("?")),
            (false, messages) => problems.push(format!(
                "{subject}: {}.avsc is INCOMPATIBLE with the registered versions under {}{}",
                s.name,
                held.as_deref().unwrap_or("?"),
                if messages.is_empty() { String::new() } else { format!(": {}", messages.join("; ")) }
            )),
        }
    }
    for p in &problems {
        eprintln!("problem: {p}");
    }
    if !problems.is_empty() {
        bail!("{} schema problem(s)", problems.len());
    }
    Ok(())
}

/// A Confluent-compatible schema registry API.
struct Registry {
    url: String,
    http: reqwest::Client,
}

impl Registry {
    fn new(url: &str) -> Result<Registry> {
        let http = reqwest::Client::builder().timeout(REGISTRY_TIMEOUT).build().context("building the registry HTTP client")?;
        Ok(Registry { url: url.trim_end_matches('/').to_string(), http })
    }

    /// Sends `req`; `Ok((status, body))` for any HTTP answer (body `null` when empty or not JSON).
    async fn call(&self, what: &str, req: reqwest::RequestBuilder) -> Result<(u16, Value)> {
        let resp = req.header("Accept", REGISTRY_JSON).send().await.with_context(|| format!("schema registry {}: {what}", self.url))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.with_context(|| format!("schema registry {}: {what}: reading the answer", self.url))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    fn post(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url)).header("Content-Type", REGISTRY_JSON).body(body.to_string())
    }

    fn put(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.http.put(format!("{}{path}", self.url)).header("Content-Type", REGISTRY_JSON).body(body.to_string())
    }

    fn fail(what: &str, status: u16, body: &Value) -> anyhow::Error {
        anyhow!("schema registry: {what}: HTTP {status}: {}", body.get("message").and_then(Value::as_str).unwrap_or(&body.to_string()))
    }

    async fn has_subject(&self, subject: &str) -> Result<bool> {
        let what = format!("versions of {subject}");
        match self.call(&what, self.http.get(format!("{}/subjects/{subject}/versions", self.url))).await? {
            (200, _) => Ok(true),
            (404, _) => Ok(false),
            (status, body) => Err(Self::fail(&what, status, &body)),
        }
    }

    /// The subject's own level, else the registry's global one.
    async fn level(&self, subject: &str) -> Result<Option<String>> {
        let level = |b: &Value| b.get("compatibilityLevel").or_else(|| b.get("compatibility")).and_then(Value::as_str).map(String::from);
        let what = format!("compatibility level of {subject}");
        match self.call(&what, self.http.get(format!("{}/config/{subject}", self.url))).await? {
            (200, body) => return Ok(level(&body)),
            (404, _) => {}
            (status, body) => return Err(Self::fail(&what, status, &body)),
        }
        match self.call("global compatibility level", self.http.get(format!("{}/config", self.url))).await? {
            (200, body) => Ok(level(&body)),
            (status, body) => Err(Self::fail("global compatibility level", status, &body)),
        }
    }

    async fn set_level(&self, subject: &str, level: SchemaCompatibilityLevel) -> Result<()> {
        let what = format!("setting {subject} to {}", level.as_str());
        match self.call(&what, self.put(&format!("/config/{subject}"), json!({ "compatibility": level.as_str() }))).await? {
            (200, _) => Ok(()),
            (status, body) => Err(Self::fail(&what, status, &body)),
        }
    }

    /// Registers `schema` under `subject`; its id. HTTP 409 (incompatible) is an error naming it.
    async fn register(&self, subject: &str, schema: &str) -> Result<u64> {
        let what = format!("registering {subject}");
        match self.call(&what, self.post(&format!("/subjects/{subject}/versions"), json!({ "schema": schema }))).await? {
            (200, body) => body.get("id").and_then(Value::as_u64).ok_or_else(|| anyhow!("schema registry: {what}: no id in {body}")),
            (409, body) => Err(Self::fail(&format!("{what}: incompatible with its registered versions"), 409, &body)),
            (status, body) => Err(Self::fail(&what, status, &body)),
        }
    }

    /// Whether `schema` is compatible with the subject's versions under its level, and the
    /// registry's messages when it says why not.
    async fn compatible(&self, subject: &str, schema: &str) -> Result<(bool, Vec<String>)> {
        let what = format!("compatibility of {subject}");
        let path = format!("/compatibility/subjects/{subject}/versions/latest?verbose=true");
        match self.call(&what, self.post(&path, json!({ "schema": schema }))).await? {
            (200, body) => {
                let ok = body.get("is_compatible").and_then(Value::as_bool).ok_or_else(|| anyhow!("schema registry: {what}: {body}"))?;
                let messages = body
                    .get("messages")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect();
                Ok((ok, messages))
            }
            (status, body) => Err(Self::fail(&what, status, &body)),
        }
    }
}
