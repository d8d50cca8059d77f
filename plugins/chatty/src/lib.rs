//! Test fixture `chatty`: publishes `count` (host config, default 10)
//! outputs per delivery to routing key `routing-key` (default
//! `chatty.out`), numbered in the body. Used by the runtime test that
//! collects 10,000 outputs from one invocation and by output-limit tests.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};

struct Chatty;

impl Plugin for Chatty {
    fn manifest() -> Manifest {
        Manifest::new("chatty", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.chatty"))
    }

    fn handle(_d: Delivery) -> Result<(), HandleError> {
        let count: u32 = match warren_sdk::config("count") {
            Some(n) => n.parse().map_err(HandleError::reject)?,
            None => 10,
        };
        let routing_key = warren_sdk::config("routing-key").unwrap_or_else(|| "chatty.out".into());
        for i in 0..count {
            warren_sdk::publish(Message::new("", &routing_key, i.to_string()))?;
        }
        Ok(())
    }
}

warren_sdk::export_plugin!(Chatty);
