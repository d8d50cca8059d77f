// `{{name}}`: republishes each delivery (body, every property and header)
// to queue `{{name}}.out`, after POSTing it to `api-url` when the operator
// configures one (`[plugin.{{name}}] config = { api-url = ".." }` and
// grants its origin in `allow-outbound`). Replace `handle` with your own
// logic.

import { Manifest, Subscription, config, exportPlugin, forward, log, post, publish } from "./warren.js";

export const handler = exportPlugin({
  manifest: () =>
    new Manifest("{{name}}", "0.1.0")
      .subscribe(Subscription.queue("{{name}}.in"))
      .outputQueue("{{name}}.out"),

  handle(d) {
    const url = config("api-url");
    if (url !== null) {
      // Refused or failed: throws; 429/503: retry after Retry-After.
      const r = post(url, { body: d.body }).retryIfBusy();
      log.info(`${url} answered ${r.status}`);
    }
    publish(forward(d, "", "{{name}}.out"));
  },
});
