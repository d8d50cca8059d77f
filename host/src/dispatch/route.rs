//! One route: a subscription's deliveries, each handled by the plugin
//! serving the route at that moment, and settled by its outcome.
//!
//! Per delivery: take the plugin's concurrency permit, invoke a fresh
//! instance, then
//! - `ack`: publish the outputs through the outbox, in order, then commit
//!   the key-value writes, then ack. If neither the broker nor the spool
//!   takes an output, or Redis does not take the writes, keep trying (the
//!   permit stays held, so consumption pauses) until it does, or until the
//!   delivery's channel is gone (the broker redelivers it). Writes that
//!   Redis refuses (an increment of a value another delivery made a
//!   non-integer) settle the delivery like a `retry`;
//! - `retry`: republish a copy with the next attempt number to the retry
//!   queue, then ack; past the attempt limit, dead-letter;
//! - `reject` or a trap: dead-letter with plugin, version, reason and
//!   attempts, then ack. Outputs of a failed invocation are discarded.
//!
//! On a deduplicated route the delivery's key is looked up first, and an
//! `ack` goes through the journal ([`super::dedup`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, warn};

use super::dedup::{self, Found, Keyed, Record, RouteDedup};
use super::headers;
use super::metric;
use super::outbox::Outbox;
use super::topology::DispatchConfig;
use crate::amqp::{self, AckOutcome};
use crate::backoff::{Backoff, BackoffConfig};
use crate::message::{HeaderValue, MessageProperties, OutboundMessage};
use crate::plugins::{self, Outcome, Plugin};
use crate::telemetry::{self, TraceContext};

/// What a route's tasks share.
pub(crate) struct RouteContext {
    pub(crate) queue: String,
    pub(crate) max_attempts: u32,
    pub(crate) outbox: Outbox,
    pub(crate) config: Arc<DispatchConfig>,
    /// Set on a deduplicated route.
    pub(crate) dedup: Option<Arc<RouteDedup>>,
}

/// Pull deliveries until `stop`, handing each to a task on `inflight`.
pub(crate) async fn run(
    ctx: Arc<RouteContext>,
    mut subscription: amqp::Subscription,
    plugin: watch::Receiver<Plugin>,
    inflight: TaskTracker,
    stop: CancellationToken,
) {
    let mut handles: Option<Arc<metric::PluginMetrics>> = None;
    loop {
        let delivery = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            d = subscription.next() => match d {
                Some(d) => d,
                None => break,
            },
        };
        if !delivery.acker.is_current() {
            // Queued before its channel or session died: the broker
            // redelivers it, so handling it now would only duplicate work.
            metric::stale_settle(&ctx.queue);
            continue;
        }
        let current = plugin.borrow().clone();
        let metrics = match &handles {
            Some(m) if m.plugin() == current.name() => m.clone(),
            _ => handles
                .insert(Arc::new(metric::PluginMetrics::new(
                    current.name(),
                    &ctx.queue,
                )))
                .clone(),
        };
        // Backpressure: the permit is taken before instantiating and held
        // until the delivery is settled. Cancel-safe: a delivery dropped
        // here unsettled is nacked with requeue by its acker.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = current.acquire() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        // Boxed: the future holds a whole invocation's state (5 KB), which
        // tokio would otherwise copy into the task and again when it
        // finishes; one allocation is cheaper.
        inflight.spawn(Box::pin(handle(
            ctx.clone(),
            current,
            metrics,
            permit,
            delivery,
        )));
    }
    debug!(queue = %ctx.queue, "Route stopped taking deliveries.");
}

async fn handle(
    ctx: Arc<RouteContext>,
    plugin: Plugin,
    metrics: Arc<metric::PluginMetrics>,
    _permit: OwnedSemaphorePermit,
    d: amqp::Delivery,
) {
    // The delivery's span (`process <queue>`): a child of the
    // `traceparent` the message came with (or the root of a new trace).
    // Each message the delivery produces gets a `publish` span of its own
    // under it, whose context it carries.
    let parent = headers::trace_parent(&d.properties);
    let tracestate = headers::trace_state(&d.properties);
    let span = telemetry::process_span(&telemetry::Delivered {
        queue: &ctx.queue,
        exchange: &d.exchange,
        routing_key: &d.routing_key,
        delivery_tag: d.delivery_tag,
        message_id: d.properties.message_id.as_deref(),
        body_size: d.body.len(),
        plugin: plugin.name(),
        plugin_version: plugin.version(),
    });
    // With OTLP export on, the exported span's ids; else our own.
    let trace = telemetry::span_context(&span, parent.as_ref(), tracestate);
    if !span.is_disabled() {
        span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
        span.record("span_id", tracing::field::display(trace.span_id_hex()));
    }
    handle_in_span(&ctx, &plugin, &metrics, d, &trace)
        .instrument(span)
        .await;
}

