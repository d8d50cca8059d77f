//! Example plugin `pay`: the README's "Calling other services" plugin, as
//! the README shows it (a test compares them).

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription, http};

struct Pay;

impl Plugin for Pay {
    fn manifest() -> Manifest {
        Manifest::new("pay", "1.0.0")
            .subscribe(Subscription::queue("order.created"))
            .outbound("https://payments.example.com")
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let key = warren_sdk::secret("api-key").map_err(HandleError::retry)?;
        let auth = format!("Bearer {}", key.unwrap_or_default());
        let charge = http::post("https://payments.example.com/charge")
            .header("authorization", &auth)
            .body(d.body)
            .send()? // refused, timed out or failed: reject or retry
            .retry_if_busy()?; // 429 or 503: retry after its Retry-After
        warren_sdk::publish(Message::new("", "order.paid", charge.body))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Pay);
