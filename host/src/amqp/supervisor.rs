//! The connection supervisor: the one owner of the `lapin::Connection`.
//!
//! It connects, declares the topology, starts one consumer task per
//! subscription and the publisher's confirm channel, then watches the
//! session three ways (the connection's event stream, a watchdog polling
//! the connection status, and failure reports from its tasks). On any
//! connection-level failure it tears the session down and reconnects with
//! capped, fully jittered exponential backoff, forever. lapin's own
//! auto-recovery is never enabled. Each session has a generation number; a
//! report from an older generation is ignored.
//!
//! It does not know what deliveries are for (that is `dispatch`), and it
//! never buffers publishes (that is `buffer`).

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::backoff::{Backoff, BackoffConfig};
use super::consumer::{self, ConsumerCtx, Delivery, SubscriptionConfig, SubscriptionStatus};
use super::failure::{AmqpError, Failure, FailureClass, classify, is_connection_level};
use super::metrics;
use super::publisher::{self, Publisher, PublisherLink};
use super::server::{self, ServerInfo};
use super::topology::{self, ArgumentDiff, Topology, TopologyRegistry};

/// Settings of one supervised connection. Plain data.
#[derive(Clone)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost` or `amqps://…`.
    pub url: String,
    /// Other nodes of the same cluster (same forms). Each connect tries
    /// `url` and these in a shuffled order.
    pub more_urls: Vec<String>,
    /// The role in the connection name `warren@<host>/<role>`.
    pub role: String,
    /// The host part of the connection name; the machine's host name when
    /// `None`.
    pub host_name: Option<String>,
    /// Requested heartbeat (the broker may lower it). Default 10 s.
    pub heartbeat: Duration,
    /// Limit on one connection attempt (TCP, TLS, AMQP handshake).
    pub connect_timeout: Duration,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// The longest wait after a connect that every endpoint refused at once
    /// (nothing listens: a broker restarting). Such an attempt costs the
    /// broker nothing, so it is retried within this, jittered, instead of
    /// the growing backoff: a broker that comes back is used again within
    /// about this long.
    pub refused_retry: Duration,
    /// A session that lived this long resets the backoff.
    pub healthy_after: Duration,
    /// How often the watchdog checks the connection status.
    pub watchdog_interval: Duration,
    /// How often each consumer compares the broker-side consumer count with
    /// what Warren believes.
    pub consumer_check_interval: Duration,
    /// Limit on every publisher confirm (and on waiting while blocked).
    pub confirm_timeout: Duration,
    /// Limit on waiting for in-flight deliveries when a subscription is
    /// removed or Warren stops.
    pub drain_timeout: Duration,
    /// How long coalesced acks may be held before they are sent.
    pub ack_flush_interval: Duration,
    /// Declared on every connect before any consumer starts.
    pub topology: Topology,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact(&self.url))
            .field("role", &self.role)
            .field("heartbeat", &self.heartbeat)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl AmqpConfig {
    /// `url` and `role` with every other setting at its `[amqp]` default
    /// (the defaults live in [`super::AmqpSection`] alone).
    pub fn new(url: impl Into<String>, role: impl Into<String>) -> Self {
        super::AmqpSection {
            url: url.into(),
            ..super::AmqpSection::default()
        }
        .supervisor(&role.into())
    }

    /// The `connection_name` client property.
    pub fn connection_name(&self) -> String {
        let host = self.host_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned())
        });
        format!("warren@{host}/{}", self.role)
    }
}

/// The URL with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The connection's life-cycle state.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionState {
    /// Opening a connection.
    Connecting {
        /// Attempts since the last healthy session (0 = first).
        attempt: u32,
    },
    /// Connected; declaring the topology.
    Declaring,
    /// Connected, topology declared, consumers started.
    Running,
    /// The broker blocked publishing (resource alarm).
    Blocked {
        /// The broker's reason.
        reason: String,
    },
    /// Waiting to reconnect after a failure.
    Recovering {
        /// Attempts since the last healthy session.
        attempt: u32,
        /// What went wrong last.
        failure: Failure,
    },
    /// The broker refused the credentials or vhost (403/530); retrying at
    /// the backoff cap.
    AuthFailed {
        /// Attempts since the last healthy session.
        attempt: u32,
        /// The refusal.
        failure: Failure,
    },
    /// Shutting down cleanly.
    Stopping,
    /// Stopped for good.
    Stopped,
}

