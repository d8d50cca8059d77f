//! Free loopback ports for services a test starts itself.

use std::net::TcpListener;

use anyhow::{Context, Result};

/// A port on 127.0.0.1 that was free a moment ago. Binding to port 0 and
/// dropping the listener is racy in theory; ports are handed out by the
/// kernel in sequence, so a collision needs another process to grab the
/// same port in between.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("failed to bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
