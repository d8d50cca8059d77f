//! One invocation: a fresh `Store` with limits and a deadline, the call,
//! and the drop. Also the host side of the `host` interface.
//!
//! Owns the per-invocation state (outputs collected from `publish`, the
//! captured stderr, the memory limiter). Nothing here outlives one call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings as wit;
use super::limits::Limits;
use super::outbound::{Budget, CallError, Outbound};
use super::outcome::TrapKind;
use super::runtime::RuntimeInner;

mod kv;
use crate::kv::{Txn, Writes};
use crate::message::OutboundMessage;
pub use kv::Bucket;
pub(crate) use kv::KvAccess;
use kv::KvState;

/// How much of a guest's stderr is kept per invocation (panic messages).
const STDERR_CAPACITY: usize = 64 << 10;
/// How much of it goes into a trap message.
const STDERR_IN_MESSAGE: usize = 1024;
/// Largest table a guest may grow.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Who is running, for log fields.
#[derive(Debug)]
pub(crate) struct Ident {
    pub(crate) name: String,
    pub(crate) version: String,
}

/// Store data of one invocation.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    ident: Arc<Ident>,
    config: Arc<PluginConfig>,
    outputs: Vec<OutboundMessage>,
    output_bytes: usize,
    max_outputs: usize,
    max_output_bytes: usize,
    /// Epoch ticks the guest may still see running before it traps.
    ticks_left: u64,
    /// Ticks one call gets (its deadline in ticks).
    ticks: u64,
    deadline_limit: std::time::Duration,
    http_ctx: wasmtime_wasi_http::WasiHttpCtx,
    /// Outbound HTTP of this plugin and the current delivery's budget.
    http: HttpHooks,
    /// Key-value state: the plugin's namespace and this delivery's writes.
    kv: KvState,
}

/// The host side of outbound calls for one store: the plugin's client and
/// grants, and the wall budget of the delivery in flight.
struct HttpHooks {
    outbound: Option<Arc<Outbound>>,
    wall: std::time::Duration,
    budget: Option<Budget>,
    /// Set when a call found the budget spent: the delivery is retried.
    spent: Arc<AtomicBool>,
    /// The calls of the delivery in flight, when it records them
    /// (`warren invoke`); `None` on the delivery path.
    calls: Option<Arc<std::sync::Mutex<Vec<CallRecord>>>>,
    /// A deduplicated delivery's `Idempotency-Key` base and its calls so
    /// far (see [`super::Plugin::invoke_keyed`]).
    idempotency: Option<(Arc<str>, Arc<std::sync::atomic::AtomicU32>)>,
}

/// The header a deduplicated delivery's calls carry.
const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// One outbound call as `warren invoke` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CallRecord {
    pub method: String,
    pub url: String,
    /// The response's status, when there was one.
    pub status: Option<u16>,
    /// Why there was none.
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

