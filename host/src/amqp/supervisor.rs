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
use futures::stream::BoxStream;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::consumer::{self, ConsumerCtx, Delivery, SubscriptionConfig, SubscriptionStatus};
use super::failure::{AmqpError, Failure, FailureClass, classify, is_connection_level};
use super::metrics;
use super::outage_log::OutageLog;
use super::publisher::{self, Publisher, PublisherLink};
use super::server::{self, ServerInfo};
use super::topology::{self, ArgumentDiff, Topology, TopologyRegistry};
use crate::backoff::{Backoff, BackoffConfig};
use crate::secret::redact_url;

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
            .field("url", &redact_url(&self.url))
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

/// The connection's life-cycle state.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionState {
    /// Opening a connection.
    Connecting {
        /// Attempts since the last healthy session (one that ran at least
        /// the backoff's cap); 0 = first.
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
        let mut subs = crate::sync::lock(&self.subs);
        if let Some(e) = subs.get_mut(queue) {
            f(&mut e.status);
        }
    }

    pub(crate) fn sub(&self, queue: &str) -> Option<(SubscriptionConfig, mpsc::Sender<Delivery>)> {
        let subs = crate::sync::lock(&self.subs);
        subs.get(queue).map(|e| (e.config.clone(), e.tx.clone()))
    }

    fn sub_names(&self) -> Vec<String> {
        let subs = crate::sync::lock(&self.subs);
        subs.keys().cloned().collect()
    }

    /// Registered, but its subscriber dropped the receiver.
    fn receiver_gone(&self, queue: &str) -> bool {
        self.sub(queue).is_some_and(|(_, tx)| tx.is_closed())
    }

    fn remove_sub(&self, queue: &str) {
        let mut subs = crate::sync::lock(&self.subs);
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
                    .map_err(|e| AmqpError::InvalidUrl(format!("{}: {e}", redact_url(url))))?;
                uri.query.heartbeat = Some(hb);
                uri.query.connection_timeout =
                    Some(u64::try_from(config.connect_timeout.as_millis()).unwrap_or(u64::MAX));
                Ok((uri, redact_url(url)))
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
        let mut retry = Retry::new(self.config.backoff);
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let attempt = retry.backoff.attempt();
            self.shared
                .set_state(ConnectionState::Connecting { attempt });
            self.shared.status.send_modify(|s| s.connect_attempts += 1);
            let connected = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = self.connect() => r,
            };
            let (failure, refused) = match connected {
                Ok((conn, uri, endpoint)) => {
                    match self.serve(conn, &uri, endpoint, &mut retry, &cancel).await {
                        None => break,
                        Some(f) => (f, false),
                    }
                }
                Err(ConnectFailed {
                    failure,
                    all_refused,
                }) => {
                    metrics::connect_failure(failure.class);
                    let loud = failure.class.is_slow_retry();
                    retry.outage.connect_failed(&failure, loud, Instant::now());
                    (failure, all_refused)
                }
            };
            let delay = self.recovering(&mut retry, failure, refused);
            self.wait_offline(delay, &cancel).await;
        }
        self.publisher_link.send_replace(None);
        for queue in self.shared.sub_names() {
            self.shared.remove_sub(&queue);
        }
        self.shared.set_state(ConnectionState::Stopped);
        info!("AMQP supervisor stopped.");
    }

    /// A session on a fresh connection, accounted for in `retry`: a session
    /// that lived at least the backoff's cap starts the backoff over (see
    /// below). Returns `None` after a clean stop, or the failure that ended
    /// it.
    async fn serve(
        &mut self,
        conn: Connection,
        uri: &AMQPUri,
        endpoint: String,
        retry: &mut Retry,
        cancel: &CancellationToken,
    ) -> Option<Failure> {
        retry.generation += 1;
        retry.last_logged = None;
        retry.outage.connected(Instant::now());
        let started = Instant::now();
        self.shared
            .status
            .send_modify(|s| s.endpoint = Some(endpoint));
        let outcome = self.session(conn, uri, retry.generation, cancel).await;
        // A session that ran at least as long as the longest reconnect delay
        // ends the failure sequence before it: its loss is the first failure
        // of a new outage, retried after at most the first delay, not after
        // a delay grown by earlier, unrelated outages (and by the refused
        // connects within them). Such a session already spaced its reconnect
        // from the one before by more than the cap would, so starting over
        // costs the broker at most the rate the cap allows. A session lost
        // sooner (a flapping broker, or a failure that recurs right after
        // each start) continues the sequence, and its delays keep growing.
        if started.elapsed() >= self.config.backoff.max {
            retry.backoff.reset();
        }
        let failure = outcome?;
        metrics::reconnect(failure.class);
        retry
            .outage
            .session_lost(retry.generation, &failure, Instant::now());
        Some(failure)
    }

    /// After a failed connect or a lost session: the wait before the next
    /// attempt (slow after a refusal that needs an operator, short when
    /// nothing listened, else the backoff), an ERROR for such a refusal
    /// (once while it repeats), and the state to publish.
    fn recovering(&self, retry: &mut Retry, failure: Failure, refused: bool) -> Duration {
        let slow = failure.class.is_slow_retry();
        let delay = if slow {
            retry.backoff.slow_delay()
        } else if refused {
            retry.backoff.next_delay_within(self.config.refused_retry)
        } else {
            retry.backoff.next_delay()
        };
        let attempt = retry.backoff.attempt();
        let key = (failure.class, failure.message.clone());
        if slow && retry.last_logged.as_ref() != Some(&key) {
            error!(class = %failure.class, error = %failure.message, ?delay, "Broker refused the connection; operator action needed, retrying slowly.");
            retry.last_logged = Some(key);
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
        delay
    }

    /// Wait `delay` before the next connect, answering commands meanwhile;
    /// ends early when `cancel` fires.
    async fn wait_offline(&mut self, delay: Duration, cancel: &CancellationToken) {
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
        let events = conn.events_listener().boxed();
        if let Err(failure) = self.declare_session(&conn, uri, generation).await {
            return Some(failure);
        }
        Session::start(self, conn, events, generation)
            .run(cancel)
            .await
    }

    /// Declare the registry's topology on a new session and learn which
    /// broker it talks to. A declaration that fails is recorded and the
    /// subscriptions that need it retry; a connection lost meanwhile ends
    /// the session.
    async fn declare_session(
        &self,
        conn: &Connection,
        uri: &AMQPUri,
        generation: u64,
    ) -> Result<(), Failure> {
        self.shared.status.send_modify(|s| {
            s.generation = generation;
            s.state = ConnectionState::Declaring;
            s.session_started = Some(std::time::Instant::now());
        });
        let topology = self.shared.topology.snapshot();
        let (errors, server) =
            tokio::join!(declare_all(conn, &topology, &self.shared), server::ask(uri),);
        self.shared.status.send_modify(|s| s.server = Some(server));
        if let Some(e) = errors
            .iter()
            .find(|e| !e.is_transient() || e.class() == FailureClass::NotFound)
        {
            warn!(generation, error = %e, "Topology declaration failed; the affected subscriptions will retry.");
        }
        let declaration_errors = errors.iter().map(ToString::to_string).collect();
        if !conn.status().connected() {
            return Err(Failure::new(
                FailureClass::Other,
                "connection closed while declaring the topology",
                Some(generation),
            ));
        }
        self.shared.status.send_modify(|s| {
            s.declaration_errors = declaration_errors;
        });
        info!(generation, connection_name = %self.config.connection_name(), "AMQP session established.");
        Ok(())
    }
}

