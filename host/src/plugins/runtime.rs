//! The one wasmtime `Engine` and `Linker` of the process, and the epoch
//! ticker that enforces deadlines.
//!
//! Owns: engine configuration (component model, pooling allocator, epoch
//! interruption), the linker with WASI (no filesystem, network or
//! environment) and Warren's `host` imports, and a global cap on live
//! instances so the pool can never be exhausted by dispatch. Does not own
//! plugins (see [`super::plugin`]) or decide what happens to an outcome.
//!
//! # The compile cache
//! Compiling an interpreter-sized component (Python, SpiderMonkey) takes
//! 14–18 s of CPU; loading its compilation from disk takes milliseconds.
//! The engine uses wasmtime's own cache (`wasmtime::Cache`): entries are
//! keyed by the component's bytes *and* a hash of everything in the engine
//! configuration and wasmtime version that affects code, so an entry from
//! another Warren build or other pool settings is never used; an entry
//! that does not decompress or deserialize is recompiled and overwritten;
//! a background worker keeps the directory under
//! `compile-cache-max-bytes`. Every path that compiles — `run`, reloads,
//! admin uploads, `check`, `invoke` — goes through the engine, so all of
//! them use it. The directory must be writable only by Warren's user: an
//! entry is machine code that is loaded without being compiled again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

use super::bindings::PluginWorld;
use super::footprint::{Footprint, Pool};
use super::instance::State;
use super::limits::Limits;
use super::plugin::PluginCounters;

/// Engine-wide settings (the `[plugins.runtime]` config section).
#[derive(
    Debug,
    Clone,
    Deserialize,
    serde::Serialize,
    documented::DocumentedOpt,
    documented::DocumentedFieldsOpt,
)]
#[serde(rename_all = "kebab-case", default)]
pub struct RuntimeConfig {
    /// Most plugin instances alive at once across all plugins (the size of
    /// the pooling allocator).
    pub max_instances: u32,
    /// Largest memory any plugin may be given; also the pool's slot size.
    pub max_memory_bytes: u64,
    /// Longest deadline any plugin may be given, in milliseconds.
    pub max_deadline_ms: u32,
    /// Largest per-plugin concurrency.
    pub max_concurrency: u32,
    /// Memory limit of plugins that ask for none.
    pub default_memory_bytes: u64,
    /// Deadline of plugins that ask for none, in milliseconds.
    pub default_deadline_ms: u32,
    /// Concurrency of plugins that ask for none.
    pub default_max_concurrency: u32,
    /// Most messages one invocation may `publish`.
    pub max_outputs: usize,
    /// Most body bytes one invocation may `publish` in total.
    pub max_output_bytes: usize,
    /// How often the epoch advances, ms. A deadline counts the ticks its
    /// guest runs: a guest running alone traps between its deadline and
    /// two ticks after it.
    pub epoch_tick_ms: u32,
    /// Bytes of each linear memory kept mapped between instances and reset
    /// with `memset` instead of `madvise`: the fast path for a guest whose
    /// working set fits (a Rust plugin built with the SDK's stack size fits
    /// in the default); more costs a longer `memset` on every drop.
    pub memory_keep_resident: usize,
    /// Where compiled components are kept; default
    /// `$XDG_CACHE_HOME/warren/compiled` (or `~/.cache/warren/compiled`).
    pub compile_cache_dir: Option<PathBuf>,
    /// Size the compile cache is trimmed to (least recently used first);
    /// 0 turns the cache off.
    pub compile_cache_max_bytes: u64,
    /// Whether a plugin may call the public origins its manifest lists
    /// (`outbound`) without an operator grant. Off: only what
    /// `allow-outbound` grants.
    pub grant_manifest_origins: bool,
    /// Origins (`https://api.example.com`, `http://*.svc.local`) and
    /// address ranges (`10.0.0.0/8`) every plugin may call, on top of its
    /// own `[plugin.<name>] allow-outbound`. A loopback, private,
    /// link-local or metadata address is reached only through a grant of
    /// its host by name here or a range containing it.
    pub allow_outbound: Vec<String>,
    /// Static name entries for outbound calls (`"inventory.internal" =
    /// "10.0.0.7"`), answered instead of DNS; the address is checked like
    /// any resolved one.
    pub outbound_hosts: BTreeMap<String, std::net::IpAddr>,
    /// A PEM file of extra CA certificates trusted by outbound `https://`
    /// calls (a service behind a private CA), on top of the system's roots.
    /// Read when the runtime starts; a file that cannot be read or holds no
    /// certificate stops the start.
    pub outbound_ca_file: Option<PathBuf>,
    /// Timeout of one outbound call that asks for none, ms.
    pub outbound_timeout_ms: u32,
    /// Most outbound calls of one plugin in flight at once.
    pub outbound_max_in_flight: u32,
    /// Wall-clock budget of all outbound calls of one delivery for plugins
    /// that ask for none, ms; must stay below
    /// `dispatch.broker-consumer-timeout-ms`.
    pub default_wall_deadline_ms: u32,
    /// Longest wall-clock budget any plugin may be given, ms.
    pub max_wall_deadline_ms: u32,
    /// Largest outbound response body for plugins that ask for no limit.
    pub default_max_response_bytes: u64,
    /// Largest outbound response body any plugin may be given.
    pub max_response_bytes: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let d = Limits::default();
        Self {
            max_instances: 256,
            max_memory_bytes: 256 << 20,
            max_deadline_ms: 60_000,
            max_concurrency: 256,
            default_memory_bytes: d.memory_bytes,
            default_deadline_ms: u32::try_from(d.deadline.as_millis()).unwrap_or(u32::MAX),
            default_max_concurrency: d.max_concurrency,
            max_outputs: 100_000,
            max_output_bytes: 64 << 20,
            epoch_tick_ms: 5,
            memory_keep_resident: 128 << 10,
            compile_cache_dir: None,
            compile_cache_max_bytes: 1 << 30,
            grant_manifest_origins: true,
            allow_outbound: Vec::new(),
            outbound_hosts: BTreeMap::new(),
            outbound_ca_file: None,
            outbound_timeout_ms: 10_000,
            outbound_max_in_flight: 64,
            default_wall_deadline_ms: u32::try_from(d.wall_deadline.as_millis())
                .unwrap_or(u32::MAX),
            max_wall_deadline_ms: 60_000,
            default_max_response_bytes: d.max_response_bytes,
            max_response_bytes: 64 << 20,
        }
    }
}

