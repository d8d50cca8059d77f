//! Retry delays: exponential and capped, the one backoff of every retry
//! loop in Warren (reconnects, channel reopening, spool writes and drains,
//! sentinel subscriptions, outputs held for a broker and spool that both
//! refuse). A leaf: no subsystem state.
//!
//! Reconnects draw with full jitter:
//! `delay = random(0 ..= min(cap, initial * 2^attempt))` (AWS "full
//! jitter"), so a fleet of hosts that lost the same broker does not come
//! back in lockstep. Failures that retrying quickly cannot fix use
//! [`Backoff::slow_delay`]: between half the cap and the cap, never less, so
//! a wrong password can never become a hot loop. Pure; no clock, no I/O.

use std::time::Duration;

use rand::Rng;

/// Backoff settings: the reconnect loops' come from `[amqp]`
/// ([`super::AmqpSection::backoff`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// The ceiling of the first delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}

/// The state of one retry sequence.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// A fresh sequence.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// How many delays were handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.config
            .initial
            .checked_mul(factor)
            .unwrap_or(self.config.max)
            .min(self.config.max)
    }

    /// The next delay, uniformly in `0..=ceiling`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.grow();
        jitter(Duration::ZERO, ceiling)
    }

    /// [`Backoff::next_delay`] with the ceiling lowered to `cap`.
    pub fn next_delay_within(&mut self, cap: Duration) -> Duration {
        let ceiling = self.ceiling().min(cap);
        self.grow();
        jitter(Duration::ZERO, ceiling)
    }

    /// The next delay for a failure that fast retries cannot fix: uniformly
    /// in `max/2..=max`.
    pub fn slow_delay(&mut self) -> Duration {
        self.grow();
        jitter(self.config.max / 2, self.config.max)
    }

    /// The next delay, uniformly in `low..=ceiling` (`low` capped at the
    /// ceiling): full jitter with a floor.
    pub fn next_delay_at_least(&mut self, low: Duration) -> Duration {
        let ceiling = self.ceiling();
        self.grow();
        jitter(low.min(ceiling), ceiling)
    }

    /// The next delay without jitter: the ceiling, which then doubles. For
    /// a loop that waits on a resource of its own, where there is no fleet
    /// to spread.
    pub fn next_fixed(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.grow();
        ceiling
    }

    /// Double the ceiling without taking a delay.
    pub fn grow(&mut self) {
        self.attempt = self.attempt.saturating_add(1);
    }

    /// Start over (after a healthy session).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn jitter(low: Duration, high: Duration) -> Duration {
    if high <= low {
        return high;
    }
    let span = u64::try_from((high - low).as_micros()).unwrap_or(u64::MAX);
    low + Duration::from_micros(rand::rng().random_range(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(cfg());
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling());
            b.next_delay();
        }
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[1], Duration::from_millis(200));
        assert_eq!(ceilings[4], Duration::from_millis(1600));
        assert_eq!(ceilings[5], Duration::from_secs(2));
        assert_eq!(ceilings[7], Duration::from_secs(2));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(
            b.ceiling(),
            Duration::from_secs(2),
            "no overflow at high attempts"
        );
    }

    #[test]
    fn full_jitter_stays_in_range_and_spreads() {
        let mut b = Backoff::new(cfg());
        for _ in 0..10 {
            b.next_delay();
        }
        let samples: Vec<Duration> = (0..500).map(|_| b.next_delay()).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(2)));
        let min = samples.iter().min().copied().unwrap_or_default();
        let max = samples.iter().max().copied().unwrap_or_default();
        assert!(
            min < Duration::from_millis(400),
            "jitter reaches low values: {min:?}"
        );
        assert!(
            max > Duration::from_millis(1600),
            "jitter reaches high values: {max:?}"
        );
    }

    #[test]
    fn slow_delay_never_below_half_cap() {
        let mut b = Backoff::new(cfg());
        for _ in 0..200 {
            let d = b.slow_delay();
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(cfg());
        for _ in 0..6 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(2));
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