/// What the reconnect loop in [`Amqp::run`] carries from one attempt to
/// the next.
struct Retry {
    backoff: Backoff,
    /// The last refusal logged at ERROR, so a repeat is not logged again.
    last_logged: Option<(FailureClass, String)>,
    outage: OutageLog,
    /// The generation of the last session; 0 before the first.
    generation: u64,
}

impl Retry {
    fn new(backoff: BackoffConfig) -> Self {
        Self {
            backoff: Backoff::new(backoff),
            last_logged: None,
            outage: OutageLog::default(),
            generation: 0,
        }
    }
}

/// A running session: the tasks it started and what its loop carries from
/// one event to the next. [`Session::run`] handles one event per method and
/// ends in [`Session::stop`] (cancelled) or [`Session::tear_down`] (failed).
struct Session<'a> {
    amqp: &'a mut Amqp,
    conn: Arc<Connection>,
    generation: u64,
    events: BoxStream<'static, Event>,
    /// Ends the publish channel's keeper and every consumer at once.
    abort: CancellationToken,
    /// Parent of every consumer's stop token: consumers drain and stop.
    graceful: CancellationToken,
    /// Failure reports from the session's tasks.
    failures_tx: mpsc::UnboundedSender<Failure>,
    failures: mpsc::UnboundedReceiver<Failure>,
    consumers: JoinSet<String>,
    /// Each running consumer's stop token, and the removal requests
    /// waiting for it to end.
    running: HashMap<String, (CancellationToken, Vec<oneshot::Sender<()>>)>,
    /// The publish channel's keeper.
    side: JoinSet<()>,
    watchdog: tokio::time::Interval,
    /// The last channel-level error, to name if the watchdog finds the
    /// connection gone.
    last_error: Option<lapin::Error>,
}

