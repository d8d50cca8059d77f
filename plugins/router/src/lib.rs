//! `router`: reads the JSON field `region` of each order and republishes it
//! (with every property and header it came with) to the topic exchange
//! `orders.routed` (host config `exchange` names another) with routing key
//! `orders.<region>`; orders that are not JSON or
//! have no region are dead-lettered. Its manifest declares the exchange and
//! the classic queue `orders.routed.all`, bound with `#` and keeping the
//! last 1,000, where the quickstart's routed orders land (a production
//! router would leave queues to the services downstream). The whole plugin
//! is the ~20 lines below: the SDK's showcase.

use warren_sdk::{
    Delivery, ExchangeKind, HandleError, Manifest, Message, OutputQueue, Plugin, Subscription,
};

struct Router;

impl Plugin for Router {
    fn manifest() -> Manifest {
        Manifest::new("router", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("orders.in"))
            .output_exchange("orders.routed", ExchangeKind::Topic)
            .output(OutputQueue::bounded_catch_all(
                "orders.routed.all",
                "orders.routed",
                ExchangeKind::Topic,
                &["#"],
                1_000,
            ))
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let order: serde_json::Value =
            serde_json::from_slice(&d.body).map_err(HandleError::reject)?;
        let Some(region) = order["region"].as_str() else {
            return Err(HandleError::reject("order has no \"region\" field"));
        };
        let exchange = warren_sdk::config("exchange").unwrap_or_else(|| "orders.routed".into());
        warren_sdk::publish(Message::forward(&d, &exchange, &format!("orders.{region}")))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Router);
