//! Finding and following the Redis primary: Sentinel discovery, the one
//! live connection to the primary, and the `+switch-master` listener.
//!
//! # Why a custom resolver, not deadpool-redis's sentinel pool
//!
//! deadpool-redis's sentinel pool keeps writing to a demoted primary after
//! a manual `SENTINEL FAILOVER` (its recycle only PINGs), and redis-rs resolves
//! through `SENTINEL MASTERS`, which the failover leader keeps stale for up
//! to `failover-timeout`. A pool also recycles connections that should be
//! dropped. The spool needs one connection at a time (the writer batches,
//! the drainer shares it), so this module owns a single
//! [`redis::aio::MultiplexedConnection`] per primary *generation*: any error
//! that may mean the primary changed invalidates that generation, the
//! connection is dropped (never recycled), and the next caller resolves
//! afresh.
//!
//! # How the primary is chosen
//!
//! 1. Every sentinel is asked, concurrently and each with a timeout,
//!    `SENTINEL GET-MASTER-ADDR-BY-NAME` (the call the Sentinel client spec
//!    prescribes, up to date on the failover leader), `SENTINEL MASTER` (for
//!    its `config-epoch`) and `SENTINEL REPLICAS`.
//! 2. The address from the sentinel with the highest `config-epoch` wins
//!    (the failover leader bumps it exactly when it starts advertising the
//!    promoted replica; ties go to the first sentinel in configured order).
//! 3. `ROLE` on that node must say primary; `INFO replication` gives its
//!    replication id and how many replicas are online.
//! 4. Successor check: if another known node (a replica Sentinel lists, or an
//!    address another sentinel named) is a primary whose `master_replid2` is
//!    our candidate's replication id, it was promoted *from* the candidate:
//!    a failover is under way and the candidate is about to be demoted.
//!    Refused with [`SpoolError::FailoverInProgress`].
//! 5. Fewer online replicas than required: [`SpoolError::NoReplicas`].
//!
//! # Why appends `WAIT` for every online replica
//!
//! During a manual failover the promoted replica leaves the old primary
//! before Sentinel advertises it; the other replica still acknowledges the
//! old primary's writes until it is re-pointed and full-resyncs, losing
//! them. Waiting for *all* replicas that were online when the primary was
//! resolved (at least `min_replicas`) makes that departure visible as a
//! short `WAIT`, which invalidates the connection and re-runs the successor
//! check above. The required count is only ever raised by the periodic
//! refresh, lowered only by a full re-resolution.
//!
//! Both rules are needed. Waiting for `min_replicas` alone acknowledges
//! appends that only the replica about to be re-pointed holds, and its
//! resync loses them. Waiting for every replica without the successor
//! check loses them too: the re-resolution after the short `WAIT` accepts
//! the old primary again, with its one remaining replica. The price: one
//! replica lagging more than the WAIT timeout refuses appends until it
//! catches up. `SpoolConfig::wait_for_all_replicas = false` trades that
//! back (WAIT for `min_replicas` only) and accepts the loss window above.
//!
//! # Credentials and TLS
//! [`Dialer`] builds every connection: to the sentinels (the sentinel URLs,
//! with `sentinel_username` / `sentinel_password` if set), to the primary
//! and the other data nodes Sentinel names (`username` / `password`: Redis
//! keeps the data nodes' and the sentinels' passwords apart), and to the
//! configured `url`. TLS is on for all of them when the URLs say
//! `rediss://`; each certificate is checked against the address the node
//! was reached at, which for data nodes is the one Sentinel announces (an
//! IP unless `announce-hostnames yes`, so the certificates must name it).
//! A refused credential is [`SpoolError::AuthFailed`], repeated without
//! dialling for [`AUTH_RETRY`].
//!
//! Deliberately not done here: connection pooling.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionInfo, IntoConnectionInfo,
    RedisConnectionInfo, Role, TlsCertificates,
};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error::AUTH_RETRY;
use super::{SpoolConfig, SpoolError};
use crate::backoff::{Backoff, BackoffConfig};
use crate::secret::{Secret, read_secret_file};

