//! Test fixture `bad-manifest`: a well-formed plugin whose manifest has an
//! invalid name and a zero prefetch. `warren check` must name both
//! problems and exit non-zero (tests/it/plugins).

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription};

struct Bad;

impl Plugin for Bad {
    fn manifest() -> Manifest {
        Manifest::new("Bad Name!", "1.0.0")
            .subscribe(Subscription::queue("fixture.bad").prefetch(0))
    }

    fn handle(_d: Delivery) -> Result<(), HandleError> {
        Ok(())
    }
}

warren_sdk::export_plugin!(Bad);
