//! The AMQP core: one supervisor per connection, the topology registry,
//! consumers and the confirmed publisher. Knows nothing of plugins or the
//! spool.
//!
//! Entry points: [`Amqp::new`] builds the supervisor and an [`AmqpHandle`];
//! [`Amqp::run`] owns the connection until cancelled. Through the handle:
//! [`AmqpHandle::status`] (a watch of [`AmqpStatus`]),
//! [`AmqpHandle::publisher`] ([`Publisher::publish`] an
//! [`crate::message::OutboundMessage`] with confirms),
//! [`AmqpHandle::add_subscription`] / [`AmqpHandle::remove_subscription`]
//! (a stream of [`Delivery`] with a [`DeliveryAcker`]), and
//! [`AmqpHandle::consumers`] (per-queue [`SubscriptionStatus`]).
//!
//! Files: `config` (the `[amqp]` section), `supervisor` (connection owner
//! and reconnect loop), `session` (one live connection's tasks and events),
//! `status` (what the supervisor publishes), `shared` (state shared with
//! its tasks and handles), `handle` (the clonable handle and
//! subscriptions), `declare` (declaring the topology), `consumer`
//! (subscriptions and deliveries), `ack` (ack coalescing), `publisher`
//! (confirm channel), `refusal` (permanent refusals, told apart from
//! transient failures and remembered per session), `topology` (registry and declarations), `failure`
//! (classes and errors), `convert` (lapin property conversion),
//! `metrics` (names), `outage_log` (how an outage reads in the log).

pub mod ack;
pub mod config;
pub mod consumer;
pub mod convert;
mod declare;
pub mod failure;
mod handle;
pub mod metrics;
mod outage_log;
pub mod publisher;
pub mod refusal;
pub mod server;
mod session;
mod shared;
pub mod status;
pub mod supervisor;
pub mod topology;

pub use crate::backoff::BackoffConfig;
pub use config::AmqpSection;
pub use consumer::{
    AckOutcome, ConsumerState, Delivery, DeliveryAcker, SubscriptionConfig, SubscriptionStatus,
};
pub use convert::{from_basic_properties, to_basic_properties};
pub use failure::{AmqpError, Failure, FailureClass};
pub use handle::{AmqpHandle, Subscription};
pub use publisher::{NackSnapshot, PublishError, Publisher};
pub use refusal::{Refusal, RefusalKind};
pub use server::ServerInfo;
pub use status::{AmqpStatus, ConnectionState};
pub use supervisor::{Amqp, AmqpConfig};
pub use topology::{
    ArgumentDiff, BindingSpec, ExchangeSpec, ExchangeType, QueueSpec, QueueType, Topology,
    TopologyRegistry,
};