/// Builds the spool's Redis clients: TLS material shared by every node, and
/// the credentials of the data nodes (the sentinels' are baked into their
/// clients at start).
struct Dialer {
    /// `rediss` or `redis`, for the data nodes Sentinel names.
    scheme: &'static str,
    /// CA and client certificate, when configured (else the system's roots).
    certificates: Option<TlsCertificates>,
    /// Credentials of the data nodes (and of `url`).
    data: Credentials,
    /// Credentials of the sentinels.
    sentinel: Credentials,
}

/// A user and password that replace whatever a URL carries, where set.
#[derive(Default)]
struct Credentials {
    username: Option<String>,
    password: Option<Secret>,
}

impl Credentials {
    /// `base` with these credentials put in where set.
    fn apply(&self, mut base: RedisConnectionInfo) -> RedisConnectionInfo {
        if let Some(u) = &self.username {
            base = base.set_username(u);
        }
        if let Some(p) = &self.password {
            base = base.set_password(p.expose());
        }
        base
    }
}

impl Dialer {
    /// Read the TLS files and password files of `cfg`; every problem at once.
    fn new(cfg: &SpoolConfig, problems: &mut Vec<String>) -> Dialer {
        let tls = match cfg.plain_url() {
            Some(url) => url.starts_with("rediss://"),
            None => cfg.sentinels.iter().any(|s| s.starts_with("rediss://")),
        };
        let read = |key: &str, path: &std::path::Path, problems: &mut Vec<String>| {
            std::fs::read(path)
                .map_err(|e| problems.push(format!("cannot read {key} {}: {e}", path.display())))
                .ok()
        };
        let root_cert = cfg
            .tls_ca_file
            .as_ref()
            .and_then(|p| read("tls_ca_file", p, problems));
        let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(cert), Some(key)) => {
                match (
                    read("tls_cert_file", cert, problems),
                    read("tls_key_file", key, problems),
                ) {
                    (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
                        client_cert,
                        client_key,
                    }),
                    _ => None,
                }
            }
            (None, None) => None,
            _ => {
                problems.push("`tls_cert_file` and `tls_key_file` go together".into());
                None
            }
        };
        let certificates =
            (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
                client_tls,
                root_cert,
            });
        if certificates.is_some() && !tls {
            problems.push("TLS files are set but the addresses use redis://, not rediss://".into());
        }
        let data = Credentials::read(
            "password_file",
            &cfg.username,
            &cfg.password,
            &cfg.password_file,
            problems,
        );
        let sentinel = Credentials::read(
            "sentinel_password_file",
            &cfg.sentinel_username,
            &cfg.sentinel_password,
            &cfg.sentinel_password_file,
            problems,
        );
        Dialer {
            scheme: if tls { "rediss" } else { "redis" },
            certificates,
            data,
            sentinel,
        }
    }

    /// A client for a configured URL; `credentials`, where set, replace the
    /// URL's own. The error never holds the URL (it may carry a password).
    fn for_url(&self, url: &str, credentials: &Credentials) -> Result<Client, String> {
        let info = url
            .into_connection_info()
            .map_err(|e| format!("bad redis url: {e}"))?;
        let redis = credentials.apply(info.redis_settings().clone());
        self.build(info.set_redis_settings(redis))
            .map_err(|e| format!("bad redis url: {e}"))
    }

    /// A client for the data node at `addr` (`ip:port` as Sentinel names it).
    fn data_node(&self, addr: &str) -> Result<Client, SpoolError> {
        let fail = |source| SpoolError::ConnectFailed {
            addr: addr.to_owned(),
            source,
        };
        let host_port = match addr.rsplit_once(':') {
            Some((host, port)) if host.contains(':') => format!("[{host}]:{port}"),
            _ => addr.to_owned(),
        };
        let info = format!("{}://{host_port}", self.scheme)
            .into_connection_info()
            .map_err(fail)?
            .set_redis_settings(self.data.apply(RedisConnectionInfo::default()));
        self.build(info).map_err(fail)
    }

    fn build(&self, info: ConnectionInfo) -> redis::RedisResult<Client> {
        match &self.certificates {
            Some(certificates) => Client::build_with_tls(info, certificates.clone()),
            None => Client::open(info),
        }
    }
}