async fn handle_in_span(
    ctx: &RouteContext,
    plugin: &Plugin,
    metrics: &metric::PluginMetrics,
    d: amqp::Delivery,
    trace: &TraceContext,
) {
    let attempt = headers::attempt(&d.properties);
    // As its publisher sent it, also after a stay in a retry tier.
    let properties = headers::as_published(d.properties.clone(), |q| {
        ctx.config.is_retry_queue(q, &ctx.queue)
    });
    let input = plugins::Delivery {
        body: d.body.clone(),
        exchange: d.exchange.clone(),
        routing_key: d.routing_key.clone(),
        queue: d.queue.clone(),
        properties,
        redelivered: d.redelivered,
        attempt,
    };
    let h = Handling {
        ctx,
        plugin,
        input: &input,
        d: &d,
        trace,
    };
    let mut keyed = None;
    if let Some(dd) = &ctx.dedup {
        match begin(&h, dd).await {
            Begun::Settled(settled) => return finish(ctx, d, settled),
            Begun::Run(k, guard) => keyed = Some((k, guard)),
            Begun::Plain => {}
        }
    }
    let started = Instant::now();
    let idempotency = keyed.as_ref().map(|(k, _)| k.idempotency_base());
    let outcome = plugin.invoke_keyed(&input, idempotency).await;
    metrics.handled(plugin, &outcome, started.elapsed());
    let span = tracing::Span::current();
    span.record("outcome", outcome.label());
    // Error status on every outcome that dead-letters the delivery.
    match &outcome {
        Outcome::Retry { reason, .. } if attempt >= ctx.max_attempts => {
            telemetry::set_error(&span, "retries_exhausted", reason)
        }
        Outcome::Reject { reason } => telemetry::set_error(&span, "reject", reason),
        Outcome::Trapped { kind, message } => {
            telemetry::set_error(&span, &format!("trap_{}", kind.as_str()), message)
        }
        Outcome::Ack { .. } | Outcome::Retry { .. } => {}
    }

    let mut writes = crate::kv::Writes::default();
    let mut settle: Vec<OutboundMessage> = match outcome {
        Outcome::Ack { outputs, writes: w } => {
            if let (Some(dd), Some((k, _guard))) = (&ctx.dedup, &keyed) {
                let settled = journal_and_apply(&h, dd, k, outputs, w).await;
                return finish(ctx, d, settled);
            }
            writes = w;
            outputs
        }
        Outcome::Retry { reason, delay } if attempt < ctx.max_attempts => {
            vec![retry_copy(ctx, &input, attempt + 1, &reason, delay)]
        }
        Outcome::Retry { reason, .. } => {
            vec![retry_or_dead_letter(ctx, plugin, &input, attempt, &reason)]
        }
        Outcome::Reject { reason } => {
            vec![dead_letter(
                ctx, plugin, &input, attempt, "reject", None, &reason,
            )]
        }
        Outcome::Trapped { kind, message } => {
            warn!(queue = %ctx.queue, plugin = plugin.name(), trap = %kind, %message, trace_id = %trace.trace_id_hex(), "Plugin trapped; dead-lettering the delivery.");
            vec![dead_letter(
                ctx,
                plugin,
                &input,
                attempt,
                "trap",
                Some(kind.as_str()),
                &message,
            )]
        }
    };
    let mut settled = publish_all(ctx, &mut settle, &d.properties, trace, &d.acker).await;
    if settled && !writes.is_empty() {
        settled = match commit_writes(ctx, plugin, &writes, &d.acker).await {
            Stored::Yes(()) => true,
            Stored::Gone => false,
            Stored::Refused(reason) => refused(&h, &reason).await,
        };
    }
    finish(ctx, d, settled);
}

