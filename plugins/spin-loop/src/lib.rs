//! Test fixture `spin-loop`: never returns from `handle`. The runtime must
//! end it as a deadline trap (tests/it/plugins) and dispatch must
//! dead-letter the delivery.

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription};

struct SpinLoop;

impl Plugin for SpinLoop {
    fn manifest() -> Manifest {
        Manifest::new("spin-loop", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.spin-loop"))
            .deadline_ms(200)
    }

    fn handle(_d: Delivery) -> Result<(), HandleError> {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

warren_sdk::export_plugin!(SpinLoop);