impl HttpHooks {
    /// Make one call; without outbound settings every call is refused.
    fn call(
        &self,
        req: super::outbound::Request,
    ) -> impl std::future::Future<Output = Result<super::outbound::Response, CallError>> + Send + 'static
    {
        let outbound = self.outbound.clone();
        let budget = self.budget;
        let spent = self.spent.clone();
        let calls = self.calls.clone();
        let mut req = req;
        if let Some((base, n)) = &self.idempotency
            && !req
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(IDEMPOTENCY_KEY))
        {
            let n = n.fetch_add(1, Ordering::Relaxed);
            req.headers
                .push((IDEMPOTENCY_KEY.to_string(), format!("{base}-{n}")));
        }
        async move {
            let started = std::time::Instant::now();
            let record = calls.map(|c| (c, req.method.clone(), req.url.clone()));
            let r = match outbound {
                None => Err(CallError::Denied(
                    "denied by rule `no-outbound`: outbound calls are not available here".into(),
                )),
                Some(outbound) => {
                    let mut now_spent = false;
                    let r = outbound.call(req, budget, &mut now_spent).await;
                    if now_spent {
                        spent.store(true, Ordering::Relaxed);
                    }
                    r
                }
            };
            if let Some((calls, method, url)) = record {
                crate::sync::lock(&calls).push(CallRecord {
                    method,
                    url,
                    status: r.as_ref().ok().map(|r| r.status),
                    error: r.as_ref().err().map(ToString::to_string),
                    elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
            r
        }
    }
}

impl wasmtime_wasi_http::WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<
                            dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                                + Send,
                        >,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        use http_body_util::BodyExt;
        drop(fut);
        let hooks = HttpHooks {
            outbound: self.outbound.clone(),
            wall: self.wall,
            budget: self.budget,
            spent: self.spent.clone(),
            calls: self.calls.clone(),
            idempotency: self.idempotency.clone(),
        };
        Box::new(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await?.to_bytes();
            let headers = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let timeout = options.and_then(|o| o.first_byte_timeout.or(o.connect_timeout));
            let req = super::outbound::Request {
                method: parts.method.as_str().to_string(),
                url: parts.uri.to_string(),
                headers,
                body: (!body.is_empty()).then(|| body.to_vec()),
                timeout,
            };
            let resp = hooks.call(req).await.map_err(|e| match e {
                CallError::Timeout(_) => wasmtime_wasi_http::Error::HttpResponseTimeout,
                CallError::TooLarge(_) => wasmtime_wasi_http::Error::HttpResponseBodySize(None),
                CallError::Invalid(_) => wasmtime_wasi_http::Error::HttpRequestUriInvalid,
                other => wasmtime_wasi_http::Error::InternalError(Some(other.to_string())),
            })?;
            let mut builder = http::Response::builder().status(resp.status);
            for (k, v) in &resp.headers {
                builder = builder.header(k.as_str(), v.as_str());
            }
            let body = http_body_util::Full::new(bytes::Bytes::from(resp.body))
                .map_err(|never| match never {})
                .boxed_unsync();
            let resp = builder
                .body(body)
                .map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))?;
            let done: Box<
                dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send,
            > = Box::new(async { Ok(()) });
            Ok((resp, done))
        })
    }
}

impl wasmtime_wasi_http::WasiHttpView for State {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.http,
        }
    }
}