/// Ack a settled delivery; count one whose channel is gone (the broker
/// redelivers it; dropping its acker unsettled is a counted no-op).
fn finish(ctx: &RouteContext, d: amqp::Delivery, settled: bool) {
    if !settled || d.acker.ack() == AckOutcome::Stale {
        metric::stale_settle(&ctx.queue);
    }
}

/// One delivery being handled: what each step of it needs.
struct Handling<'a> {
    ctx: &'a RouteContext,
    plugin: &'a Plugin,
    input: &'a plugins::Delivery,
    d: &'a amqp::Delivery,
    trace: &'a TraceContext,
}

/// Settle a delivery whose key-value writes Redis refused like a retry.
async fn refused(h: &Handling<'_>, reason: &str) -> bool {
    let mut again = vec![retry_or_dead_letter(
        h.ctx,
        h.plugin,
        h.input,
        h.input.attempt,
        reason,
    )];
    publish_all(h.ctx, &mut again, &h.d.properties, h.trace, &h.d.acker).await
}

/// Publish `outputs` for `h`'s delivery.
async fn publish_for(h: &Handling<'_>, outputs: &mut [OutboundMessage]) -> bool {
    publish_all(h.ctx, outputs, &h.d.properties, h.trace, &h.d.acker).await
}

/// How a deduplicated delivery starts.
enum Begun {
    /// Settled without invoking (done before, or its record replayed);
    /// false if its channel went away first.
    Settled(bool),
    /// New: invoke the plugin, holding the key.
    Run(Keyed, dedup::KeyGuard),
    /// Without a key, or the store down and the route at least once.
    Plain,
}

/// Look the delivery's key up, waiting for the store while it cannot
/// answer (the route pauses: the delivery is held, never acked
/// unrecorded), unless the route runs at least once then.
async fn begin(h: &Handling<'_>, dd: &RouteDedup) -> Begun {
    let span = tracing::Span::current();
    let Some(raw) = dd.key_of(h.input) else {
        dd.count_no_key();
        span.record("warren.dedup", "no-key");
        return Begun::Plain;
    };
    let found = until_stored(h.ctx, &h.d.acker, "look up the delivery's key", || {
        dd.find(&raw)
    })
    .await;
    match found {
        Stored::Yes(Found::New(k, guard)) => {
            span.record("warren.dedup", "new");
            Begun::Run(k, guard)
        }
        Stored::Yes(Found::Plain) => {
            span.record("warren.dedup", "unrecorded");
            Begun::Plain
        }
        Stored::Yes(Found::Done) => {
            dd.count_skipped();
            span.record("warren.dedup", "skipped");
            span.record("outcome", "skipped");
            Begun::Settled(true)
        }
        Stored::Yes(Found::Journal(k, _guard, record)) => {
            dd.count_replayed();
            span.record("warren.dedup", "replayed");
            span.record("outcome", "replayed");
            Begun::Settled(apply(h, dd, &k, record).await)
        }
        Stored::Refused(reason) => {
            // A lookup is never refused; if the store says so, handle the
            // delivery as a route without deduplication would.
            warn!(queue = %h.ctx.queue, %reason, "Deduplication lookup refused; handling the delivery at least once.");
            Begun::Plain
        }
        Stored::Gone => Begun::Settled(false),
    }
}

/// The effects of a new delivery that acked: outputs stamped with
/// deterministic ids, journalled (if it has outputs), then applied.
async fn journal_and_apply(
    h: &Handling<'_>,
    dd: &RouteDedup,
    k: &Keyed,
    mut outputs: Vec<OutboundMessage>,
    writes: crate::kv::Writes,
) -> bool {
    k.stamp(&mut outputs);
    let mut record = Record::new(outputs, &writes);
    crate::crash::point("dedup-invoked");
    // Without outputs, applying the writes with the done mark is one
    // atomic step: nothing to journal.
    if !record.outputs.is_empty() {
        let bytes = match record.encode() {
            Ok(b) => b,
            Err(e) => return refused(h, &e).await,
        };
        let held = until_stored(h.ctx, &h.d.acker, "journal the delivery", || {
            dd.store().journal(k.key(), bytes.clone())
        })
        .await;
        match held {
            Stored::Yes(crate::kv::Recorded::Nothing) => {}
            Stored::Yes(crate::kv::Recorded::Done) => return true,
            Stored::Yes(crate::kv::Recorded::Journal(theirs)) => {
                // Another copy, in another process, journalled first: its
                // effects are the ones that happen.
                if let Some(r) = dedup::decode(&theirs) {
                    record = r;
                }
            }
            Stored::Refused(reason) => return refused(h, &reason).await,
            Stored::Gone => return false,
        }
    }
    crate::crash::point("dedup-journalled");
    apply(h, dd, k, record).await
}

