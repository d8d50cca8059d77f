//! A loaded plugin: compiled and pre-instantiated once, invoked afresh for
//! every delivery.
//!
//! Owns: checking a file is a `warren:plugin` component, compiling it off
//! the async threads, calling `manifest()` once, the resolved limits and the
//! per-plugin concurrency permits. Does not own the plugins directory or
//! hot swap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Component, ComponentExportIndex, TypedFunc};

use super::bindings::{self as wit, PluginWorldPre};
use super::footprint::Footprint;
use super::instance::{Ident, Invocation, KvAccess, PluginConfig};
use super::limits::{Limits, LimitsOverride};
use super::manifest::Manifest;
use super::outbound::{Grants, OperatorGrants, Outbound, OutboundDefaults};
use super::outcome::{LoadError, Outcome};
use super::runtime::PluginRuntime;
use crate::message::MessageProperties;
use crate::sync::lock;

/// A delivery as the runtime hands it to a plugin.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub body: Bytes,
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    pub properties: MessageProperties,
    pub redelivered: bool,
    /// 1 on the first delivery.
    pub attempt: u32,
}

/// Host-side settings for one plugin: limits overrides and the values its
/// `config(key)` import returns.
#[derive(Debug, Clone, Default)]
pub struct PluginSettings {
    pub limits: LimitsOverride,
    pub config: BTreeMap<String, String>,
    /// Fresh instance per delivery, or reused ones.
    pub instance: InstancePolicy,
    /// The operator's outbound grants for this plugin (origins and CIDRs),
    /// on top of the runtime-wide ones.
    pub allow_outbound: Vec<String>,
}

/// How deliveries get their instance.
///
/// - `Fresh` (the default): every delivery runs in a new instance, so
///   nothing a delivery leaves in memory (globals, caches, a half-updated
///   structure after a bug) reaches the next one.
/// - `Reuse`: an instance serves one delivery at a time, for at most
///   `max_deliveries`, then is dropped; any trap (a panic, the deadline,
///   the memory limit) drops it too, so a fault costs exactly the delivery
///   in flight and the next delivery gets a fresh instance. Everything in
///   linear memory survives between the deliveries one instance serves:
///   module-level state in Python or JavaScript, `static`s in Rust. Worth
///   it for interpreters, whose fresh instance costs 10–100× the handler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum InstancePolicy {
    #[default]
    Fresh,
    Reuse {
        max_deliveries: u32,
    },
}

/// An idle instance kept for the next delivery under
/// [`InstancePolicy::Reuse`], with the pool slots it holds.
struct Warm {
    inv: Invocation,
    instance: wasmtime::component::Instance,
    served: u32,
    _slot: super::footprint::Admitted,
}

/// A loaded, checked plugin. Cheap to clone; clones share permits.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    runtime: PluginRuntime,
    pre: PluginWorldPre<super::instance::State>,
    /// Where `handle` is among the component's exports, found once at load
    /// so an invocation looks up and type-checks only that function (the
    /// generated `instantiate` would also look up and type-check
    /// `manifest` on every delivery).
    handle: ComponentExportIndex,
    path: PathBuf,
    manifest: Manifest,
    ident: Arc<Ident>,
    limits: Limits,
    /// The memory one instance takes before it handles anything (measured
    /// at load); a limit below it would trap every delivery.
    memory_floor: u64,
    /// Pool slots one instance takes; admitted before each instantiation.
    footprint: Footprint,
    policy: InstancePolicy,
    /// Idle instances under [`InstancePolicy::Reuse`] (at most the
    /// plugin's concurrency, since each served one delivery in flight).
    warm: std::sync::Mutex<Vec<Warm>>,
    config: Arc<PluginConfig>,
    /// Outbound HTTP: grants, client pool and limits, shared by instances.
    outbound: Arc<Outbound>,
    /// Key-value state: the plugin's namespace, or why it has none.
    kv: KvAccess,
    permits: Arc<Semaphore>,
    /// Shared by every version of the plugin with this name.
    counters: Arc<PluginCounters>,
}

impl PluginInner {
    /// A fresh store for one of this plugin's invocations under `limits`.
    fn invocation(&self, limits: &Limits) -> Invocation {
        Invocation::new(
            self.runtime.inner(),
            self.ident.clone(),
            self.config.clone(),
            Some(self.outbound.clone()),
            self.kv.clone(),
            limits,
        )
    }

