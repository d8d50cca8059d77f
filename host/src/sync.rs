//! Locks that outlive a panic, and the clock of a periodic loop.
//!
//! [`lock`], [`read`] and [`write`] are the one way Warren takes a
//! `std::sync` lock. The values behind Warren's locks (status maps, registries,
//! counters, memories of refusals) are changed by single assignments and
//! map operations, so a holder that panicked leaves them consistent;
//! recovering the guard keeps one panicked task from taking every other
//! user of the lock down with it.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// `m.lock()`, poisoned or not.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `l.read()`, poisoned or not.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// `l.write()`, poisoned or not.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// A periodic loop's clock: ticks every `period` (a late tick delays the
/// next rather than bunching them) until a token is cancelled.
pub struct Ticker(tokio::time::Interval);

impl Ticker {
    /// The first tick is at once.
    pub fn new(period: std::time::Duration) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self(interval)
    }

    /// Wait for the next tick: true, or false once `cancel` fired (it is
    /// looked at first).
    pub async fn tick(&mut self, cancel: &tokio_util::sync::CancellationToken) -> bool {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => false,
            _ = self.0.tick() => true,
        }
    }
}
