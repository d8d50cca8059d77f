//! A Redis Sentinel topology (1 primary, 2 replicas, 3 sentinels) started
//! through `sentinel-compose/local.sh` on free loopback ports in a temporary
//! directory, with the faults tests need. Dropping it stops every process
//! it started, by the PIDs in its own pidfiles.
//!
//! [`Topology::start_secured`] starts the secured variant
//! (`sentinel-compose/secure/`): TLS only, with certificates made for the
//! test by `secure/make-certs.sh`, a password on the data nodes and on the
//! sentinels, and an ACL user `warren` for the spool.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use redis::AsyncConnectionConfig;

use crate::{ports, wait};

/// Sentinel timings used by tests (fast failovers).
pub const DOWN_AFTER_MS: u64 = 1000;
/// See [`DOWN_AFTER_MS`].
pub const FAILOVER_TIMEOUT_MS: u64 = 5000;

/// The secrets and certificates of a secured topology.
#[derive(Debug, Clone)]
pub struct Secured {
    /// `ca.crt`, `redis.crt`, `redis.key`, `client.crt`, `client.key`.
    pub tls_dir: PathBuf,
    /// The data nodes' `requirepass` (the default user).
    pub data_password: String,
    /// The password of the data nodes' ACL user `warren`.
    pub warren_password: String,
    /// The sentinels' `requirepass`.
    pub sentinel_password: String,
}

/// The ACL user the secured topology makes for Warren.
pub const WARREN_USER: &str = "warren";

/// A running topology.
pub struct Topology {
    dir: tempfile::TempDir,
    script: PathBuf,
    /// Set for the secured variant.
    pub secured: Option<Secured>,
    /// The Sentinel master name.
    pub master_name: String,
    /// Ports of the three data nodes; `data_ports[0]` started as primary.
    pub data_ports: [u16; 3],
    /// Ports of the three sentinels.
    pub sentinel_ports: [u16; 3],
}

fn script_path() -> PathBuf {
    crate::plugins::repo_root()
        .join("sentinel-compose")
        .join("local.sh")
}

fn distinct_ports<const N: usize>() -> Result<[u16; N]> {
    let mut out: Vec<u16> = Vec::with_capacity(N);
    while out.len() < N {
        let p = ports::free_port()?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out.try_into()
        .map_err(|_| anyhow::anyhow!("could not collect {N} ports"))
}

/// How long [`Topology::failover`] waits for Sentinel to have a replica it
/// can promote.
const FAILOVER_READY: Duration = Duration::from_secs(30);

/// Sentinel's refusals that mean "not now" rather than "never".
fn is_not_ready(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("NOGOODSLAVE" | "INPROG"))
}

/// A connection to `127.0.0.1:port` as the default user with `password`,
/// over TLS trusting `tls`'s CA when given.
async fn conn(
    port: u16,
    tls: Option<&Path>,
    password: Option<&str>,
) -> Result<redis::aio::MultiplexedConnection> {
    let scheme = if tls.is_some() { "rediss" } else { "redis" };
    let mut info =
        redis::IntoConnectionInfo::into_connection_info(format!("{scheme}://127.0.0.1:{port}"))?;
    if let Some(pw) = password {
        info = info.set_redis_settings(redis::RedisConnectionInfo::default().set_password(pw));
    }
    let client = match tls {
        Some(dir) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(dir.join("ca.crt"))?),
            },
        )?,
        None => redis::Client::open(info)?,
    };
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?)
}

impl Topology {
    /// Start the topology and return once every sentinel sees two replicas
    /// and two other sentinels and CKQUORUM is OK (the script waits).
    pub async fn start() -> Result<Topology> {
        Self::start_with(false).await
    }

    /// [`Topology::start`] for the secured variant.
    pub async fn start_secured() -> Result<Topology> {
        Self::start_with(true).await
    }

