//! `{{name}}`: republishes each delivery (body, every property and header)
//! to queue `{{name}}.out`. Replace `handle` with your own logic.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};

struct Handler;

impl Plugin for Handler {
    fn manifest() -> Manifest {
        Manifest::new("{{name}}", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("{{name}}.in"))
            .output_queue("{{name}}.out")
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        warren_sdk::publish(Message::forward(&d, "", "{{name}}.out"))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Handler);
