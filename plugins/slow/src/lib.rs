//! Test fixture `slow`: busy-waits on the clock for `millis` (host config,
//! default 10,000) and then succeeds, so with a shorter deadline it ends as
//! a deadline trap after calling into the host for the time. Used by the
//! deadline tests beside `spin-loop`, which never calls the host.

use std::time::{Duration, Instant};

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription};

struct Slow;

impl Plugin for Slow {
    fn manifest() -> Manifest {
        Manifest::new("slow", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.slow"))
            .deadline_ms(200)
    }

    fn handle(_d: Delivery) -> Result<(), HandleError> {
        let millis: u64 = match warren_sdk::config("millis") {
            Some(n) => n.parse().map_err(HandleError::reject)?,
            None => 10_000,
        };
        let until = Instant::now() + Duration::from_millis(millis);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        Ok(())
    }
}

warren_sdk::export_plugin!(Slow);
