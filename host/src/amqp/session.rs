//! One session on a live connection: the consumers and the publish
//! channel's keeper it started, and the loop that handles one event per
//! method until the session is stopped or fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use lapin::{Connection, Event};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::consumer::{self, ConsumerCtx};
use super::declare::declare_all;
use super::failure::{Failure, FailureClass, classify, is_connection_level};
use super::publisher;
use super::shared::Command;
use super::status::ConnectionState;
use super::supervisor::Amqp;

/// A running session: the tasks it started and what its loop carries from
/// one event to the next. [`Session::run`] handles one event per method and
/// ends in [`Session::stop`] (cancelled) or [`Session::tear_down`] (failed).
pub(super) struct Session<'a> {
    amqp: &'a mut Amqp,
    conn: Arc<Connection>,
    generation: u64,
    events: BoxStream<'static, Event>,
    /// Ends the publish channel's keeper and every consumer at once.
    abort: CancellationToken,
    /// Parent of every consumer's stop token: consumers drain and stop.
    graceful: CancellationToken,
    /// Failure reports from the session's tasks.
    failures_tx: mpsc::UnboundedSender<Failure>,
    failures: mpsc::UnboundedReceiver<Failure>,
    consumers: JoinSet<String>,
    /// Each running consumer's stop token, and the removal requests
    /// waiting for it to end.
    running: HashMap<String, (CancellationToken, Vec<oneshot::Sender<()>>)>,
    /// The publish channel's keeper.
    side: JoinSet<()>,
    watchdog: tokio::time::Interval,
    /// The last channel-level error, to name if the watchdog finds the
    /// connection gone.
    last_error: Option<lapin::Error>,
}

impl<'a> Session<'a> {
    /// Start the publish channel's keeper and one consumer per
    /// subscription, then publish the session as running (or blocked).
    pub(super) fn start(
        amqp: &'a mut Amqp,
        conn: Arc<Connection>,
        events: BoxStream<'static, Event>,
        generation: u64,
    ) -> Self {
        let (failures_tx, failures) = mpsc::unbounded_channel::<Failure>();
        let mut watchdog = tokio::time::interval(amqp.config.watchdog_interval);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut session = Session {
            amqp,
            conn,
            generation,
            events,
            abort: CancellationToken::new(),
            graceful: CancellationToken::new(),
            failures_tx,
            failures,
            consumers: JoinSet::new(),
            running: HashMap::new(),
            side: JoinSet::new(),
            watchdog,
            last_error: None,
        };
        session.side.spawn(publisher::keep_channel(
            session.conn.clone(),
            generation,
            session.amqp.publisher_link.clone(),
            session.abort.clone(),
            session.failures_tx.clone(),
        ));
        for queue in session.amqp.shared.sub_names() {
            session.start_consumer(queue);
        }
        session
            .amqp
            .shared
            .set_state(if session.conn.status().blocked() {
                ConnectionState::Blocked {
                    reason: "blocked at connect".to_owned(),
                }
            } else {
                ConnectionState::Running
            });
        session
    }

