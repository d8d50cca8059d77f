//! A subscription: what to consume and how, and what Warren knows about it.

use std::time::SystemTime;

use crate::amqp::failure::{Failure, FailureClass};

/// What to consume and how.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionConfig {
    /// The queue.
    pub queue: String,
    /// `basic.qos` prefetch count.
    pub prefetch: u16,
    /// Coalesce acks into `multiple = true` frames.
    pub coalesce_acks: bool,
}

impl SubscriptionConfig {
    /// Prefetch 100, coalesced acks.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            prefetch: 100,
            coalesce_acks: true,
        }
    }

    /// With prefetch `n`.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }

    /// With coalesced acks on or off.
    pub fn coalesce_acks(mut self, on: bool) -> Self {
        self.coalesce_acks = on;
        self
    }

    pub(crate) fn buffer(&self) -> usize {
        usize::from(self.prefetch.max(1)) * 2 + 16
    }
}

/// The state of one subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumerState {
    /// Not started yet (no session).
    Idle,
    /// Declaring and subscribing.
    Starting,
    /// Consuming.
    Running,
    /// Lost its consumer; being re-established.
    Reestablishing,
    /// Cannot subscribe; retrying (see `last_error`).
    Failed,
    /// Stopping (in-flight deliveries finishing).
    Stopping,
}

/// What Warren knows about one subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionStatus {
    /// The queue.
    pub queue: String,
    /// Prefetch.
    pub prefetch: u16,
    /// The state.
    pub state: ConsumerState,
    /// Consumers Warren believes it has on the queue (0 or 1).
    pub believed_consumers: u32,
    /// The broker's consumer count at the last check, and when.
    pub broker_consumers: Option<(u32, SystemTime)>,
    /// The broker's message count at the last check.
    pub broker_messages: Option<u32>,
    /// Deliveries to this consumer not yet acknowledged (unacked at the
    /// broker on its behalf), at the last check.
    pub unacked: Option<u32>,
    /// The generation of the session the consumer runs in.
    pub generation: u64,
    /// Times the consumer was re-established without a reconnect.
    pub reestablished: u64,
    /// Times the periodic check found the consumer missing on the broker.
    pub zombies: u64,
    /// Periodic checks that got no answer in time (a congested link or a
    /// stuck channel; several in a row re-establish the consumer).
    pub check_timeouts: u64,
    /// Subscribe attempts (declare + consume) since start.
    pub subscribe_attempts: u64,
    /// The last subscribe error, cleared when running again.
    pub last_error: Option<String>,
    /// Its class.
    pub last_error_class: Option<FailureClass>,
    /// Acks for deliveries of an older channel or session (no-ops).
    pub stale_acks: u64,
    /// Times the broker's consumer timeout ended the consumer.
    pub consumer_timeouts: u64,
    /// Why the consumer was last lost on a live connection (kept after it
    /// is re-established).
    pub last_loss: Option<Failure>,
}

impl SubscriptionStatus {
    pub(crate) fn new(queue: &str, prefetch: u16) -> Self {
        Self {
            queue: queue.to_owned(),
            prefetch,
            state: ConsumerState::Idle,
            believed_consumers: 0,
            broker_consumers: None,
            broker_messages: None,
            unacked: None,
            generation: 0,
            reestablished: 0,
            zombies: 0,
            check_timeouts: 0,
            subscribe_attempts: 0,
            last_error: None,
            last_error_class: None,
            stale_acks: 0,
            consumer_timeouts: 0,
            last_loss: None,
        }
    }
}
