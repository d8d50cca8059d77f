//! `router`: reads the JSON field `region` of each order and republishes it
//! to exchange `orders.routed` with routing key `orders.<region>`; orders
//! that are not JSON or have no region are dead-lettered. The whole plugin
//! is the ~15 lines below: the SDK's showcase.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};

struct Router;

impl Plugin for Router {
    fn manifest() -> Manifest {
        Manifest::new("router", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("orders.in"))
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let order: serde_json::Value =
            serde_json::from_slice(&d.body).map_err(HandleError::reject)?;
        let Some(region) = order["region"].as_str() else {
            return Err(HandleError::reject("order has no \"region\" field"));
        };
        warren_sdk::publish(Message::new(
            "orders.routed",
            &format!("orders.{region}"),
            d.body,
        ))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Router);
