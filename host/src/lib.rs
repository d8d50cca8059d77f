//! Warren: a RabbitMQ consumer host with a durable outage spool and
//! sandboxed WebAssembly handler plugins.
//!
//! One process owns resilient AMQP connections, a Redis Sentinel–backed
//! spool that keeps outputs safe while the broker is down, and plugins that
//! are instantiated afresh for every delivery. `ARCHITECTURE.md` at the
//! repository root maps the design onto these modules.
//!
//! # Layout
//! - [`message`]: the outbound message type shared by every subsystem (leaf).
//! - [`plugins`]: the wasmtime engine, plugin loading, limits, host imports,
//!   and per-delivery invocation.
//! - [`amqp`]: connection supervisor, topology registry, consumers,
//!   confirmed publisher.
//! - [`buffer`]: Sentinel discovery, the Redis Stream spool and its drainer.
//! - [`kv`]: plugins' key-value state on Redis, committed with the
//!   delivery.
//! - [`config`]: `warren.toml`: the tree of the subsystems' own sections,
//!   env overrides, validation.
//! - [`config_doc`]: `warren config` — the effective configuration as
//!   commented TOML.
//! - [`dispatch`]: delivery → plugin → outcome → ack, retry or dead-letter;
//!   the outbox (broker or spool).
//! - [`backoff`]: retry delays, exponential and capped, for every retry
//!   loop (leaf).
//! - [`app`]: `warren run` — builds, wires and stops everything.
//! - [`admin`]: the admin HTTP API (axum); reads handles, owns no state.
//! - [`secret`]: [`secret::Secret`] (never printed), `*-file` secrets and
//!   the URL redactor (leaf).
//! - [`shutdown`]: signals, the shutdown order and `[shutdown]`.
//! - [`sync`]: taking a lock whatever a panicked holder left (leaf).
//! - [`cli`]: the offline commands `warren check` and `warren invoke`.
//! - [`new`]: `warren new` — a plugin project in Rust, Python or JavaScript.
//! - [`telemetry`]: logging, the Prometheus recorder, W3C trace context
//!   (leaf).
//! - [`validate`]: `warren validate` — the configuration, the plugins
//!   directory and every plugin's load, checked without running.

pub mod admin;
pub mod amqp;
pub mod app;
pub mod backoff;
pub mod buffer;
pub mod cli;
pub mod config;
pub mod config_doc;
pub mod crash;
pub mod dispatch;
pub mod kv;
#[cfg(test)]
mod layers;
pub mod message;
pub mod new;
pub mod plugins;
pub mod secret;
pub mod shutdown;
pub mod sync;
pub mod telemetry;
pub mod validate;
