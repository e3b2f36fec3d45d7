//! The processor as the worker runs it: every record it is given is named to the stall watch
//! first ([`crate::stall::StallWatch::processing`]), so a stall caused by a processor that never
//! returns is logged with the record it is stuck on (topic, partition, offset, key): the offset
//! `orderflow skip` needs.
//!
//! Test builds (cargo feature `failpoints`, enabled for the integration tests only) add one fault
//! injection point, `orderflow::process`, configured from the `FAILPOINTS` environment variable
//! (the `fail` crate's syntax): `FAILPOINTS='orderflow::process=return(<orderId>)'` makes the
//! processor block forever on that order's events, as a processor bug would. Release builds
//! without the feature compile it out and ignore the variable.

use std::sync::{Arc, Mutex};

use orderflow_api::{Context, Event, Outputs, ProcessError, Processor, StateTxn};

use crate::stall::{Cursor, StallWatch};

/// A processor whose records are reported to the stall watch before it handles them.
pub(super) struct Watched {
    pub(super) inner: Box<dyn Processor>,
    pub(super) watch: Arc<Mutex<StallWatch>>,
}

impl Processor for Watched {
    fn process(&mut self, ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let key = event.order_id().unwrap_or(event.event_id()).to_string();
        self.watch.lock().expect("stall watch").processing(Cursor {
            topic: ctx.topic.clone(),
            partition: ctx.partition,
            offset: ctx.offset,
            key: key.clone(),
        });
        #[cfg(feature = "failpoints")]
        fail::fail_point!("orderflow::process", |blocked: Option<String>| {
            if blocked.as_deref() == Some(key.as_str()) {
                tracing::error!(key = %key, offset = ctx.offset, "failpoint orderflow::process: blocking on this record forever");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            self.inner.process(ctx, event, state, out)
        });
        self.inner.process(ctx, event, state, out)
    }

    fn on_timer(&mut self, ctx: &Context, key: &[u8], due_ms: i64, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        self.inner.on_timer(ctx, key, due_ms, state, out)
    }
}

/// Configures the fail points named in `FAILPOINTS` (`name=actions;...`) when the build has them;
/// otherwise warns once that the variable is ignored.
///
/// Errors: an action the `fail` crate cannot parse (test builds only).
pub(super) fn configure_failpoints() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else { return Ok(()) };
    #[cfg(feature = "failpoints")]
    for entry in spec.split(';').filter(|e| !e.trim().is_empty()) {
        let (name, actions) = entry.split_once('=').ok_or_else(|| format!("FAILPOINTS entry {entry:?} is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim())?;
        tracing::warn!(failpoint = name.trim(), actions = actions.trim(), "fault injection configured (test build)");
    }
    #[cfg(not(feature = "failpoints"))]
    tracing::warn!(%spec, "FAILPOINTS is set but this build has no fail points; ignored");
    Ok(())
}