impl<'a> Session<'a> {
    /// Start the publish channel's keeper and one consumer per
    /// subscription, then publish the session as running (or blocked).
    fn start(
        amqp: &'a mut Amqp,
        conn: Arc<Connection>,
        events: BoxStream<'static, Event>,
        generation: u64,
    ) -> Self {
        let (failures_tx, failures) = mpsc::unbounded_channel::<Failure>();
        let mut watchdog = tokio::time::interval(amqp.config.watchdog_interval);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut session = Session {
            amqp,
            conn,
            generation,
            events,
            abort: CancellationToken::new(),
            graceful: CancellationToken::new(),
            failures_tx,
            failures,
            consumers: JoinSet::new(),
            running: HashMap::new(),
            side: JoinSet::new(),
            watchdog,
            last_error: None,
        };
        session.side.spawn(publisher::keep_channel(
            session.conn.clone(),
            generation,
            session.amqp.publisher_link.clone(),
            session.abort.clone(),
            session.failures_tx.clone(),
        ));
        for queue in session.amqp.shared.sub_names() {
            session.start_consumer(queue);
        }
        session
            .amqp
            .shared
            .set_state(if session.conn.status().blocked() {
                ConnectionState::Blocked {
                    reason: "blocked at connect".to_owned(),
                }
            } else {
                ConnectionState::Running
            });
        session
    }

