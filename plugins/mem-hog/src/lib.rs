//! Test fixture `mem-hog`: allocates and touches 1 MiB blocks without
//! bound. The runtime must end it as a memory trap when it reaches its
//! limit (16 MiB here), and the host must be unaffected.

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription};

struct MemHog;

impl Plugin for MemHog {
    fn manifest() -> Manifest {
        Manifest::new("mem-hog", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.mem-hog"))
            .memory_bytes(16 << 20)
    }

    fn handle(_d: Delivery) -> Result<(), HandleError> {
        let mut blocks = Vec::new();
        loop {
            blocks.push(std::hint::black_box(vec![0xA5u8; 1 << 20]));
        }
    }
}

warren_sdk::export_plugin!(MemHog);
