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
//! for a reload; [`watch`] (optional) reloads when the directory changes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tracing::{error, info, warn};

use super::Dispatcher;
use crate::plugins::PluginOverride;
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
            instance: o.instance_policy(),
            allow_outbound: o.allow_outbound.clone(),
        })
        .unwrap_or_default()
}

/// The subscriptions `plugin` serves: `[plugin.<name>] subscriptions` when
/// configured, else its manifest's; each deduplicated as `[plugin.<name>]
/// dedup` says when it is set.
pub fn subscriptions_for(
    overrides: &BTreeMap<String, PluginOverride>,
    plugin: &Plugin,
) -> Vec<Subscription> {
    let o = overrides.get(plugin.name());
    let mut subs = o
        .and_then(|o| o.subscriptions.clone())
        .unwrap_or_else(|| plugin.manifest().subscriptions.clone());
    if let Some(d) = o.and_then(|o| o.dedup.as_ref()) {
        for s in &mut subs {
            s.dedup = Some(d.clone());
        }
    }
    subs
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
/// `current` (or of one in `known`, components compiled earlier from the
/// same path) are not compiled again. A file that fails while an earlier version of it is
/// in `current` keeps that version (and is reported in `failed`).
pub async fn scan(
    runtime: &PluginRuntime,
    dir: &Path,
    overrides: &BTreeMap<String, PluginOverride>,
    current: &BTreeMap<String, Candidate>,
    known: &[Candidate],
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
                    .chain(known.iter().filter(|k| k.plugin.path() == path))
                    .find(|c| c.digest == digest);
                match known {
                    Some(c) => Ok(c.clone()),
                    None => runtime
                        .load_bytes_with(&path, bytes, |name| plugin_settings(overrides, name))
                        .await
                        .map(|plugin| Candidate { plugin, digest })
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
    /// Plugins that may now call origins or addresses they could not
    /// before: a reload that widens what a plugin reaches says so.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outbound_widened: Vec<Widened>,
}

/// Outbound grants a reload added to one plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Widened {
    pub name: String,
    /// Origins and ranges granted now that were not before.
    pub added: Vec<String>,
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
    /// Components that served recently and were replaced or removed, so a
    /// rollback needs no compilation. At most [`RECENT`].
    recent: Mutex<VecDeque<Candidate>>,
}

/// How many replaced components are kept compiled for rollbacks.
const RECENT: usize = 4;

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
            recent: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
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

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Candidate>> {
        crate::sync::lock(&self.recent)
    }

    /// A component already compiled from `path` with these bytes (serving
    /// now, or replaced recently), if any.
    pub fn compiled(&self, path: &Path, digest: u64) -> Option<Candidate> {
        let matches = |c: &Candidate| c.digest == digest && c.plugin.path() == path;
        let serving = self
            .state()
            .loaded
            .values()
            .map(|l| &l.candidate)
            .find(|c| matches(c))
            .cloned();
        serving.or_else(|| self.recent().iter().find(|c| matches(c)).cloned())
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
            let known: Vec<Candidate> = hint
                .into_iter()
                .chain(self.recent().iter().cloned())
                .collect();
            let scan = scan(
                &self.runtime,
                &self.dir,
                &self.overrides,
                &self.current(),
                &known,
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
        let plugins = scan.plugins;
        let desired: Routes = plugins
            .iter()
            .map(|(name, c)| {
                let subs = subscriptions_for(&self.overrides, &c.plugin)
                    .into_iter()
                    .map(|s| (s.queue.clone(), s))
                    .collect();
                (name.clone(), subs)
            })
            .collect();
        let running: Routes = old
            .iter()
            .map(|(n, l)| (n.clone(), l.routes.clone()))
            .collect();
        let changed: BTreeSet<String> = plugins
            .iter()
            .filter(|(n, c)| old.get(*n).is_some_and(|o| o.candidate.digest != c.digest))
            .map(|(n, _)| n.clone())
            .collect();
        let plan = plan(&running, &changed, &desired);
        report_plugins(&old, &plugins, &changed, &desired, &mut report);
        let routes = self.carry_out(&plan, running, &plugins, &mut report).await;
        report_routes(&plan, &routes, &mut report);
        for f in &report.failed {
            error!(file = %f.file.display(), error = %f.error, "Plugin not loaded; the others run.");
        }
        self.commit(plugins, routes, &report);
        report
    }

    /// Change the routes as `plan` says: stop, then swap, then start.
    /// Returns the routes now running.
    async fn carry_out(
        &self,
        plan: &Plan,
        running: Routes,
        plugins: &BTreeMap<String, Candidate>,
        report: &mut ReloadReport,
    ) -> Routes {
        // 1. Stop what goes away or changes (in-flight deliveries finish and
        //    are acked first), so the queues are free for what comes next.
        let mut routes = running;
        for (name, queue) in &plan.stop {
            if let Err(e) = self.dispatcher.stop_route(queue, self.grace).await {
                warn!(%queue, error = %e, "Route to stop was not running.");
            }
            if let Some(r) = routes.get_mut(name) {
                r.remove(queue);
            }
        }
        // 2. Swap kept routes of changed plugins: atomic per route.
        for (name, queue) in &plan.swap {
            let Some(c) = plugins.get(name) else {
                continue;
            };
            self.dispatcher.declare_outputs(&c.plugin).await;
            if let Err(e) = self.dispatcher.swap_plugin(queue, c.plugin.clone()) {
                warn!(%queue, error = %e, "Route to swap was not running.");
            }
        }
        // 3. Start new and changed subscriptions.
        for (name, sub) in &plan.start {
            let Some(c) = plugins.get(name) else {
                continue;
            };
            let queue = sub.queue.clone();
            match self
                .dispatcher
                .start_route(sub.clone(), c.plugin.clone())
                .await
            {
                Ok(()) => {
                    routes
                        .entry(name.clone())
                        .or_default()
                        .insert(queue, sub.clone());
                }
                Err(e) => {
                    error!(plugin = %name, error = %e, "Subscription not started.");
                    report.failed.push(FailedPlugin {
                        file: c.plugin.path().to_path_buf(),
                        error: e.to_string(),
                    });
                }
            }
        }
        routes
    }

    /// Make `plugins` with their running `routes` the plugin set; keep the
    /// components that stop serving among the recent ones.
    fn commit(
        &self,
        plugins: BTreeMap<String, Candidate>,
        mut routes: Routes,
        report: &ReloadReport,
    ) {
        let next: BTreeMap<String, Loaded> = plugins
            .into_iter()
            .map(|(name, candidate)| {
                let routes = routes.remove(&name).unwrap_or_default();
                (name, Loaded { candidate, routes })
            })
            .collect();
        let mut state = self.state();
        let mut recent = self.recent();
        for (name, l) in &state.loaded {
            let gone = next
                .get(name)
                .is_none_or(|n| n.candidate.digest != l.candidate.digest);
            if gone {
                recent.retain(|c| c.digest != l.candidate.digest);
                recent.push_front(l.candidate.clone());
            }
        }
        recent.truncate(RECENT);
        state.loaded = next;
        state.failed = report.failed.clone();
    }
}

/// Log and report each plugin removed, loaded, replaced or unchanged, and
/// warn about plugins without subscriptions.
fn report_plugins(
    old: &BTreeMap<String, Loaded>,
    plugins: &BTreeMap<String, Candidate>,
    changed: &BTreeSet<String>,
    desired: &Routes,
    report: &mut ReloadReport,
) {
    for (name, loaded) in old {
        if !plugins.contains_key(name) {
            info!(plugin = %name, version = loaded.candidate.plugin.version(), "Plugin removed.");
            report
                .removed
                .push(PluginRef::from(&loaded.candidate.plugin));
        }
    }
    for (name, candidate) in plugins {
        let plugin = &candidate.plugin;
        if let Some(prev) = old.get(name) {
            let added = plugin.grants().widened_from(prev.candidate.plugin.grants());
            if !added.is_empty() {
                warn!(plugin = %name, added = ?added, "Reload widens the plugin's outbound grants.");
                report.outbound_widened.push(Widened {
                    name: name.clone(),
                    added,
                });
            }
        }
        match old.get(name) {
            None => {
                info!(plugin = %name, version = plugin.version(), file = %plugin.path().display(), "Plugin loaded.");
                report.loaded.push(PluginRef::from(plugin));
            }
            Some(_) if !changed.contains(name) => {
                report.unchanged.push(name.clone());
            }
            Some(prev) => {
                let from = prev.candidate.plugin.version().to_string();
                info!(plugin = %name, from = %from, to = plugin.version(), file = %plugin.path().display(), "Plugin replaced.");
                report.replaced.push(Replaced {
                    name: name.clone(),
                    from_version: from,
                    to_version: plugin.version().to_string(),
                    file: plugin.path().to_path_buf(),
                });
            }
        }
        if desired.get(name).is_none_or(BTreeMap::is_empty) {
            warn!(plugin = %name, "Plugin has no subscriptions; configure some under [plugin.{name}].");
        }
    }
}

/// Report the queues whose consumer started, stopped or restarted: a
/// queue stopped and started again restarted; a start that failed is not
/// in `routes`.
fn report_routes(plan: &Plan, routes: &Routes, report: &mut ReloadReport) {
    let stopped: BTreeSet<&String> = plan.stop.iter().map(|(_, q)| q).collect();
    let started: BTreeSet<&String> = plan
        .start
        .iter()
        .filter(|(n, s)| routes.get(n).is_some_and(|r| r.contains_key(&s.queue)))
        .map(|(_, s)| &s.queue)
        .collect();
    report.routes_restarted = stopped
        .intersection(&started)
        .map(|q| (*q).clone())
        .collect();
    report.routes_stopped = stopped.difference(&started).map(|q| (*q).clone()).collect();
    report.routes_started = started.difference(&stopped).map(|q| (*q).clone()).collect();
}

/// Name, length and modification time of every `*.wasm` in `dir`.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    wasm_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let len = m.as_ref().map_or(0, std::fs::Metadata::len);
            let modified = m.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}

