//! `orderflow inventory`: publish an admin stock movement (seed 004, issue 16) without
//! hand-crafting Avro: `restock` (into an HQ, or through it straight to a store), `distribute`
//! (HQ → store), `transfer` (store → store) and `correct` (signed, with a reason).
//!
//! The movement is built as an `InventoryAdjusted`, checked with the stock reserver's own
//! checks that need no state (`stock_reserver::movements::check`: type, signs, reason, stores),
//! and produced to the topology's external `InventoryAdjusted` topic (`inventory.adjusted`) keyed
//! `hqId:storeId` (`hqId:` for the HQ). `--dry-run` prints it and produces nothing. The
//! `eventId` is derived from `--reference` and the type, so running the same command again (a
//! retry after a timeout) is the same event and applies once. Checks against the figures (enough
//! units, a known HQ or store) happen in the stock reserver, which dead-letters a movement it
//! refuses, with the reason (on `stock.commands.dlq`: `orderflow dlq list`), and applies
//! nothing of it.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use orderflow_api::events::{adjustment_type, store_key, AdjustedItem, InventoryAdjusted};
use orderflow_api::{derive_event_id, Event};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, Side};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::json;

/// `orderflow inventory` flags.
#[derive(Args, Debug)]
pub struct InventoryArgs {
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY", global = true)]
    pub topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long, global = true)]
    pub bootstrap: Option<String>,
    /// Print the movement as it would be published and publish nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Who issues the movement (recorded in the event's `operator`).
    #[arg(long, env = "USER", global = true)]
    pub operator: Option<String>,
    /// The movement's business id (receipt number, distributionId, transferId); the eventId is
    /// derived from it and the type, so a repeated command is the same event.
    #[arg(long, global = true)]
    pub reference: Option<String>,
    #[command(subcommand)]
    pub action: InventoryAction,
}

/// The movements.
#[derive(Subcommand, Debug)]
pub enum InventoryAction {
    /// New units arrive at the HQ (without --store), or through the HQ straight at --store.
    Restock {
        #[arg(long)]
        hq: String,
        #[arg(long)]
        store: Option<String>,
        /// `PRODUCT=UNITS` (repeatable), units > 0.
        #[arg(long = "item", required = true, value_parser = parse_item)]
        items: Vec<(String, i64)>,
    },
    /// HQ unallocated units to a store (admin only, seed 004).
    Distribute {
        #[arg(long)]
        hq: String,
        #[arg(long)]
        store: String,
        #[arg(long = "item", required = true, value_parser = parse_item)]
        items: Vec<(String, i64)>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Units from one store to another of the same HQ (the HQ total is unchanged).
    Transfer {
        #[arg(long)]
        hq: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long = "item", required = true, value_parser = parse_item)]
        items: Vec<(String, i64)>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// A signed correction of the HQ's unallocated units (without --store) or of a store's.
    Correct {
        #[arg(long)]
        hq: String,
        #[arg(long)]
        store: Option<String>,
        /// `PRODUCT=±UNITS` (repeatable).
        #[arg(long = "item", required = true, value_parser = parse_item, allow_hyphen_values = true)]
        items: Vec<(String, i64)>,
        /// Why (required: the audit trail).
        #[arg(long, required = true)]
        reason: String,
    },
}

/// `PRODUCT=UNITS` → (product, units).
fn parse_item(s: &str) -> Result<(String, i64), String> {
    let (p, q) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected PRODUCT=UNITS"))?;
    let q: i64 = q.trim().parse().map_err(|e| format!("{s:?}: units: {e}"))?;
    if p.trim().is_empty() {
        return Err(format!("{s:?}: empty product id"));
    }
    Ok((p.trim().to_string(), q))
}

/// The movement `args` describe, with its eventId derived from the reference and the type and
/// `occurredAt` = `now_ms`.
///
/// Errors: no `--reference`; the stock reserver's stateless checks.
pub fn movement(args: &InventoryArgs, now_ms: i64) -> Result<InventoryAdjusted> {
    let Some(reference) = args.reference.clone().filter(|r| !r.trim().is_empty()) else {
        bail!("--reference is required: the movement's business id (a retry with the same one applies once)");
    };
    let (kind, hq, store, to, items, reason) = match &args.action {
        InventoryAction::Restock { hq, store, items } => {
            (adjustment_type::RESTOCK, hq, store.clone().unwrap_or_default(), None, items, None)
        }
        InventoryAction::Distribute { hq, store, items, reason } => {
            (adjustment_type::DISTRIBUTION, hq, store.clone(), None, items, reason.clone())
        }
        InventoryAction::Transfer { hq, from, to, items, reason } => {
            (adjustment_type::TRANSFER, hq, from.clone(), Some(to.clone()), items, reason.clone())
        }
        InventoryAction::Correct { hq, store, items, reason } => {
            (adjustment_type::CORRECTION, hq, store.clone().unwrap_or_default(), None, items, Some(reason.clone()))
        }
    };
    build(
        Movement {
            kind,
            hq_id: hq.clone(),
            store_id: store,
            to_store_id: to,
            items: items.clone(),
            reason,
            reference,
            operator: args.operator.clone(),
        },
        now_ms,
    )
}

