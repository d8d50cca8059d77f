//! Declaring the registry's topology on a connection, each declaration
//! within a time limit.

use std::time::Duration;

use lapin::Connection;

use super::failure::{AmqpError, FailureClass};
use super::shared::Shared;
use super::topology::{self, Topology};

/// Declare everything, one channel per failed entity so one conflict does
/// not hide the rest. A queue that exists with other settings is used as
/// it is and its differences recorded in the status. Returns every error.
pub(super) async fn declare_all(
    conn: &Connection,
    t: &Topology,
    shared: &Shared,
) -> Vec<AmqpError> {
    let mut errors = Vec::new();
    let mut channel = None;
    macro_rules! step {
        ($f:expr) => {{
            if channel.is_none() {
                match conn.create_channel().await {
                    Ok(c) => channel = Some(c),
                    Err(e) => {
                        errors.push(AmqpError::channel("channel.open", &e));
                        return errors;
                    }
                }
            }
            if let Some(ch) = &channel {
                if let Err(e) = within_declare_timeout($f(ch)).await {
                    errors.push(e);
                    channel = None;
                } else if !ch.status().connected() {
                    // A tolerated conflict (an existing output) closed it.
                    channel = None;
                }
            }
        }};
    }
    for e in t.exchanges.values() {
        step!(|ch| topology::declare_exchange(ch, e));
    }
    for q in t.queues.values() {
        step!(|ch| async move {
            match topology::declare_queue(ch, q).await {
                Ok(_) => {
                    shared.record_differences(&q.name, Vec::new());
                    Ok(())
                }
                Err(AmqpError::DeclarationConflict { .. }) => {
                    let diffs = topology::declare_or_adopt_queue(|| open_channel(conn), q).await?;
                    shared.record_differences(&q.name, diffs);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        });
    }
    for b in &t.bindings {
        step!(|ch| topology::declare_binding(ch, b));
    }
    if let Some(ch) = channel {
        let _ = ch.close(200, "declared".into()).await;
    }
    errors
}

/// How long one declaration may take. A quorum queue whose leader was on a
/// node that just died answers only after the rest of the cluster elected
/// a new one; without a limit one such declaration would hold the whole
/// session in `declaring`. A declaration that times out is reported like
/// one that failed, and the consumer that needs it retries.
pub(crate) const DECLARE_TIMEOUT: Duration = Duration::from_secs(5);

/// `declaration` within [`DECLARE_TIMEOUT`].
pub(crate) async fn within_declare_timeout<T>(
    declaration: impl std::future::Future<Output = Result<T, AmqpError>>,
) -> Result<T, AmqpError> {
    tokio::time::timeout(DECLARE_TIMEOUT, declaration)
        .await
        .unwrap_or_else(|_| {
            Err(AmqpError::DeclarationFailed {
                entity: "topology".into(),
                class: FailureClass::Other,
                message: format!("no answer within {DECLARE_TIMEOUT:?}"),
            })
        })
}

/// A fresh channel on `conn`.
pub(crate) async fn open_channel(conn: &Connection) -> Result<lapin::Channel, AmqpError> {
    conn.create_channel()
        .await
        .map_err(|e| AmqpError::channel("channel.open", &e))
}