impl RuntimeConfig {
    /// Every problem with these settings.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_instances == 0 {
            out.push("plugins.runtime.max-instances must be at least 1".into());
        }
        if self.max_memory_bytes < super::limits::MIN_MEMORY_BYTES {
            out.push("plugins.runtime.max-memory-bytes must be at least 1048576".into());
        }
        if self.default_memory_bytes > self.max_memory_bytes {
            out.push("plugins.runtime.default-memory-bytes exceeds max-memory-bytes".into());
        }
        if self.max_deadline_ms == 0 || self.default_deadline_ms == 0 {
            out.push("plugins.runtime deadlines must be at least 1 ms".into());
        }
        if self.default_deadline_ms > self.max_deadline_ms {
            out.push("plugins.runtime.default-deadline-ms exceeds max-deadline-ms".into());
        }
        if self.max_concurrency == 0 || self.default_max_concurrency == 0 {
            out.push("plugins.runtime concurrency limits must be at least 1".into());
        }
        if self.epoch_tick_ms == 0 || self.epoch_tick_ms > 1000 {
            out.push("plugins.runtime.epoch-tick-ms must be between 1 and 1000".into());
        }
        if self.default_wall_deadline_ms == 0
            || self.default_wall_deadline_ms > self.max_wall_deadline_ms
        {
            out.push(
                "plugins.runtime.default-wall-deadline-ms must be at least 1 and at most max-wall-deadline-ms"
                    .into(),
            );
        }
        if self.default_max_response_bytes > self.max_response_bytes {
            out.push(
                "plugins.runtime.default-max-response-bytes exceeds max-response-bytes".into(),
            );
        }
        if self.outbound_timeout_ms == 0 || self.outbound_max_in_flight == 0 {
            out.push(
                "plugins.runtime.outbound-timeout-ms and outbound-max-in-flight must be at least 1"
                    .into(),
            );
        }
        if let Err(e) = super::outbound::OperatorGrants::parse(&self.allow_outbound) {
            out.push(format!("plugins.runtime.allow-outbound: {e}"));
        }
        if let Some(path) = &self.outbound_ca_file
            && let Err(e) = super::outbound::read_ca_file(path)
        {
            out.push(e);
        }
        if let Some(dir) = &self.compile_cache_dir
            && !dir.is_absolute()
        {
            out.push(format!(
                "plugins.runtime.compile-cache-dir {} must be an absolute path",
                dir.display()
            ));
        }
        out
    }

    /// The compile cache's directory, if the cache is on and one is known.
    pub fn compile_cache_dir(&self) -> Option<PathBuf> {
        if self.compile_cache_max_bytes == 0 {
            return None;
        }
        self.compile_cache_dir.clone().or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(base.join("warren").join("compiled"))
        })
    }

    /// Limits for a plugin that asks for none.
    pub fn default_limits(&self) -> Limits {
        Limits {
            memory_bytes: self.default_memory_bytes,
            deadline: Duration::from_millis(self.default_deadline_ms.into()),
            max_concurrency: self.default_max_concurrency,
            wall_deadline: Duration::from_millis(self.default_wall_deadline_ms.into()),
            max_response_bytes: self.default_max_response_bytes,
        }
    }

    /// The largest limits any plugin may get.
    pub fn caps(&self) -> Limits {
        Limits {
            memory_bytes: self.max_memory_bytes,
            deadline: Duration::from_millis(self.max_deadline_ms.into()),
            max_concurrency: self.max_concurrency,
            wall_deadline: Duration::from_millis(self.max_wall_deadline_ms.into()),
            max_response_bytes: self.max_response_bytes,
        }
    }
}

