//! Test fixture `big-floor`: 3 MiB of zeroed static memory makes every
//! instance start with more memory than its manifest asks for (2 MiB), the
//! shape of an interpreter built with a limit too small for it. Warren
//! must refuse it at load, naming both numbers, unless an operator's limit
//! covers it.

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription};

/// Zero-initialised, so it costs initial memory, not file size.
static mut ARENA: [u8; 3 << 20] = [0; 3 << 20];

struct BigFloor;

impl Plugin for BigFloor {
    fn manifest() -> Manifest {
        Manifest::new("big-floor", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.big-floor"))
            .memory_bytes(2 << 20)
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        // Keeps the arena linked in.
        let arena = std::hint::black_box(&raw const ARENA);
        std::hint::black_box((arena, d.body.len()));
        Ok(())
    }
}

warren_sdk::export_plugin!(BigFloor);