impl State {
    /// `wasi:config/store` over the plugin's config values.
    pub(crate) fn wasi_config(&mut self) -> wasmtime_wasi_config::WasiConfig<'_> {
        wasmtime_wasi_config::WasiConfig::from(&self.config.vars)
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Fails memory growth past the plugin's limit with a recognisable error,
/// so exhaustion is told apart from other traps.
struct MemoryLimiter {
    limit: usize,
    /// The largest size any one memory asked for (granted or not).
    peak: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded (asked for {desired})")]
pub(crate) struct MemoryLimitExceeded {
    limit: usize,
    desired: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.peak = self.peak.max(desired);
        if desired > self.limit {
            return Err(MemoryLimitExceeded {
                limit: self.limit,
                desired,
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A fresh store, ready for one instantiation and call.
pub(crate) struct Invocation {
    pub(crate) store: Store<State>,
    stderr: MemoryOutputPipe,
}

/// A plugin's `[plugin.<name>] config` values, built once per load and
/// shared by every instance: `host.config(key)` reads `values`,
/// `wasi:config/store` reads `vars`, and neither is copied per delivery.
pub(crate) struct PluginConfig {
    values: BTreeMap<String, String>,
    vars: wasmtime_wasi_config::WasiConfigVariables,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self::new(BTreeMap::new())
    }
}

impl PluginConfig {
    pub(crate) fn new(values: BTreeMap<String, String>) -> Self {
        let vars = wasmtime_wasi_config::WasiConfigVariables::from_iter(
            values.iter().map(|(k, v)| (k.clone(), v.clone())),
        );
        Self { values, vars }
    }
}

impl Invocation {
    pub(crate) fn new(
        rt: &RuntimeInner,
        ident: Arc<Ident>,
        config: Arc<PluginConfig>,
        outbound: Option<Arc<Outbound>>,
        kv: KvAccess,
        limits: &Limits,
    ) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let tick = std::time::Duration::from_millis(rt.config.epoch_tick_ms.into());
        let ticks = deadline_ticks(limits.deadline, tick);
        // Defaults of the builder: no env, no args, no preopens, stdin
        // closed, stdout discarded, TCP/UDP with every address denied, no
        // name lookup. Only stderr is captured, for panic messages.
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
                peak: 0,
            },
            ident,
            config,
            http_ctx: wasmtime_wasi_http::WasiHttpCtx::new(),
            http: HttpHooks {
                outbound,
                wall: limits.wall_deadline,
                budget: None,
                spent: Arc::default(),
                calls: None,
                idempotency: None,
            },
            kv: KvState {
                txn: Txn::new(match &kv {
                    KvAccess::Granted(ns) => ns.limits(),
                    KvAccess::Denied(_) => crate::kv::KvLimits::default(),
                }),
                access: kv,
            },
            outputs: Vec::new(),
            output_bytes: 0,
            max_outputs: rt.config.max_outputs,
            max_output_bytes: rt.config.max_output_bytes,
            ticks_left: ticks,
            ticks,
            deadline_limit: limits.deadline,
        };
        let mut store = Store::new(&rt.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        // The deadline counts the ticks a guest sees while it runs, not the
        // clock: a delivery waiting for a core behind a hundred others (a
        // Python plugin at prefetch 100 on two cores) must not trap for it.
        // At every tick: trap when none are left, otherwise yield to the
        // executor so a busy guest never starves other tasks.
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if state.ticks_left <= 1 {
                return Ok(UpdateDeadline::Interrupt);
            }
            state.ticks_left -= 1;
            Ok(UpdateDeadline::Yield(1))
        });
        Self { store, stderr }
    }

    /// Ready the store for another call of a reused instance: a new
    /// deadline, no outputs; its outbound calls recorded if `record`, and
    /// keyed from `idempotency` if set.
    pub(crate) fn begin_call(&mut self, record: bool, idempotency: Option<String>) {
        let state = self.store.data_mut();
        state.ticks_left = state.ticks;
        state.outputs.clear();
        state.output_bytes = 0;
        drop(state.kv.txn.take());
        let now = std::time::Instant::now();
        state.http.budget = Some(Budget {
            deadline: now + state.http.wall,
            total: state.http.wall,
        });
        state.http.spent = Arc::default();
        state.http.calls = record.then(Arc::default);
        state.http.idempotency = idempotency.map(|base| (Arc::from(base), Arc::default()));
    }

    /// The outbound calls the delivery made.
    pub(crate) fn take_calls(&mut self) -> Vec<CallRecord> {
        match self.store.data_mut().http.calls.take() {
            Some(calls) => std::mem::take(&mut *crate::sync::lock(&calls)),
            None => Vec::new(),
        }
    }

    /// Why this delivery must be retried whatever `handle` returned: an
    /// outbound call found its wall budget spent.
    pub(crate) fn budget_spent(&self) -> Option<String> {
        let http = &self.store.data().http;
        http.spent.load(Ordering::Relaxed).then(|| {
            format!(
                "wall deadline of {} ms for outbound calls exceeded",
                http.wall.as_millis()
            )
        })
    }

    /// The largest size one of this store's memories asked for so far.
    pub(crate) fn memory_peak(&self) -> u64 {
        self.store.data().limiter.peak as u64
    }

    /// The messages `publish` collected.
    pub(crate) fn take_outputs(&mut self) -> Vec<OutboundMessage> {
        std::mem::take(&mut self.store.data_mut().outputs)
    }

    /// The key-value writes of a delivery that succeeded, to commit.
    pub(crate) fn take_writes(&mut self) -> Writes {
        self.store.data_mut().kv.txn.take()
    }

