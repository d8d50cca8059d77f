//! Dispatch: where the subsystems meet. Deliveries from `amqp` go to a
//! fresh `plugins` instance; the outcome decides ack, retry or dead-letter;
//! outputs go through the [`Outbox`] to the broker or the `buffer` spool.
//!
//! Owns the routes (subscription → plugin) and their in-flight deliveries.
//! Does not own connections, the spool or plugins: it holds their handles.
//!
//! - [`route`]-level work per delivery (`route.rs`),
//! - [`outbox`]: broker-or-spool publishing,
//! - [`topology`]: what to declare for a subscription, retries and dead
//!   letters,
//! - [`reload`]: the plugin set at start and on reload (overrides, route
//!   reconciliation, atomic swaps),
//! - [`dedup`]: effectively once on a deduplicated route,
//! - [`headers`], [`metric`]: names in one place.

pub mod dedup;
pub mod headers;
pub mod metric;
pub mod outbox;
pub mod reload;
mod route;
pub mod topology;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use outbox::{Outbox, OutboxError, Placement};
pub use topology::DispatchConfig;

use crate::amqp::{AmqpError, AmqpHandle, SubscriptionConfig, Topology};
use crate::plugins::Plugin;
use crate::plugins::manifest::Subscription;

/// Why a route could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("queue {queue:?} is already served by plugin {plugin}")]
    QueueTaken { queue: String, plugin: String },
    #[error("failed to subscribe to {queue:?}: {source}")]
    Subscribe { queue: String, source: AmqpError },
    #[error("no route for queue {0:?}")]
    UnknownRoute(String),
    #[error("cannot deduplicate queue {queue:?}: {reason}")]
    Dedup { queue: String, reason: String },
}

/// A running route, as status reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteInfo {
    pub queue: String,
    pub plugin: String,
    pub version: String,
    pub prefetch: u16,
    pub max_attempts: u32,
}

struct RouteEntry {
    subscription: Subscription,
    plugin: watch::Sender<Plugin>,
    stop: CancellationToken,
    inflight: TaskTracker,
    max_attempts: u32,
    dedup: Option<Arc<dedup::RouteDedup>>,
}

/// Runs routes. Cheap to share behind an `Arc`.
pub struct Dispatcher {
    amqp: AmqpHandle,
    outbox: Outbox,
    /// Where deduplicated routes keep their records.
    store: Option<crate::kv::Store>,
    config: Arc<DispatchConfig>,
    routes: Mutex<BTreeMap<String, RouteEntry>>,
    tasks: TaskTracker,
}

impl Dispatcher {
    pub fn new(amqp: AmqpHandle, outbox: Outbox, config: DispatchConfig) -> Self {
        Self {
            amqp,
            outbox,
            store: None,
            config: Arc::new(config),
            routes: Mutex::new(BTreeMap::new()),
            tasks: TaskTracker::new(),
        }
    }

    /// Per route: its queue, its plugin and the deliveries Warren is
    /// handling for it now (taken and not yet settled).
    pub fn in_flight(&self) -> Vec<(String, String, usize)> {
        self.routes()
            .iter()
            .map(|(queue, e)| {
                let plugin = e.plugin.borrow().name().to_string();
                (queue.clone(), plugin, e.inflight.len())
            })
            .collect()
    }

    /// Keep deduplicated routes' records in `store`.
    pub fn with_store(mut self, store: crate::kv::Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Deduplicated routes handling deliveries at least once because the
    /// store cannot be reached, and since when.
    pub fn unrecorded(&self) -> Vec<(String, std::time::Instant)> {
        self.routes()
            .iter()
            .filter_map(|(q, e)| Some((q.clone(), e.dedup.as_ref()?.unrecorded_since()?)))
            .collect()
    }

    /// The outbox every publish goes through.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RouteEntry>> {
        crate::sync::lock(&self.routes)
    }

    /// Declare the dead-letter and retry exchanges and the dead-letter
    /// queue. Registered with the supervisor, so they are declared again on
    /// every reconnect; declaring now fails quietly while the broker is down.
    pub async fn declare_base(&self) {
        if let Err(e) = self.amqp.declare(self.config.base_topology()).await {
            warn!(error = %e, "Could not declare the retry and dead-letter topology yet; it is declared on connect.");
        }
    }

