"""`router`: reads the JSON field `region` of each order and republishes it
(every property and header kept) to the topic exchange `orders.routed`
(host config `exchange` names another) with routing key `orders.<region>`;
orders that are not JSON or have no region are dead-lettered. The Python
twin of plugins/router."""

import json

import warren
from warren import ExchangeKind


class Router(warren.Plugin):
    def manifest(self):
        return (
            warren.Manifest("router", "0.1.0")
            .subscribe(warren.Subscription.queue("orders.in"))
            .output_exchange("orders.routed", ExchangeKind.TOPIC)
            .output(
                warren.bounded_catch_all(
                    "orders.routed.all", "orders.routed", ExchangeKind.TOPIC, ["#"], 1_000
                )
            )
        )

    def handle(self, d):
        try:
            order = json.loads(d.body)
        except ValueError as e:
            raise warren.Reject(f"order is not JSON: {e}")
        region = order.get("region") if isinstance(order, dict) else None
        if not isinstance(region, str):
            raise warren.Reject('order has no "region" field')
        exchange = warren.config("exchange") or "orders.routed"
        warren.publish(warren.forward(d, exchange, f"orders.{region}"))


Handler = warren.export(Router)
