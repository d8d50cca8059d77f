//! The plugin runtime: one wasmtime engine, plugins loaded once and
//! instantiated afresh for every delivery, with memory limits, deadlines and
//! concurrency permits.
//!
//! Knows nothing of AMQP or the spool: a [`Delivery`] goes in, an
//! [`Outcome`] (with the collected outputs) comes out. `dispatch` decides
//! what an outcome means for the broker.
//!
//! - `bindings`: the one `bindgen!` of the host.
//! - [`runtime`]: engine, linker, epoch ticker.
//! - [`plugin`]: loading and invoking one plugin.
//! - [`directory`]: the `*.wasm` files of the plugins directory.
//! - `instance`: one invocation's store and the `host` imports.
//! - [`outbound`]: outbound HTTP grants and the client every call uses.
//! - [`manifest`], [`limits`], [`outcome`]: plain data and validation.

mod bindings;
pub mod directory;
pub mod footprint;
mod instance;
pub mod limits;
pub mod manifest;
pub mod outbound;
pub mod outcome;
mod overrides;
pub mod plugin;
mod properties;
pub mod runtime;

pub use directory::DirectoryError;
pub use instance::CallRecord;
pub use limits::{Limits, LimitsOverride};
pub use manifest::Manifest;
pub use outcome::{LoadError, Outcome, TrapKind};
pub use overrides::{InstanceSetting, PluginOverride};
pub use plugin::{
    Delivery, InstancePolicy, Plugin, PluginCounters, PluginCountersSnapshot, PluginSettings,
};
pub use runtime::{CompileCacheStats, PluginRuntime, RuntimeConfig, RuntimeError};