    /// Start consuming `subscription` with `plugin`.
    pub async fn start_route(
        &self,
        subscription: Subscription,
        plugin: Plugin,
    ) -> Result<(), DispatchError> {
        let queue = subscription.queue.clone();
        if let Some(e) = self.routes().get(&queue) {
            return Err(DispatchError::QueueTaken {
                queue,
                plugin: e.plugin.borrow().name().to_string(),
            });
        }
        let deadline = plugin.limits().deadline;
        if deadline > self.config.broker_consumer_timeout() {
            warn!(%queue, plugin = %plugin.name(), deadline_ms = deadline.as_millis(), consumer_timeout_ms = self.config.broker_consumer_timeout_ms, "The plugin's deadline is longer than the broker's consumer timeout: a delivery that takes that long is taken back by the broker mid-handle and redelivered. Raise the queue's consumer timeout (policy consumer-timeout) or shorten the deadline.");
        }
        let topology = self
            .config
            .subscription_topology(&subscription)
            .with_missing(self.config.outputs_topology(&plugin.manifest().outputs));
        if let Err(e) = self.amqp.declare(topology).await {
            warn!(%queue, error = %e, "Could not declare the subscription's topology yet; the consumer declares it when it starts.");
        }
        let sub = self
            .amqp
            .add_subscription(
                SubscriptionConfig::new(queue.clone()).prefetch(subscription.prefetch),
            )
            .map_err(|source| DispatchError::Subscribe {
                queue: queue.clone(),
                source,
            })?;
        let max_attempts = subscription
            .max_attempts
            .unwrap_or(self.config.max_attempts);
        let dedup = match (&subscription.dedup, &self.store) {
            (None, _) => None,
            (Some(d), Some(store)) => Some(Arc::new(
                dedup::RouteDedup::new(&queue, d, store.clone()).map_err(|reason| {
                    DispatchError::Dedup {
                        queue: queue.clone(),
                        reason,
                    }
                })?,
            )),
            (Some(_), None) => {
                return Err(DispatchError::Dedup {
                    queue,
                    reason: "no store for its records here".into(),
                });
            }
        };
        let ctx = Arc::new(route::RouteContext {
            queue: queue.clone(),
            max_attempts,
            outbox: self.outbox.clone(),
            config: self.config.clone(),
            dedup: dedup.clone(),
        });
        info!(%queue, plugin = plugin.name(), version = plugin.version(), "Route started.");
        let (tx, rx) = watch::channel(plugin);
        let stop = CancellationToken::new();
        let inflight = TaskTracker::new();
        self.tasks
            .spawn(route::run(ctx, sub, rx, inflight.clone(), stop.clone()));
        self.routes().insert(
            queue,
            RouteEntry {
                subscription,
                plugin: tx,
                stop,
                inflight,
                max_attempts,
                dedup,
            },
        );
        Ok(())
    }

    /// Declare the destinations `plugin`'s manifest lists for its outputs
    /// (before it serves a route; registered, so declared again on every
    /// reconnect). Fails quietly while the broker is down.
    pub async fn declare_outputs(&self, plugin: &Plugin) {
        let outputs = self.config.outputs_topology(&plugin.manifest().outputs);
        if outputs == Topology::default() {
            return;
        }
        if let Err(e) = self.amqp.declare(outputs).await {
            warn!(plugin = plugin.name(), error = %e, "Could not declare the plugin's outputs yet; they are declared on connect.");
        }
    }

    /// Serve `queue` with `plugin` from now on: deliveries already being
    /// handled finish on the old version, every later one uses the new.
    pub fn swap_plugin(&self, queue: &str, plugin: Plugin) -> Result<(), DispatchError> {
        let routes = self.routes();
        let entry = routes
            .get(queue)
            .ok_or_else(|| DispatchError::UnknownRoute(queue.to_string()))?;
        entry.plugin.send_replace(plugin);
        Ok(())
    }

    /// Stop `queue`'s route: stop taking deliveries, cancel the consumer,
    /// and let in-flight deliveries finish and settle (bounded by `grace`).
    pub async fn stop_route(&self, queue: &str, grace: Duration) -> Result<(), DispatchError> {
        let entry = self
            .routes()
            .remove(queue)
            .ok_or_else(|| DispatchError::UnknownRoute(queue.to_string()))?;
        let deadline = tokio::time::Instant::now() + grace;
        self.stop_entry(queue, entry, deadline).await;
        Ok(())
    }

    async fn stop_entry(&self, queue: &str, entry: RouteEntry, deadline: tokio::time::Instant) {
        entry.stop.cancel();
        entry.inflight.close();
        let finish = async {
            // basic.cancel, then the amqp core waits for in-flight acks
            // while our tasks finish them.
            let (removed, ()) =
                tokio::join!(self.amqp.remove_subscription(queue), entry.inflight.wait());
            if let Err(e) = removed {
                warn!(%queue, error = %e, "Cancelling the consumer failed.");
            }
        };
        if tokio::time::timeout_at(deadline, finish).await.is_err() {
            warn!(%queue, "In-flight deliveries did not finish within the grace period; the broker will redeliver them.");
        }
        info!(%queue, "Route stopped.");
    }

    /// The settings dispatch runs with.
    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// Stop every route (shutdown): all consumers are cancelled at once,
    /// then in-flight deliveries finish by `deadline`.
    pub async fn stop_all(&self, deadline: tokio::time::Instant) {
        let entries: Vec<(String, RouteEntry)> =
            std::mem::take(&mut *self.routes()).into_iter().collect();
        let stops = entries
            .into_iter()
            .map(|(queue, entry)| async move { self.stop_entry(&queue, entry, deadline).await });
        futures::future::join_all(stops).await;
        self.tasks.close();
        let _ = tokio::time::timeout_at(deadline, self.tasks.wait()).await;
    }

    /// The running routes.
    pub fn route_info(&self) -> Vec<RouteInfo> {
        self.routes()
            .iter()
            .map(|(queue, e)| {
                let p = e.plugin.borrow();
                RouteInfo {
                    queue: queue.clone(),
                    plugin: p.name().to_string(),
                    version: p.version().to_string(),
                    prefetch: e.subscription.prefetch,
                    max_attempts: e.max_attempts,
                }
            })
            .collect()
    }
}
