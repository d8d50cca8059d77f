//! `{{name}}`: republishes each delivery (body, every property and header)
//! to queue `{{name}}.out`, after POSTing it to `api-url` when the
//! operator configures one (`[plugin.{{name}}] config = { api-url = ".." }`
//! and grants its origin in `allow-outbound`). Replace `handle` with your
//! own logic.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription, http};

struct Handler;

impl Plugin for Handler {
    fn manifest() -> Manifest {
        Manifest::new("{{name}}", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("{{name}}.in"))
            .output_queue("{{name}}.out")
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        if let Some(url) = warren_sdk::config("api-url") {
            // Refused or failed: reject or retry; 429/503: retry after Retry-After.
            let r = http::post(&url).body(d.body.clone()).send()?.retry_if_busy()?;
            warren_sdk::log::info(&format!("{url} answered {}", r.status));
        }
        warren_sdk::publish(Message::forward(&d, "", "{{name}}.out"))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Handler);
