//! The AMQP core: one supervisor per connection, the topology registry,
//! consumers and the confirmed publisher. Knows nothing of plugins or the
//! spool.