/// One admin stock movement, as `orderflow inventory` and the inventory API's admin routes take
/// it (seed 004; the types of `adjustment_type`).
#[derive(Debug, Clone)]
pub struct Movement {
    pub kind: &'static str,
    pub hq_id: String,
    /// The store (the receiving one of a distribution, the source of a transfer); empty for the HQ.
    pub store_id: String,
    pub to_store_id: Option<String>,
    /// (productId, signed units).
    pub items: Vec<(String, i64)>,
    pub reason: Option<String>,
    /// The movement's business id (distributionId, receipt number…): the eventId derives from
    /// it, so a retry with the same one applies once.
    pub reference: String,
    pub operator: Option<String>,
}

/// The `inventory.adjusted` event of `m` at `now_ms`, checked with the stock reserver's
/// stateless rules.
///
/// Errors: those rules' refusal, naming the type.
pub fn build(m: Movement, now_ms: i64) -> Result<InventoryAdjusted> {
    let kind = m.kind;
    let e = InventoryAdjusted {
        event_id: derive_event_id(&format!("{}/{}", m.hq_id, m.reference), &format!("inventory/{kind}")),
        occurred_at: now_ms,
        hq_id: m.hq_id,
        store_id: m.store_id,
        adjustment_type: kind.to_string(),
        reference_id: m.reference,
        items: m.items.into_iter().map(|(p, d)| AdjustedItem { product_id: p, delta: d }).collect(),
        to_store_id: m.to_store_id,
        reason: m.reason,
        operator: m.operator,
    };
    stock_reserver::movements::check(&e).map_err(|msg| anyhow::anyhow!("{kind} refused before publishing: {msg}"))?;
    Ok(e)
}

/// The topology's external topic (one producers outside orderflow write) that carries records
/// of schema `schema` (e.g. `InventoryAdjusted`, `OrderCreated`).
///
/// Errors: no such topic.
pub fn external_topic(t: &orderflow_runtime::topology::Topology, schema: &str) -> Result<String> {
    t.topics
        .iter()
        .find(|(_, t)| t.external.is_some() && t.schema.as_ref().is_some_and(|s| s.names().contains(&schema)))
        .map(|(name, _)| name.clone())
        .with_context(|| format!("no external topic of the topology carries {schema}"))
}

/// Runs `orderflow inventory`: prints the movement as one JSON object (`topic`, `key`,
/// `eventId`, `event`, and `partition`/`offset` once produced, or `dryRun: true`).
///
/// Errors: see [`movement`]; no topic of the topology carries `InventoryAdjusted` from outside;
/// encoding or producing failed.
pub async fn run(args: InventoryArgs) -> Result<()> {
    let mut loaded = orderflow_runtime::topology::load(&args.topology)?;
    if let Some(b) = &args.bootstrap {
        loaded.topology.broker.bootstrap = b.clone();
    }
    let e = movement(&args, orderflow_runtime::worker::now_ms())?;
    let topic = external_topic(&loaded.topology, "InventoryAdjusted")?;
    let key = store_key(&e.hq_id, &e.store_id);
    let event = Event::InventoryAdjusted(e);
    let mut report = json!({ "topic": topic, "key": key, "eventId": event.event_id(), "event": event.to_json() });
    if args.dry_run {
        report["dryRun"] = json!(true);
        println!("{report}");
        return Ok(());
    }
    let codec = Codec::load(&loaded.avro_dir(), loaded.topology.broker.registry_url.as_deref())?;
    let bytes = codec.encode(&topic, &event).await?;
    let producer: FutureProducer = client_config(&loaded.topology.broker, Side::Producer).create()?;
    let delivery = producer
        .send(FutureRecord::to(&topic).key(&key).payload(&bytes), Timeout::After(std::time::Duration::from_secs(30)))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
    report["partition"] = json!(delivery.partition);
    report["offset"] = json!(delivery.offset);
    println!("{report}");
    Ok(())
}
