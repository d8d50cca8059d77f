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

use futures::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use tokio::sync::{Mutex, Notify, watch};
use tracing::{debug, info, warn};

mod checks;
mod dialer;
mod switch;

use super::error::AUTH_RETRY;
use super::{SpoolConfig, SpoolError};
use checks::{ReplInfo, check_primary, field, repl_info, startup_checks, too_few};
use dialer::Dialer;

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
    /// The link, guarded by the lock one resolution at a time holds across
    /// `resolve()`: concurrent callers of [`Primary::get`] wait for that
    /// one resolution instead of starting their own.
    current: Mutex<Option<Arc<Link>>>,
    /// `current`, published: readable without waiting, so a caller with a
    /// link to use (each append, each plugin read) and the status (see
    /// [`Primary::peek`]) never queue behind a resolution. Written only
    /// under the lock, together with `current`.
    shown: watch::Sender<Option<Arc<Link>>>,
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
            shown: watch::Sender::new(None),
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
        if let Some(link) = self.peek() {
            return Ok(link);
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
                self.shown.send_replace(Some(link.clone()));
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

    /// The current link without resolving, and without waiting for a
    /// resolution under way.
    pub(crate) fn peek(&self) -> Option<Arc<Link>> {
        self.shown.borrow().clone()
    }

    /// Drop the link of `generation` (if it is still current): its
    /// connection is closed once in-flight users let go, and the next
    /// [`Primary::get`] resolves again. A report about an older generation
    /// does nothing, so one failure never triggers two repairs.
    pub(crate) async fn invalidate(&self, generation: u64, why: &SpoolError) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|l| l.generation == generation) {
            self.shown.send_replace(None);
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
            self.shown.send_replace(None);
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
        let Some(link) = self.peek() else {
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
}
