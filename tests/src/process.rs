//! Processes a test starts itself (`warren run`): signals to them.

use std::process::{Child, Command};

use anyhow::{Context, Result, bail};

/// Send the signal `name` (`TERM`, `HUP`, ...) to `child` with `kill`.
pub fn signal(child: &Child, name: &str) -> Result<()> {
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {pid}: {status}");
    }
    Ok(())
}