/// Publish a record's outputs, then apply its writes and mark its key done,
/// once. True when the delivery may be acked.
async fn apply(h: &Handling<'_>, dd: &RouteDedup, k: &Keyed, mut record: Record) -> bool {
    if !publish_for(h, &mut record.outputs).await {
        return false;
    }
    crate::crash::point("dedup-published");
    let writes = record.writes();
    let ns = dedup::namespace(h.plugin, &writes);
    let done = until_stored(h.ctx, &h.d.acker, "apply the delivery's writes", || {
        dd.store().complete(k.key(), ns, &writes)
    })
    .await;
    let settled = match done {
        Stored::Yes(()) => true,
        Stored::Gone => false,
        Stored::Refused(reason) => refused(h, &reason).await,
    };
    crate::crash::point("dedup-completed");
    settled
}

/// Publish `messages` in order through the outbox, each under a `publish`
/// span (a child of the delivery's, `trace`) whose context it carries.
/// Returns false if the delivery's channel went away first (then it will
/// be redelivered).
async fn publish_all(
    ctx: &RouteContext,
    messages: &mut [OutboundMessage],
    incoming: &MessageProperties,
    trace: &TraceContext,
    acker: &amqp::DeliveryAcker,
) -> bool {
    let tracestate = headers::trace_state(incoming);
    for msg in messages {
        let span = telemetry::publish_span(
            tracing::Span::current().id(),
            &msg.exchange,
            &msg.routing_key,
            msg.properties.message_id.as_deref(),
        );
        let context = telemetry::span_context(&span, Some(trace), tracestate);
        headers::propagate_trace(incoming, &context, &mut msg.properties);
        let mut delay = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
        });
        let mut warned = false;
        loop {
            match ctx.outbox.publish(msg).instrument(span.clone()).await {
                Ok(placement) => {
                    span.record("warren.placement", placement.as_str());
                    break;
                }
                Err(e) => {
                    if !acker.is_current() {
                        return false;
                    }
                    if !warned {
                        warn!(queue = %ctx.queue, error = %e, "Neither the broker nor the spool takes outputs; holding the delivery and retrying.");
                        warned = true;
                    }
                    metric::outbox_refused();
                    // Also during shutdown: keep trying until the grace
                    // period ends; then the process exits and the broker
                    // redelivers the delivery.
                    tokio::time::sleep(delay.next_fixed()).await;
                }
            }
        }
    }
    true
}

/// How a step that needs the store ended.
enum Stored<T> {
    Yes(T),
    /// The store refused (nothing written): the reason.
    Refused(String),
    /// The delivery's channel went away first; it will be redelivered.
    Gone,
}

/// Run `step` until the store takes it: while it cannot be reached the
/// delivery is held (its permit too, so the route pauses), never acked
/// without it.
async fn until_stored<T, F, Fut>(
    ctx: &RouteContext,
    acker: &amqp::DeliveryAcker,
    what: &str,
    mut step: F,
) -> Stored<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::kv::KvError>>,
{
    let mut delay = Backoff::new(BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(2),
    });
    let mut warned = false;
    loop {
        match step().await {
            Ok(v) => return Stored::Yes(v),
            Err(crate::kv::KvError::Unavailable(e)) => {
                if !acker.is_current() {
                    return Stored::Gone;
                }
                if !warned {
                    warn!(queue = %ctx.queue, error = %e, "Redis cannot {what}; holding the delivery and retrying.");
                    warned = true;
                }
                tokio::time::sleep(delay.next_fixed()).await;
            }
            Err(e) => return Stored::Refused(format!("key-value commit refused: {e}")),
        }
    }
}

