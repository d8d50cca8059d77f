//! `bump`: increments one key, `count`, in its key-value state per
//! delivery and does nothing else. `noop` with one `increment`: the state
//! benchmark (`bench --bin state`) runs the two side by side to measure
//! what a delivery's read and commit cost, and checks that `count` ends at
//! the number of messages.

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription, kv};

struct Bump;

impl Plugin for Bump {
    fn manifest() -> Manifest {
        Manifest::new("bump", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("bump.in"))
            .state()
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        std::hint::black_box((d.body.len(), d.routing_key.len()));
        // Pending until the delivery succeeds; `?` retries if the store is down.
        // Host config `op = "add"` counts without reading the key first.
        if warren_sdk::config("op").as_deref() == Some("add") {
            kv::add("count", 1)?;
        } else {
            kv::increment("count", 1)?;
        }
        Ok(())
    }
}

warren_sdk::export_plugin!(Bump);
