//! How one invocation ended, and why a file is not a plugin.
//!
//! Three kinds of failure are kept apart, because the caller's policy differs
//! for each: a `handle-error` the
//! guest returned is an ordinary [`Outcome`] (`Retry`, `Reject`); a trap is a
//! fault ([`Outcome::Trapped`]) and its store is dropped; a file that cannot
//! be loaded at all is a [`LoadError`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::kv::Writes;
use crate::message::OutboundMessage;

/// The result of handling one delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// `handle` returned `ok`: publish `outputs`, commit `writes` (the
    /// key-value writes), then acknowledge.
    Ack {
        outputs: Vec<OutboundMessage>,
        #[serde(skip_serializing_if = "Writes::is_empty")]
        writes: Writes,
    },
    /// A transient failure: deliver again later (bounded by attempts),
    /// after `delay` if the plugin asked for one, else after the
    /// configured backoff for the next attempt. The delay is honoured to
    /// within one retry tier (see `dispatch::topology`).
    Retry {
        reason: String,
        #[serde(
            rename = "delay_ms",
            serialize_with = "delay_ms",
            skip_serializing_if = "Option::is_none"
        )]
        delay: Option<Duration>,
    },
    /// A permanent failure: dead-letter now.
    Reject { reason: String },
    /// The guest faulted; any outputs were discarded.
    Trapped { kind: TrapKind, message: String },
}

impl Outcome {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ack { .. } => "ack",
            Outcome::Retry { .. } => "retry",
            Outcome::Reject { .. } => "reject",
            Outcome::Trapped { .. } => "trap",
        }
    }
}

/// A requested retry delay as whole milliseconds.
fn delay_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

/// Why a guest faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrapKind {
    /// Ran past its wall-clock deadline.
    Deadline,
    /// Tried to grow memory past its limit.
    Memory,
    /// Panicked, aborted, or hit `unreachable`.
    Panic,
    /// Any other trap: out-of-bounds access, stack overflow, a host import
    /// failure, ...
    Other,
}

impl TrapKind {
    /// A short label for metrics and dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            TrapKind::Deadline => "deadline",
            TrapKind::Memory => "memory",
            TrapKind::Panic => "panic",
            TrapKind::Other => "other",
        }
    }
}

impl std::fmt::Display for TrapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a file could not be loaded as a plugin. The `Display` text is one
/// line naming the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: outbound grants: {message}")]
    Grants { path: PathBuf, message: String },
    #[error("{path}: cannot read file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a WebAssembly file (no \\0asm header)")]
    NotWasm { path: PathBuf },
    #[error(
        "{path}: a core WebAssembly module, not a component; build the plugin for wasm32-wasip2 (or run `wasm-tools component new`)"
    )]
    CoreModule { path: PathBuf },
    #[error("{path}: invalid component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error(
        "{path}: not a warren:plugin@{} component: {message}",
        super::plugin::CONTRACT_VERSION
    )]
    WrongWorld { path: PathBuf, message: String },
    #[error(
        "{path}: built for contract warren:plugin@{found}, but this Warren runs warren:plugin@{expected}; rebuild the plugin with the SDK for {expected}"
    )]
    WrongContract {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error("{path}: manifest() failed: {message}")]
    ManifestCall { path: PathBuf, message: String },
    #[error("{path}: invalid manifest: {}", problems.join("; "))]
    InvalidManifest {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error(
        "{path}: needs at least {} of memory to start; its limit is {} (raise limits.memory-bytes in its manifest or [plugin.<name>])",
        mib(*needs),
        mib(*limit)
    )]
    MemoryFloor {
        path: PathBuf,
        needs: u64,
        limit: u64,
    },
    #[error("{path}: too large for the plugin pool: {reason}")]
    TooBig { path: PathBuf, reason: String },
}

/// `bytes` as MiB with one decimal, the way limits are read.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

impl LoadError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            LoadError::Read { path, .. }
            | LoadError::NotWasm { path }
            | LoadError::CoreModule { path }
            | LoadError::Compile { path, .. }
            | LoadError::WrongWorld { path, .. }
            | LoadError::WrongContract { path, .. }
            | LoadError::ManifestCall { path, .. }
            | LoadError::InvalidManifest { path, .. }
            | LoadError::MemoryFloor { path, .. }
            | LoadError::TooBig { path, .. }
            | LoadError::Grants { path, .. } => path,
        }
    }
}
