//! `warren run`: builds every subsystem from the configuration, wires them,
//! and runs until asked to stop, then stops in the order `shutdown.rs`
//! describes.
//!
//! Start-up order: load and check every plugin (a broken file is reported
//! and skipped) → start the AMQP supervisor, the spool and its drainer →
//! register topology from manifests and config → start consumers → start
//! the admin HTTP server (its listener is bound first, so a taken port
//! fails the start) → ready once the connection runs and every consumer is
//! registered. A broker that is down at start only delays readiness: the
//! supervisor keeps retrying. The admin server stops last.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::timeout_at;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, AdminError};
use crate::amqp::{Amqp, AmqpConfig, AmqpHandle, ConsumerState};
use crate::buffer::{Adopter, Drainer, DrainerHandle, Spool, SpoolHandle};
use crate::config::Config;
use crate::dispatch::reload::{self, Reloader};
use crate::dispatch::{Dispatcher, Outbox};
use crate::plugins::{DirectoryError, PluginRuntime, RuntimeError};

pub use crate::admin::Readiness;
pub use crate::dispatch::reload::FailedPlugin;

/// Why Warren could not start at all. (A broker or Redis that is down is
/// not one of these: Warren starts and keeps retrying.)
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    PluginsDir(#[from] DirectoryError),
    #[error("invalid AMQP settings: {0}")]
    Amqp(#[from] crate::amqp::AmqpError),
    #[error("invalid spool settings: {0}")]
    Spool(#[from] crate::buffer::SpoolError),
    #[error("invalid key-value settings: {0}")]
    Kv(String),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

impl StartError {
    /// Whether the settings or the plugins directory are at fault (exit
    /// 78), rather than the machine (a taken port, no runtime).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::PluginsDir(_) | Self::Amqp(_) | Self::Spool(_) | Self::Kv(_)
        )
    }
}

/// Read-only views of a running Warren, for the admin API and tests.
#[derive(Clone)]
pub struct AppHandle {
    /// A drain idle this long with the broker connected is stalled.
    pub drain_stalled_after: Duration,
    pub amqp: AmqpHandle,
    pub spool: SpoolHandle,
    pub drainer: DrainerHandle,
    pub dispatcher: Arc<Dispatcher>,
    pub runtime: PluginRuntime,
    /// Plugins' key-value state.
    pub kv: crate::kv::Store,
    /// The plugin set; reloads go through it.
    pub reloader: Arc<Reloader>,
    /// The process-wide Prometheus recorder (`None` if another recorder
    /// was installed first).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    stopping: Arc<AtomicBool>,
    /// The configuration as loaded, and the AMQP supervisor's settings as
    /// built from it: with the subsystems' own, what
    /// [`AppHandle::effective_config`] reads.
    loaded: Arc<(Config, AmqpConfig)>,
}

impl AppHandle {
    /// Ready when the connection runs and every route's consumer is
    /// registered; never while stopping or with no plugin loaded.
    pub fn readiness(&self) -> Readiness {
        let mut reasons = Vec::new();
        if self.stopping.load(Ordering::SeqCst) {
            reasons.push("shutting down".to_string());
        }
        let status = self.amqp.status_now();
        if !status.is_running() {
            let mut r = format!("broker connection is {}", status.state.name());
            if let Some(f) = &status.last_failure {
                r.push_str(&format!(" (last failure, {}: {})", f.class, f.message));
            }
            reasons.push(r);
        }
        let routes = self.dispatcher.route_info();
        if routes.is_empty() {
            reasons.push("no plugin subscriptions are running".to_string());
        }
        for route in routes {
            match self.amqp.consumer(&route.queue) {
                Some(c) if c.state == ConsumerState::Running => {}
                Some(c) => reasons.push(format!(
                    "consumer for queue {:?} is {:?}",
                    route.queue, c.state
                )),
                None => reasons.push(format!("no consumer for queue {:?}", route.queue)),
            }
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
            degraded: self.degraded(&status),
        }
    }

    fn degraded(&self, amqp: &crate::amqp::AmqpStatus) -> Vec<String> {
        let mut out = Vec::new();
        let depth = self.spool.depth();
        if depth > 0 {
            out.push(format!("{depth} outputs wait in the spool for the broker"));
        }
        if let Some(stalled) = self.drain_stalled(amqp) {
            let why = self
                .spool
                .last_drain_failure()
                .unwrap_or_else(|| "no failure recorded".into());
            out.push(format!(
                "spool drain stalled: nothing drained for {}s with the broker connected and {depth} entries waiting (last failure: {why})",
                stalled.as_secs()
            ));
        }
        for (queue, diffs) in &amqp.queue_differences {
            let each: Vec<String> = diffs
                .iter()
                .map(|d| {
                    format!(
                        "{} is {} where Warren declares {} ({})",
                        d.argument,
                        d.existing,
                        d.declared,
                        d.remedy()
                    )
                })
                .collect();
            out.push(format!(
                "queue {queue:?} exists with other settings and is consumed as it is: {}",
                each.join("; ")
            ));
        }
        if !self.spool.is_highly_available() {
            out.push("the spool is a single Redis, not highly available".into());
        }
        for (queue, since) in self.dispatcher.unrecorded() {
            out.push(format!(
                "queue {queue:?} is deduplicated but its store has been unreachable for {}s: deliveries run at least once (dedup.on-store-down = \"at-least-once\")",
                since.elapsed().as_secs()
            ));
        }
        out
    }

    /// How long the drain has made no progress while it could have: the
    /// spool has entries and the broker has been connected all along.
    /// `None` unless that is at least `spool.drain-stalled-after-ms`.
    pub fn drain_stalled(&self, amqp: &crate::amqp::AmqpStatus) -> Option<Duration> {
        let idle = self.spool.drain_idle()?;
        let session = amqp.session_started.filter(|_| amqp.is_connected())?;
        let stalled = idle.min(session.elapsed());
        (stalled >= self.drain_stalled_after).then_some(stalled)
    }

    /// The configuration Warren runs with, each section read back from the
    /// subsystem that holds it where one does (`GET /config`).
    pub fn effective_config(&self) -> Config {
        let (loaded, amqp) = &*self.loaded;
        let mut c = loaded.clone();
        c.amqp = crate::amqp::AmqpSection::of(amqp);
        c.spool = self.spool.config().clone();
        c.plugins.runtime = self.runtime.config().clone();
        c.dispatch = self.dispatcher.config().clone();
        c
    }

    /// Plugin files that failed to load at start or at the last reload.
    pub fn failed_plugins(&self) -> Vec<FailedPlugin> {
        self.reloader.failed()
    }

    /// What the admin API reads: the handles, and this handle for what
    /// only the running app can answer.
    fn admin_view(&self) -> admin::AdminView {
        admin::AdminView {
            amqp: self.amqp.clone(),
            spool: self.spool.clone(),
            kv: self.kv.clone(),
            dispatcher: self.dispatcher.clone(),
            reloader: self.reloader.clone(),
            metrics: self.metrics.clone(),
            wiring: Arc::new(self.clone()),
        }
    }
}

impl admin::Wiring for AppHandle {
    fn readiness(&self) -> Readiness {
        AppHandle::readiness(self)
    }

    fn drain_stalled(&self, amqp: &crate::amqp::AmqpStatus) -> Option<Duration> {
        AppHandle::drain_stalled(self, amqp)
    }

    fn config_text(&self) -> String {
        crate::config_doc::render(&self.effective_config(), "this running Warren")
    }
}

/// A running Warren.
pub struct App {
    handle: AppHandle,
    grace: Duration,
    tasks: TaskTracker,
    stop: StopTree,
    admin_tasks: TaskTracker,
    admin_addr: SocketAddr,
}

/// The shutdown tree: one root token and a child per subsystem, cancelled
/// one by one in the order `shutdown.rs` states; cancelling the root stops
/// whatever is left.
struct StopTree {
    root: CancellationToken,
    /// The plugin watcher and the ready announcement: first, so no reload
    /// starts a route behind the stop.
    plugins: CancellationToken,
    /// The drainer and the adopter.
    drain: CancellationToken,
    spool: CancellationToken,
    amqp: CancellationToken,
    /// Last: `/live` answers, and `/ready` says 503, until the end.
    admin: CancellationToken,
}

impl StopTree {
    fn new() -> Self {
        let root = CancellationToken::new();
        Self {
            plugins: root.child_token(),
            drain: root.child_token(),
            spool: root.child_token(),
            amqp: root.child_token(),
            admin: root.child_token(),
            root,
        }
    }
}

impl App {
    /// Build and start everything. Fails only on what retrying cannot fix:
    /// unusable settings or an unreadable plugins directory.
    pub async fn start(config: Config) -> Result<App, StartError> {
        let tasks = TaskTracker::new();
        let metrics = crate::telemetry::install_metrics();
        admin::metric::describe_all();
        let admin_listener = admin::bind(&config.admin.bind).await?;
        let stop = StopTree::new();
        let (kv, kv_task) =
            crate::kv::Store::redis(&config.kv, &config.spool).map_err(StartError::Kv)?;
        // Stopped with the spool, after dispatch: in-flight deliveries
        // commit their writes during the grace period.
        tasks.spawn(kv_task.run(stop.spool.clone()));
        let runtime = PluginRuntime::with_kv(config.plugins.runtime.clone(), Some(kv.clone()))?;
        let scan = reload::scan(
            &runtime,
            &config.plugins.dir,
            &config.plugin,
            &BTreeMap::new(),
            &[],
        )
        .await?;
        if scan.plugins.is_empty() {
            warn!(dir = %config.plugins.dir.display(), "No plugins loaded; Warren stays unready until one is.");
        }

        let dispatch_config = config.dispatch.clone();
        let mut amqp_cfg = config.amqp.supervisor("main");
        amqp_cfg.topology = dispatch_config.base_topology();
        amqp_cfg.drain_timeout = config.shutdown.grace();
        let (amqp, amqp_handle) = Amqp::new(amqp_cfg.clone())?;
        tasks.spawn(amqp.run(stop.amqp.clone()));

        let (spool, spool_handle) = Spool::new(config.spool.clone())?;
        tasks.spawn(spool.run(stop.spool.clone()));

        let outbox = Outbox::new(
            amqp_handle.clone(),
            spool_handle.clone(),
            dispatch_config.dead_letter_exchange.clone(),
        );
        let drainer_config = config.spool.drainer();
        let (drainer, drainer_handle) = Drainer::new(
            drainer_config.clone(),
            &spool_handle,
            outbox.drain_publisher(),
        )?;
        tasks.spawn(drainer.run(stop.drain.clone()));
        tasks.spawn(wake_drainer_with_session(
            amqp_handle.status(),
            drainer_handle.clone(),
            stop.drain.clone(),
        ));
        if config.spool.adopt_orphans {
            let adopter = Adopter::new(
                drainer_config,
                &spool_handle,
                &drainer_handle,
                outbox.drain_publisher(),
            )?;
            tasks.spawn(adopter.run(stop.drain.clone()));
        }

        let dispatcher = Arc::new(
            Dispatcher::new(amqp_handle.clone(), outbox, dispatch_config).with_store(kv.clone()),
        );
        dispatcher.declare_base().await;
        let grace = config.shutdown.grace();
        let reloader = Arc::new(Reloader::new(
            runtime.clone(),
            dispatcher.clone(),
            config.plugins.dir.clone(),
            config.plugin.clone(),
            grace,
        ));
        if let Err(e) = reloader.apply(scan).await {
            warn!(error = %e, "Plugins not applied.");
        }
        if config.plugins.watch_ms > 0 {
            tasks.spawn(reload::watch(
                reloader.clone(),
                Duration::from_millis(config.plugins.watch_ms),
                stop.plugins.clone(),
            ));
        }

        let handle = AppHandle {
            drain_stalled_after: Duration::from_millis(config.spool.drain_stalled_after_ms),
            amqp: amqp_handle,
            spool: spool_handle,
            drainer: drainer_handle,
            dispatcher,
            runtime,
            kv,
            reloader,
            metrics,
            stopping: Arc::new(AtomicBool::new(false)),
            loaded: Arc::new((config.clone(), amqp_cfg)),
        };
        let admin_tasks = TaskTracker::new();
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|e| AdminError::Bind(config.admin.bind.clone(), e))?;
        admin_tasks.spawn(admin::serve(
            admin_listener,
            admin::router(handle.admin_view(), &config.admin),
            stop.admin.clone(),
        ));
        info!(addr = %admin_addr, "Admin API listening.");
        tasks.spawn(announce_ready(
            handle.clone(),
            admin_addr,
            stop.plugins.clone(),
        ));
        Ok(App {
            handle,
            grace,
            tasks,
            stop,
            admin_tasks,
            admin_addr,
        })
    }

    /// Where the admin API listens (the bound address, also when the
    /// configured port was 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Views for the admin API and tests.
    pub fn handle(&self) -> AppHandle {
        self.handle.clone()
    }

    /// The ordered shutdown (see `shutdown.rs`), all of it within one
    /// grace period: each phase waits until the same deadline, and what
    /// has not finished by then is abandoned (unacked deliveries go back to
    /// the broker).
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.grace;
        self.shutdown_by(deadline).await;
    }

    /// [`App::shutdown`] by a deadline the caller already holds (`main`'s,
    /// taken when the signal came), so the stop has one deadline, not two.
    pub async fn shutdown_by(self, deadline: tokio::time::Instant) {
        info!(grace = ?self.grace, "Shutting down: readiness off, consumers cancelled, finishing in-flight deliveries.");
        self.handle.stopping.store(true, Ordering::SeqCst);
        self.stop.plugins.cancel();
        // No reload may start routes behind stop_all's back.
        if timeout_at(deadline, self.handle.reloader.close())
            .await
            .is_ok()
        {
            self.handle.dispatcher.stop_all(deadline).await;
        }
        self.stop.drain.cancel();
        self.stop.spool.cancel();
        self.stop.amqp.cancel();
        self.tasks.close();
        if timeout_at(deadline, self.tasks.wait()).await.is_err() {
            warn!("Some tasks did not stop within the grace period.");
        }
        self.stop.admin.cancel();
        self.admin_tasks.close();
        if timeout_at(deadline, self.admin_tasks.wait()).await.is_err() {
            warn!("The admin server did not stop within the grace period.");
        }
        self.stop.root.cancel();
        info!("Stopped.");
    }
}

