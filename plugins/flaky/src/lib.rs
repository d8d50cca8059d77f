//! Test fixture `flaky`: returns `retry` while the delivery's attempt is at
//! most `fail-attempts` (host config; default: always), then forwards the
//! delivery (every property and header) to routing key `routing-key` (host
//! config; default `flaky.out`). The dispatch tests use it for
//! bounded retries ending in the dead-letter queue, and for retries that
//! eventually succeed.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};

struct Flaky;

impl Plugin for Flaky {
    fn manifest() -> Manifest {
        Manifest::new("flaky", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.flaky"))
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let fail_attempts: u32 = match warren_sdk::config("fail-attempts") {
            Some(n) => n.parse().map_err(HandleError::reject)?,
            None => u32::MAX,
        };
        if d.attempt <= fail_attempts {
            return Err(HandleError::retry(format!(
                "transient failure on attempt {}",
                d.attempt
            )));
        }
        let routing_key = warren_sdk::config("routing-key").unwrap_or_else(|| "flaky.out".into());
        warren_sdk::publish(Message::forward(&d, "", &routing_key))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Flaky);