impl Credentials {
    /// A user and the password given inline or in a file (`file_key`
    /// names the file's setting in a problem).
    fn read(
        file_key: &str,
        username: &Option<String>,
        inline: &Option<Secret>,
        file: &Option<std::path::PathBuf>,
        problems: &mut Vec<String>,
    ) -> Credentials {
        let password = match (inline, file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(path)) => read_secret_file(file_key, path)
                .map_err(|e| problems.push(e))
                .ok(),
            (None, None) => None,
        };
        Credentials {
            username: username.clone(),
            password,
        }
    }
}

/// A connection to the current primary, tagged with its generation.
pub(crate) struct Link {
    /// Generation of this link; [`Primary::invalidate`] compares it.
    pub(crate) generation: u64,
    /// `ip:port` of the primary.
    pub(crate) addr: String,
    conn: MultiplexedConnection,
    /// Replicas every append must reach (`WAIT n`).
    wait_for: AtomicU32,
    /// Start-up check findings for this primary.
    pub(crate) warnings: Vec<String>,
}

impl Link {
    /// A handle on the multiplexed connection (cheap clone).
    pub(crate) fn conn(&self) -> MultiplexedConnection {
        self.conn.clone()
    }

    /// Replicas each append must reach on this link.
    pub(crate) fn wait_for(&self) -> u32 {
        self.wait_for.load(Ordering::Relaxed)
    }

    /// Raise (never lower) the replica count appends wait for.
    pub(crate) fn raise_wait_for(&self, n: u32) {
        self.wait_for.fetch_max(n, Ordering::Relaxed);
    }
}

enum Target {
    Sentinel {
        master: String,
        sentinels: Vec<(String, Client)>,
    },
    Plain {
        addr: String,
        /// Boxed: a TLS client is far larger than the sentinel list.
        client: Box<Client>,
    },
}

/// A resolved primary: its address, the connection kept for appends, the
/// replicas each append waits for, and the start-up check findings.
type Resolved = (String, MultiplexedConnection, u32, Vec<String>);

/// `GET-MASTER-ADDR-BY-NAME`, `MASTER` and `REPLICAS` replies.
type SentinelReply = (Option<(String, u16)>, Vec<String>, Vec<Vec<String>>);

/// What one sentinel said.
struct SentinelAnswer {
    index: usize,
    addr: String,
    epoch: u64,
    replicas: Vec<String>,
}

/// What `INFO replication` on a data node says.
#[derive(Debug, Default)]
struct ReplInfo {
    role: String,
    replid: String,
    replid2: String,
    online_replicas: u32,
}

/// The current primary and how to find the next one.
pub(crate) struct Primary {
    target: Target,
    dialer: Dialer,
    /// An authentication failure and until when it is repeated without
    /// dialling (see [`AUTH_RETRY`]).
    refused: std::sync::Mutex<Option<(std::time::Instant, SpoolError)>>,
    min_replicas: u32,
    wait_for_all: bool,
    response_timeout: Duration,
    probe_response: Duration,
    probe_cfg: AsyncConnectionConfig,
    probe_timeout: Duration,
    current: Mutex<Option<Arc<Link>>>,
    /// A copy of `current` readable without waiting: every caller of
    /// [`Primary::get`] (each plugin read, each append) takes it from here
    /// while a link exists, instead of queueing on the async lock, which
    /// is held across a resolution. Written only under that lock.
    shown: std::sync::RwLock<Option<Arc<Link>>>,
    /// Fired on `+switch-master`.
    switched: Notify,
    generation: AtomicU64,
    /// Last resolution failure, for status.
    last_error: std::sync::Mutex<Option<String>>,
}

