// `router`: reads the JSON field `region` of each order and republishes it
// (every property and header kept) to the topic exchange `orders.routed`
// (host config `exchange` names another) with routing key
// `orders.<region>`; orders that are not JSON or have no region are
// dead-lettered. The JavaScript twin of plugins/router.

import {
  Manifest,
  Reject,
  Subscription,
  boundedCatchAll,
  config,
  exportPlugin,
  forward,
  publish,
  text,
} from "../sdk/warren.js";

export const handler = exportPlugin({
  manifest: () =>
    new Manifest("router", "0.1.0")
      .subscribe(Subscription.queue("orders.in"))
      .outputExchange("orders.routed", "topic")
      .output(boundedCatchAll("orders.routed.all", "orders.routed", "topic", ["#"], 1000)),

  handle(d) {
    let order;
    try {
      order = JSON.parse(text(d.body));
    } catch (e) {
      throw new Reject(`order is not JSON: ${e.message}`);
    }
    const region = order?.region;
    if (typeof region !== "string") throw new Reject('order has no "region" field');
    publish(forward(d, config("exchange") ?? "orders.routed", `orders.${region}`));
  },
});
