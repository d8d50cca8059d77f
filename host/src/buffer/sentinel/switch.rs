//! Following `+switch-master`: the sentinels announce a new primary, and
//! the current link is dropped unless it already points there.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use redis::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Primary, Target};
use crate::backoff::{Backoff, BackoffConfig};
use crate::buffer::error::AUTH_RETRY;
use crate::buffer::metric;

impl Primary {
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
                metrics::counter!(metric::SWITCH_MASTER).increment(1);
                self.switched.notify_waiters();
                self.invalidate_unless(&format!("{ip}:{port}")).await;
            }
        }
    }
}
