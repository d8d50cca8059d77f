//! How a broker outage reads in the log: one WARN when it starts, an INFO
//! every [`REPORT_EVERY`] while it lasts (attempts so far, time elapsed,
//! the last failure), and one INFO when the broker answers again with the
//! outage's duration. Each failed attempt in between is DEBUG.
//!
//! Owns no connection: the supervisor tells it what happened. Refusals
//! that need an operator (bad credentials, a missing vhost) are the
//! supervisor's to log at ERROR; they are still counted here.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::failure::Failure;

/// How often a continuing outage is reported.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The current outage, if any.
#[derive(Debug, Default)]
pub(crate) struct OutageLog {
    outage: Option<Outage>,
}

#[derive(Debug)]
struct Outage {
    started: Instant,
    /// Connection attempts that failed since it started.
    attempts: u32,
    last_report: Instant,
}

/// What to log (returned so the decisions are testable without a
/// subscriber).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Note {
    Started,
    Continuing { attempts: u32, elapsed: Duration },
    Ended { attempts: u32, lasted: Duration },
    Quiet,
}

impl OutageLog {
    /// A running session was lost: the outage starts (WARN).
    pub(crate) fn session_lost(&mut self, generation: u64, f: &Failure, now: Instant) -> Note {
        self.outage = Some(Outage {
            started: now,
            attempts: 0,
            last_report: now,
        });
        warn!(generation, class = %f.class, error = %f.message, "AMQP session lost; reconnecting.");
        Note::Started
    }

    /// A connection attempt failed. `loud` says the supervisor logs this
    /// failure itself (at ERROR): then no WARN here.
    pub(crate) fn connect_failed(&mut self, f: &Failure, loud: bool, now: Instant) -> Note {
        let Some(o) = &mut self.outage else {
            // No session was running (Warren is starting): this is the start.
            self.outage = Some(Outage {
                started: now,
                attempts: 1,
                last_report: now,
            });
            if !loud {
                warn!(class = %f.class, error = %f.message, "Cannot connect to the broker; retrying.");
            }
            return Note::Started;
        };
        o.attempts += 1;
        if now.duration_since(o.last_report) < REPORT_EVERY {
            debug!(class = %f.class, error = %f.message, attempts = o.attempts, "Still cannot connect to the broker.");
            return Note::Quiet;
        }
        o.last_report = now;
        let elapsed = now.duration_since(o.started);
        info!(
            attempts = o.attempts,
            elapsed_secs = elapsed.as_secs(),
            class = %f.class,
            error = %f.message,
            "Broker still unreachable; retrying."
        );
        Note::Continuing {
            attempts: o.attempts,
            elapsed,
        }
    }

    /// A connection succeeded: the outage, if any, ends (INFO).
    pub(crate) fn connected(&mut self, now: Instant) -> Note {
        let Some(o) = self.outage.take() else {
            return Note::Quiet;
        };
        let lasted = now.duration_since(o.started);
        info!(
            attempts = o.attempts,
            outage_secs = format_args!("{:.1}", lasted.as_secs_f64()),
            "Broker reachable again."
        );
        Note::Ended {
            attempts: o.attempts,
            lasted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::FailureClass;

    #[test]
    fn an_outage_is_one_warn_a_periodic_info_and_an_end() {
        let f = Failure::new(FailureClass::TcpReset, "connection refused", Some(1));
        let t0 = Instant::now();
        let mut log = OutageLog::default();
        assert_eq!(log.connected(t0), Note::Quiet, "no outage yet");
        assert_eq!(log.session_lost(1, &f, t0), Note::Started);
        let at = |ms| t0 + Duration::from_millis(ms);
        // Attempts within the first period are quiet.
        for ms in [100, 2_000, 9_000] {
            assert_eq!(log.connect_failed(&f, false, at(ms)), Note::Quiet);
        }
        assert_eq!(
            log.connect_failed(&f, false, at(10_500)),
            Note::Continuing {
                attempts: 4,
                elapsed: Duration::from_millis(10_500)
            }
        );
        assert_eq!(log.connect_failed(&f, false, at(15_000)), Note::Quiet);
        assert!(matches!(
            log.connect_failed(&f, false, at(21_000)),
            Note::Continuing { attempts: 6, .. }
        ));
        assert_eq!(
            log.connected(at(30_000)),
            Note::Ended {
                attempts: 6,
                lasted: Duration::from_secs(30)
            }
        );
        assert_eq!(log.connected(at(31_000)), Note::Quiet);
        // A broker missing at start starts an outage at the first attempt.
        assert_eq!(log.connect_failed(&f, false, at(40_000)), Note::Started);
        assert!(matches!(
            log.connected(at(41_000)),
            Note::Ended { attempts: 1, .. }
        ));
    }
}