impl Primary {
    pub(crate) fn new(cfg: &SpoolConfig) -> Result<Self, SpoolError> {
        let mut problems = Vec::new();
        let dialer = Dialer::new(cfg, &mut problems);
        let target = match cfg.plain_url() {
            Some(url) => match dialer.for_url(url, &dialer.data) {
                Ok(client) => Some(Target::Plain {
                    addr: client.get_connection_info().addr().to_string(),
                    client: Box::new(client),
                }),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            None => {
                let mut sentinels = Vec::new();
                for url in &cfg.sentinels {
                    match dialer.for_url(url, &dialer.sentinel) {
                        Ok(c) => sentinels.push((c.get_connection_info().addr().to_string(), c)),
                        Err(e) => problems.push(format!("sentinel: {e}")),
                    }
                }
                Some(Target::Sentinel {
                    master: cfg.master_name.clone(),
                    sentinels,
                })
            }
        };
        let (Some(target), true) = (target, problems.is_empty()) else {
            return Err(SpoolError::InvalidConfig(problems));
        };
        // Checks (sentinel queries, ROLE, INFO) get a short response
        // timeout, so a frozen node costs little; a connection that is kept
        // for appends is switched to `response_timeout` (> the WAIT timeout).
        let probe_response = cfg.connect_timeout().min(Duration::from_millis(500));
        let probe_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout()))
            .set_response_timeout(Some(probe_response));
        Ok(Self {
            target,
            dialer,
            refused: std::sync::Mutex::new(None),
            min_replicas: cfg.min_replicas(),
            wait_for_all: cfg.wait_for_all_replicas,
            response_timeout: cfg.response_timeout(),
            probe_response,
            probe_cfg,
            probe_timeout: cfg.connect_timeout() + probe_response * 2,
            current: Mutex::new(None),
            shown: std::sync::RwLock::new(None),
            switched: Notify::new(),
            generation: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
        })
    }

    /// The Sentinel master name, if Sentinel is used.
    pub(crate) fn master_name(&self) -> Option<&str> {
        match &self.target {
            Target::Sentinel { master, .. } => Some(master),
            Target::Plain { .. } => None,
        }
    }

    /// The current link, resolving the primary first if there is none.
    /// Concurrent callers wait for one resolution.
    pub(crate) async fn get(&self) -> Result<Arc<Link>, SpoolError> {
        if let Some(link) = crate::sync::read(&self.shown).as_ref() {
            return Ok(link.clone());
        }
        let mut current = self.current.lock().await;
        if let Some(link) = current.as_ref() {
            return Ok(link.clone());
        }
        if let Some(refused) = self.still_refused() {
            return Err(refused);
        }
        // A `+switch-master` during a resolution (typically stuck on the old,
        // frozen primary) cuts it short; the caller retries at once.
        let switched = self.switched.notified();
        let resolved = tokio::select! {
            biased;
            _ = switched => Err(SpoolError::NoPrimary {
                master: self.master_name().unwrap_or("").to_owned(),
                detail: "sentinel switched the primary during resolution".into(),
            }),
            r = self.resolve() => r,
        };
        match resolved {
            Ok((addr, conn, wait_for, warnings)) => {
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                info!(%addr, generation, wait_for, "Connected to the Redis primary.");
                for w in &warnings {
                    warn!(%addr, check = %w, "Redis primary is configured unsafely for the spool.");
                }
                let link = Arc::new(Link {
                    generation,
                    addr,
                    conn,
                    wait_for: AtomicU32::new(wait_for),
                    warnings,
                });
                *current = Some(link.clone());
                *crate::sync::write(&self.shown) = Some(link.clone());
                self.set_last_error(None);
                metrics::counter!(super::metric::PRIMARY_RESOLVED).increment(1);
                Ok(link)
            }
            Err(e) => {
                if e.is_auth() {
                    warn!(error = %e, retry_in = ?AUTH_RETRY, "Redis refused the spool's credentials.");
                    if let Ok(mut g) = self.refused.lock() {
                        *g = Some((std::time::Instant::now() + AUTH_RETRY, e.clone()));
                    }
                } else {
                    debug!(error = %e, "Could not resolve the Redis primary.");
                }
                self.set_last_error(Some(e.to_string()));
                Err(e)
            }
        }
    }

    /// The last authentication failure while it is repeated without
    /// dialling.
    fn still_refused(&self) -> Option<SpoolError> {
        let mut g = self.refused.lock().ok()?;
        match g.as_ref() {
            Some((until, e)) if std::time::Instant::now() < *until => Some(e.clone()),
            Some(_) => {
                *g = None;
                None
            }
            None => None,
        }
    }

    /// The current link without resolving.
    pub(crate) async fn peek(&self) -> Option<Arc<Link>> {
        self.current.lock().await.clone()
    }

    /// Drop the link of `generation` (if it is still current): its
    /// connection is closed once in-flight users let go, and the next
    /// [`Primary::get`] resolves again. A report about an older generation
    /// does nothing, so one failure never triggers two repairs.
    pub(crate) async fn invalidate(&self, generation: u64, why: &SpoolError) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|l| l.generation == generation) {
            *crate::sync::write(&self.shown) = None;
            if let Some(old) = current.take() {
                warn!(addr = %old.addr, generation, error = %why, "Dropping the Redis primary connection; re-resolving.");
            }
            self.set_last_error(Some(why.to_string()));
        }
    }

    /// On `+switch-master`: drop the current link unless it already points
    /// at the new primary `addr`.
    pub(crate) async fn invalidate_unless(&self, addr: &str) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|l| l.addr != addr)
            && let Some(old) = current.take()
        {
            *crate::sync::write(&self.shown) = None;
            info!(addr = %old.addr, generation = old.generation, new = %addr, "Dropping the Redis primary connection after +switch-master.");
        }
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    fn set_last_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Re-check the current link: still a primary (else invalidate), and
    /// raise the WAIT count if more replicas came online.
    pub(crate) async fn refresh(&self) {
        let Some(link) = self.peek().await else {
            return;
        };
        let mut conn = link.conn();
        match repl_info(&mut conn, &link.addr).await {
            Ok(info) if info.role == "master" => {
                if self.wait_for_all {
                    link.raise_wait_for(info.online_replicas.max(self.min_replicas));
                }
            }
            Ok(info) => {
                let e = SpoolError::NotPrimary {
                    addr: link.addr.clone(),
                    role: info.role,
                };
                self.invalidate(link.generation, &e).await;
            }
            Err(e) if e.is_failover() => self.invalidate(link.generation, &e).await,
            Err(_) => {}
        }
    }

    async fn resolve(&self) -> Result<Resolved, SpoolError> {
        match &self.target {
            Target::Plain { addr, client } => self.resolve_plain(addr, client).await,
            Target::Sentinel { master, sentinels } => {
                self.resolve_sentinel(master, sentinels).await
            }
        }
    }

    /// The configured `url`: it must be a primary with enough replicas.
    async fn resolve_plain(&self, addr: &str, client: &Client) -> Result<Resolved, SpoolError> {
        let mut conn = self.connect(client, addr, &self.probe_cfg).await?;
        let info = check_primary(&mut conn, addr).await?;
        if info.online_replicas < self.min_replicas {
            return Err(too_few(addr, info.online_replicas, self.min_replicas));
        }
        let warnings = startup_checks(&mut conn, addr).await;
        conn.set_response_timeout(self.response_timeout);
        Ok((addr.to_owned(), conn, self.min_replicas, warnings))
    }

    /// Steps 1–5 of the module doc, "How the primary is chosen".
    async fn resolve_sentinel(
        &self,
        master: &str,
        sentinels: &[(String, Client)],
    ) -> Result<Resolved, SpoolError> {
        let (addr, answers) = self.ask_sentinels(master, sentinels).await?;
        let client = self.dialer.data_node(&addr)?;
        let mut conn = self.connect(&client, &addr, &self.probe_cfg).await?;
        let info = check_primary(&mut conn, &addr).await?;
        self.check_no_successor(&addr, &info, &answers).await?;
        if info.online_replicas < self.min_replicas {
            return Err(too_few(&addr, info.online_replicas, self.min_replicas));
        }
        let warnings = startup_checks(&mut conn, &addr).await;
        conn.set_response_timeout(self.response_timeout);
        let wait_for = if self.wait_for_all {
            info.online_replicas.max(self.min_replicas)
        } else {
            self.min_replicas
        };
        Ok((addr, conn, wait_for, warnings))
    }

    /// Ask every sentinel at once: the address the one with the highest
    /// `config-epoch` names (ties in configured order), and every answer.
    async fn ask_sentinels(
        &self,
        master: &str,
        sentinels: &[(String, Client)],
    ) -> Result<(String, Vec<SentinelAnswer>), SpoolError> {
        let answers = join_all(
            sentinels
                .iter()
                .enumerate()
                .map(|(i, (addr, c))| self.ask_sentinel(i, addr, c, master)),
        )
        .await;
        let mut errors = Vec::new();
        let mut ok = Vec::new();
        for a in answers {
            match a {
                Ok(a) => ok.push(a),
                Err(e) => errors.push(e),
            }
        }
        // Highest config-epoch first; ties in configured order.
        ok.sort_by(|a, b| b.epoch.cmp(&a.epoch).then(a.index.cmp(&b.index)));
        let Some(best) = ok.first() else {
            // Every sentinel refused the credentials: say so, not "no
            // primary".
            if let Some(auth) = errors.iter().find(|e| e.is_auth())
                && errors.iter().all(SpoolError::is_auth)
            {
                return Err(auth.clone());
            }
            let detail: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(SpoolError::NoPrimary {
                master: master.to_owned(),
                detail: detail.join("; "),
            });
        };
        Ok((best.addr.clone(), ok))
    }

    /// The successor check (step 4 of the module doc): refuse `addr` when
    /// another node the sentinels know is a primary promoted from it.
    async fn check_no_successor(
        &self,
        addr: &str,
        info: &ReplInfo,
        answers: &[SentinelAnswer],
    ) -> Result<(), SpoolError> {
        let mut others: Vec<String> = Vec::new();
        for a in answers {
            for o in std::iter::once(&a.addr).chain(a.replicas.iter()) {
                if *o != addr && !others.contains(o) {
                    others.push(o.clone());
                }
            }
        }
        let probes = join_all(others.iter().map(|o| self.probe(o))).await;
        for (other, probe) in others.iter().zip(probes) {
            if let Some(p) = probe
                && p.role == "master"
                && !info.replid.is_empty()
                && p.replid2 == info.replid
            {
                return Err(SpoolError::FailoverInProgress {
                    addr: addr.to_owned(),
                    successor: other.clone(),
                });
            }
        }
        Ok(())
    }

    async fn connect(
        &self,
        client: &Client,
        addr: &str,
        cfg: &AsyncConnectionConfig,
    ) -> Result<MultiplexedConnection, SpoolError> {
        let fut = client.get_multiplexed_async_connection_with_config(cfg);
        match tokio::time::timeout(self.probe_timeout, fut).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(source)) => Err(SpoolError::from_connect(addr, source)),
            Err(_) => Err(SpoolError::ConnectFailed {
                addr: addr.to_owned(),
                source: redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")),
            }),
        }
    }

    async fn ask_sentinel(
        &self,
        index: usize,
        sentinel: &str,
        client: &Client,
        master: &str,
    ) -> Result<SentinelAnswer, SpoolError> {
        let work = async {
            let mut conn = self.connect(client, sentinel, &self.probe_cfg).await?;
            let mut p = redis::pipe();
            p.cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(master)
                .cmd("SENTINEL")
                .arg("MASTER")
                .arg(master)
                .cmd("SENTINEL")
                .arg("REPLICAS")
                .arg(master);
            let (addr, fields, replicas): SentinelReply = p
                .query_async(&mut conn)
                .await
                .map_err(|e| SpoolError::from_redis(sentinel, e))?;
            let (ip, port) = addr.ok_or_else(|| SpoolError::NoPrimary {
                master: master.to_owned(),
                detail: format!("sentinel {sentinel} does not know it"),
            })?;
            let epoch = field(&fields, "config-epoch")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let replicas = replicas
                .iter()
                .filter_map(|r| Some(format!("{}:{}", field(r, "ip")?, field(r, "port")?)))
                .collect();
            Ok(SentinelAnswer {
                index,
                addr: format!("{ip}:{port}"),
                epoch,
                replicas,
            })
        };
        match tokio::time::timeout(self.probe_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(SpoolError::NoPrimary {
                master: master.to_owned(),
                detail: format!("sentinel {sentinel} timed out"),
            }),
        }
    }

    /// `INFO replication` of another node, or `None` if it does not answer.
    /// Bounded by `probe_response`: a successor that matters was just
    /// promoted and answers at once; a frozen or dead node must not hold up
    /// the resolution.
    async fn probe(&self, addr: &str) -> Option<ReplInfo> {
        let work = async {
            let client = self.dialer.data_node(addr).ok()?;
            let mut conn = self.connect(&client, addr, &self.probe_cfg).await.ok()?;
            repl_info(&mut conn, addr).await.ok()
        };
        tokio::time::timeout(self.probe_response, work)
            .await
            .ok()
            .flatten()
    }

    /// Listen for `+switch-master` on the sentinels (one at a time, moving on
    /// when one goes away) and drop the current link when it fires.
    pub(crate) async fn watch_switch_master(self: Arc<Self>, cancel: CancellationToken) {
        let Target::Sentinel { master, sentinels } = &self.target else {
            return;
        };
        let mut i = 0usize;
        // After a failed subscription: short while another sentinel is left
        // to try, doubled after each round in which every one failed (a
        // password they all refuse must not be retried five times a second).
        let mut pause = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(200),
            max: AUTH_RETRY,
        });
        let mut failed_in_row = 0usize;
        loop {
            let Some((addr, client)) = sentinels.get(i % sentinels.len().max(1)) else {
                return;
            };
            i = i.wrapping_add(1);
            let ps = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                r = self.subscribe_switch_master(client) => r,
            };
            match ps {
                Ok(ps) => {
                    pause.reset();
                    failed_in_row = 0;
                    debug!(sentinel = %addr, "Subscribed to +switch-master.");
                    if !self.follow_switches(ps, addr, master, &cancel).await {
                        return;
                    }
                    debug!(sentinel = %addr, "Sentinel subscription ended; trying the next.");
                }
                Err(e) => {
                    debug!(sentinel = %addr, error = %e, "Cannot subscribe on sentinel.");
                    failed_in_row += 1;
                    if failed_in_row.is_multiple_of(sentinels.len()) {
                        pause.grow();
                    }
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause.ceiling()) => {}
            }
        }
    }

    /// A pub/sub connection to one sentinel, subscribed to `+switch-master`.
    async fn subscribe_switch_master(
        &self,
        client: &Client,
    ) -> Result<redis::aio::PubSub, Box<dyn std::error::Error + Send + Sync>> {
        let mut ps = tokio::time::timeout(self.probe_timeout, client.get_async_pubsub()).await??;
        ps.subscribe("+switch-master").await?;
        Ok(ps)
    }

    /// Act on `master`'s switches announced on `ps` until the subscription
    /// ends (true) or `cancel` (false).
    async fn follow_switches(
        &self,
        ps: redis::aio::PubSub,
        sentinel: &str,
        master: &str,
        cancel: &CancellationToken,
    ) -> bool {
        let mut stream = ps.into_on_message();
        loop {
            // Cancel-safe: a pub/sub message lost at shutdown does not
            // matter.
            let msg = tokio::select! {
                biased;
                _ = cancel.cancelled() => return false,
                m = stream.next() => m,
            };
            let Some(msg) = msg else { return true };
            // "<name> <old-ip> <old-port> <new-ip> <new-port>"
            let payload: String = msg.get_payload().unwrap_or_default();
            let parts: Vec<&str> = payload.split(' ').collect();
            if let [name, _, _, ip, port] = parts[..]
                && name == master
            {
                info!(%sentinel, %payload, "Sentinel switched the primary.");
                metrics::counter!(super::metric::SWITCH_MASTER).increment(1);
                self.switched.notify_waiters();
                self.invalidate_unless(&format!("{ip}:{port}")).await;
            }
        }
    }
}