    async fn start_with(secure: bool) -> Result<Topology> {
        let dir = tempfile::Builder::new()
            .prefix("warren-sentinel-")
            .tempdir()?;
        let secured = if secure {
            let tls_dir = dir.path().join("tls");
            let script = crate::plugins::repo_root().join("sentinel-compose/secure/make-certs.sh");
            let out = tokio::process::Command::new("bash")
                .arg(script)
                .arg(&tls_dir)
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "make-certs.sh failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let secret = |what: &str| format!("{what}-{}", uuid::Uuid::new_v4().simple());
            Some(Secured {
                tls_dir,
                data_password: secret("data"),
                warren_password: secret("warren"),
                sentinel_password: secret("sentinel"),
            })
        } else {
            None
        };
        let all: [u16; 6] = distinct_ports()?;
        let topo = Topology {
            dir,
            script: script_path(),
            secured,
            master_name: "mymaster".into(),
            data_ports: [all[0], all[1], all[2]],
            sentinel_ports: [all[3], all[4], all[5]],
        };
        let args: Vec<String> = all.iter().map(u16::to_string).collect();
        topo.run_script("start", &args).await?;
        Ok(topo)
    }

    async fn run_script(&self, cmd: &str, args: &[String]) -> Result<()> {
        let mut c = tokio::process::Command::new("bash");
        c.arg(&self.script)
            .arg(cmd)
            .arg(self.dir.path())
            .args(args)
            .env("MASTER_NAME", &self.master_name)
            .env("DOWN_AFTER_MS", DOWN_AFTER_MS.to_string())
            .env("FAILOVER_TIMEOUT_MS", FAILOVER_TIMEOUT_MS.to_string())
            .env("MIN_REPLICAS_MAX_LAG", "2");
        if let Some(s) = &self.secured {
            c.env("SECURE_DIR", &s.tls_dir)
                .env("DATA_PASSWORD", &s.data_password)
                .env("WARREN_PASSWORD", &s.warren_password)
                .env("SENTINEL_PASSWORD", &s.sentinel_password);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), c.output())
            .await
            .context("local.sh timed out")??;
        if !out.status.success() {
            bail!(
                "local.sh {cmd} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The temporary directory holding logs, AOFs and pidfiles.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis://127.0.0.1:<port>` for each sentinel (`rediss://` when
    /// secured).
    pub fn sentinel_urls(&self) -> Vec<String> {
        let scheme = if self.secured.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.sentinel_ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect()
    }

    /// A connection to a node of this topology, as its administrator.
    pub async fn conn(&self, port: u16) -> Result<redis::aio::MultiplexedConnection> {
        let tls = self.secured.as_ref().map(|s| s.tls_dir.as_path());
        let password = self.secured.as_ref().map(|s| {
            if self.sentinel_ports.contains(&port) {
                s.sentinel_password.as_str()
            } else {
                s.data_password.as_str()
            }
        });
        conn(port, tls, password).await
    }

    /// The primary's port according to the first sentinel that answers.
    pub async fn primary_port(&self) -> Result<u16> {
        let mut last = None;
        for s in self.sentinel_ports {
            let r = async {
                let mut c = self.conn(s).await?;
                let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master_name)
                    .query_async(&mut c)
                    .await?;
                addr.map(|(_, p)| p).context("sentinel knows no primary")
            }
            .await;
            match r {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no sentinel answered")))
    }

    /// `ROLE` of a data node: "master", "slave", or an error if it is down.
    pub async fn role(&self, port: u16) -> Result<String> {
        let mut c = self.conn(port).await?;
        let v: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await?;
        match v.first() {
            Some(redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(redis::Value::SimpleString(s)) => Ok(s.clone()),
            other => bail!("unexpected ROLE reply {other:?}"),
        }
    }

    /// Replicas the node reports as online (`INFO replication`).
    pub async fn online_replicas(&self, port: u16) -> Result<usize> {
        let mut c = self.conn(port).await?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut c)
            .await?;
        Ok(info
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count())
    }

    fn pidfile(&self, port: u16) -> PathBuf {
        self.dir.path().join(port.to_string()).join("redis.pid")
    }

    fn pid(&self, port: u16) -> Result<i32> {
        let text = std::fs::read_to_string(self.pidfile(port))
            .with_context(|| format!("no pidfile for node {port}"))?;
        Ok(text.trim().parse()?)
    }

    fn signal(pid: i32, sig: &str) -> Result<()> {
        let st = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()?;
        if !st.success() {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    fn alive(pid: i32) -> bool {
        Command::new("kill")
            .arg("-0")
            .arg(pid.to_string())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// `kill -9` a data node (and forget its pidfile).
    pub async fn kill9(&self, port: u16) -> Result<()> {
        let pid = self.pid(port)?;
        Self::signal(pid, "-9")?;
        wait::until_true("killed node to exit", Duration::from_secs(5), || async {
            !Self::alive(pid)
        })
        .await?;
        let _ = std::fs::remove_file(self.pidfile(port));
        Ok(())
    }

    /// Freeze a data node (`SIGSTOP`): it keeps its sockets but answers
    /// nothing, like a partitioned or hung server.
    pub fn freeze(&self, port: u16) -> Result<()> {
        Self::signal(self.pid(port)?, "-STOP")
    }

    /// Resume a node frozen by [`Topology::freeze`].
    pub fn thaw(&self, port: u16) -> Result<()> {
        Self::signal(self.pid(port)?, "-CONT")
    }

    /// Stop a data node cleanly (SIGTERM) and wait until it is gone.
    pub async fn stop_node(&self, port: u16) -> Result<()> {
        let pid = self.pid(port)?;
        Self::signal(pid, "-TERM")?;
        wait::until_true("stopped node to exit", Duration::from_secs(10), || async {
            !Self::alive(pid)
        })
        .await?;
        let _ = std::fs::remove_file(self.pidfile(port));
        Ok(())
    }

    /// Start a stopped or killed data node again as a bare instance;
    /// Sentinel turns it into a replica of the current primary.
    pub async fn restart_node(&self, port: u16) -> Result<()> {
        self.run_script("restart-node", &[port.to_string()]).await
    }

    /// `SENTINEL FAILOVER` on the first sentinel. Right after an earlier
    /// failover or a node restart Sentinel may have no replica it deems fit
    /// yet (`NOGOODSLAVE`: the replicas are still resynchronising) or still
    /// be finishing the last one (`INPROG`); those are retried until
    /// `FAILOVER_READY` passes, anything else fails at once.
    pub async fn failover(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + FAILOVER_READY;
        loop {
            let mut c = self.conn(self.sentinel_ports[0]).await?;
            let r: redis::RedisResult<String> = redis::cmd("SENTINEL")
                .arg("FAILOVER")
                .arg(&self.master_name)
                .query_async(&mut c)
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if is_not_ready(&e) && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(wait::POLL * 5).await;
                }
                Err(e) => return Err(e).context("SENTINEL FAILOVER"),
            }
        }
    }

    /// Wait until Sentinel names a primary other than `old` and that node
    /// says it is a primary.
    pub async fn wait_new_primary(&self, old: u16, timeout: Duration) -> Result<u16> {
        wait::until("a new primary", timeout, || async {
            let p = self.primary_port().await.ok()?;
            (p != old && self.role(p).await.ok()? == "master").then_some(p)
        })
        .await
    }

    /// Wait until `old` (a primary that was killed and restarted, or failed
    /// over) is a replica again and the primary Sentinel names has both
    /// replicas online: the topology is whole again. Sentinel occasionally
    /// runs a second failover meanwhile; this follows it.
    pub async fn wait_rejoined(&self, old: u16, timeout: Duration) -> Result<()> {
        wait::until_true(
            "old primary back as a replica, both replicas online",
            timeout,
            || async {
                let Ok(primary) = self.primary_port().await else {
                    return false;
                };
                self.role(old).await.ok().as_deref() == Some("slave")
                    && self.online_replicas(primary).await.unwrap_or(0) == 2
            },
        )
        .await
    }

    /// Stop everything (also done on drop).
    pub fn stop(&self) -> Result<()> {
        let st = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(self.dir.path())
            .status()?;
        if !st.success() {
            bail!("local.sh stop failed");
        }
        Ok(())
    }
}

impl Drop for Topology {
    /// Stops every process. The directory (logs, configs) is kept when the
    /// test is panicking or `WARREN_KEEP_TOPOLOGY` is set.
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, dir = %self.dir.path().display(), "Could not stop the Sentinel topology.");
        }
        if std::thread::panicking() || std::env::var_os("WARREN_KEEP_TOPOLOGY").is_some() {
            self.dir.disable_cleanup(true);
            tracing::warn!(dir = %self.dir.path().display(), "Keeping the Sentinel topology's logs.");
        }
    }
}
