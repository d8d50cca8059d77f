// `{{name}}`: republishes each delivery (body, every property and header)
// to queue `{{name}}.out`. Replace `handle` with your own logic.

import { Manifest, Subscription, exportPlugin, forward, publish } from "./warren.js";

export const handler = exportPlugin({
  manifest: () =>
    new Manifest("{{name}}", "0.1.0")
      .subscribe(Subscription.queue("{{name}}.in"))
      .outputQueue("{{name}}.out"),

  handle(d) {
    publish(forward(d, "", "{{name}}.out"));
  },
});
