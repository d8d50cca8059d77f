//! A private, plain Redis on a free loopback port, for tests whose keys
//! must not meet other tests' (spool adoption scans every
//! `warren:spool:*` stream). Dropping it kills the process.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{ports, wait};

/// A running `redis-server`.
pub struct PrivateRedis {
    child: Child,
    _dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl PrivateRedis {
    /// Start one and wait until it answers `PING`.
    pub async fn start() -> Result<PrivateRedis> {
        let dir = tempfile::Builder::new()
            .prefix("warren-it-redis-")
            .tempdir()?;
        let port = ports::free_port()?;
        let child = spawn(port, dir.path())?;
        let redis = PrivateRedis {
            child,
            _dir: dir,
            port,
        };
        redis.answers().await?;
        Ok(redis)
    }

    /// Kill it (`kill -9`): every connection breaks, nothing listens.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port (empty: it keeps nothing).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = spawn(self.port, self._dir.path())?;
        self.answers().await
    }

    async fn answers(&self) -> Result<()> {
        let url = self.url();
        wait::until_true("private redis answers", Duration::from_secs(10), || async {
            async {
                let client = redis::Client::open(url.as_str())?;
                let mut c = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut c).await
            }
            .await
            .is_ok()
        })
        .await
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection to it.
    pub async fn conn(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }
}

fn spawn(port: u16, dir: &std::path::Path) -> Result<Child> {
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start redis-server")
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