/// Log once when Warren first becomes ready, in one line: the plugins and
/// their versions, the queues, the spool's mode and primary, the broker,
/// and the admin address.
async fn announce_ready(handle: AppHandle, admin: SocketAddr, cancel: CancellationToken) {
    let mut ticker = crate::sync::Ticker::new(Duration::from_millis(100));
    while ticker.tick(&cancel).await {
        if handle.readiness().ready {
            let routes = handle.dispatcher.route_info();
            let plugins: std::collections::BTreeSet<String> = routes
                .iter()
                .map(|r| format!("{}@{}", r.plugin, r.version))
                .collect();
            let queues: Vec<&str> = routes.iter().map(|r| r.queue.as_str()).collect();
            let amqp = handle.amqp.status_now();
            let spool = handle.spool.status().await;
            let broker = amqp.server.as_ref().map_or_else(String::new, |s| {
                format!(
                    "{} {}{}",
                    s.product,
                    s.version,
                    s.cluster_name
                        .as_ref()
                        .map_or_else(String::new, |c| format!(" ({c})"))
                )
            });
            info!(
                plugins = %plugins.into_iter().collect::<Vec<_>>().join(","),
                queues = %queues.join(","),
                spool = %spool.mode,
                spool_primary = spool.primary.as_deref().unwrap_or("none"),
                broker_endpoint = amqp.endpoint.as_deref().unwrap_or("none"),
                %broker,
                %admin,
                "Ready: consumers registered."
            );
            return;
        }
    }
}

