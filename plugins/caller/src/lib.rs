//! Test fixture `caller`: GETs the URL in the delivery's body through the
//! SDK's HTTP helper and publishes the response body to `caller.out` with
//! its status in header `x-status`. A redirect is followed once, by the
//! guest (the host never follows one), so the target meets the grants
//! again. A refused call rejects the delivery with the host's reason (it
//! names the rule); 429 and 503 retry after their `Retry-After`. Its
//! manifest asks for two origins that the outbound tests point at a
//! loopback and a metadata address.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription, http};

struct Caller;

impl Plugin for Caller {
    fn manifest() -> Manifest {
        Manifest::new("caller", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.caller"))
            .outbound("http://loop.test:8080")
            .outbound("http://meta.test:8080")
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let url = String::from_utf8_lossy(&d.body).into_owned();
        let mut resp = http::get(&url).send()?;
        if (300..400).contains(&resp.status)
            && let Some(next) = resp.header("location").map(str::to_owned)
        {
            resp = http::get(&next).send()?;
        }
        let resp = resp.retry_if_busy()?;
        let msg = Message::new("", "caller.out", resp.body.clone())
            .header("x-status", &resp.status.to_string());
        warren_sdk::publish(msg)?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Caller);
