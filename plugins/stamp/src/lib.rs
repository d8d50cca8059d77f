//! `stamp`: a test fixture for hot reload. Like `echo`, republishes each
//! delivery (body and headers) to the routing key in the host config
//! (`routing-key`, default `stamp.out`), and adds `x-stamp-version` with the
//! crate version. The crates `stamp` (1.0.0) and `stamp-v2` (2.0.0) build
//! this one source, so the reload tests and benchmark can tell which
//! version handled each message.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};

struct Stamp;

impl Plugin for Stamp {
    fn manifest() -> Manifest {
        Manifest::new("stamp", env!("CARGO_PKG_VERSION")).subscribe(Subscription::queue("stamp.in"))
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let routing_key = warren_sdk::config("routing-key").unwrap_or_else(|| "stamp.out".into());
        let out = Message::forward(&d, "", &routing_key)
            .header("x-stamp-version", env!("CARGO_PKG_VERSION"));
        warren_sdk::publish(out)?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Stamp);