    /// Handle events until `cancel` fires (a clean stop, `None`) or one
    /// ends the session (its failure, after the teardown).
    pub(super) async fn run(mut self, cancel: &CancellationToken) -> Option<Failure> {
        let failure = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break None,
                Some(f) = self.failures.recv() => {
                    if let Some(f) = self.failure_report(f) {
                        break Some(f);
                    }
                }
                ev = self.events.next() => {
                    if let Some(f) = self.connection_event(ev) {
                        break Some(f);
                    }
                }
                _ = self.watchdog.tick() => {
                    if let Some(f) = self.watchdog_check() {
                        break Some(f);
                    }
                }
                // Cancel-safe: a command is either handled here or not taken.
                Some(cmd) = self.amqp.commands.recv() => self.command(cmd).await,
                Some(joined) = self.consumers.join_next() => self.consumer_ended(joined),
            }
        };
        match failure {
            None => self.stop().await,
            Some(_) => self.tear_down().await,
        }
        failure
    }

    /// A task's failure report: it ends the session unless it is from an
    /// older one.
    fn failure_report(&self, f: Failure) -> Option<Failure> {
        if f.generation == Some(self.generation) {
            return Some(f);
        }
        debug!(generation = self.generation, stale = ?f.generation, "Ignoring a failure report from an older session.");
        None
    }

    /// An event of the connection; a connection-level error, or the end of
    /// the events, ends the session. A channel-level error is its owner's
    /// to repair.
    fn connection_event(&mut self, ev: Option<Event>) -> Option<Failure> {
        let generation = self.generation;
        match ev {
            Some(Event::Error(e)) if is_connection_level(&e) => {
                return Some(Failure::from_lapin(&e, Some(generation)));
            }
            Some(Event::Error(e)) => {
                debug!(generation, error = %e, class = %classify(&e), "Channel-level error; its owner repairs it.");
                self.last_error = Some(e);
            }
            Some(Event::ConnectionBlocked(reason)) => {
                warn!(generation, %reason, "Broker blocked publishing.");
                self.amqp
                    .shared
                    .set_state(ConnectionState::Blocked { reason });
            }
            Some(Event::ConnectionUnblocked) => {
                info!(generation, "Broker unblocked publishing.");
                self.amqp.shared.set_state(ConnectionState::Running);
            }
            Some(_) => {}
            None => {
                return Some(Failure::new(
                    FailureClass::Other,
                    "connection event stream ended",
                    Some(generation),
                ));
            }
        }
        None
    }

    /// The watchdog: a connection that is no longer connected ends the
    /// session.
    fn watchdog_check(&self) -> Option<Failure> {
        if self.conn.status().connected() {
            return None;
        }
        let generation = Some(self.generation);
        Some(match &self.last_error {
            Some(e) if is_connection_level(e) => Failure::from_lapin(e, generation),
            _ => Failure::new(
                FailureClass::Other,
                "connection is no longer connected (watchdog)",
                generation,
            ),
        })
    }

    /// A command from a handle, on the live connection.
    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Start(queue) => {
                if !self.running.contains_key(&queue) {
                    self.start_consumer(queue);
                }
            }
            Command::Stop(queue, done) => match self.running.get_mut(&queue) {
                Some((stop, waiters)) => {
                    stop.cancel();
                    waiters.push(done);
                }
                None => {
                    self.amqp.shared.remove_sub(&queue);
                    let _ = done.send(());
                }
            },
            Command::Declare(t, done) => {
                self.amqp.shared.topology.merge(t.clone());
                let declared = declare_all(&self.conn, &t, &self.amqp.shared).await;
                let res = match declared.into_iter().next() {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
                let _ = done.send(res);
            }
        }
    }

    /// A consumer task ended: answer the removal that stopped it, or start
    /// it again on the live connection, or forget a subscription whose
    /// receiver is gone.
    fn consumer_ended(&mut self, joined: Result<String, tokio::task::JoinError>) {
        let queue = match joined {
            Ok(q) => q,
            Err(e) => {
                error!(generation = self.generation, error = %e, "Consumer task failed.");
                return;
            }
        };
        let Some((_, waiters)) = self.running.remove(&queue) else {
            return;
        };
        let shared = &self.amqp.shared;
        // Only a removal request leaves waiters.
        if !waiters.is_empty() {
            shared.remove_sub(&queue);
            for w in waiters {
                let _ = w.send(());
            }
        } else if !self.abort.is_cancelled() && shared.sub(&queue).is_some() {
            // Its receiver is gone or it gave up on this
            // connection; a failure report (if any) decides.
            if self.conn.status().connected() && !shared.receiver_gone(&queue) {
                self.start_consumer(queue);
            } else if shared.receiver_gone(&queue) {
                shared.remove_sub(&queue);
            }
        }
    }

    /// Start the consumer task of `queue`.
    fn start_consumer(&mut self, queue: String) {
        let stop = self.graceful.child_token();
        let ctx = ConsumerCtx {
            conn: self.conn.clone(),
            generation: self.generation,
            queue: queue.clone(),
            shared: self.amqp.shared.clone(),
            stop: stop.clone(),
            abort: self.abort.clone(),
            failures: self.failures_tx.clone(),
            check_interval: self.amqp.config.consumer_check_interval,
            flush_interval: self.amqp.config.ack_flush_interval,
            drain_timeout: self.amqp.config.drain_timeout,
            backoff: self.amqp.config.backoff,
        };
        self.consumers.spawn(consumer::run(ctx));
        self.running.insert(queue, (stop, Vec::new()));
    }

    /// Clean stop: consumers first (they drain in-flight acks),
    /// then the publisher channel, then the connection.
    async fn stop(mut self) {
        self.amqp.shared.set_state(ConnectionState::Stopping);
        self.graceful.cancel();
        let drain = self.amqp.config.drain_timeout + Duration::from_secs(1);
        if tokio::time::timeout(drain, async {
            while self.consumers.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!(
                generation = self.generation,
                "Consumers did not drain in time; closing anyway."
            );
        }
        self.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.side.join_next().await.is_some() {}
        })
        .await;
        self.amqp.publisher_link.send_replace(None);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.conn.close(200, "warren stopping".into()),
        )
        .await;
        for (_, (_, waiters)) in self.running {
            for w in waiters {
                let _ = w.send(());
            }
        }
    }

    /// After a failure: everything stops at once, and the connection is
    /// closed if it is still up.
    async fn tear_down(mut self) {
        self.amqp.publisher_link.send_replace(None);
        self.abort.cancel();
        self.graceful.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.consumers.join_next().await.is_some() {}
            while self.side.join_next().await.is_some() {}
        })
        .await;
        self.consumers.abort_all();
        self.side.abort_all();
        // Waiters of removals in progress: the subscription is gone.
        for (queue, (_, waiters)) in self.running {
            if !waiters.is_empty() {
                self.amqp.shared.remove_sub(&queue);
                for w in waiters {
                    let _ = w.send(());
                }
            }
        }
        if self.conn.status().connected() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.conn.close(320, "warren recovering".into()),
            )
            .await;
        }
    }
}