fn too_few(addr: &str, online: u32, required: u32) -> SpoolError {
    SpoolError::NoReplicas {
        addr: addr.to_owned(),
        detail: format!("{online} online, {required} required"),
    }
}

/// Value of `name` in a flat `[name, value, ...]` reply.
fn field<'a>(flat: &'a [String], name: &str) -> Option<&'a str> {
    flat.chunks(2)
        .find(|c| c.first().map(String::as_str) == Some(name))
        .and_then(|c| c.get(1))
        .map(String::as_str)
}

/// `ROLE` must say primary; then `INFO replication` for ids and replicas.
async fn check_primary(
    conn: &mut MultiplexedConnection,
    addr: &str,
) -> Result<ReplInfo, SpoolError> {
    let role: Role = redis::cmd("ROLE")
        .query_async(conn)
        .await
        .map_err(|e| SpoolError::from_redis(addr, e))?;
    match role {
        Role::Primary { .. } => repl_info(conn, addr).await,
        Role::Replica { .. } => Err(SpoolError::NotPrimary {
            addr: addr.to_owned(),
            role: "replica".into(),
        }),
        _ => Err(SpoolError::NotPrimary {
            addr: addr.to_owned(),
            role: "sentinel".into(),
        }),
    }
}

async fn repl_info(conn: &mut MultiplexedConnection, addr: &str) -> Result<ReplInfo, SpoolError> {
    let text: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await
        .map_err(|e| SpoolError::from_redis(addr, e))?;
    Ok(parse_repl_info(&text))
}

