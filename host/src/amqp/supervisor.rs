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
//! never buffers publishes (that is `buffer`). The session on a live
//! connection is `session`, the status it publishes `status`, the state it
//! shares with its tasks `shared`, and the handle to it `handle`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::declare::declare_all;
use super::failure::{AmqpError, Failure, FailureClass};
use super::handle::AmqpHandle;
use super::metrics;
use super::outage_log::OutageLog;
use super::publisher::{Publisher, PublisherLink};
use super::server;
use super::session::Session;
use super::shared::{Command, Shared};
use super::status::{AmqpStatus, ConnectionState};
use super::topology::{Topology, TopologyRegistry};
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
    pub(super) config: AmqpConfig,
    /// Every endpoint, with its redacted form for logs and status.
    endpoints: Vec<(AMQPUri, String)>,
    pub(super) shared: Arc<Shared>,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) publisher_link: watch::Sender<Option<PublisherLink>>,
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