/// Commit `writes` under a `commit` span, until Redis takes them.
async fn commit_writes(
    ctx: &RouteContext,
    plugin: &Plugin,
    writes: &crate::kv::Writes,
    acker: &amqp::DeliveryAcker,
) -> Stored<()> {
    let Some(ns) = plugin.kv() else {
        // Unreachable in practice: a plugin without a namespace has no
        // writes. Refused, so the delivery is retried, not acked.
        return Stored::Refused("key-value state is not available".into());
    };
    let span = tracing::debug_span!(
        "commit",
        "otel.name" = "commit",
        "warren.plugin" = plugin.name(),
        "warren.kv.keys" = writes.len(),
    );
    let stored = until_stored(ctx, acker, "take the delivery's key-value writes", || {
        ns.commit(writes).instrument(span.clone())
    })
    .await;
    if let Stored::Refused(reason) = &stored {
        telemetry::set_error(&span, "kv_commit_refused", reason);
    }
    stored
}

/// What a failed delivery becomes: a retry copy while attempts remain,
/// else a dead letter.
fn retry_or_dead_letter(
    ctx: &RouteContext,
    plugin: &Plugin,
    d: &plugins::Delivery,
    attempt: u32,
    reason: &str,
) -> OutboundMessage {
    if attempt < ctx.max_attempts {
        retry_copy(ctx, d, attempt + 1, reason, None)
    } else {
        dead_letter(
            ctx,
            plugin,
            d,
            attempt,
            "retries-exhausted",
            None,
            &format!("gave up after {attempt} attempts: {reason}"),
        )
    }
}

/// The delivery `d` again, for the retry tier of `requested` (the delay
/// the plugin asked for; `None` is the backoff schedule's delay for
/// `next_attempt`): its properties and headers as they came, plus Warren's
/// (the attempt, the reason, the queue), without an `expiration` (the
/// message's own is kept in a header: the tier's TTL is the delay, and a
/// shorter one of the message's own would drop it in the tier).
fn retry_copy(
    ctx: &RouteContext,
    d: &plugins::Delivery,
    next_attempt: u32,
    reason: &str,
    requested: Option<Duration>,
) -> OutboundMessage {
    let mut properties = d.properties.clone();
    headers::stash_expiration(&mut properties);
    properties.set_header(headers::ATTEMPT, HeaderValue::I64(next_attempt.into()));
    properties.set_header(headers::REASON, HeaderValue::String(reason.to_string()));
    properties.set_header(headers::QUEUE, HeaderValue::String(ctx.queue.clone()));
    if properties.delivery_mode.is_none() {
        properties.delivery_mode = Some(2);
    }
    metric::retried(&ctx.queue);
    let delay = requested.unwrap_or_else(|| ctx.config.retry_delay_for(next_attempt));
    OutboundMessage {
        exchange: ctx.config.retry_tier_name(ctx.config.retry_tier_for(delay)),
        // A tier dead-letters with the routing key: back to this queue.
        routing_key: ctx.queue.clone(),
        properties,
        body: d.body.clone(),
    }
}

/// The delivery `d` for the dead-letter queue: its properties and headers
/// as they came, plus Warren's `x-warren-*` (the message's own
/// `expiration` kept in a header: a dead letter must not expire).
fn dead_letter(
    ctx: &RouteContext,
    plugin: &Plugin,
    d: &plugins::Delivery,
    attempts: u32,
    outcome: &str,
    trap: Option<&str>,
    reason: &str,
) -> OutboundMessage {
    let mut p: MessageProperties = d.properties.clone();
    headers::stash_expiration(&mut p);
    let text = |s: &str| HeaderValue::String(s.to_string());
    p.set_header(headers::PLUGIN, text(plugin.name()));
    p.set_header(headers::VERSION, text(plugin.version()));
    p.set_header(headers::OUTCOME, text(outcome));
    p.set_header(headers::REASON, text(reason));
    p.set_header(headers::ATTEMPTS, HeaderValue::I64(attempts.into()));
    p.set_header(headers::QUEUE, text(&ctx.queue));
    p.set_header(headers::ORIGINAL_EXCHANGE, text(&d.exchange));
    p.set_header(headers::ORIGINAL_ROUTING_KEY, text(&d.routing_key));
    if let Some(kind) = trap {
        p.set_header(headers::TRAP, text(kind));
    }
    metric::dead_lettered(plugin.name(), outcome);
    OutboundMessage {
        exchange: ctx.config.dead_letter_exchange.clone(),
        routing_key: ctx.queue.clone(),
        properties: p,
        body: d.body.clone(),
    }
}