/// Reload whenever the plugins directory changed and then held still for
/// one more poll (a file being copied in is not loaded half-written).
/// Polls every `every` until `cancel`.
pub async fn watch(
    reloader: Arc<Reloader>,
    every: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let dir = reloader.dir().to_path_buf();
    let mut applied = fingerprint(&dir);
    let mut last = applied.clone();
    let mut ticker = crate::sync::Ticker::new(every);
    while ticker.tick(&cancel).await {
        let now = fingerprint(&dir);
        if now != applied && now == last {
            info!(dir = %dir.display(), "Plugins directory changed; reloading.");
            match reloader.reload(None).await {
                Ok(r) => info!(
                    loaded = r.loaded.len(),
                    replaced = r.replaced.len(),
                    removed = r.removed.len(),
                    failed = r.failed.len(),
                    "Reloaded."
                ),
                Err(ReloadError::ShuttingDown) => return,
                Err(e) => warn!(error = %e, "Reload after a directory change failed."),
            }
            applied = now.clone();
        }
        last = now;
    }
}

/// Subscriptions by plugin name, then by queue.
type Routes = BTreeMap<String, BTreeMap<String, Subscription>>;

/// What a reload does to the routes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// (plugin, queue): routes to stop, because their plugin or
    /// subscription went away or the subscription changed.
    stop: Vec<(String, String)>,
    /// (plugin, queue): routes kept as they are whose plugin has a new
    /// component.
    swap: Vec<(String, String)>,
    /// (plugin, subscription): routes to start, new or changed.
    start: Vec<(String, Subscription)>,
}