    /// A fresh instance in `inv`'s store, and its `handle` export.
    async fn instantiate<'a>(
        &self,
        inv: &mut Invocation,
    ) -> wasmtime::Result<TypedFunc<(&'a wit::Delivery,), (Result<(), wit::HandleError>,)>> {
        let instance = self
            .pre
            .instance_pre()
            .instantiate_async(&mut inv.store)
            .await?;
        instance.get_typed_func(&mut inv.store, self.handle)
    }

    /// Call `handle` with `delivery` in `instance`, or in a fresh instance
    /// in `inv`'s store. Returns the outcome and the instance, unless it
    /// trapped: a trap retires the instance, whatever state it left stays
    /// with it.
    async fn call_handle(
        &self,
        inv: &mut Invocation,
        instance: Option<wasmtime::component::Instance>,
        delivery: &Delivery,
    ) -> (Outcome, Option<wasmtime::component::Instance>) {
        let input = delivery_to_wit(delivery);
        let result = async {
            let instance = match instance {
                Some(i) => i,
                None => {
                    self.pre
                        .instance_pre()
                        .instantiate_async(&mut inv.store)
                        .await?
                }
            };
            let handle = instance
                .get_typed_func::<(&wit::Delivery,), (Result<(), wit::HandleError>,)>(
                    &mut inv.store,
                    self.handle,
                )?;
            let (result,) = handle.call_async(&mut inv.store, (&input,)).await?;
            wasmtime::Result::Ok((instance, result))
        }
        .await;
        // Past the wall budget the delivery is retried, whatever the guest
        // made of the failed call (even a panic over it): the cause is the
        // time, and another attempt may find the service faster.
        if let Some(reason) = inv.budget_spent() {
            inv.discard();
            let instance = result.ok().map(|(i, _)| i);
            return (
                Outcome::Retry {
                    reason,
                    delay: None,
                },
                instance,
            );
        }
        let outcome = match result {
            Ok((instance, Ok(()))) => (
                Outcome::Ack {
                    outputs: inv.take_outputs(),
                    writes: inv.take_writes(),
                },
                Some(instance),
            ),
            Ok((instance, Err(wit::HandleError::Retry(reason)))) => (
                Outcome::Retry {
                    reason,
                    delay: None,
                },
                Some(instance),
            ),
            // The plugin's delay (a downstream's Retry-After), honoured by
            // dispatch's delay tiers.
            Ok((instance, Err(wit::HandleError::RetryAfter(r)))) => (
                Outcome::Retry {
                    reason: r.reason,
                    delay: Some(std::time::Duration::from_millis(r.delay_ms.into())),
                },
                Some(instance),
            ),
            Ok((instance, Err(wit::HandleError::Reject(reason)))) => {
                (Outcome::Reject { reason }, Some(instance))
            }
            Err(e) => {
                let (kind, message) = inv.classify(&e);
                (Outcome::Trapped { kind, message }, None)
            }
        };
        if !matches!(outcome.0, Outcome::Ack { .. }) {
            inv.discard();
        }
        outcome
    }
}

/// Outcomes counted per plugin name, across reloads, for `/status`.
#[derive(Debug, Default)]
pub struct PluginCounters {
    ack: AtomicU64,
    retry: AtomicU64,
    reject: AtomicU64,
    trap: AtomicU64,
}

/// A snapshot of [`PluginCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PluginCountersSnapshot {
    pub ack: u64,
    pub retry: u64,
    pub reject: u64,
    pub trap: u64,
}

