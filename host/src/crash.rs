//! Crash points: places where a test can make Warren die as `kill -9`
//! would, to show what each crash leaves behind. Compiled in only with
//! the `crash-points` feature (the host's own tests turn it on); without
//! it [`point`] is empty and costs nothing.
//!
//! With the feature, `CRASH_AT=<name>` aborts the process the first
//! time the point `<name>` is reached: no destructor runs, nothing is
//! flushed, no acknowledgement is sent.

/// Abort here if `CRASH_AT` names `name`.
#[cfg(feature = "crash-points")]
pub fn point(name: &str) {
    if std::env::var("CRASH_AT").is_ok_and(|v| v == name) {
        eprintln!("warren: crash point {name} reached; aborting");
        std::process::abort();
    }
}

/// Abort here if `CRASH_AT` names `name` (not compiled in).
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &str) {}
