//! The plugin set: which plugins serve which queues, at start and after
//! every reload.
//!
//! A reload has two phases. [`scan`] reads the plugins directory and
//! compiles and pre-instantiates every new or changed file (the runtime
//! compiles on a blocking thread: nothing on the delivery path waits). A
//! file that fails keeps its previous version serving. Then
//! [`Reloader::apply`] reconciles the routes: subscriptions that went away
//! are stopped (their in-flight deliveries finish and are acked first),
//! unchanged subscriptions of a changed plugin are swapped atomically
//! ([`Dispatcher::swap_plugin`]: deliveries already taken finish on the old
//! version, every later one runs on the new), changed subscriptions (prefetch,
//! bindings, ...) restart, and new ones start. Reloads are serialized.
//!
//! `[plugin.<name>]` overrides apply here, and only here, for start-up and
//! reloads alike ([`plugin_settings`], [`subscriptions_for`]).
//!
//! Does not own files: the admin API writes and removes them, then asks
//! for a reload.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tracing::{error, info, warn};

use super::Dispatcher;
use crate::config::PluginOverride;
use crate::plugins::directory::wasm_files;
use crate::plugins::manifest::Subscription;
use crate::plugins::{DirectoryError, Plugin, PluginRuntime, PluginSettings};

/// Counter: reloads, by `result` (`ok` when every file loaded, `partial`
/// when some failed).
pub const RELOADS: &str = "warren_plugin_reloads_total";

/// A plugin file that did not load (or a subscription that did not start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedPlugin {
    pub file: PathBuf,
    pub error: String,
}

/// The host settings of plugin `name`: limits and `config(key)` values
/// from `[plugin.<name>]`, or the defaults.
pub fn plugin_settings(overrides: &BTreeMap<String, PluginOverride>, name: &str) -> PluginSettings {
    overrides
        .get(name)
        .map(|o| PluginSettings {
            limits: o.limits,
            config: o.config_strings(),
        })
        .unwrap_or_default()
}

/// The subscriptions `plugin` serves: `[plugin.<name>] subscriptions` when
/// configured, else its manifest's.
pub fn subscriptions_for(
    overrides: &BTreeMap<String, PluginOverride>,
    plugin: &Plugin,
) -> Vec<Subscription> {
    overrides
        .get(plugin.name())
        .and_then(|o| o.subscriptions.clone())
        .unwrap_or_else(|| plugin.manifest().subscriptions.clone())
}

/// A plugin as the directory holds it.
#[derive(Clone)]
pub struct Candidate {
    pub plugin: Plugin,
    /// Hash of the file's bytes: equal digests are the same component.
    pub digest: u64,
}

/// What a scan of the directory found.
#[derive(Default)]
pub struct Scan {
    /// By manifest name.
    pub plugins: BTreeMap<String, Candidate>,
    pub failed: Vec<FailedPlugin>,
}

/// A hash of a file's bytes.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Read every `*.wasm` in `dir`. Files whose bytes are those of a plugin in
/// `current` (or of `hint`, a component the caller already compiled) are
/// not compiled again. A file that fails while an earlier version of it is
/// in `current` keeps that version (and is reported in `failed`).
pub async fn scan(
    runtime: &PluginRuntime,
    dir: &Path,
    overrides: &BTreeMap<String, PluginOverride>,
    current: &BTreeMap<String, Candidate>,
    hint: Option<&Candidate>,
) -> Result<Scan, DirectoryError> {
    let mut out = Scan::default();
    for path in wasm_files(dir)? {
        let previous = current.values().find(|c| c.plugin.path() == path);
        let loaded = match tokio::fs::read(&path).await {
            Err(e) => Err(format!("{}: cannot read file: {e}", path.display())),
            Ok(bytes) => {
                let digest = digest(&bytes);
                let known = previous
                    .into_iter()
                    .chain(hint.filter(|h| h.plugin.path() == path))
                    .find(|c| c.digest == digest);
                match known {
                    Some(c) => Ok(c.clone()),
                    None => runtime
                        .load_bytes(&path, bytes, &PluginSettings::default())
                        .await
                        .map(|p| {
                            let settings = plugin_settings(overrides, p.name());
                            Candidate {
                                plugin: p.with_settings(&settings),
                                digest,
                            }
                        })
                        .map_err(|e| e.to_string()),
                }
            }
        };
        let candidate = match loaded {
            Ok(c) => c,
            Err(error) => {
                out.failed.push(FailedPlugin {
                    file: path.clone(),
                    error,
                });
                match previous {
                    // The old version keeps serving.
                    Some(prev) => prev.clone(),
                    None => continue,
                }
            }
        };
        let name = candidate.plugin.name().to_string();
        if let Some(first) = out.plugins.get(&name) {
            out.failed.push(FailedPlugin {
                file: path.clone(),
                error: format!(
                    "{}: plugin name {name:?} is already loaded from {}",
                    path.display(),
                    first.plugin.path().display()
                ),
            });
            continue;
        }
        out.plugins.insert(name, candidate);
    }
    Ok(out)
}

