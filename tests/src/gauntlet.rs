//! What the chaos gauntlets share: the producer that keeps publishing
//! through broker faults, waits on its progress, the last step of the
//! Redis faults, and the lock that runs one gauntlet at a time.
//! `tests/it/gauntlet.rs` runs Warren in process; the deduplicated variant
//! (`host/tests/dedup_gauntlet.rs`) runs it as a process it kills.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use lapin::BasicProperties;

use crate::broker::Broker;
use crate::proxy::{Mode, Proxy};
use crate::sentinel::Topology;
use crate::wait;

/// The number of messages a gauntlet sends: `var` from the environment
/// (a soak), else `default`.
pub fn messages(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One message for the default exchange: its routing key (the queue),
/// body and properties.
pub type Outgoing = (String, Vec<u8>, BasicProperties);

/// Where the publisher stops until the test lets it on: from message `at`
/// on, until `release` turns true. So a fault is sure to land before the
/// stream ends however long the earlier faults took.
pub struct Hold {
    pub at: u64,
    pub release: tokio::sync::watch::Receiver<bool>,
}

/// Publish messages `0..n` (`message(i)` makes message `i`) to the default
/// exchange with confirms, reconnecting and republishing the unconfirmed
/// chunk after any failure: what a careful producer does across broker
/// restarts. `published` counts the messages confirmed so far, in order.
pub async fn publish_resilient(
    url: String,
    n: u64,
    message: impl Fn(u64) -> Outgoing,
    published: Arc<AtomicU64>,
    mut hold: Hold,
) {
    const CHUNK: u64 = 100;
    let mut next = 0;
    while next < n {
        let Ok(broker) = Broker::connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while next < n {
            if next >= hold.at && hold.release.wait_for(|r| *r).await.is_err() {
                return;
            }
            let end = (next + CHUNK).min(n);
            if broker
                .publish_each("", (next..end).map(&message))
                .await
                .is_err()
            {
                break; // reconnect, republish this chunk (duplicates are fine)
            }
            next = end;
            published.store(next, Ordering::SeqCst);
            // About 2,000 messages a second: the faults land mid-stream.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Wait (up to 5 minutes) until at least `at_least` messages are
/// published.
pub async fn until_published(published: &AtomicU64, at_least: u64) -> Result<()> {
    wait::until_true(
        &format!("{at_least} messages published"),
        Duration::from_secs(300),
        || async { published.load(Ordering::SeqCst) >= at_least },
    )
    .await
}

/// Wait until a replica has taken over from the primary on port `old`,
/// give the spool a second on it, and let the broker back (the proxy
/// blackholed it to keep outputs in the spool through the fault).
pub async fn new_primary_then_pass(redis: &Topology, old: u16, proxy: &Proxy) -> Result<()> {
    redis.wait_new_primary(old, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set_mode(Mode::Pass);
    Ok(())
}

/// Hold the gauntlet lock (a file under the system temporary directory)
/// until the returned file is dropped: one gauntlet at a time on this
/// machine, whichever test binary runs it. Two at once on two cores
/// starved a Sentinel topology until a `SENTINEL FAILOVER` aborted. The
/// lock is an open file's, so it is released however the holder ends.
pub async fn one_at_a_time() -> Result<std::fs::File> {
    let path = std::env::temp_dir().join("warren-gauntlet.lock");
    tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok(file)
    })
    .await?
}