/// Kick the drainer whenever the broker may take publishes again: a
/// session starts running (a new one, or the same one unblocked). A
/// non-empty spool then costs its drain, not the rest of a backoff pause
/// taken while the broker was away; and live outputs, which queue behind
/// the spool while it is not empty, wait no longer than that drain.
async fn wake_drainer_with_session(
    mut status: tokio::sync::watch::Receiver<crate::amqp::AmqpStatus>,
    drainer: DrainerHandle,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut running: Option<u64> = None;
    loop {
        let now = {
            let s = status.borrow_and_update();
            s.is_running().then_some(s.generation)
        };
        if now.is_some() && now != running {
            drainer.kick();
        }
        running = now;
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = status.changed() => if r.is_err() { return },
        }
    }
}

/// On each SIGHUP (`hangups`), reload the plugins as `POST /plugins/reload`
/// does (the reload logs each file that fails). Runs until dropped.
pub async fn reload_on_hangup(
    hangups: Option<tokio::signal::unix::Signal>,
    reloader: Arc<Reloader>,
) {
    let Some(mut hup) = hangups else {
        return std::future::pending().await;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading plugins.");
        match reloader.reload(None).await {
            Ok(r) => tracing::info!(
                loaded = r.loaded.len(),
                replaced = r.replaced.len(),
                removed = r.removed.len(),
                unchanged = r.unchanged.len(),
                failed = r.failed.len(),
                "Plugins reloaded."
            ),
            Err(e) => tracing::warn!(error = %e, "Reload on SIGHUP failed."),
        }
    }
}
