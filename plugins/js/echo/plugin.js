// `echo`: republishes each delivery (body, every property and header) to
// the exchange and routing key set in the host config (`exchange`, default
// "" = the default exchange; `routing-key`, default `echo.out`, which the
// manifest declares). The JavaScript twin of plugins/echo.

import { Manifest, Subscription, config, exportPlugin, forward, publish } from "../sdk/warren.js";

export const handler = exportPlugin({
  manifest: () =>
    new Manifest("echo", "0.1.0").subscribe(Subscription.queue("echo.in")).outputQueue("echo.out"),

  handle(d) {
    publish(forward(d, config("exchange") ?? "", config("routing-key") ?? "echo.out"));
  },
});