fn parse_repl_info(text: &str) -> ReplInfo {
    let mut info = ReplInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once(':') else {
            continue;
        };
        match k {
            "role" => info.role = v.to_owned(),
            "master_replid" => info.replid = v.to_owned(),
            "master_replid2" => info.replid2 = v.to_owned(),
            k if k.starts_with("slave") && v.contains("state=online") => {
                info.online_replicas += 1;
            }
            _ => {}
        }
    }
    info
}

/// Start-up checks of the primary's durability settings (`appendonly`,
/// `min-replicas-to-write`, `maxmemory-policy`): findings are reported, not
/// fatal.
async fn startup_checks(conn: &mut MultiplexedConnection, addr: &str) -> Vec<String> {
    let mut p = redis::pipe();
    p.cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .cmd("CONFIG")
        .arg("GET")
        .arg("min-replicas-to-write")
        .cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy");
    let replies: Result<(Vec<String>, Vec<String>, Vec<String>), _> = p.query_async(conn).await;
    match replies {
        Ok((aof, minrep, policy)) => check_findings(
            field(&aof, "appendonly"),
            field(&minrep, "min-replicas-to-write"),
            field(&policy, "maxmemory-policy"),
        ),
        Err(e) => vec![format!("could not read the configuration of {addr}: {e}")],
    }
}

