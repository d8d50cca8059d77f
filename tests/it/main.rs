//! Warren's integration tests: one binary, a module per area, real services.

// The whole binary is test code; clippy.toml allows these in `#[test]`
// functions, and the helpers shared between tests deserve the same.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod buffer;
