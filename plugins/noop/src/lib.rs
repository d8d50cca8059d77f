//! `noop`: acknowledges every delivery and does nothing else. The
//! benchmarks use it to measure what Warren itself costs per delivery.

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription};

struct Noop;

impl Plugin for Noop {
    fn manifest() -> Manifest {
        Manifest::new("noop", env!("CARGO_PKG_VERSION")).subscribe(Subscription::queue("noop.in"))
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        std::hint::black_box((d.body.len(), d.routing_key.len()));
        Ok(())
    }
}

warren_sdk::export_plugin!(Noop);