impl ConnectionState {
    /// A short name for status output.
    pub fn name(&self) -> &'static str {
        match self {
            ConnectionState::Connecting { .. } => "connecting",
            ConnectionState::Declaring => "declaring",
            ConnectionState::Running => "running",
            ConnectionState::Blocked { .. } => "blocked",
            ConnectionState::Recovering { .. } => "recovering",
            ConnectionState::AuthFailed { .. } => "auth-failed",
            ConnectionState::Stopping => "stopping",
            ConnectionState::Stopped => "stopped",
        }
    }
}

/// What the supervisor publishes on its watch channel.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpStatus {
    /// The state.
    pub state: ConnectionState,
    /// The generation of the current (or last) session; 0 before the first.
    pub generation: u64,
    /// The last classified failure, kept after recovery.
    pub last_failure: Option<Failure>,
    /// Connection attempts since start.
    pub connect_attempts: u64,
    /// Topology declarations that failed in the current session.
    pub declaration_errors: Vec<String>,
    /// When the current (or last) session's connection was established.
    pub session_started: Option<std::time::Instant>,
    /// Queues that exist with other settings than Warren declares, each
    /// used as it is, and what differs.
    pub queue_differences: BTreeMap<String, Vec<ArgumentDiff>>,
    /// The broker the current (or last) session talks to, from the
    /// connection's server properties.
    pub server: Option<ServerInfo>,
    /// The endpoint (redacted URL) of the current (or last) session.
    pub endpoint: Option<String>,
}

impl AmqpStatus {
    /// Connected and running (blocked counts as connected but not ready).
    pub fn is_running(&self) -> bool {
        self.state == ConnectionState::Running
    }

    /// The broker is blocking publishes (`connection.blocked`).
    pub fn is_blocked(&self) -> bool {
        matches!(self.state, ConnectionState::Blocked { .. })
    }

    /// A session is up (running or blocked).
    pub fn is_connected(&self) -> bool {
        matches!(
            self.state,
            ConnectionState::Running | ConnectionState::Blocked { .. }
        )
    }
}

pub(crate) enum Command {
    Start(String),
    Stop(String, oneshot::Sender<()>),
    Declare(Topology, oneshot::Sender<Result<(), AmqpError>>),
}

/// A registered subscription, alive across sessions.
pub(crate) struct SubEntry {
    pub(crate) config: SubscriptionConfig,
    pub(crate) tx: mpsc::Sender<Delivery>,
    pub(crate) status: SubscriptionStatus,
}

/// State shared by the supervisor, its tasks and the handles.
pub(crate) struct Shared {
    pub(crate) status: watch::Sender<AmqpStatus>,
    pub(crate) subs: Mutex<BTreeMap<String, SubEntry>>,
    pub(crate) topology: TopologyRegistry,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) epochs: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub(crate) fn update_sub(&self, queue: &str, f: impl FnOnce(&mut SubscriptionStatus)) {
        let mut subs = match self.subs.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if let Some(e) = subs.get_mut(queue) {
            f(&mut e.status);
        }
    }

    pub(crate) fn sub(&self, queue: &str) -> Option<(SubscriptionConfig, mpsc::Sender<Delivery>)> {
        let subs = match self.subs.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.get(queue).map(|e| (e.config.clone(), e.tx.clone()))
    }

    fn sub_names(&self) -> Vec<String> {
        let subs = match self.subs.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.keys().cloned().collect()
    }

    fn remove_sub(&self, queue: &str) {
        let mut subs = match self.subs.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.remove(queue);
    }

    fn set_state(&self, state: ConnectionState) {
        metrics::connected(matches!(
            state,
            ConnectionState::Running | ConnectionState::Blocked { .. }
        ));
        self.status.send_modify(|s| s.state = state);
    }
}

