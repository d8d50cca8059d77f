//! Per-plugin resource limits: what the manifest asks for, overridden by the
//! host config, clamped to what the engine's pool can give.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::manifest::RequestedLimits;

/// Smallest memory limit a plugin may ask for.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// The limits one plugin runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Largest linear memory, in bytes.
    pub memory_bytes: u64,
    /// Deadline of one `handle` call, counted while the guest runs: time
    /// spent waiting for a core behind other guests does not count.
    #[serde(with = "millis")]
    pub deadline: Duration,
    /// Most invocations running at once.
    pub max_concurrency: u32,
    /// Wall-clock budget of all outbound calls of one delivery.
    #[serde(with = "millis")]
    pub wall_deadline: Duration,
    /// Largest response body of one outbound call.
    pub max_response_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            deadline: Duration::from_secs(1),
            max_concurrency: 64,
            wall_deadline: Duration::from_secs(10),
            max_response_bytes: 1 << 20,
        }
    }
}

/// Limits set in the host config for one plugin (or for all); each field
/// wins over what the manifest asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LimitsOverride {
    pub memory_bytes: Option<u64>,
    pub deadline_ms: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub wall_deadline_ms: Option<u32>,
    pub max_response_bytes: Option<u64>,
}

impl Limits {
    /// Resolve: host override, else manifest request, else `defaults`; then
    /// clamp to `caps`.
    pub fn resolve(
        defaults: Limits,
        caps: Limits,
        requested: RequestedLimits,
        host: LimitsOverride,
    ) -> Limits {
        let memory_bytes = host
            .memory_bytes
            .or(requested.memory_bytes)
            .unwrap_or(defaults.memory_bytes)
            .clamp(MIN_MEMORY_BYTES, caps.memory_bytes.max(MIN_MEMORY_BYTES));
        let deadline = host
            .deadline_ms
            .or(requested.deadline_ms)
            .map(|ms| Duration::from_millis(ms.into()))
            .unwrap_or(defaults.deadline)
            .clamp(Duration::from_millis(1), caps.deadline);
        let max_concurrency = host
            .max_concurrency
            .or(requested.max_concurrency)
            .unwrap_or(defaults.max_concurrency)
            .clamp(1, caps.max_concurrency.max(1));
        let wall_deadline = host
            .wall_deadline_ms
            .or(requested.wall_deadline_ms)
            .map(|ms| Duration::from_millis(ms.into()))
            .unwrap_or(defaults.wall_deadline)
            .clamp(Duration::from_millis(1), caps.wall_deadline);
        let max_response_bytes = host
            .max_response_bytes
            .or(requested.max_response_bytes)
            .unwrap_or(defaults.max_response_bytes)
            .min(caps.max_response_bytes);
        Limits {
            memory_bytes,
            deadline,
            max_concurrency,
            wall_deadline,
            max_response_bytes,
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Limits = Limits {
        memory_bytes: 256 << 20,
        deadline: Duration::from_secs(60),
        max_concurrency: 256,
        wall_deadline: Duration::from_secs(60),
        max_response_bytes: 16 << 20,
    };

    #[test]
    fn host_override_beats_manifest_beats_default() {
        let req = RequestedLimits {
            memory_bytes: Some(8 << 20),
            deadline_ms: Some(200),
            max_concurrency: None,
            ..Default::default()
        };
        let host = LimitsOverride {
            deadline_ms: Some(50),
            ..Default::default()
        };
        let l = Limits::resolve(Limits::default(), CAPS, req, host);
        assert_eq!(l.memory_bytes, 8 << 20);
        assert_eq!(l.deadline, Duration::from_millis(50));
        assert_eq!(l.max_concurrency, Limits::default().max_concurrency);
    }

    #[test]
    fn clamped_to_caps() {
        let req = RequestedLimits {
            memory_bytes: Some(u64::MAX),
            deadline_ms: Some(u32::MAX),
            max_concurrency: Some(100_000),
            wall_deadline_ms: Some(u32::MAX),
            max_response_bytes: Some(u64::MAX),
        };
        let l = Limits::resolve(Limits::default(), CAPS, req, LimitsOverride::default());
        assert_eq!(l, CAPS);
    }
}