/// A plugin in a reload report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginRef {
    pub name: String,
    pub version: String,
    pub file: PathBuf,
}

impl From<&Plugin> for PluginRef {
    fn from(p: &Plugin) -> Self {
        PluginRef {
            name: p.name().to_string(),
            version: p.version().to_string(),
            file: p.path().to_path_buf(),
        }
    }
}

/// A plugin whose component changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replaced {
    pub name: String,
    pub from_version: String,
    pub to_version: String,
    pub file: PathBuf,
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Plugins that were not loaded before.
    pub loaded: Vec<PluginRef>,
    /// Plugins now served by a new component.
    pub replaced: Vec<Replaced>,
    /// Plugins whose file is gone; their routes are stopped.
    pub removed: Vec<PluginRef>,
    /// Plugin names whose component did not change.
    pub unchanged: Vec<String>,
    /// Files that failed (an earlier version, if any, keeps serving) and
    /// subscriptions that could not start.
    pub failed: Vec<FailedPlugin>,
    /// Queues whose consumer started, stopped, or restarted with new
    /// subscription settings.
    pub routes_started: Vec<String>,
    pub routes_stopped: Vec<String>,
    pub routes_restarted: Vec<String>,
}

/// Why a reload did not run.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("warren is shutting down")]
    ShuttingDown,
}

/// A loaded plugin and the routes it serves.
#[derive(Clone)]
struct Loaded {
    candidate: Candidate,
    /// Subscriptions running for it, by queue.
    routes: BTreeMap<String, Subscription>,
}

#[derive(Default)]
struct State {
    loaded: BTreeMap<String, Loaded>,
    failed: Vec<FailedPlugin>,
}

/// Owns the plugin set and applies reloads, one at a time.
pub struct Reloader {
    runtime: PluginRuntime,
    dispatcher: Arc<Dispatcher>,
    dir: PathBuf,
    overrides: BTreeMap<String, PluginOverride>,
    /// How long a stopped route's in-flight deliveries may take.
    grace: Duration,
    /// Held for the whole of a reload; `true` once shutting down.
    serial: tokio::sync::Mutex<bool>,
    state: Mutex<State>,
}

