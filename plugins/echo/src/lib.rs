//! `echo`: republishes each delivery (body, every property and header) to
//! the exchange and routing key set in the host config
//! (`exchange`, default "" = the default exchange; `routing-key`, default
//! `echo.out`, which the manifest declares). The simplest useful plugin,
//! and the one the end-to-end and chaos tests push load through.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};

struct Echo;

impl Plugin for Echo {
    fn manifest() -> Manifest {
        Manifest::new("echo", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("echo.in"))
            .output_queue("echo.out")
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let exchange = warren_sdk::config("exchange").unwrap_or_default();
        let routing_key = warren_sdk::config("routing-key").unwrap_or_else(|| "echo.out".into());
        warren_sdk::publish(Message::forward(&d, &exchange, &routing_key))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Echo);