/// Reconcile `running` routes with `desired` ones; `changed` names the
/// plugins whose component is new.
fn plan(running: &Routes, changed: &BTreeSet<String>, desired: &Routes) -> Plan {
    let mut p = Plan::default();
    for (name, subs) in running {
        for (queue, sub) in subs {
            match desired.get(name).and_then(|d| d.get(queue)) {
                Some(d) if d == sub => {
                    if changed.contains(name) {
                        p.swap.push((name.clone(), queue.clone()));
                    }
                }
                _ => p.stop.push((name.clone(), queue.clone())),
            }
        }
    }
    for (name, subs) in desired {
        for (queue, sub) in subs {
            let kept = running
                .get(name)
                .and_then(|r| r.get(queue))
                .is_some_and(|r| r == sub);
            if !kept {
                p.start.push((name.clone(), sub.clone()));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(queue: &str, prefetch: u16) -> Subscription {
        let mut s: Subscription =
            serde_json::from_value(serde_json::json!({ "queue": queue })).unwrap();
        s.prefetch = prefetch;
        s
    }

    fn routes(entries: &[(&str, &[Subscription])]) -> Routes {
        entries
            .iter()
            .map(|(n, subs)| {
                (
                    n.to_string(),
                    subs.iter().map(|s| (s.queue.clone(), s.clone())).collect(),
                )
            })
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_new_component_with_the_same_subscriptions_is_only_swapped() {
        let r = routes(&[("a", &[sub("q1", 10), sub("q2", 10)])]);
        let changed = BTreeSet::from(["a".to_string()]);
        let p = plan(&r, &changed, &r);
        assert_eq!(p.swap, pairs(&[("a", "q1"), ("a", "q2")]));
        assert!(p.stop.is_empty() && p.start.is_empty(), "{p:?}");
        // Unchanged component: nothing at all.
        assert_eq!(plan(&r, &BTreeSet::new(), &r), Plan::default());
    }

    #[test]
    fn subscriptions_are_added_removed_and_restarted_when_changed() {
        let running = routes(&[("a", &[sub("keep", 10), sub("gone", 10), sub("tune", 10)])]);
        let desired = routes(&[("a", &[sub("keep", 10), sub("tune", 50), sub("new", 10)])]);
        let changed = BTreeSet::from(["a".to_string()]);
        let p = plan(&running, &changed, &desired);
        assert_eq!(p.stop, pairs(&[("a", "gone"), ("a", "tune")]));
        assert_eq!(p.swap, pairs(&[("a", "keep")]));
        let started: Vec<(String, u16)> = p
            .start
            .iter()
            .map(|(_, s)| (s.queue.clone(), s.prefetch))
            .collect();
        assert_eq!(started, vec![("new".into(), 10), ("tune".into(), 50)]);
    }

    #[test]
    fn a_removed_plugin_stops_and_a_queue_can_move_to_another_plugin() {
        let running = routes(&[("a", &[sub("q", 10)]), ("b", &[sub("b1", 10)])]);
        let desired = routes(&[("b", &[sub("b1", 10), sub("q", 10)])]);
        let p = plan(&running, &BTreeSet::new(), &desired);
        assert_eq!(p.stop, pairs(&[("a", "q")]));
        assert!(p.swap.is_empty());
        assert_eq!(p.start.len(), 1);
        assert_eq!(p.start[0].0, "b");
        assert_eq!(p.start[0].1.queue, "q");
    }
}