/// Why a connect found no endpoint: the failure to report, and whether
/// every endpoint refused the TCP connection outright.
struct ConnectFailed {
    failure: Failure,
    all_refused: bool,
}

/// A connect that nothing listened for (RST to the SYN).
fn is_refused(err: &lapin::Error) -> bool {
    match err.kind() {
        lapin::ErrorKind::IOError(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// The supervisor. Create with [`Amqp::new`], run with [`Amqp::run`].
pub struct Amqp {
    config: AmqpConfig,
    /// Every endpoint, with its redacted form for logs and status.
    endpoints: Vec<(AMQPUri, String)>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    publisher_link: watch::Sender<Option<PublisherLink>>,
}

/// A cheap clonable handle to a running supervisor.
#[derive(Clone)]
pub struct AmqpHandle {
    shared: Arc<Shared>,
    publisher: Publisher,
}

/// A subscription's delivery stream. Dropping it cancels the consumer.
pub struct Subscription {
    /// The queue.
    pub queue: String,
    /// Deliveries, in the order the broker sent them.
    pub deliveries: mpsc::Receiver<Delivery>,
}

impl Subscription {
    /// The next delivery; `None` once the subscription was removed.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }
}

impl futures::Stream for Subscription {
    type Item = Delivery;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        self.deliveries.poll_recv(cx)
    }
}

impl Amqp {
    /// Validate `config` and build the supervisor and its handle.
    pub fn new(config: AmqpConfig) -> Result<(Amqp, AmqpHandle), AmqpError> {
        let hb = u16::try_from(config.heartbeat.as_secs().max(1)).unwrap_or(u16::MAX);
        let endpoints = std::iter::once(&config.url)
            .chain(&config.more_urls)
            .map(|url| {
                let mut uri = AMQPUri::from_str(url)
                    .map_err(|e| AmqpError::InvalidUrl(format!("{}: {e}", redact(url))))?;
                uri.query.heartbeat = Some(hb);
                uri.query.connection_timeout =
                    Some(u64::try_from(config.connect_timeout.as_millis()).unwrap_or(u64::MAX));
                Ok((uri, redact(url)))
            })
            .collect::<Result<Vec<_>, AmqpError>>()?;
        let (status, _) = watch::channel(AmqpStatus {
            state: ConnectionState::Connecting { attempt: 0 },
            generation: 0,
            last_failure: None,
            connect_attempts: 0,
            declaration_errors: Vec::new(),
            session_started: None,
            queue_differences: BTreeMap::new(),
            server: None,
            endpoint: None,
        });
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            status,
            subs: Mutex::new(BTreeMap::new()),
            topology: TopologyRegistry::new(config.topology.clone()),
            commands: commands_tx,
            epochs: std::sync::atomic::AtomicU64::new(0),
        });
        let (publisher_link, link_rx) = watch::channel(None);
        let publisher = Publisher::new(link_rx, shared.status.subscribe(), config.confirm_timeout);
        let handle = AmqpHandle {
            shared: shared.clone(),
            publisher,
        };
        Ok((
            Amqp {
                config,
                endpoints,
                shared,
                commands,
                publisher_link,
            },
            handle,
        ))
    }

    /// Run until `cancel` fires, then stop cleanly: cancel consumers, wait
    /// for in-flight acks, close channels, close the connection.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.config.backoff);
        let mut last_logged: Option<(FailureClass, String)> = None;
        let mut outage = super::outage_log::OutageLog::default();
        let mut generation = 0u64;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let attempt = backoff.attempt();
            self.shared
                .set_state(ConnectionState::Connecting { attempt });
            self.shared.status.send_modify(|s| s.connect_attempts += 1);
            let connected = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = self.connect() => r,
            };
            let mut refused = false;
            let failure = match connected {
                Ok((conn, uri, endpoint)) => {
                    generation += 1;
                    last_logged = None;
                    outage.connected(Instant::now());
                    let started = Instant::now();
                    self.shared
                        .status
                        .send_modify(|s| s.endpoint = Some(endpoint));
                    let outcome = self.session(conn, &uri, generation, &cancel).await;
                    if started.elapsed() >= self.config.healthy_after {
                        backoff.reset();
                    }
                    match outcome {
                        None => break,
                        Some(f) => {
                            metrics::reconnect(f.class);
                            outage.session_lost(generation, &f, Instant::now());
                            f
                        }
                    }
                }
                Err(ConnectFailed {
                    failure,
                    all_refused,
                }) => {
                    metrics::connect_failure(failure.class);
                    outage.connect_failed(&failure, failure.class.is_slow_retry(), Instant::now());
                    refused = all_refused;
                    failure
                }
            };
            let delay = if failure.class.is_slow_retry() {
                backoff.slow_delay()
            } else if refused {
                backoff.next_delay_within(self.config.refused_retry)
            } else {
                backoff.next_delay()
            };
            let attempt = backoff.attempt();
            let slow = failure.class.is_slow_retry();
            let key = (failure.class, failure.message.clone());
            if slow && last_logged.as_ref() != Some(&key) {
                error!(class = %failure.class, error = %failure.message, ?delay, "Broker refused the connection; operator action needed, retrying slowly.");
                last_logged = Some(key);
            }
            let state = if failure.class.is_auth() {
                ConnectionState::AuthFailed {
                    attempt,
                    failure: failure.clone(),
                }
            } else {
                ConnectionState::Recovering {
                    attempt,
                    failure: failure.clone(),
                }
            };
            self.shared.status.send_modify(|s| {
                s.last_failure = Some(failure);
                s.state = state;
            });
            metrics::connected(false);
            let wake = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep_until(wake) => break,
                    // Cancel-safe: a command is either handled here or not taken.
                    Some(cmd) = self.commands.recv() => self.offline_command(cmd),
                }
            }
        }
        self.publisher_link.send_replace(None);
        for queue in self.shared.sub_names() {
            self.shared.remove_sub(&queue);
        }
        self.shared.set_state(ConnectionState::Stopped);
        info!("AMQP supervisor stopped.");
    }

    fn offline_command(&self, cmd: Command) {
        match cmd {
            Command::Start(_) => {}
            Command::Stop(queue, done) => {
                self.shared.remove_sub(&queue);
                let _ = done.send(());
            }
            Command::Declare(t, done) => {
                self.shared.topology.merge(t);
                let _ = done.send(Ok(()));
            }
        }
    }

    /// Connect to the first endpoint that takes the connection, trying
    /// them in a shuffled order (a fleet spreads over the cluster's nodes,
    /// and a dead node is not always tried first).
    async fn connect(&self) -> Result<(Connection, AMQPUri, String), ConnectFailed> {
        use rand::seq::SliceRandom;
        let mut order: Vec<&(AMQPUri, String)> = self.endpoints.iter().collect();
        order.shuffle(&mut rand::rng());
        let mut all_refused = true;
        let mut last = None;
        for (uri, shown) in order {
            let props = ConnectionProperties::default()
                .with_connection_name(self.config.connection_name().into());
            let failure = match tokio::time::timeout(
                self.config.connect_timeout,
                Connection::connect_uri(uri.clone(), props),
            )
            .await
            {
                Ok(Ok(conn)) => return Ok((conn, uri.clone(), shown.clone())),
                Ok(Err(e)) => {
                    all_refused &= is_refused(&e);
                    let mut f = Failure::from_lapin(&e, None);
                    f.message = format!("{shown}: {}", f.message);
                    f
                }
                Err(_) => {
                    all_refused = false;
                    Failure::new(
                        FailureClass::HeartbeatTimeout,
                        format!(
                            "connect to {shown} timed out after {:?}",
                            self.config.connect_timeout
                        ),
                        None,
                    )
                }
            };
            debug!(endpoint = %shown, class = %failure.class, error = %failure.message, "Connect attempt failed.");
            // The most telling failure wins: one that needs an operator
            // over one that retrying fixes.
            last = match last {
                Some(prev) if !failure.class.is_slow_retry() => Some(prev),
                _ => Some(failure),
            };
        }
        Err(ConnectFailed {
            failure: last
                .unwrap_or_else(|| Failure::new(FailureClass::Other, "no endpoints", None)),
            all_refused,
        })
    }

    /// One session on `conn`. Returns `None` after a clean stop, or the
    /// failure that ended it.
    async fn session(
        &mut self,
        conn: Connection,
        uri: &AMQPUri,
        generation: u64,
        cancel: &CancellationToken,
    ) -> Option<Failure> {
        let conn = Arc::new(conn);
        let mut events = conn.events_listener();
        self.shared.status.send_modify(|s| {
            s.generation = generation;
            s.state = ConnectionState::Declaring;
            s.session_started = Some(std::time::Instant::now());
        });
        let topology = self.shared.topology.snapshot();
        let (errors, server) = tokio::join!(
            declare_all(&conn, &topology, &self.shared),
            server::ask(uri),
        );
        self.shared.status.send_modify(|s| s.server = Some(server));
        if let Some(e) = errors
            .iter()
            .find(|e| !e.is_transient() || e.class() == FailureClass::NotFound)
        {
            warn!(generation, error = %e, "Topology declaration failed; the affected subscriptions will retry.");
        }
        let declaration_errors = errors.iter().map(ToString::to_string).collect();
        if !conn.status().connected() {
            return Some(Failure::new(
                FailureClass::Other,
                "connection closed while declaring the topology",
                Some(generation),
            ));
        }
        self.shared.status.send_modify(|s| {
            s.declaration_errors = declaration_errors;
        });
        info!(generation, connection_name = %self.config.connection_name(), "AMQP session established.");

        let abort = CancellationToken::new();
        let graceful = CancellationToken::new();
        let (failures_tx, mut failures) = mpsc::unbounded_channel::<Failure>();
        let mut consumers: JoinSet<String> = JoinSet::new();
        let mut running: HashMap<String, (CancellationToken, Vec<oneshot::Sender<()>>)> =
            HashMap::new();
        let mut side: JoinSet<()> = JoinSet::new();
        side.spawn(publisher::keep_channel(
            conn.clone(),
            generation,
            self.publisher_link.clone(),
            abort.clone(),
            failures_tx.clone(),
        ));
        let ctx = |queue: &str, stop: CancellationToken| ConsumerCtx {
            conn: conn.clone(),
            generation,
            queue: queue.to_owned(),
            shared: self.shared.clone(),
            stop,
            abort: abort.clone(),
            failures: failures_tx.clone(),
            check_interval: self.config.consumer_check_interval,
            flush_interval: self.config.ack_flush_interval,
            drain_timeout: self.config.drain_timeout,
            backoff: self.config.backoff,
        };
        for queue in self.shared.sub_names() {
            let stop = graceful.child_token();
            consumers.spawn(consumer::run(ctx(&queue, stop.clone())));
            running.insert(queue, (stop, Vec::new()));
        }
        self.shared.set_state(if conn.status().blocked() {
            ConnectionState::Blocked {
                reason: "blocked at connect".to_owned(),
            }
        } else {
            ConnectionState::Running
        });

        let mut watchdog = tokio::time::interval(self.config.watchdog_interval);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<lapin::Error> = None;
        let failure = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break None,
                Some(f) = failures.recv() => {
                    if f.generation == Some(generation) {
                        break Some(f);
                    }
                    debug!(generation, stale = ?f.generation, "Ignoring a failure report from an older session.");
                }
                ev = events.next() => match ev {
                    Some(Event::Error(e)) if is_connection_level(&e) => {
                        break Some(Failure::from_lapin(&e, Some(generation)));
                    }
                    Some(Event::Error(e)) => {
                        debug!(generation, error = %e, class = %classify(&e), "Channel-level error; its owner repairs it.");
                        last_error = Some(e);
                    }
                    Some(Event::ConnectionBlocked(reason)) => {
                        warn!(generation, %reason, "Broker blocked publishing.");
                        self.shared.set_state(ConnectionState::Blocked { reason });
                    }
                    Some(Event::ConnectionUnblocked) => {
                        info!(generation, "Broker unblocked publishing.");
                        self.shared.set_state(ConnectionState::Running);
                    }
                    Some(_) => {}
                    None => break Some(Failure::new(FailureClass::Other, "connection event stream ended", Some(generation))),
                },
                _ = watchdog.tick() => {
                    if !conn.status().connected() {
                        let f = match &last_error {
                            Some(e) if is_connection_level(e) => Failure::from_lapin(e, Some(generation)),
                            _ => Failure::new(FailureClass::Other, "connection is no longer connected (watchdog)", Some(generation)),
                        };
                        break Some(f);
                    }
                }
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Start(queue) => {
                        if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(queue.clone()) {
                            let stop = graceful.child_token();
                            consumers.spawn(consumer::run(ctx(&queue, stop.clone())));
                            slot.insert((stop, Vec::new()));
                        }
                    }
                    Command::Stop(queue, done) => match running.get_mut(&queue) {
                        Some((stop, waiters)) => {
                            stop.cancel();
                            waiters.push(done);
                        }
                        None => {
                            self.shared.remove_sub(&queue);
                            let _ = done.send(());
                        }
                    },
                    Command::Declare(t, done) => {
                        self.shared.topology.merge(t.clone());
                        let res = match declare_all(&conn, &t, &self.shared).await.into_iter().next() {
                            Some(e) => Err(e),
                            None => Ok(()),
                        };
                        let _ = done.send(res);
                    }
                },
                Some(joined) = consumers.join_next() => {
                    let queue = match joined {
                        Ok(q) => q,
                        Err(e) => { error!(generation, error = %e, "Consumer task failed."); continue; }
                    };
                    if let Some((_, waiters)) = running.remove(&queue) {
                        // Only a removal request leaves waiters.
                        if !waiters.is_empty() {
                            self.shared.remove_sub(&queue);
                            for w in waiters { let _ = w.send(()); }
                        } else if !abort.is_cancelled() && self.shared.sub(&queue).is_some() {
                            // Its receiver is gone or it gave up on this
                            // connection; a failure report (if any) decides.
                            if conn.status().connected() && !self.shared.sub(&queue).is_some_and(|(_, tx)| tx.is_closed()) {
                                let stop = graceful.child_token();
                                consumers.spawn(consumer::run(ctx(&queue, stop.clone())));
                                running.insert(queue, (stop, waiters));
                            } else if self.shared.sub(&queue).is_some_and(|(_, tx)| tx.is_closed()) {
                                self.shared.remove_sub(&queue);
                            }
                        }
                    }
                }
            }
        };

        match &failure {
            None => {
                // Clean stop: consumers first (they drain in-flight acks),
                // then the publisher channel, then the connection.
                self.shared.set_state(ConnectionState::Stopping);
                graceful.cancel();
                let drain = self.config.drain_timeout + Duration::from_secs(1);
                if tokio::time::timeout(drain, async {
                    while consumers.join_next().await.is_some() {}
                })
                .await
                .is_err()
                {
                    warn!(
                        generation,
                        "Consumers did not drain in time; closing anyway."
                    );
                }
                abort.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while side.join_next().await.is_some() {}
                })
                .await;
                self.publisher_link.send_replace(None);
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    conn.close(200, "warren stopping".into()),
                )
                .await;
                for (_, (_, waiters)) in running {
                    for w in waiters {
                        let _ = w.send(());
                    }
                }
            }
            Some(_) => {
                self.publisher_link.send_replace(None);
                abort.cancel();
                graceful.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while consumers.join_next().await.is_some() {}
                    while side.join_next().await.is_some() {}
                })
                .await;
                consumers.abort_all();
                side.abort_all();
                // Waiters of removals in progress: the subscription is gone.
                for (queue, (_, waiters)) in running {
                    if !waiters.is_empty() {
                        self.shared.remove_sub(&queue);
                        for w in waiters {
                            let _ = w.send(());
                        }
                    }
                }
                if conn.status().connected() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        conn.close(320, "warren recovering".into()),
                    )
                    .await;
                }
            }
        }
        failure
    }
}

