//! Test harness for Warren's integration tests and benchmarks: real
//! services started on free loopback ports, a TCP fault proxy, and the
//! example plugins built from source. Nothing here is a mock.
//!
//! # Layout
//! - [`wait`]: polling with deadlines (the only way tests wait).
//! - [`ports`]: free loopback ports.
//! - [`config`]: the `warren.toml` builder every test uses.
//! - [`broker`]: a plain lapin client to publish, count and collect.
//! - [`http`]: a raw HTTP/1.1 client for the admin API, and its metrics.
//! - [`otlp`]: an OTLP/HTTP collector that decodes the spans it receives.
//! - [`process`]: signals to a process a test started.
//! - [`plugins`]: builds `plugins/` for `wasm32-wasip2` once per process.
//! - [`proxy`]: a TCP fault proxy (pass, blackhole, refuse, cut).
//! - [`rabbit`]: a private RabbitMQ node to stop, kill and restart.
//! - [`gauntlet`]: the chaos gauntlets' publisher, waits and lock.
//! - [`sentinel`]: a Redis primary, two replicas and three sentinels from
//!   `sentinel-compose/local.sh`, with kill/stop/restart/failover.

pub mod broker;
pub mod config;
pub mod gauntlet;
pub mod http;
pub mod otlp;
pub mod plugins;
pub mod ports;
pub mod private_redis;
pub mod process;
pub mod proxy;
pub mod rabbit;
pub mod sentinel;
pub mod tally;
pub mod wait;
