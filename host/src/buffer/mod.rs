//! The outage spool: Sentinel primary discovery, a Redis Stream of
//! outbound messages, and the drainer. Knows nothing of AMQP or plugins.
