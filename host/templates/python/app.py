"""`{{name}}`: republishes each delivery (body, every property and header)
to queue `{{name}}.out`, after POSTing it to `api-url` when the operator
configures one (`[plugin.{{name}}] config = { api-url = ".." }` and grants
its origin in `allow-outbound`). Replace `handle` with your own logic;
import every module at the top of this file (there is no filesystem at run
time)."""

import warren


class App(warren.Plugin):
    def manifest(self):
        return (
            warren.Manifest("{{name}}", "0.1.0")
            .subscribe(warren.Subscription.queue("{{name}}.in"))
            .output_queue("{{name}}.out")
        )

    def handle(self, d):
        url = warren.config("api-url")
        if url is not None:
            # Refused or failed: raises; 429/503: retry after Retry-After.
            r = warren.post(url, body=d.body).retry_if_busy()
            warren.log.info(f"{url} answered {r.status}")
        warren.publish(warren.forward(d, "", "{{name}}.out"))


Handler = warren.export(App)
