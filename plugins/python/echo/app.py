"""`echo`: republishes each delivery (body, every property and header) to
the exchange and routing key set in the host config (`exchange`, default ""
= the default exchange; `routing-key`, default `echo.out`, which the
manifest declares). The Python twin of plugins/echo."""

import warren


class Echo(warren.Plugin):
    def manifest(self):
        return (
            warren.Manifest("echo", "0.1.0")
            .subscribe(warren.Subscription.queue("echo.in"))
            .output_queue("echo.out")
        )

    def handle(self, d):
        exchange = warren.config("exchange") or ""
        routing_key = warren.config("routing-key") or "echo.out"
        warren.publish(warren.forward(d, exchange, routing_key))


Handler = warren.export(Echo)
