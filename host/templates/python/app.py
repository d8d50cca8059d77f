"""`{{name}}`: republishes each delivery (body, every property and header)
to queue `{{name}}.out`. Replace `handle` with your own logic; import every
module at the top of this file (there is no filesystem at run time)."""

import warren


class App(warren.Plugin):
    def manifest(self):
        return (
            warren.Manifest("{{name}}", "0.1.0")
            .subscribe(warren.Subscription.queue("{{name}}.in"))
            .output_queue("{{name}}.out")
        )

    def handle(self, d):
        warren.publish(warren.forward(d, "", "{{name}}.out"))


Handler = warren.export(App)
