//! Test harness for Warren's integration tests and benchmarks: real
//! services started on free loopback ports, a TCP fault proxy, and the
//! example plugins built from source. Nothing here is a mock.
//!
//! # Layout
//! - [`wait`]: polling with deadlines (the only way tests wait).
//! - [`ports`]: free loopback ports.
//! - [`plugins`]: builds `plugins/` for `wasm32-wasip2` once per process.
//! - [`sentinel`]: a Redis primary, two replicas and three sentinels from
//!   `sentinel-compose/local.sh`, with kill/stop/restart/failover.

pub mod plugins;
pub mod ports;
pub mod sentinel;
pub mod wait;