    /// Drop the outputs and key-value writes of a delivery that did not
    /// succeed, counting the writes as discarded.
    pub(crate) fn discard(&mut self) {
        let state = self.store.data_mut();
        state.outputs.clear();
        let calls = state.kv.txn.calls();
        drop(state.kv.txn.take());
        if let KvAccess::Granted(ns) = &state.kv.access {
            ns.discarded(calls);
        }
    }

    /// Classify a failed instantiation or call.
    pub(crate) fn classify(&self, err: &wasmtime::Error) -> (TrapKind, String) {
        let stderr = self.stderr.contents();
        let stderr = String::from_utf8_lossy(&stderr);
        let stderr = stderr.trim();
        if let Some(e) = err.downcast_ref::<MemoryLimitExceeded>() {
            return (TrapKind::Memory, e.to_string());
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => (
                TrapKind::Deadline,
                format!(
                    "deadline of {} ms exceeded",
                    self.store.data().deadline_limit.as_millis()
                ),
            ),
            Some(Trap::UnreachableCodeReached) => {
                let reason = panic_reason(stderr);
                let msg = if reason.is_empty() {
                    "guest panicked or aborted (wasm unreachable executed)".to_string()
                } else {
                    format!("guest panicked: {}", truncate(&reason, STDERR_IN_MESSAGE))
                };
                (TrapKind::Panic, msg)
            }
            Some(trap) => (TrapKind::Other, format!("guest trapped: {trap}")),
            None => (TrapKind::Other, format!("{err:#}")),
        }
    }
}

/// What a guest's stderr says about its panic, without the boilerplate
/// of the language runtime that printed it: Rust's `thread '..' panicked
/// at FILE:` line and backtrace note go, and an exception that escaped a
/// QuickJS handler (componentize-qjs prints `Failed to call 'handle':
/// Value(Exception(Exception { message: Some("..") ..`) is its message.
/// Python's SDK writes its one-line summary itself.
fn panic_reason(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE=1`"))
        .collect();
    let body = match lines.split_first() {
        Some((first, rest)) if first.starts_with("thread '") && first.contains(" panicked at ") => {
            rest.join("\n")
        }
        _ => lines.join("\n"),
    };
    if body.starts_with("Failed to call '")
        && let Some(at) = body.find("Exception { message: Some(\"")
        && let Some(message) = debug_string(&body[at + "Exception { message: Some(".len()..])
    {
        return message;
    }
    body.trim().to_string()
}

/// The string a Rust `{:?}` literal at the start of `s` stands for.
fn debug_string(s: &str) -> Option<String> {
    let mut chars = s.strip_prefix('"')?.chars();
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                'u' => {
                    let rest: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    let code = u32::from_str_radix(rest.strip_prefix('{')?, 16).ok()?;
                    out.push(char::from_u32(code)?);
                }
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
}

/// Ticks that cover `deadline`: the first tick comes anywhere within one
/// tick of the start, so a guest running alone traps between `deadline`
/// and two ticks after it.
fn deadline_ticks(deadline: std::time::Duration, tick: std::time::Duration) -> u64 {
    let tick = tick.as_micros().max(1);
    let n = deadline.as_micros().div_ceil(tick);
    u64::try_from(n).unwrap_or(u64::MAX).saturating_add(1)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl wit::TypesHost for State {}

impl wit::Host for State {
    fn log(&mut self, level: wit::LogLevel, text: String) {
        let (plugin, version) = (&self.ident.name, &self.ident.version);
        match level {
            wit::LogLevel::Trace => tracing::trace!(plugin, version, "{text}"),
            wit::LogLevel::Debug => tracing::debug!(plugin, version, "{text}"),
            wit::LogLevel::Info => tracing::info!(plugin, version, "{text}"),
            wit::LogLevel::Warn => tracing::warn!(plugin, version, "{text}"),
            wit::LogLevel::Error => tracing::error!(plugin, version, "{text}"),
        }
    }

    fn publish(&mut self, msg: wit::Message) -> Result<(), wit::PublishError> {
        if msg.exchange.len() > super::manifest::MAX_SHORTSTR {
            return Err(wit::PublishError::Invalid(format!(
                "exchange name is {} bytes; the limit is 255",
                msg.exchange.len()
            )));
        }
        if msg.routing_key.len() > super::manifest::MAX_SHORTSTR {
            return Err(wit::PublishError::Invalid(format!(
                "routing key is {} bytes; the limit is 255",
                msg.routing_key.len()
            )));
        }
        if self.outputs.len() >= self.max_outputs {
            return Err(wit::PublishError::LimitExceeded(format!(
                "at most {} messages per delivery",
                self.max_outputs
            )));
        }
        if self.output_bytes + msg.body.len() > self.max_output_bytes {
            return Err(wit::PublishError::LimitExceeded(format!(
                "at most {} body bytes per delivery",
                self.max_output_bytes
            )));
        }
        let body_len = msg.body.len();
        let out = outbound_from_wit(msg).map_err(wit::PublishError::Invalid)?;
        self.output_bytes += body_len;
        self.outputs.push(out);
        Ok(())
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.values.get(&key).cloned()
    }
}

impl wit::HttpHost for State {
    async fn fetch(&mut self, req: wit::HttpRequest) -> Result<wit::HttpResponse, wit::HttpError> {
        let req = super::outbound::Request {
            method: req.method,
            url: req.url,
            headers: req.headers,
            body: req.body,
            timeout: req
                .timeout_ms
                .map(|ms| std::time::Duration::from_millis(ms.into())),
        };
        match self.http.call(req).await {
            Ok(r) => Ok(wit::HttpResponse {
                status: r.status,
                headers: r.headers,
                body: r.body,
            }),
            Err(CallError::Denied(t)) => Err(wit::HttpError::Denied(t)),
            Err(CallError::Timeout(t)) => Err(wit::HttpError::Timeout(t)),
            Err(CallError::TooLarge(t)) => Err(wit::HttpError::TooLarge(t)),
            Err(CallError::Invalid(t)) => Err(wit::HttpError::Invalid(t)),
            Err(CallError::Failed(t)) => Err(wit::HttpError::Failed(t)),
        }
    }
}

fn outbound_from_wit(msg: wit::Message) -> Result<OutboundMessage, String> {
    Ok(OutboundMessage {
        exchange: msg.exchange,
        routing_key: msg.routing_key,
        properties: super::properties::from_wit(msg.properties)?,
        body: Bytes::from(msg.body),
    })
}

#[cfg(test)]
mod tests {
    use super::{deadline_ticks, panic_reason};
    use std::time::Duration;

    #[test]
    fn a_deadline_is_covered_by_whole_ticks_plus_the_first_partial_one() {
        let ms = Duration::from_millis;
        assert_eq!(deadline_ticks(ms(1000), ms(5)), 201);
        assert_eq!(deadline_ticks(ms(1001), ms(5)), 202);
        assert_eq!(deadline_ticks(ms(1), ms(5)), 2);
    }

    #[test]
    fn panic_reasons_lose_the_runtime_boilerplate() {
        let rust = "thread '<unnamed>' (1) panicked at src/lib.rs:17:9:\nboom: order 42\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(panic_reason(rust), "boom: order 42");
        let qjs = "thread '<unnamed>' (1) panicked at crates/runtime/src/interpreter.rs:51:31:\nFailed to call 'handle': Value(Exception(\nException { message: Some(\"TypeError: boom: \\\"x\\\" \\u{e9}\"), stack: Some(\"    at trap (/sdk/warren.js:296:3)\\n\") })\n)\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace";
        assert_eq!(panic_reason(qjs), "TypeError: boom: \"x\" é");
        assert_eq!(panic_reason("ValueError: bad\n"), "ValueError: bad");
        assert_eq!(panic_reason(""), "");
    }
}