fn check_findings(aof: Option<&str>, minrep: Option<&str>, policy: Option<&str>) -> Vec<String> {
    let mut findings = Vec::new();
    if aof != Some("yes") {
        findings.push(format!(
            "appendonly is {} (want yes: a restart loses the spool)",
            aof.unwrap_or("unknown")
        ));
    }
    if minrep.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) == 0 {
        findings.push(format!(
            "min-replicas-to-write is {} (want >= 1: an isolated primary accepts writes a failover discards)",
            minrep.unwrap_or("unknown")
        ));
    }
    if policy != Some("noeviction") {
        findings.push(format!(
            "maxmemory-policy is {} (want noeviction: Redis may evict spooled messages)",
            policy.unwrap_or("unknown")
        ));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_replication() {
        let text = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=7001,state=online,offset=1,lag=0\r\n\
            slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n\
            master_failover_state:no-failover\r\nmaster_replid:abc\r\nmaster_replid2:def\r\n";
        let i = parse_repl_info(text);
        assert_eq!(i.role, "master");
        assert_eq!(i.replid, "abc");
        assert_eq!(i.replid2, "def");
        assert_eq!(i.online_replicas, 1);
    }

    #[test]
    fn findings_flag_unsafe_settings() {
        assert!(check_findings(Some("yes"), Some("1"), Some("noeviction")).is_empty());
        let f = check_findings(Some("no"), Some("0"), Some("allkeys-lru"));
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].starts_with("appendonly is no"));
    }

    #[test]
    fn field_reads_flat_maps() {
        let flat: Vec<String> = ["ip", "1.2.3.4", "port", "7"].map(String::from).to_vec();
        assert_eq!(field(&flat, "port"), Some("7"));
        assert_eq!(field(&flat, "nope"), None);
    }
}