    /// Handle events until `cancel` fires (a clean stop, `None`) or one
    /// ends the session (its failure, after the teardown).
    async fn run(mut self, cancel: &CancellationToken) -> Option<Failure> {
        let failure = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break None,
                Some(f) = self.failures.recv() => {
                    if let Some(f) = self.failure_report(f) {
                        break Some(f);
                    }
                }
                ev = self.events.next() => {
                    if let Some(f) = self.connection_event(ev) {
                        break Some(f);
                    }
                }
                _ = self.watchdog.tick() => {
                    if let Some(f) = self.watchdog_check() {
                        break Some(f);
                    }
                }
                // Cancel-safe: a command is either handled here or not taken.
                Some(cmd) = self.amqp.commands.recv() => self.command(cmd).await,
                Some(joined) = self.consumers.join_next() => self.consumer_ended(joined),
            }
        };
        match failure {
            None => self.stop().await,
            Some(_) => self.tear_down().await,
        }
        failure
    }

    /// A task's failure report: it ends the session unless it is from an
    /// older one.
    fn failure_report(&self, f: Failure) -> Option<Failure> {
        if f.generation == Some(self.generation) {
            return Some(f);
        }
        debug!(generation = self.generation, stale = ?f.generation, "Ignoring a failure report from an older session.");
        None
    }

    /// An event of the connection; a connection-level error, or the end of
    /// the events, ends the session. A channel-level error is its owner's
    /// to repair.
    fn connection_event(&mut self, ev: Option<Event>) -> Option<Failure> {
        let generation = self.generation;
        match ev {
            Some(Event::Error(e)) if is_connection_level(&e) => {
                return Some(Failure::from_lapin(&e, Some(generation)));
            }
            Some(Event::Error(e)) => {
                debug!(generation, error = %e, class = %classify(&e), "Channel-level error; its owner repairs it.");
                self.last_error = Some(e);
            }
            Some(Event::ConnectionBlocked(reason)) => {
                warn!(generation, %reason, "Broker blocked publishing.");
                self.amqp
                    .shared
                    .set_state(ConnectionState::Blocked { reason });
            }
            Some(Event::ConnectionUnblocked) => {
                info!(generation, "Broker unblocked publishing.");
                self.amqp.shared.set_state(ConnectionState::Running);
            }
            Some(_) => {}
            None => {
                return Some(Failure::new(
                    FailureClass::Other,
                    "connection event stream ended",
                    Some(generation),
                ));
            }
        }
        None
    }

    /// The watchdog: a connection that is no longer connected ends the
    /// session.
    fn watchdog_check(&self) -> Option<Failure> {
        if self.conn.status().connected() {
            return None;
        }
        let generation = Some(self.generation);
        Some(match &self.last_error {
            Some(e) if is_connection_level(e) => Failure::from_lapin(e, generation),
            _ => Failure::new(
                FailureClass::Other,
                "connection is no longer connected (watchdog)",
                generation,
            ),
        })
    }

    /// A command from a handle, on the live connection.
    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Start(queue) => {
                if !self.running.contains_key(&queue) {
                    self.start_consumer(queue);
                }
            }
            Command::Stop(queue, done) => match self.running.get_mut(&queue) {
                Some((stop, waiters)) => {
                    stop.cancel();
                    waiters.push(done);
                }
                None => {
                    self.amqp.shared.remove_sub(&queue);
                    let _ = done.send(());
                }
            },
            Command::Declare(t, done) => {
                self.amqp.shared.topology.merge(t.clone());
                let declared = declare_all(&self.conn, &t, &self.amqp.shared).await;
                let res = match declared.into_iter().next() {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
                let _ = done.send(res);
            }
        }
    }

    /// A consumer task ended: answer the removal that stopped it, or start
    /// it again on the live connection, or forget a subscription whose
    /// receiver is gone.
    fn consumer_ended(&mut self, joined: Result<String, tokio::task::JoinError>) {
        let queue = match joined {
            Ok(q) => q,
            Err(e) => {
                error!(generation = self.generation, error = %e, "Consumer task failed.");
                return;
            }
        };
        let Some((_, waiters)) = self.running.remove(&queue) else {
            return;
        };
        let shared = &self.amqp.shared;
        // Only a removal request leaves waiters.
        if !waiters.is_empty() {
            shared.remove_sub(&queue);
            for w in waiters {
                let _ = w.send(());
            }
        } else if !self.abort.is_cancelled() && shared.sub(&queue).is_some() {
            // Its receiver is gone or it gave up on this
            // connection; a failure report (if any) decides.
            if self.conn.status().connected() && !shared.receiver_gone(&queue) {
                self.start_consumer(queue);
            } else if shared.receiver_gone(&queue) {
                shared.remove_sub(&queue);
            }
        }
    }

    /// Start the consumer task of `queue`.
    fn start_consumer(&mut self, queue: String) {
        let stop = self.graceful.child_token();
        let ctx = ConsumerCtx {
            conn: self.conn.clone(),
            generation: self.generation,
            queue: queue.clone(),
            shared: self.amqp.shared.clone(),
            stop: stop.clone(),
            abort: self.abort.clone(),
            failures: self.failures_tx.clone(),
            check_interval: self.amqp.config.consumer_check_interval,
            flush_interval: self.amqp.config.ack_flush_interval,
            drain_timeout: self.amqp.config.drain_timeout,
            backoff: self.amqp.config.backoff,
        };
        self.consumers.spawn(consumer::run(ctx));
        self.running.insert(queue, (stop, Vec::new()));
    }

    /// Clean stop: consumers first (they drain in-flight acks),
    /// then the publisher channel, then the connection.
    async fn stop(mut self) {
        self.amqp.shared.set_state(ConnectionState::Stopping);
        self.graceful.cancel();
        let drain = self.amqp.config.drain_timeout + Duration::from_secs(1);
        if tokio::time::timeout(drain, async {
            while self.consumers.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!(
                generation = self.generation,
                "Consumers did not drain in time; closing anyway."
            );
        }
        self.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.side.join_next().await.is_some() {}
        })
        .await;
        self.amqp.publisher_link.send_replace(None);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.conn.close(200, "warren stopping".into()),
        )
        .await;
        for (_, (_, waiters)) in self.running {
            for w in waiters {
                let _ = w.send(());
            }
        }
    }

    /// After a failure: everything stops at once, and the connection is
    /// closed if it is still up.
    async fn tear_down(mut self) {
        self.amqp.publisher_link.send_replace(None);
        self.abort.cancel();
        self.graceful.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.consumers.join_next().await.is_some() {}
            while self.side.join_next().await.is_some() {}
        })
        .await;
        self.consumers.abort_all();
        self.side.abort_all();
        // Waiters of removals in progress: the subscription is gone.
        for (queue, (_, waiters)) in self.running {
            if !waiters.is_empty() {
                self.amqp.shared.remove_sub(&queue);
                for w in waiters {
                    let _ = w.send(());
                }
            }
        }
        if self.conn.status().connected() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.conn.close(320, "warren recovering".into()),
            )
            .await;
        }
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
/// a new one; without a limit one such declaration would hold the whole
/// session in `declaring`. A declaration that times out is reported like
/// one that failed, and the consumer that needs it retries.
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

    /// What Warren declares for the destination `exchange` /
    /// `routing_key`, if it declares it: the queue `routing_key` of the
    /// default exchange, or the exchange with its bindings and the queues
    /// they bind, each with the bindings of its own. `None` for what
    /// nobody declared here.
    pub fn owned_destination(&self, exchange: &str, routing_key: &str) -> Option<Topology> {
        let all = self.shared.topology.snapshot();
        if exchange.is_empty() {
            return all
                .queues
                .contains_key(routing_key)
                .then(|| all.for_queue(routing_key));
        }
        let spec = all.exchanges.get(exchange)?.clone();
        let mut t = Topology::default().exchange(spec);
        let queues: Vec<String> = all
            .bindings
            .iter()
            .filter(|b| b.exchange == exchange)
            .map(|b| b.queue.clone())
            .collect();
        for q in queues {
            t = t.with_missing(all.for_queue(&q));
        }
        Some(t)
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
            let mut subs = crate::sync::lock(&self.shared.subs);
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
        let subs = crate::sync::lock(&self.shared.subs);
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
        let subs = crate::sync::lock(&self.shared.subs);
        subs.get(queue).map(|e| e.status.clone())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_connect_nothing_listens_for_is_refused() {
        // Port 1 on loopback: nothing listens there.
        let uri: lapin::uri::AMQPUri = "amqp://guest:guest@127.0.0.1:1/%2f".parse().unwrap();
        let err = match lapin::Connection::connect_uri(uri, lapin::ConnectionProperties::default())
            .await
        {
            Ok(_) => panic!("something listens on port 1"),
            Err(e) => e,
        };
        assert!(super::is_refused(&err), "{err:?}");
    }

    use super::*;

    #[test]
    fn invalid_url_never_shows_password() {
        let Err(err) = Amqp::new(AmqpConfig::new("amqp://u:pw@[bad", "t")) else {
            panic!("expected an error");
        };
        assert!(!err.to_string().contains("pw@"), "{err}");
    }
}
