//! Warren's integration tests: one binary, a module per area, real
//! services only (see `warren_it` for the harness).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// Generate `NAME::rabbitmq_3_10` and `NAME::rabbitmq_4_0`, which run the
/// async fn `NAME(target: warren_it::rabbit::Shared)` against the shared
/// broker of each version (see `warren_it::rabbit::shared`). CI counts the
/// results per version by these names.
macro_rules! each_version {
    ($name:ident $(-> $ret:ty)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use warren_it::rabbit::{Version, shared};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rabbitmq_3_10() $(-> $ret)? {
                super::$name(shared(Version::V3_10).await.unwrap()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rabbitmq_4_0() $(-> $ret)? {
                super::$name(shared(Version::V4_0).await.unwrap()).await
            }
        }
    };
}

mod admin;
mod amqp;
mod broker_rules;
mod buffer;
mod cluster;
mod contract;
mod dedup;
mod deploy;
mod fidelity;
mod gauntlet;
mod heal;
mod host;
mod nacks;
mod ops;
mod outage;
mod outbound;
mod plugins;
mod refusals;
mod reload;
mod retries;
mod run;
mod state;
mod wake;