/// Declare everything, one channel per failed entity so one conflict does
/// not hide the rest. A queue that exists with other settings is used as
/// it is and its differences recorded in the status. Returns every error.
async fn declare_all(conn: &Connection, t: &Topology, shared: &Shared) -> Vec<AmqpError> {
    let mut errors = Vec::new();
    let mut channel = None;
    macro_rules! step {
        ($f:expr) => {{
            if channel.is_none() {
                match conn.create_channel().await {
                    Ok(c) => channel = Some(c),
                    Err(e) => {
                        errors.push(AmqpError::channel("channel.open", &e));
                        return errors;
                    }
                }
            }
            if let Some(ch) = &channel {
                if let Err(e) = within_declare_timeout($f(ch)).await {
                    errors.push(e);
                    channel = None;
                } else if !ch.status().connected() {
                    // A tolerated conflict (an existing output) closed it.
                    channel = None;
                }
            }
        }};
    }
    for e in t.exchanges.values() {
        step!(|ch| topology::declare_exchange(ch, e));
    }
    for q in t.queues.values() {
        step!(|ch| async move {
            match topology::declare_queue(ch, q).await {
                Ok(_) => {
                    shared.record_differences(&q.name, Vec::new());
                    Ok(())
                }
                Err(AmqpError::DeclarationConflict { .. }) => {
                    let diffs = topology::declare_or_adopt_queue(|| open_channel(conn), q).await?;
                    shared.record_differences(&q.name, diffs);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        });
    }
    for b in &t.bindings {
        step!(|ch| topology::declare_binding(ch, b));
    }
    if let Some(ch) = channel {
        let _ = ch.close(200, "declared".into()).await;
    }
    errors
}

/// How long one declaration may take. A quorum queue whose leader was on a
/// node that just died answers only after the rest of the cluster elected
/// a new one; without a limit one such declaration held the whole session
/// in `declaring`. A declaration that times out is reported like one that
/// failed, and the consumer that needs it retries.
pub(crate) const DECLARE_TIMEOUT: Duration = Duration::from_secs(5);

/// `declaration` within [`DECLARE_TIMEOUT`].
pub(crate) async fn within_declare_timeout<T>(
    declaration: impl std::future::Future<Output = Result<T, AmqpError>>,
) -> Result<T, AmqpError> {
    tokio::time::timeout(DECLARE_TIMEOUT, declaration)
        .await
        .unwrap_or_else(|_| {
            Err(AmqpError::DeclarationFailed {
                entity: "topology".into(),
                class: FailureClass::Other,
                message: format!("no answer within {DECLARE_TIMEOUT:?}"),
            })
        })
}

/// A fresh channel on `conn`.
pub(crate) async fn open_channel(conn: &Connection) -> Result<lapin::Channel, AmqpError> {
    conn.create_channel()
        .await
        .map_err(|e| AmqpError::channel("channel.open", &e))
}

impl Shared {
    /// Record what differs on `queue` (nothing: it matches). Logged once
    /// per change, with the fix.
    pub(crate) fn record_differences(&self, queue: &str, diffs: Vec<ArgumentDiff>) {
        self.status.send_if_modified(|s| {
            let known = s.queue_differences.get(queue).map_or(&[][..], Vec::as_slice);
            if known == diffs.as_slice() {
                return false;
            }
            for d in &diffs {
                warn!(queue, argument = %d.argument, declared = %d.declared, existing = %d.existing, remedy = d.remedy(), "Queue exists with another setting than Warren declares; consuming it as it is.");
            }
            if diffs.is_empty() {
                s.queue_differences.remove(queue);
            } else {
                s.queue_differences.insert(queue.to_owned(), diffs);
            }
            true
        });
    }
}

impl AmqpHandle {
    /// The supervisor's status; `changed()` wakes on every transition.
    pub fn status(&self) -> watch::Receiver<AmqpStatus> {
        self.shared.status.subscribe()
    }

    /// The current status.
    pub fn status_now(&self) -> AmqpStatus {
        self.shared.status.borrow().clone()
    }

    /// The confirmed publisher (cheap clone).
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Add `t` to the registry and declare it on the live connection, if
    /// any.
    pub async fn declare(&self, t: Topology) -> Result<(), AmqpError> {
        let (done, rx) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Declare(t, done))
            .map_err(|_| AmqpError::Stopped)?;
        rx.await.map_err(|_| AmqpError::Stopped)?
    }

    /// Start consuming `config.queue`; deliveries arrive on the returned
    /// [`Subscription`] and survive reconnects. The queue's declaration is
    /// taken from the topology registry (passively checked if absent).
    pub fn add_subscription(&self, config: SubscriptionConfig) -> Result<Subscription, AmqpError> {
        let queue = config.queue.clone();
        let (tx, rx) = mpsc::channel(config.buffer());
        {
            let mut subs = match self.shared.subs.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if subs.contains_key(&queue) {
                return Err(AmqpError::DuplicateSubscription(queue));
            }
            subs.insert(
                queue.clone(),
                SubEntry {
                    status: SubscriptionStatus::new(&queue, config.prefetch),
                    config,
                    tx,
                },
            );
        }
        if self
            .shared
            .commands
            .send(Command::Start(queue.clone()))
            .is_err()
        {
            self.shared.remove_sub(&queue);
            return Err(AmqpError::Stopped);
        }
        Ok(Subscription {
            queue,
            deliveries: rx,
        })
    }

    /// Cancel the subscription to `queue`: the broker stops delivering,
    /// in-flight deliveries may still be acked (up to the drain timeout),
    /// then its channel closes. Resolves when that is done.
    pub async fn remove_subscription(&self, queue: &str) -> Result<(), AmqpError> {
        if self.shared.sub(queue).is_none() {
            return Err(AmqpError::UnknownSubscription(queue.to_owned()));
        }
        let (done, rx) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Stop(queue.to_owned(), done))
            .map_err(|_| AmqpError::Stopped)?;
        rx.await.map_err(|_| AmqpError::Stopped)
    }

    /// Status of every subscription: what Warren believes and the last
    /// broker-side consumer count.
    pub fn consumers(&self) -> Vec<SubscriptionStatus> {
        let subs = match self.shared.subs.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.values().map(|e| e.status.clone()).collect()
    }

    /// Ready to serve: the connection is running and every subscription
    /// has its consumer registered (for a readiness probe).
    pub fn is_ready(&self) -> bool {
        self.shared.status.borrow().is_running()
            && self.consumers().iter().all(|c| {
                c.state == super::consumer::ConsumerState::Running && c.believed_consumers == 1
            })
    }

    /// Status of the subscription to `queue`.
    pub fn consumer(&self, queue: &str) -> Option<SubscriptionStatus> {
        let subs = match self.shared.subs.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.get(queue).map(|e| e.status.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[test]
    fn invalid_url_never_shows_password() {
        let Err(err) = Amqp::new(AmqpConfig::new("amqp://u:pw@[bad", "t")) else {
            panic!("expected an error");
        };
        assert!(!err.to_string().contains("pw@"), "{err}");
    }
}
