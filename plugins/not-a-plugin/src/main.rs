//! Test fixture: a WASI command (`wasi:cli/run`), a valid component for a
//! different world. `warren check` must refuse it as "not a
//! warren:plugin@0.3.0 component" (tests/it/plugins).

fn main() {
    println!("hello from a command, not a plugin");
}
