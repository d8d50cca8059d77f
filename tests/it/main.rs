//! Warren's integration tests: one binary, a module per area, real
//! services only (see `warren_it` for the harness).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod amqp;
mod buffer;
mod fidelity;
mod gauntlet;
mod host;
mod outage;
mod plugins;
mod refusals;
mod reload;
mod run;