impl PluginCounters {
    fn count(&self, outcome: &Outcome) {
        let c = match outcome {
            Outcome::Ack { .. } => &self.ack,
            Outcome::Retry { .. } => &self.retry,
            Outcome::Reject { .. } => &self.reject,
            Outcome::Trapped { .. } => &self.trap,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> PluginCountersSnapshot {
        PluginCountersSnapshot {
            ack: self.ack.load(Ordering::Relaxed),
            retry: self.retry.load(Ordering::Relaxed),
            reject: self.reject.load(Ordering::Relaxed),
            trap: self.trap.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.inner.path)
            .field("name", &self.inner.manifest.name)
            .field("version", &self.inner.manifest.version)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// The first bytes of a component (layer 1) and of a core module (layer 0).
const WASM_MAGIC: &[u8; 4] = b"\0asm";

impl PluginRuntime {
    /// Load the plugin in `path` with `settings`.
    pub async fn load_file(
        &self,
        path: &Path,
        settings: &PluginSettings,
    ) -> Result<Plugin, LoadError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| LoadError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        self.load_bytes(path, bytes, settings).await
    }

    /// Load a plugin from `bytes`; `path` names it in errors.
    pub async fn load_bytes(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        settings: &PluginSettings,
    ) -> Result<Plugin, LoadError> {
        self.load_bytes_with(path, bytes, |_| settings.clone())
            .await
    }

    /// [`PluginRuntime::load_bytes`] with the settings for the name the
    /// component's manifest declares (an operator's `[plugin.<name>]`), so
    /// its limits are checked against what it needs before it is accepted.
    pub async fn load_bytes_with(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        settings_for: impl FnOnce(&str) -> PluginSettings,
    ) -> Result<Plugin, LoadError> {
        let path = path.to_path_buf();
        check_layer(&path, &bytes)?;
        let (component, footprint) = self.compile(&path, bytes).await?;
        if let Some(reason) = self.inner().pool.refuses(&footprint) {
            return Err(LoadError::TooBig { path, reason });
        }
        if let Some(found) = contract_version(&self.inner().engine, &component)
            && found != CONTRACT_VERSION
        {
            return Err(LoadError::WrongContract {
                path,
                found,
                expected: CONTRACT_VERSION,
            });
        }
        let (pre, handle) = self.link(&path, &component)?;
        let (manifest, memory_floor) = self.call_manifest(&path, &pre, &footprint).await?;
        let problems = manifest.problems();
        if !problems.is_empty() {
            return Err(LoadError::InvalidManifest { path, problems });
        }
        let settings = &settings_for(&manifest.name);
        let limits = Limits::resolve(
            self.config().default_limits(),
            self.config().caps(),
            manifest.limits,
            settings.limits,
        );
        check_floor(&path, memory_floor, &limits)?;
        let outbound = self.outbound(&path, &manifest, settings, &limits)?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                runtime: self.clone(),
                kv: self.kv_access(&manifest),
                outbound,
                pre,
                handle,
                path,
                ident: Arc::new(Ident {
                    name: manifest.name.clone(),
                    version: manifest.version.clone(),
                }),
                permits: Arc::new(Semaphore::new(limits.max_concurrency as usize)),
                counters: self.counters(&manifest.name),
                manifest,
                limits,
                memory_floor,
                footprint,
                policy: settings.instance,
                warm: std::sync::Mutex::default(),
                config: Arc::new(PluginConfig::new(settings.config.clone())),
            }),
        })
    }

    /// Key-value state for plugin `manifest`: its namespace when it
    /// declares `state` and this runtime has a store.
    fn kv_access(&self, manifest: &Manifest) -> KvAccess {
        match (&self.inner().kv, manifest.state) {
            (Some(store), true) => KvAccess::Granted(Arc::new(store.namespace(&manifest.name))),
            (None, true) => KvAccess::Denied(Arc::from(
                "key-value state is not available here: no store is configured",
            )),
            (_, false) => KvAccess::Denied(Arc::from(format!(
                "plugin {}'s manifest does not declare `state`, so it has no key-value state",
                manifest.name
            ))),
        }
    }

    /// The outbound side of plugin `manifest` under `settings`.
    fn outbound(
        &self,
        path: &Path,
        manifest: &Manifest,
        settings: &PluginSettings,
        limits: &Limits,
    ) -> Result<Arc<Outbound>, LoadError> {
        let rc = self.config();
        let fail = |message: String| LoadError::Grants {
            path: path.to_path_buf(),
            message,
        };
        let mut entries = rc.allow_outbound.clone();
        entries.extend(settings.allow_outbound.iter().cloned());
        let operator = OperatorGrants::parse(&entries).map_err(fail)?;
        let grants = Grants::resolve(&manifest.outbound, rc.grant_manifest_origins, operator);
        let defaults = OutboundDefaults {
            call_timeout: std::time::Duration::from_millis(rc.outbound_timeout_ms.into()),
            max_in_flight: rc.outbound_max_in_flight,
            tls: self.inner().outbound_tls.clone(),
            hosts: Arc::new(
                rc.outbound_hosts
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), *v))
                    .collect(),
            ),
        };
        Outbound::new(&manifest.name, grants, limits.max_response_bytes, &defaults)
            .map(Arc::new)
            .map_err(fail)
    }

    /// Compile `bytes` on a blocking thread (compiling takes long enough to
    /// hold up the deliveries sharing an async thread) and price one
    /// instance in pool slots.
    async fn compile(
        &self,
        path: &Path,
        bytes: Vec<u8>,
    ) -> Result<(Component, Footprint), LoadError> {
        let engine = self.inner().engine.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let component =
                Component::from_binary(&engine, &bytes).map_err(|e| format!("{e:#}"))?;
            let footprint = Footprint::of(&bytes, &component)?;
            Ok::<_, String>((component, footprint))
        })
        .await
        .map_err(|e| LoadError::Compile {
            path: path.to_path_buf(),
            message: format!("compiler task failed: {e}"),
        })?;
        compiled.map_err(|message| LoadError::Compile {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Link `component` against the host's imports and find its `handle`
    /// export: it must be a `warren:plugin` world.
    fn link(
        &self,
        path: &Path,
        component: &Component,
    ) -> Result<(PluginWorldPre<super::instance::State>, ComponentExportIndex), LoadError> {
        let pre = self
            .inner()
            .linker
            .instantiate_pre(component)
            .and_then(PluginWorldPre::new)
            .map_err(|e| LoadError::WrongWorld {
                path: path.to_path_buf(),
                message: format!("{e:#}"),
            })?;
        let handle = handle_export(component).ok_or_else(|| LoadError::WrongWorld {
            path: path.to_path_buf(),
            message: format!("no `{HANDLER}` export with a `handle` function"),
        })?;
        Ok((pre, handle))
    }

    async fn call_manifest(
        &self,
        path: &Path,
        pre: &PluginWorldPre<super::instance::State>,
        footprint: &Footprint,
    ) -> Result<(Manifest, u64), LoadError> {
        let fail = |message: String| LoadError::ManifestCall {
            path: path.to_path_buf(),
            message,
        };
        let _slot = self
            .inner()
            .pool
            .admit(footprint)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let ident = Arc::new(Ident {
            name: file_stem(path),
            version: "?".into(),
        });
        // Under the largest limits any plugin may get: the manifest says
        // what the plugin asks for, and what it takes here is its floor.
        let limits = self.config().caps();
        let mut inv = Invocation::new(
            self.inner(),
            ident,
            Arc::default(),
            None,
            KvAccess::default(),
            &limits,
        );
        let result = async {
            let world = pre.instantiate_async(&mut inv.store).await?;
            world
                .warren_plugin_handler()
                .call_manifest(&mut inv.store)
                .await
        }
        .await;
        match result {
            Ok(m) => Ok((Manifest::from(m), inv.memory_peak())),
            Err(e) => {
                let (kind, message) = inv.classify(&e);
                Err(fail(format!("{kind} trap: {message}")))
            }
        }
    }
}

/// Refuse bytes that are not a WebAssembly component (a core module, or
/// no wasm at all) before compiling anything.
fn check_layer(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
        return Err(LoadError::NotWasm {
            path: path.to_path_buf(),
        });
    }
    // Bytes 4..8: version and layer; layer 1 is a component.
    if bytes[6..8] != [1, 0] {
        return Err(LoadError::CoreModule {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Refuse `limits` that leave less memory than the plugin takes to start.
fn check_floor(path: &Path, floor: u64, limits: &Limits) -> Result<(), LoadError> {
    if floor > limits.memory_bytes {
        return Err(LoadError::MemoryFloor {
            path: path.to_path_buf(),
            needs: floor,
            limit: limits.memory_bytes,
        });
    }
    Ok(())
}

/// The contract version this host runs (`package` in `wit/plugin.wit`).
pub const CONTRACT_VERSION: &str = "0.3.0";
/// The exported interface plugins implement.
const HANDLER: &str = "warren:plugin/handler@0.3.0";
/// What every version of that interface's name starts with.
const HANDLER_ANY_VERSION: &str = "warren:plugin/handler@";

/// The contract version `component` exports its handler for, if it
/// exports one of any version.
fn contract_version(engine: &wasmtime::Engine, component: &Component) -> Option<String> {
    component
        .component_type()
        .exports(engine)
        .find_map(|(name, _)| name.strip_prefix(HANDLER_ANY_VERSION).map(str::to_owned))
}

fn handle_export(component: &Component) -> Option<ComponentExportIndex> {
    let interface = component.get_export_index(None, HANDLER)?;
    component.get_export_index(Some(&interface), "handle")
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Plugin {
    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// `manifest().name`.
    pub fn name(&self) -> &str {
        &self.inner.manifest.name
    }

    /// `manifest().version`.
    pub fn version(&self) -> &str {
        &self.inner.manifest.version
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The limits it runs under.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The same compiled plugin with other host settings (new limits, new
    /// config values, fresh permits). No recompilation.
    pub fn with_settings(&self, settings: &PluginSettings) -> Result<Plugin, LoadError> {
        let rt = &self.inner.runtime;
        let limits = Limits::resolve(
            rt.config().default_limits(),
            rt.config().caps(),
            self.inner.manifest.limits,
            settings.limits,
        );
        check_floor(&self.inner.path, self.inner.memory_floor, &limits)?;
        let outbound = rt.outbound(&self.inner.path, &self.inner.manifest, settings, &limits)?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                runtime: rt.clone(),
                kv: self.inner.kv.clone(),
                outbound,
                pre: self.inner.pre.clone(),
                handle: self.inner.handle,
                path: self.inner.path.clone(),
                manifest: self.inner.manifest.clone(),
                ident: self.inner.ident.clone(),
                permits: Arc::new(Semaphore::new(limits.max_concurrency as usize)),
                limits,
                memory_floor: self.inner.memory_floor,
                footprint: self.inner.footprint,
                policy: settings.instance,
                warm: std::sync::Mutex::default(),
                config: Arc::new(PluginConfig::new(settings.config.clone())),
                counters: self.inner.counters.clone(),
            }),
        })
    }

    /// The plugin's key-value namespace, when it declares `state` and
    /// the runtime has a store: where its deliveries' writes commit.
    pub fn kv(&self) -> Option<&crate::kv::Namespace> {
        match &self.inner.kv {
            KvAccess::Granted(ns) => Some(ns),
            KvAccess::Denied(_) => None,
        }
    }

    /// What the plugin may call (manifest origins granted, and the
    /// operator's grants).
    pub fn grants(&self) -> &Grants {
        &self.inner.outbound.grants
    }

    /// The memory one instance takes before it handles anything.
    pub fn memory_floor(&self) -> u64 {
        self.inner.memory_floor
    }

    /// Pool slots one instance takes.
    pub fn footprint(&self) -> Footprint {
        self.inner.footprint
    }

    /// Outcomes handled so far by every version of this plugin.
    pub fn counters(&self) -> PluginCountersSnapshot {
        self.inner.counters.snapshot()
    }

    /// Count `outcome` among those this plugin handled: dispatch does,
    /// once per delivery, where it records the delivery's metrics.
    pub(crate) fn count(&self, outcome: &Outcome) {
        self.inner.counters.count(outcome);
    }

    /// Wait for one of this plugin's concurrency permits. Dispatch holds it
    /// from before instantiation until the delivery is acknowledged.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        self.inner.permits.clone().acquire_owned().await
    }

    /// Handle one delivery in a fresh instance, or under
    /// [`InstancePolicy::Reuse`] in an idle one. Never fails: every fault is
    /// an [`Outcome::Trapped`].
    pub async fn invoke(&self, delivery: &Delivery) -> Outcome {
        self.invoke_recording(delivery, false, None).await.0
    }

    /// [`Plugin::invoke`] for a deduplicated delivery: each outbound call
    /// without an `Idempotency-Key` of its own gets `<base>-<n>`, `n`
    /// counting the delivery's calls from 0, so a second run of the same
    /// delivery sends the same keys.
    pub async fn invoke_keyed(&self, delivery: &Delivery, idempotency: Option<String>) -> Outcome {
        self.invoke_recording(delivery, false, idempotency).await.0
    }

    /// [`Plugin::invoke`], with the outbound calls the delivery made
    /// (`warren invoke` prints them).
    pub async fn invoke_with_calls(
        &self,
        delivery: &Delivery,
    ) -> (Outcome, Vec<super::instance::CallRecord>) {
        self.invoke_recording(delivery, true, None).await
    }

    async fn invoke_recording(
        &self,
        delivery: &Delivery,
        record: bool,
        idempotency: Option<String>,
    ) -> (Outcome, Vec<super::instance::CallRecord>) {
        let inner = &*self.inner;
        let rt = inner.runtime.inner();
        let warm = match inner.policy {
            InstancePolicy::Reuse { .. } => lock(&inner.warm).pop(),
            InstancePolicy::Fresh => None,
        };
        let (mut inv, instance, served, slot) = match warm {
            Some(w) => (w.inv, Some(w.instance), w.served, w._slot),
            None => {
                let Ok(slot) = rt.pool.admit(&inner.footprint).await else {
                    let outcome = Outcome::Trapped {
                        kind: super::outcome::TrapKind::Other,
                        message: "plugin runtime is shutting down".into(),
                    };
                    return (outcome, Vec::new());
                };
                let inv = inner.invocation(&inner.limits);
                (inv, None, 0, slot)
            }
        };
        inv.begin_call(record, idempotency);
        let (outcome, instance) = inner.call_handle(&mut inv, instance, delivery).await;
        let calls = inv.take_calls();
        if let (InstancePolicy::Reuse { max_deliveries }, Some(instance)) = (inner.policy, instance)
            && served + 1 < max_deliveries
        {
            lock(&inner.warm).push(Warm {
                inv,
                instance,
                served: served + 1,
                _slot: slot,
            });
        }
        (outcome, calls)
    }

    /// How deliveries get their instance.
    pub fn instance_policy(&self) -> InstancePolicy {
        self.inner.policy
    }
}

/// One instance kept alive and called again and again. Only the sandbox
/// benchmark uses it, as the lower bound a fresh instance is compared with:
/// state leaks between calls, so Warren never serves deliveries this way.
#[doc(hidden)]
pub struct ReusedInstance {
    inv: Invocation,
    world: wit::PluginWorld,
}

impl Plugin {
    #[doc(hidden)]
    pub async fn reused_instance(&self) -> Result<ReusedInstance, String> {
        let inner = &*self.inner;
        let mut limits = inner.limits;
        limits.deadline = std::time::Duration::from_secs(3600);
        let mut inv = inner.invocation(&limits);
        let world = inner
            .pre
            .instantiate_async(&mut inv.store)
            .await
            .map_err(|e| format!("{e:#}"))?;
        Ok(ReusedInstance { inv, world })
    }

    /// Where the time of a fresh invocation goes, in ns per call: store
    /// (with its WASI context), instantiation, the call, the drop. Only the
    /// sandbox benchmark uses it.
    #[doc(hidden)]
    pub async fn bench_phases(&self, delivery: &Delivery, n: u32) -> [f64; 4] {
        let inner = &*self.inner;
        let mut t = [std::time::Duration::ZERO; 4];
        for _ in 0..n {
            let a = std::time::Instant::now();
            let mut inv = inner.invocation(&inner.limits);
            let b = std::time::Instant::now();
            let Ok(handle) = inner.instantiate(&mut inv).await else {
                return [f64::NAN; 4];
            };
            let c = std::time::Instant::now();
            let input = delivery_to_wit(delivery);
            let _ = handle.call_async(&mut inv.store, (&input,)).await;
            let d = std::time::Instant::now();
            drop(inv);
            let e = std::time::Instant::now();
            t[0] += b - a;
            t[1] += c - b;
            t[2] += d - c;
            t[3] += e - d;
        }
        t.map(|d| d.as_nanos() as f64 / f64::from(n))
    }
}

impl ReusedInstance {
    #[doc(hidden)]
    pub async fn call(&mut self, delivery: &Delivery) -> bool {
        let input = delivery_to_wit(delivery);
        let ok = matches!(
            self.world
                .warren_plugin_handler()
                .call_handle(&mut self.inv.store, &input)
                .await,
            Ok(Ok(()))
        );
        drop(self.inv.take_outputs());
        ok
    }
}

fn delivery_to_wit(d: &Delivery) -> wit::Delivery {
    wit::Delivery {
        body: d.body.to_vec(),
        exchange: d.exchange.clone(),
        routing_key: d.routing_key.clone(),
        queue: d.queue.clone(),
        properties: super::properties::to_wit(&d.properties),
        redelivered: d.redelivered,
        attempt: d.attempt.max(1),
    }
}

#[cfg(test)]
mod contract_tests {
    use super::*;

    #[test]
    fn the_contract_version_is_the_wit_package_version() {
        let wit = include_str!("../../../wit/plugin.wit");
        assert!(
            wit.contains(&format!("package warren:plugin@{CONTRACT_VERSION};")),
            "wit/plugin.wit is not warren:plugin@{CONTRACT_VERSION}"
        );
        assert_eq!(HANDLER, format!("{HANDLER_ANY_VERSION}{CONTRACT_VERSION}"));
    }
}