impl Reloader {
    pub fn new(
        runtime: PluginRuntime,
        dispatcher: Arc<Dispatcher>,
        dir: PathBuf,
        overrides: BTreeMap<String, PluginOverride>,
        grace: Duration,
    ) -> Self {
        Self {
            runtime,
            dispatcher,
            dir,
            overrides,
            grace,
            serial: tokio::sync::Mutex::new(false),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The plugins directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The runtime plugins are loaded with.
    pub fn runtime(&self) -> &PluginRuntime {
        &self.runtime
    }

    /// The host settings of plugin `name`.
    pub fn settings(&self, name: &str) -> PluginSettings {
        plugin_settings(&self.overrides, name)
    }

    /// The loaded plugins, by name.
    pub fn plugins(&self) -> BTreeMap<String, Plugin> {
        self.state()
            .loaded
            .iter()
            .map(|(n, l)| (n.clone(), l.candidate.plugin.clone()))
            .collect()
    }

    /// Files that failed at the last start or reload.
    pub fn failed(&self) -> Vec<FailedPlugin> {
        self.state().failed.clone()
    }

    fn current(&self) -> BTreeMap<String, Candidate> {
        self.state()
            .loaded
            .iter()
            .map(|(n, l)| (n.clone(), l.candidate.clone()))
            .collect()
    }

    /// Rescan the directory and reconcile routes. `hint` is a component
    /// already compiled from a file the caller just wrote.
    pub async fn reload(&self, hint: Option<Candidate>) -> Result<ReloadReport, ReloadError> {
        let closed = self.serial.lock().await;
        if *closed {
            return Err(ReloadError::ShuttingDown);
        }
        let result = async {
            let scan = scan(
                &self.runtime,
                &self.dir,
                &self.overrides,
                &self.current(),
                hint.as_ref(),
            )
            .await?;
            Ok(self.apply_locked(scan).await)
        }
        .await;
        let label = match &result {
            Ok(r) if r.failed.is_empty() => "ok",
            Ok(_) => "partial",
            Err(_) => "error",
        };
        metrics::counter!(RELOADS, "result" => label).increment(1);
        result
    }

    /// Apply a scan made before the dispatcher existed (start-up).
    pub async fn apply(&self, scan: Scan) -> Result<ReloadReport, ReloadError> {
        let closed = self.serial.lock().await;
        if *closed {
            return Err(ReloadError::ShuttingDown);
        }
        Ok(self.apply_locked(scan).await)
    }

    /// No reload runs after this returns (shutdown); waits for one in
    /// progress.
    pub async fn close(&self) {
        *self.serial.lock().await = true;
    }

    async fn apply_locked(&self, scan: Scan) -> ReloadReport {
        let old = self.state().loaded.clone();
        let mut report = ReloadReport {
            failed: scan.failed,
            ..ReloadReport::default()
        };
        let desired: BTreeMap<String, BTreeMap<String, Subscription>> = scan
            .plugins
            .iter()
            .map(|(name, c)| {
                let subs = subscriptions_for(&self.overrides, &c.plugin)
                    .into_iter()
                    .map(|s| (s.queue.clone(), s))
                    .collect();
                (name.clone(), subs)
            })
            .collect();

        // 1. Stop routes that go away or change, so their queues are free
        //    for whoever takes them next.
        let mut next: BTreeMap<String, Loaded> = BTreeMap::new();
        let mut restarting: Vec<String> = Vec::new();
        for (name, loaded) in &old {
            let wanted = desired.get(name);
            let mut kept = BTreeMap::new();
            for (queue, sub) in &loaded.routes {
                match wanted.and_then(|w| w.get(queue)) {
                    Some(w) if w == sub => {
                        kept.insert(queue.clone(), sub.clone());
                    }
                    other => {
                        if let Err(e) = self.dispatcher.stop_route(queue, self.grace).await {
                            warn!(%queue, error = %e, "Route to stop was not running.");
                        }
                        if other.is_some() {
                            restarting.push(queue.clone());
                        } else {
                            report.routes_stopped.push(queue.clone());
                        }
                    }
                }
            }
            match scan.plugins.get(name) {
                Some(c) => {
                    next.insert(
                        name.clone(),
                        Loaded {
                            candidate: c.clone(),
                            routes: kept,
                        },
                    );
                }
                None => {
                    info!(plugin = %name, version = loaded.candidate.plugin.version(), "Plugin removed.");
                    report
                        .removed
                        .push(PluginRef::from(&loaded.candidate.plugin));
                }
            }
        }

        // 2. New or changed components: swap kept routes, start the rest.
        for (name, candidate) in &scan.plugins {
            let plugin = &candidate.plugin;
            let entry = next.entry(name.clone()).or_insert_with(|| Loaded {
                candidate: candidate.clone(),
                routes: BTreeMap::new(),
            });
            match old.get(name) {
                None => {
                    info!(plugin = %name, version = plugin.version(), file = %plugin.path().display(), "Plugin loaded.");
                    report.loaded.push(PluginRef::from(plugin));
                }
                Some(prev) if prev.candidate.digest == candidate.digest => {
                    report.unchanged.push(name.clone());
                }
                Some(prev) => {
                    let from = prev.candidate.plugin.version().to_string();
                    info!(plugin = %name, from = %from, to = plugin.version(), file = %plugin.path().display(), "Plugin replaced.");
                    for queue in entry.routes.keys() {
                        if let Err(e) = self.dispatcher.swap_plugin(queue, plugin.clone()) {
                            warn!(%queue, error = %e, "Route to swap was not running.");
                        }
                    }
                    report.replaced.push(Replaced {
                        name: name.clone(),
                        from_version: from,
                        to_version: plugin.version().to_string(),
                        file: plugin.path().to_path_buf(),
                    });
                }
            }
            let subs = desired.get(name).cloned().unwrap_or_default();
            if subs.is_empty() {
                warn!(plugin = %name, "Plugin has no subscriptions; configure some under [plugin.{name}].");
            }
            for (queue, sub) in subs {
                if entry.routes.contains_key(&queue) {
                    continue;
                }
                match self
                    .dispatcher
                    .start_route(sub.clone(), plugin.clone())
                    .await
                {
                    Ok(()) => {
                        if restarting.contains(&queue) {
                            report.routes_restarted.push(queue.clone());
                        } else {
                            report.routes_started.push(queue.clone());
                        }
                        entry.routes.insert(queue, sub);
                    }
                    Err(e) => {
                        error!(plugin = %name, error = %e, "Subscription not started.");
                        report.failed.push(FailedPlugin {
                            file: plugin.path().to_path_buf(),
                            error: e.to_string(),
                        });
                    }
                }
            }
        }
        for queue in restarting {
            if !report.routes_restarted.contains(&queue) {
                report.routes_stopped.push(queue);
            }
        }
        for f in &report.failed {
            error!(file = %f.file.display(), error = %f.error, "Plugin not loaded; the others run.");
        }
        let mut state = self.state();
        state.loaded = next;
        state.failed = report.failed.clone();
        report
    }
}
