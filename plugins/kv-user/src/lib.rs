//! Test fixture `kv-user`: opens a `wasi:keyvalue` bucket in `handle`, so
//! the component imports `wasi:keyvalue/store`; a Warren that does not
//! provide key-value state refuses it at load, naming the interface.

use warren_sdk::{Delivery, HandleError, Manifest, Plugin, Subscription};

struct KvUser;

impl Plugin for KvUser {
    fn manifest() -> Manifest {
        let mut m = Manifest::new("kv-user", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.kv-user"));
        m.state = true;
        m
    }

    fn handle(_d: Delivery) -> Result<(), HandleError> {
        warren_sdk::bindings::wasi::keyvalue::store::open("default")
            .map(drop)
            .map_err(|e| HandleError::reject(format!("{e:?}")))
    }
}

warren_sdk::export_plugin!(KvUser);
