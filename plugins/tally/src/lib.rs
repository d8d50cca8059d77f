//! Example plugin `tally`: counts deliveries per key in the plugin's
//! key-value state, and shows that the count follows the delivery. The body
//! is `{"key": "a", "fail": null}`; the plugin increments `count:a` and
//! publishes `{"key": "a", "seen": <count>}` to `tally.out` (or the queue
//! named by host config `routing-key`).
//!
//! `fail` makes a delivery fail after its increment: `"retry-once"`
//! retries its first attempt, `"trap"` panics. Neither failure counts: the
//! increment is committed only with a delivery that succeeds, so `count:a`
//! ends at the number of deliveries acknowledged, whatever was retried or
//! trapped on the way. The acceptance runs and the README's "State"
//! section use it.

use serde::Deserialize;
use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription, kv};

#[derive(Deserialize)]
struct Request {
    key: String,
    #[serde(default)]
    fail: Option<String>,
}

struct Tally;

impl Plugin for Tally {
    fn manifest() -> Manifest {
        Manifest::new("tally", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("tally.in"))
            .output_queue("tally.out")
            .state()
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let req: Request = serde_json::from_slice(&d.body)
            .map_err(|e| HandleError::reject(format!("body is not a tally request: {e}")))?;
        // Pending until the delivery succeeds; `?` retries if the store is down.
        let seen = kv::increment(&format!("count:{}", req.key), 1)?;
        match req.fail.as_deref() {
            Some("retry-once") if d.attempt == 1 => return Err(HandleError::retry("retry-once")),
            Some("trap") => panic!("asked to trap"),
            _ => {}
        }
        let body = serde_json::json!({ "key": req.key, "seen": seen });
        let out = warren_sdk::config("routing-key").unwrap_or_else(|| "tally.out".into());
        warren_sdk::publish(Message::new("", &out, body.to_string()))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Tally);
