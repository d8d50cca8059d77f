//! Warren's integration tests: one binary, a module per area, real
//! services only.

mod amqp;
