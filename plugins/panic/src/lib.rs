//! Test fixture `panic`: panics with "boom: <body>". The runtime must end it
//! as a panic trap whose message carries the panic text, and dispatch must
//! dead-letter the delivery with that reason.

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription};

struct Panics;

impl Plugin for Panics {
    fn manifest() -> Manifest {
        Manifest::new("panic", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.panic"))
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        panic!("boom: {}", String::from_utf8_lossy(&d.body));
    }
}

warren_sdk::export_plugin!(Panics);
