//! Test fixture `counter`: publishes how many deliveries its instance has
//! handled (1 in a fresh instance every time; 1, 2, 3, ... in a reused
//! one), and panics on the body `panic`, so tests can see which state an
//! instance policy keeps and that a trap drops it.

use std::sync::atomic::{AtomicU32, Ordering};

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};

/// Lives in linear memory: reset only with the instance.
static HANDLED: AtomicU32 = AtomicU32::new(0);

struct Counter;

impl Plugin for Counter {
    fn manifest() -> Manifest {
        Manifest::new("counter", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.counter"))
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let n = HANDLED.fetch_add(1, Ordering::Relaxed) + 1;
        assert!(d.body != b"panic", "asked to panic after {n} deliveries");
        warren_sdk::publish(Message::new("", "counter.out", n.to_string()))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Counter);
