//! Private RabbitMQ nodes for tests that must stop, kill or restart the
//! broker, of either version the suites run against ([`Version`]), and the
//! shared broker of each version for tests that only need one.
//!
//! A node runs from `/usr/lib/rabbitmq/bin/*` directly with its own data
//! directory, `HOME` (so its own Erlang cookie), node name and free ports on
//! 127.0.0.1. RabbitMQ 3.10 is the machine's own package; RabbitMQ 4.0 runs
//! the same way inside the Debian 13 tree `tests/rabbitmq4/provision`
//! makes (entered with `chroot`, sharing the host's network and `epmd`), so
//! its files live under that tree's `/tmp`. Only the PID in a node's own
//! pidfile is ever signalled. Dropping a [`RabbitNode`] kills it and
//! removes its directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::ports::free_port;

const BIN: &str = "/usr/lib/rabbitmq/bin";

/// A RabbitMQ release the suites run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The machine's own package (Debian 12): 3.10.
    V3_10,
    /// Debian 13's package in the tree `tests/rabbitmq4/provision` makes.
    V4_0,
}

impl Version {
    /// Both, oldest first.
    pub const ALL: [Version; 2] = [Version::V3_10, Version::V4_0];

    /// `3.10` or `4.0`.
    pub fn label(self) -> &'static str {
        match self {
            Version::V3_10 => "3.10",
            Version::V4_0 => "4.0",
        }
    }

    /// The filesystem root the node's programs run in: `/` for 3.10, the
    /// provisioned tree for 4.0 (built on first use, about a minute).
    pub fn root(self) -> Result<PathBuf> {
        match self {
            Version::V3_10 => Ok(PathBuf::from("/")),
            Version::V4_0 => rabbitmq4_root(),
        }
    }
}

