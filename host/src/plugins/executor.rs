//! The sandbox threads: every instantiation and call of a plugin runs here,
//! synchronously, off the tokio workers.
//!
//! Owns a small set of OS threads fed from one queue. A fresh instance per
//! delivery costs ~4 µs synchronously; wasmtime's async instantiation and
//! calls put every one of them on a fiber of its own, which costs about as
//! much again, and a synchronous guest must not run on a tokio worker (it
//! would hold the worker for as long as the guest runs, and WASI's
//! synchronous bindings block on a runtime of their own). So dispatch hands
//! each invocation to these threads and awaits its outcome.
//!
//! A guest may run for its whole deadline (up to a minute). A thread busy
//! longer than [`SLOW_AFTER`] no longer counts toward the pool: the epoch
//! ticker calls [`Executor::supervise`] at every tick, which starts a
//! thread in its place, so slow deliveries never hold up the others; the
//! surplus threads leave as soon as they are idle. The number of threads is
//! bounded by the instances the pool admits at once, since every job holds
//! an admitted instance.
//!
//! Does not own admission (see [`super::footprint`]) or what runs in a job.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

/// A thread busy with one job for longer than this is replaced.
pub(crate) const SLOW_AFTER: Duration = Duration::from_millis(10);

type Job = Box<dyn FnOnce() + Send>;

/// The job's thread went away before answering (the runtime is being
/// dropped, or the job panicked).
#[derive(Debug, thiserror::Error)]
#[error("the sandbox thread ended before the invocation finished")]
pub(crate) struct ExecutorGone;

/// Hands jobs to the sandbox threads. Dropping it ends them once the queue
/// is empty.
pub(crate) struct Executor {
    tx: Sender<Job>,
    shared: Arc<Shared>,
}

struct Shared {
    rx: Receiver<Job>,
    /// Threads kept ready: never fewer than this idle or fast.
    target: usize,
    /// Live threads, including slow ones.
    live: AtomicUsize,
    /// Each live thread's state.
    threads: Mutex<Vec<Arc<ThreadState>>>,
    /// The zero of every `busy_since`.
    origin: Instant,
}

#[derive(Default)]
struct ThreadState {
    /// Nanoseconds after `origin` when the current job started; 0 when idle.
    busy_since: AtomicU64,
}

impl Executor {
    /// Start `target` threads (at least one).
    pub(crate) fn start(target: usize) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            rx,
            target: target.max(1),
            live: AtomicUsize::new(0),
            threads: Mutex::default(),
            origin: Instant::now(),
        });
        for _ in 0..shared.target {
            Shared::spawn(&shared)?;
        }
        Ok(Self { tx, shared })
    }

    /// Run `f` on a sandbox thread and wait for its result.
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, ExecutorGone> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.tx.send(job).map_err(|_| ExecutorGone)?;
        result.await.map_err(|_| ExecutorGone)
    }

    /// Replace the threads that have been busy with one job for longer than
    /// [`SLOW_AFTER`]. Called by the epoch ticker at every tick.
    pub(crate) fn supervise(&self) {
        let shared = &self.shared;
        let now = shared.nanos();
        let slow_after = SLOW_AFTER.as_nanos() as u64;
        let fast = lock(&shared.threads)
            .iter()
            .filter(|t| {
                let since = t.busy_since.load(Ordering::Relaxed);
                since == 0 || now.saturating_sub(since) < slow_after
            })
            .count();
        for _ in fast..shared.target {
            if let Err(e) = Shared::spawn(shared) {
                tracing::error!(error = %e, "Failed to start a sandbox thread; slow deliveries may delay others.");
                break;
            }
        }
    }

    /// Threads alive now.
    #[cfg(test)]
    pub(crate) fn threads(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn nanos(&self) -> u64 {
        // Never 0, which means idle.
        (self.origin.elapsed().as_nanos() as u64).max(1)
    }

    fn spawn(shared: &Arc<Shared>) -> std::io::Result<()> {
        let state = Arc::new(ThreadState::default());
        let me = state.clone();
        let this = shared.clone();
        // Counted before the thread runs, so a supervisor tick in between
        // does not start another.
        shared.live.fetch_add(1, Ordering::Relaxed);
        lock(&shared.threads).push(state);
        let started = std::thread::Builder::new()
            .name("warren-sandbox".into())
            .spawn(move || this.work(&me));
        if let Err(e) = started {
            shared.live.fetch_sub(1, Ordering::Relaxed);
            lock(&shared.threads).pop();
            return Err(e);
        }
        Ok(())
    }

    /// A thread's life: take jobs until the executor is dropped, or until
    /// it is surplus (it was started in place of a slow one).
    fn work(&self, me: &Arc<ThreadState>) {
        loop {
            if self.live.load(Ordering::Relaxed) > self.target && self.leave_if_surplus(me) {
                return;
            }
            let Ok(job) = self.rx.recv() else {
                self.leave(me);
                return;
            };
            me.busy_since.store(self.nanos(), Ordering::Relaxed);
            // A panic (a host bug) ends the job, whose caller then sees
            // ExecutorGone, not the thread.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                tracing::error!("A sandbox job panicked; its delivery ends as a trap.");
            }
            me.busy_since.store(0, Ordering::Relaxed);
        }
    }

    /// Leave if enough other threads are idle or fast without this one.
    fn leave_if_surplus(&self, me: &Arc<ThreadState>) -> bool {
        let now = self.nanos();
        let slow_after = SLOW_AFTER.as_nanos() as u64;
        let mut threads = lock(&self.threads);
        let others_ready = threads
            .iter()
            .filter(|t| !Arc::ptr_eq(t, me))
            .filter(|t| {
                let since = t.busy_since.load(Ordering::Relaxed);
                since == 0 || now.saturating_sub(since) < slow_after
            })
            .count();
        if others_ready < self.target {
            return false;
        }
        threads.retain(|t| !Arc::ptr_eq(t, me));
        self.live.fetch_sub(1, Ordering::Relaxed);
        true
    }

    fn leave(&self, me: &Arc<ThreadState>) {
        lock(&self.threads).retain(|t| !Arc::ptr_eq(t, me));
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_and_answer() {
        let ex = Executor::start(2).unwrap();
        let mut sum = 0;
        for i in 0..100u32 {
            sum += ex.run(move || i * 2).await.unwrap();
        }
        assert_eq!(sum, 9900);
    }

    #[tokio::test]
    async fn a_slow_job_is_replaced_and_its_thread_leaves_when_done() {
        let ex = Arc::new(Executor::start(1).unwrap());
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let slow = tokio::spawn({
            let ex = ex.clone();
            async move { ex.run(move || wait.recv().is_ok()).await }
        });
        // Deadline-bounded poll: the thread counts as slow after SLOW_AFTER.
        let deadline = Instant::now() + Duration::from_secs(5);
        while ex.threads() < 2 {
            assert!(Instant::now() < deadline, "no replacement thread started");
            ex.supervise();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The replacement serves while the slow job still runs.
        assert_eq!(ex.run(|| 7).await.unwrap(), 7);
        release.send(()).unwrap();
        assert!(slow.await.unwrap().unwrap());
        // One of the two leaves once both are idle.
        while ex.threads() > 1 {
            assert!(Instant::now() < deadline, "surplus thread never left");
            ex.run(|| ()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