/// Why the runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid plugin runtime settings: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
    #[error("failed to create the wasmtime engine: {0}")]
    Engine(String),
    #[error("cannot use the compile cache {dir}: {message}")]
    CompileCache { dir: PathBuf, message: String },
    #[error("failed to link host imports: {0}")]
    Link(String),
    #[error("failed to start the epoch ticker thread: {0}")]
    Ticker(std::io::Error),
    #[error("cannot set up TLS for outbound calls: {0}")]
    OutboundTls(String),
}

/// The shared plugin runtime. Cheap to clone.
#[derive(Clone)]
pub struct PluginRuntime {
    inner: Arc<RuntimeInner>,
}

pub(super) struct RuntimeInner {
    pub(super) engine: Engine,
    pub(super) linker: Linker<State>,
    pub(super) config: RuntimeConfig,
    /// The pool's slots: an instance's footprint is taken before it is
    /// instantiated, so the pool never refuses one.
    pub(super) pool: Pool,
    /// The TLS settings of every plugin's outbound client (trusted roots
    /// read once, at start).
    pub(super) outbound_tls: rustls::ClientConfig,
    /// The compile cache, when on (a handle on the engine's; shares its
    /// hit and miss counts).
    cache: Option<Cache>,
    /// The store of plugins that declare `state`, if this runtime has one.
    pub(super) kv: Option<crate::kv::Store>,
    /// Outcome counters by plugin name; they outlive reloads.
    counters: std::sync::Mutex<BTreeMap<String, Arc<PluginCounters>>>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl PluginRuntime {
    /// Build the engine, the linker and start the epoch ticker. Plugins
    /// get no key-value store (see [`PluginRuntime::with_kv`]).
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        Self::with_kv(config, None)
    }

