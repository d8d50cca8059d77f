//! A private RabbitMQ node for tests that must stop, kill or restart the
//! broker. Never touches the shared broker on 5672.
//!
//! The node runs from `/usr/lib/rabbitmq/bin/*` directly with its own data
//! directory, `HOME` (so its own Erlang cookie), node name and free ports on
//! 127.0.0.1. Only the PID in its own pidfile is ever signalled. Dropping a
//! [`RabbitNode`] kills it and removes its directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::ports::free_port;

const BIN: &str = "/usr/lib/rabbitmq/bin";

/// A private RabbitMQ node.
pub struct RabbitNode {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl RabbitNode {
    /// Boot a fresh node (about 9 s) and wait until it accepts AMQP
    /// connections. Fails loudly when RabbitMQ is not installed.
    pub async fn start() -> Result<RabbitNode> {
        Self::start_with("").await
    }

    /// [`RabbitNode::start`] with `conf` (`rabbitmq.conf` lines, e.g.
    /// `max_message_size = 4096`) added to the node's configuration.
    pub async fn start_with(conf: &str) -> Result<RabbitNode> {
        if !Path::new(BIN).join("rabbitmq-server").exists() {
            bail!("RabbitMQ is not installed: {BIN}/rabbitmq-server is missing");
        }
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        let dir = std::env::temp_dir().join(format!("warren-it-rabbit-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n{conf}\n"),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("advanced.config"), "[].\n")?;
        let mut node = RabbitNode {
            node: format!("warrenit{port}@localhost"),
            dir,
            port,
            dist_port,
            child: None,
        };
        node.boot().await?;
        Ok(node)
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
        let _ = std::fs::remove_file(self.pidfile());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))?;
        let mut cmd = Command::new(format!("{BIN}/rabbitmq-server"));
        self.env(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let child = cmd.spawn().context("failed to spawn rabbitmq-server")?;
        self.child = Some(child);
        let out = self
            .ctl(&[
                "wait",
                "--timeout",
                "120",
                &self.pidfile().to_string_lossy(),
            ])
            .await;
        if let Err(e) = out {
            let tail = std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
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
        let mut cmd = Command::new(format!("{BIN}/rabbitmqctl"));
        self.env(&mut cmd);
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
        let text = std::fs::read_to_string(self.pidfile()).context("no pidfile")?;
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
        let _ = std::fs::remove_file(self.pidfile());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))?;
        let mut cmd = Command::new(format!("{BIN}/rabbitmq-server"));
        self.env(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().context("failed to spawn rabbitmq-server")?);
        Ok(())
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Ok(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