/// The RabbitMQ 4 tree, provisioned once per process (the script is
/// idempotent and fast once the tree is cached).
fn rabbitmq4_root() -> Result<PathBuf> {
    static ROOT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("rabbitmq4/provision");
        let out = std::process::Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed ({})", script.display(), out.status));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A private RabbitMQ node.
pub struct RabbitNode {
    version: Version,
    /// The filesystem root its programs run in (see [`Version::root`]).
    root: PathBuf,
    /// Its directory as its programs see it (inside `root`).
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
    /// Left running when dropped (the shared node of a version).
    keep: bool,
}

impl RabbitNode {
    /// Boot a fresh 3.10 node (about 9 s) and wait until it accepts AMQP
    /// connections. Fails loudly when RabbitMQ is not installed.
    pub async fn start() -> Result<RabbitNode> {
        Self::start_with("").await
    }

    /// [`RabbitNode::start`] with `conf` (`rabbitmq.conf` lines, e.g.
    /// `max_message_size = 4096`) added to the node's configuration.
    pub async fn start_with(conf: &str) -> Result<RabbitNode> {
        Self::start_version(Version::V3_10, conf).await
    }

    /// A fresh node of `version` with `conf` added to its configuration.
    pub async fn start_version(version: Version, conf: &str) -> Result<RabbitNode> {
        Self::start_full(version, conf, "[].").await
    }

    /// [`RabbitNode::start_version`] with an `advanced.config` too (Erlang
    /// terms, e.g. `[{rabbit, [{channel_tick_interval, 1000}]}].`).
    pub async fn start_full(version: Version, conf: &str, advanced: &str) -> Result<RabbitNode> {
        let mut node = RabbitNode::private(version, conf, advanced)?;
        node.boot().await?;
        Ok(node)
    }

    /// A private node of `version` on free ports, not yet booted.
    fn private(version: Version, conf: &str, advanced: &str) -> Result<RabbitNode> {
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        RabbitNode::prepare(
            version,
            port,
            dist_port,
            format!("warrenit{port}@localhost"),
            PathBuf::from(format!("/tmp/warren-it-rabbit-{port}")),
            conf,
            advanced,
        )
    }

    fn prepare(
        version: Version,
        port: u16,
        dist_port: u16,
        node: String,
        dir: PathBuf,
        conf: &str,
        advanced: &str,
    ) -> Result<RabbitNode> {
        let root = version.root()?;
        if !root.join("usr/lib/rabbitmq/bin/rabbitmq-server").exists() {
            bail!(
                "RabbitMQ {} is not installed: {}{BIN}/rabbitmq-server is missing",
                version.label(),
                root.display()
            );
        }
        let node = RabbitNode {
            version,
            root,
            dir,
            node,
            port,
            dist_port,
            child: None,
            keep: false,
        };
        node.write_dir(conf, advanced)?;
        Ok(node)
    }

    /// The version this node runs.
    pub fn version(&self) -> Version {
        self.version
    }

    /// `path` (as the node's programs see it) from the host.
    fn host_path(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// A command that runs `program` from the node's installation.
    fn command(&self, program: &str) -> Command {
        let bin = format!("{BIN}/{program}");
        let mut cmd = if self.root == Path::new("/") {
            Command::new(bin)
        } else {
            let mut c = Command::new("chroot");
            c.arg(&self.root).arg(bin);
            c
        };
        self.env(&mut cmd);
        cmd
    }

    /// The AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The AMQP address.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node name.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", self.pidfile())
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            );
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("rabbit.pid")
    }

    /// Start the node process (data kept) and wait until it is up.
    async fn boot(&mut self) -> Result<()> {
        self.spawn_again()?;
        let out = self
            .ctl(&[
                "wait",
                "--timeout",
                "120",
                &self.pidfile().to_string_lossy(),
            ])
            .await;
        if let Err(e) = out {
            let tail = std::fs::read_to_string(self.host_path(&self.dir.join("stdout.log")))
                .unwrap_or_default();
            let tail: String = tail
                .chars()
                .rev()
                .take(3000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "private RabbitMQ node {} did not start: {e:#}\n{tail}",
                self.node
            );
        }
        self.wait_accepting(Duration::from_secs(30)).await
    }

    /// Wait until the node reports it has fully booted.
    pub async fn wait_booted(&self) -> Result<()> {
        self.ctl(&[
            "wait",
            "--timeout",
            "120",
            &self.pidfile().to_string_lossy(),
        ])
        .await
        .map(|_| ())
    }

    /// Wait until the AMQP port accepts TCP connections.
    pub async fn wait_accepting(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {} does not accept connections on {}",
                    self.node,
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Run `rabbitmqctl -n <node> args…` and return its stdout.
    pub async fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command("rabbitmqctl");
        cmd.arg("-n").arg(&self.node).args(args);
        cmd.stdin(Stdio::null());
        let out = tokio::time::timeout(Duration::from_secs(150), cmd.output())
            .await
            .with_context(|| format!("rabbitmqctl {args:?} timed out"))?
            .with_context(|| format!("failed to run rabbitmqctl {args:?}"))?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rabbitmqctl close_all_connections <reason>` (clients see 320).
    pub async fn close_all_connections(&self, reason: &str) -> Result<()> {
        self.ctl(&["close_all_connections", reason])
            .await
            .map(|_| ())
    }

    /// The node's OS pid, from its own pidfile.
    pub fn pid(&self) -> Result<u32> {
        let text =
            std::fs::read_to_string(self.host_path(&self.pidfile())).context("no pidfile")?;
        text.trim().parse().context("bad pidfile")
    }

    /// `kill -9` the node (its own pid only) and reap it.
    pub async fn kill9(&mut self) -> Result<()> {
        let pid = self.pid()?;
        let status = Command::new("kill")
            .arg("-9")
            .arg(pid.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -9 {pid} failed");
        }
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stop the node cleanly (`rabbitmqctl stop`).
    pub async fn stop(&mut self) -> Result<()> {
        self.ctl(&["stop"]).await?;
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        }
        Ok(())
    }

    /// Start the node again on the same data and ports (about 7 s).
    pub async fn restart(&mut self) -> Result<()> {
        self.boot().await
    }

    /// Start the node process again without waiting for it.
    pub fn spawn_again(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.host_path(&self.pidfile()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.host_path(&self.dir.join("stdout.log")))?;
        let mut cmd = self.command("rabbitmq-server");
        if self.keep {
            // The shared node outlives the test process that started it.
            cmd.process_group(0).kill_on_drop(false);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().context("failed to spawn rabbitmq-server")?);
        Ok(())
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Ok(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(self.host_path(&self.dir));
    }
}

/// A RabbitMQ cluster of private nodes on loopback, joined with
/// `rabbitmqctl join_cluster` (they share one Erlang cookie). Quorum
/// queues declared on it get a replica on every node.
pub struct Cluster {
    pub nodes: Vec<RabbitNode>,
}

impl Cluster {
    /// Boot `n` nodes of `version` and join the others to the first.
    pub async fn start(version: Version, n: usize) -> Result<Cluster> {
        let cookie = format!("WARRENIT{}", uuid::Uuid::new_v4().simple()).to_uppercase();
        let mut nodes = Vec::new();
        for _ in 0..n {
            let node = RabbitNode::private(version, "", "[].")?;
            node.set_cookie(&cookie)?;
            nodes.push(node);
        }
        let boots = nodes.iter_mut().map(|n| n.boot());
        for r in futures::future::join_all(boots).await {
            r?;
        }
        let first = nodes[0].node_name().to_owned();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]).await?;
            node.ctl(&["join_cluster", &first]).await?;
            node.ctl(&["start_app"]).await?;
            node.wait_accepting(Duration::from_secs(30)).await?;
        }
        Ok(Cluster { nodes })
    }

    /// Every node's AMQP URL.
    pub fn amqp_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitNode::amqp_url).collect()
    }

    /// The node listening on `port`.
    pub fn node_on(&mut self, port: u16) -> Option<&mut RabbitNode> {
        self.nodes.iter_mut().find(|n| n.port() == port)
    }
}

/// The broker of `version` that tests share: they only declare uniquely
/// named queues on it and never stop it. 3.10 is the machine's service on
/// 5672; 4.0 is a node the harness starts on first use on [`SHARED4_PORT`]
/// and leaves running for later runs, like a service.
#[derive(Debug, Clone)]
pub struct Shared {
    pub version: Version,
    pub url: String,
    pub addr: std::net::SocketAddr,
}

/// The AMQP port of the shared RabbitMQ 4.0 node.
pub const SHARED4_PORT: u16 = 5682;

/// The shared broker of `version` (see [`Shared`]).
pub async fn shared(version: Version) -> Result<Shared> {
    let port = match version {
        Version::V3_10 => 5672,
        Version::V4_0 => {
            static UP: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
            UP.get_or_try_init(start_shared4).await?;
            SHARED4_PORT
        }
    };
    Ok(Shared {
        version,
        url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

/// Start the shared 4.0 node unless it runs. Test processes run side by
/// side, so the check and the start hold a file lock.
async fn start_shared4() -> Result<()> {
    let root = Version::V4_0.root()?;
    let lock_path = root.join("tmp/warren-shared4.lock");
    let lock = tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        let f = std::fs::File::create(&lock_path)?;
        f.lock()?;
        Ok(f)
    })
    .await??;
    let mut node = RabbitNode::prepare_kept(root)?;
    if node.ctl(&["status"]).await.is_err() {
        // Its data is disposable: the tests that use it create their own queues.
        node.write_dir("", "[].")?;
        node.boot().await?;
    }
    node.wait_accepting(Duration::from_secs(30)).await?;
    drop(lock);
    Ok(())
}

impl RabbitNode {
    fn prepare_kept(root: PathBuf) -> Result<RabbitNode> {
        Ok(RabbitNode {
            version: Version::V4_0,
            root,
            dir: PathBuf::from("/var/lib/warren-shared4"),
            node: "warrenshared4@localhost".into(),
            port: SHARED4_PORT,
            dist_port: SHARED4_PORT + 20_000,
            child: None,
            keep: true,
        })
    }

    /// Give the node `cookie` as its Erlang cookie (nodes of one cluster
    /// share it). Takes effect at the next boot.
    fn set_cookie(&self, cookie: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.host_path(&self.dir.join(".erlang.cookie"));
        std::fs::write(&path, cookie)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
        Ok(())
    }

    /// A fresh directory with the node's configuration: `conf` lines added
    /// to `rabbitmq.conf`, `advanced` as `advanced.config`.
    fn write_dir(&self, conf: &str, advanced: &str) -> Result<()> {
        let host_dir = self.host_path(&self.dir);
        let _ = std::fs::remove_dir_all(&host_dir);
        std::fs::create_dir_all(host_dir.join("log"))?;
        std::fs::create_dir_all(host_dir.join("mnesia"))?;
        std::fs::write(
            host_dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{}\nloopback_users = none\n{conf}\n",
                self.port
            ),
        )?;
        std::fs::write(host_dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(host_dir.join("advanced.config"), format!("{advanced}\n"))?;
        Ok(())
    }
}