    /// [`PluginRuntime::new`], with `kv` as the store of plugins whose
    /// manifest declares `state`.
    pub fn with_kv(
        config: RuntimeConfig,
        kv: Option<crate::kv::Store>,
    ) -> Result<Self, RuntimeError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(RuntimeError::InvalidConfig(problems));
        }
        let cache = compile_cache(&config)?;
        let outbound_tls = super::outbound::tls_config(config.outbound_ca_file.as_deref())
            .map_err(RuntimeError::OutboundTls)?;
        let mut engine_cfg = engine_config(&config);
        engine_cfg.cache(cache.clone());
        let engine =
            Engine::new(&engine_cfg).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        wasmtime_wasi_config::add_to_linker(&mut linker, State::wasi_config)
            .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        PluginWorld::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        super::bindings::keyvalue::Imports::add_to_linker::<State, HasSelf<State>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        let ticker = EpochTicker::start(
            engine.clone(),
            Duration::from_millis(config.epoch_tick_ms.into()),
        )
        .map_err(RuntimeError::Ticker)?;
        let pool = Pool::new(config.max_instances, pool_totals(&config));
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                pool,
                outbound_tls,
                cache,
                kv,
                counters: std::sync::Mutex::default(),
                _ticker: ticker,
            }),
        })
    }

    /// The settings the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Compilations served from the compile cache, and compilations done
    /// and stored, since start; `None` with the cache off.
    pub fn compile_cache_stats(&self) -> Option<CompileCacheStats> {
        self.inner.cache.as_ref().map(|c| CompileCacheStats {
            dir: c.directory().clone(),
            hits: c.cache_hits() as u64,
            misses: c.cache_misses() as u64,
        })
    }

    /// The counters of plugin `name`, shared by all its versions.
    pub(super) fn counters(&self, name: &str) -> Arc<PluginCounters> {
        let mut all = crate::sync::lock(&self.inner.counters);
        all.entry(name.to_string()).or_default().clone()
    }

    pub(super) fn inner(&self) -> &RuntimeInner {
        &self.inner
    }
}

/// What the compile cache has done since start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CompileCacheStats {
    pub dir: PathBuf,
    /// Components loaded from a cached compilation.
    pub hits: u64,
    /// Components compiled (and stored).
    pub misses: u64,
}

/// wasmtime's compile cache in `rc`'s directory, trimmed to its size.
fn compile_cache(rc: &RuntimeConfig) -> Result<Option<Cache>, RuntimeError> {
    let Some(dir) = rc.compile_cache_dir() else {
        return Ok(None);
    };
    let fail = |message: String| RuntimeError::CompileCache {
        dir: dir.clone(),
        message,
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
    let mut cc = CacheConfig::new();
    cc.with_directory(&dir)
        .with_files_total_size_soft_limit(rc.compile_cache_max_bytes);
    Cache::new(cc).map(Some).map_err(|e| fail(format!("{e:#}")))
}

/// The pool's totals of core instances, memories and tables for
/// `max_instances` component instances. A Rust wasip2 component takes one
/// core module plus a few shims; the budget leaves room for interpreters
/// (14 core instances for componentize-py), which admission by footprint
/// then runs fewer of at once.
fn pool_totals(rc: &RuntimeConfig) -> Footprint {
    let n = rc.max_instances;
    Footprint {
        core_instances: n.saturating_mul(8),
        memories: n.saturating_mul(2),
        tables: n.saturating_mul(4),
    }
}

fn engine_config(rc: &RuntimeConfig) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    let n = rc.max_instances;
    let totals = pool_totals(rc);
    pool.total_component_instances(n)
        .total_core_instances(totals.core_instances)
        .total_memories(totals.memories)
        .total_tables(totals.tables)
        .total_stacks(n)
        .max_memory_size(usize::try_from(rc.max_memory_bytes).unwrap_or(usize::MAX))
        // Reset the first bytes of each memory with memset rather than
        // unmapping them: a small handler's whole working set (a Rust plugin
        // built with the SDK's 64 KiB stack fits in 128 KiB) stays resident
        // between deliveries. No PAGEMAP_SCAN: scanning for dirtied pages
        // costs more per drop than the 128 KiB memset it saves
        // (`cargo bench --bench sandbox`).
        .linear_memory_keep_resident(rc.memory_keep_resident)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::No);
    let mut cfg = Config::new();
    cfg.wasm_component_model(true)
        .epoch_interruption(true)
        // No component-model async: its per-store bookkeeping costs ~30% of
        // a fresh invocation and Warren's contract does not use it.
        .concurrency_support(false)
        .memory_init_cow(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    cfg
}

/// Advances the engine's epoch on a plain thread, so deadlines hold even if
/// every tokio worker is busy. Stopped and joined on drop.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("warren-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
