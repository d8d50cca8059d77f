//! The drainer: order, restart after a kill, failed publishes, and a
//! message's round trip through the spool. Plain Redis on 6379, a stream per
//! test.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use warren::buffer::{
    DrainPublisher, Drainer, DrainerConfig, DrainerState, FnPublisher, SpoolConfig,
};
use warren::message::{HeaderValue, MessageProperties, OutboundMessage};
use warren_it::wait;

use super::{PLAIN_URL, cleanup, host_id, message, seq_of, start, xlen};

/// Records sends in order, like a broker that confirms one publish per
/// `pace`, in order: the k-th publish of a full window is confirmed about
/// k × `pace` after its send.
/// Publishes picked by `hang` are never confirmed (a broker that stalled).
/// While `blocked` is set, the broker says it blocks publishing and
/// confirms wait for it to clear.
struct PacedConfirms {
    sent: Arc<Mutex<Vec<u64>>>,
    pace: Duration,
    next: Arc<Mutex<tokio::time::Instant>>,
    hang: Hang,
    hung: Arc<Mutex<std::collections::HashSet<u64>>>,
    blocked: Arc<AtomicBool>,
}

/// Which publishes never get their confirm.
#[derive(Clone)]
enum Hang {
    Never,
    /// The first publish of each of these entries.
    FirstOf(Vec<u64>),
    /// Every `every`-th publish (counting repeats) before the `until`-th.
    Every {
        every: usize,
        until: usize,
    },
}

impl PacedConfirms {
    fn new(pace: Duration, hang: Hang, sent: Arc<Mutex<Vec<u64>>>) -> Self {
        Self {
            sent,
            pace,
            next: Arc::new(Mutex::new(tokio::time::Instant::now())),
            hang,
            hung: Arc::default(),
            blocked: Arc::default(),
        }
    }
}

impl DrainPublisher for PacedConfirms {
    type Error = String;
    type Confirm = BoxFuture<'static, Result<(), String>>;

    fn publish(
        &self,
        message: OutboundMessage,
    ) -> impl Future<Output = Result<Self::Confirm, String>> + Send {
        let seq = seq_of(&message);
        let count = {
            let mut sent = self.sent.lock().unwrap();
            sent.push(seq);
            sent.len()
        };
        let at = {
            let mut next = self.next.lock().unwrap();
            *next = (*next).max(tokio::time::Instant::now()) + self.pace;
            *next
        };
        let hang = match &self.hang {
            Hang::Never => false,
            Hang::FirstOf(seqs) => seqs.contains(&seq) && self.hung.lock().unwrap().insert(seq),
            Hang::Every { every, until } => count < *until && count % every == 0,
        };
        let blocked = self.blocked.clone();
        async move {
            let confirm: BoxFuture<'static, Result<(), String>> = Box::pin(async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep_until(at).await;
                while blocked.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(())
            });
            Ok(confirm)
        }
    }

    fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::SeqCst)
    }
}

fn drain_cfg() -> DrainerConfig {
    DrainerConfig {
        batch: 64,
        window: 16,
        lease_ttl_ms: 1000,
        stall_timeout_ms: 5_000,
        backoff_min_ms: 50,
        backoff_max_ms: 200,
        idle_poll_ms: 100,
    }
}

fn plain_cfg(test: &str) -> SpoolConfig {
    let mut cfg = SpoolConfig::plain(PLAIN_URL, host_id(test));
    cfg.status_interval_ms = 100;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_order_and_a_killed_drainer_is_resumed() {
    const N: u64 = 400;
    let run = start(plain_cfg("drain-order")).await;
    let key = run.handle.stream_key().to_owned();
    for n in 0..N {
        run.handle.append(message(n)).await.unwrap();
    }
    assert_eq!(xlen(PLAIN_URL, &key).await, N);
    assert!(!run.handle.is_empty());

    // First drainer: killed (task aborted) half-way, confirms in flight.
    let first = Arc::new(Mutex::new(Vec::new()));
    let (d1, _c1) = Drainer::new(
        drain_cfg(),
        &run.handle,
        PacedConfirms::new(Duration::from_millis(3), Hang::Never, first.clone()),
    )
    .unwrap();
    let t1 = tokio::spawn(d1.run(CancellationToken::new()));
    wait::until_true(
        "first drainer half-way",
        Duration::from_secs(20),
        || async { first.lock().unwrap().len() >= (N / 2) as usize },
    )
    .await
    .unwrap();
    t1.abort();
    let _ = t1.await;
    let left = xlen(PLAIN_URL, &key).await;
    assert!(left > 0 && left < N, "the kill left {left} entries");

    // Second drainer: waits out the dead one's lease, then drains the rest.
    let second = Arc::new(Mutex::new(Vec::new()));
    let (d2, _c2) = Drainer::new(
        drain_cfg(),
        &run.handle,
        PacedConfirms::new(Duration::from_millis(1), Hang::Never, second.clone()),
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let t2 = tokio::spawn(d2.run(cancel.clone()));
    wait::until_true("spool drained", Duration::from_secs(20), || async {
        xlen(PLAIN_URL, &key).await == 0
    })
    .await
    .unwrap();
    wait::until_true("spool reports empty", Duration::from_secs(5), || async {
        run.handle.is_empty()
    })
    .await
    .unwrap();

    let first = first.lock().unwrap().clone();
    let second = second.lock().unwrap().clone();
    assert!(
        second.windows(2).all(|w| w[0] < w[1]),
        "second drainer out of order"
    );
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "first drainer out of order"
    );
    // Every entry at least once, first publications in append order.
    let mut firsts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for s in first.iter().chain(second.iter()) {
        if seen.insert(*s) {
            firsts.push(*s);
        }
    }
    assert_eq!(firsts, (0..N).collect::<Vec<_>>());
    let status = run.handle.status().await;
    assert_eq!(status.depth, 0);
    assert!(status.drained >= N - left, "drained {}", status.drained);
    assert_eq!(status.oldest_age_ms, None);

    cancel.cancel();
    t2.await.unwrap();
    run.stop().await;
    cleanup(&key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drainers_never_publish_the_same_entry() {
    const N: u64 = 300;
    let run = start(plain_cfg("drain-two")).await;
    let key = run.handle.stream_key().to_owned();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (d, _c) = Drainer::new(
            drain_cfg(),
            &run.handle,
            PacedConfirms::new(Duration::from_millis(1), Hang::Never, sent.clone()),
        )
        .unwrap();
        tasks.push(tokio::spawn(d.run(cancel.clone())));
    }
    for n in 0..N {
        run.handle.append(message(n)).await.unwrap();
    }
    wait::until_true("spool drained", Duration::from_secs(20), || async {
        xlen(PLAIN_URL, &key).await == 0
    })
    .await
    .unwrap();
    // Both drainers publish into the same log: one holds the lease, so each
    // entry appears once and in order.
    assert_eq!(*sent.lock().unwrap(), (0..N).collect::<Vec<_>>());
    cancel.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    run.stop().await;
    cleanup(&key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publish_keeps_the_entry_and_resumes() {
    let run = start(plain_cfg("drain-fail")).await;
    let key = run.handle.stream_key().to_owned();
    for n in 0..10 {
        run.handle.append(message(n)).await.unwrap();
    }
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let broken = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (delivered, broken) = (delivered.clone(), broken.clone());
        FnPublisher(move |m: OutboundMessage| {
            let (delivered, broken) = (delivered.clone(), broken.clone());
            async move {
                let seq = seq_of(&m);
                if seq == 5 && broken.load(Ordering::SeqCst) {
                    return Err("broker unavailable".to_owned());
                }
                delivered.lock().unwrap().push(seq);
                Ok(())
            }
        })
    };
    let (drainer, control) = Drainer::new(drain_cfg(), &run.handle, publisher).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(drainer.run(cancel.clone()));

    wait::until_true(
        "drainer paused on the failure",
        Duration::from_secs(10),
        || async {
            matches!(
                run.handle.status().await.drainer,
                DrainerState::Paused { .. }
            )
        },
    )
    .await
    .unwrap();
    assert_eq!(*delivered.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    assert_eq!(
        xlen(PLAIN_URL, &key).await,
        5,
        "the failed entry and its successors stay"
    );
    assert!(!run.handle.is_empty());

    broken.store(false, Ordering::SeqCst);
    control.kick();
    wait::until_true(
        "drained after recovery",
        Duration::from_secs(10),
        || async { xlen(PLAIN_URL, &key).await == 0 },
    )
    .await
    .unwrap();
    assert_eq!(*delivered.lock().unwrap(), (0..10).collect::<Vec<_>>());

    // Paused drainers leave new entries alone.
    control.pause();
    wait::until_true("drainer disabled", Duration::from_secs(5), || async {
        run.handle.status().await.drainer == DrainerState::Disabled
    })
    .await
    .unwrap();
    run.handle.append(message(10)).await.unwrap();
    assert_eq!(xlen(PLAIN_URL, &key).await, 1);
    control.resume();
    wait::until_true("drained after resume", Duration::from_secs(10), || async {
        xlen(PLAIN_URL, &key).await == 0
    })
    .await
    .unwrap();

    cancel.cancel();
    task.await.unwrap();
    run.stop().await;
    cleanup(&key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_message_comes_back_unchanged() {
    let run = start(plain_cfg("roundtrip")).await;
    let key = run.handle.stream_key().to_owned();
    let mut full = OutboundMessage {
        exchange: "orders".into(),
        routing_key: "orders.created".into(),
        properties: MessageProperties {
            content_type: Some("application/json".into()),
            content_encoding: Some("gzip".into()),
            delivery_mode: Some(2),
            priority: Some(7),
            correlation_id: Some("corr-1".into()),
            reply_to: Some("replies".into()),
            expiration: Some("60000".into()),
            message_id: Some("own-id".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("order.created".into()),
            user_id: Some("guest".into()),
            app_id: Some("warren".into()),
            headers: vec![],
        },
        body: Bytes::from_static(&[0, 1, 2, 255, 254, b'{', b'"']),
    };
    full.properties.set_header(
        "traceparent",
        HeaderValue::String("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    );
    full.properties.set_header(
        "nested",
        HeaderValue::Table(vec![
            ("f".into(), HeaderValue::F64(-0.1)),
            (
                "d".into(),
                HeaderValue::Decimal {
                    scale: 2,
                    value: 12345,
                },
            ),
            (
                "b".into(),
                HeaderValue::Bytes(Bytes::from_static(&[0, 200])),
            ),
            (
                "a".into(),
                HeaderValue::Array(vec![HeaderValue::Void, HeaderValue::I8(-3)]),
            ),
        ]),
    );
    let mut anonymous = OutboundMessage::new("", "q", Bytes::from_static(b"no id"));
    anonymous.properties.timestamp = Some(1);

    run.handle.append(full.clone()).await.unwrap();
    let anon_id = run.handle.append(anonymous.clone()).await.unwrap();

    let got = Arc::new(Mutex::new(Vec::new()));
    let publisher = {
        let got = got.clone();
        FnPublisher(move |m: OutboundMessage| {
            let got = got.clone();
            async move {
                got.lock().unwrap().push(m);
                Ok::<(), String>(())
            }
        })
    };
    let (drainer, _control) = Drainer::new(drain_cfg(), &run.handle, publisher).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(drainer.run(cancel.clone()));
    wait::until_true("both drained", Duration::from_secs(10), || async {
        got.lock().unwrap().len() == 2
    })
    .await
    .unwrap();
    let got = got.lock().unwrap().clone();
    assert_eq!(
        got[0], full,
        "every property, header and body byte comes back"
    );
    anonymous.properties.message_id = Some(anon_id.id.to_string());
    assert_eq!(
        got[1], anonymous,
        "a message without id gets the entry id as message_id"
    );

    cancel.cancel();
    task.await.unwrap();
    run.stop().await;
    cleanup(&key).await;
}

/// Slow is not failed: a window whose tail is confirmed long after the
/// stall timeout is waited for while confirms keep coming (each entry
/// published once); a confirm that never comes stops the pass after the
/// stall timeout and the drainer republishes from that entry.
/// Append `seqs`, drain them through `publisher` (a fresh drainer with
/// `cfg`) until the stream is empty, and return what was published, in
/// order.
async fn drain_through(
    run: &super::Running,
    cfg: &DrainerConfig,
    seqs: std::ops::Range<u64>,
    publisher: PacedConfirms,
) -> Vec<u64> {
    for n in seqs {
        run.handle.append(message(n)).await.unwrap();
    }
    let sent = publisher.sent.clone();
    let (drainer, _control) = Drainer::new(cfg.clone(), &run.handle, publisher).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(drainer.run(cancel.clone()));
    let key = run.handle.stream_key().to_owned();
    wait::until_true("spool drained", Duration::from_secs(20), || async {
        xlen(PLAIN_URL, &key).await == 0
    })
    .await
    .unwrap();
    cancel.cancel();
    task.await.unwrap();
    sent.lock().unwrap().clone()
}

fn paced(pace_ms: u64, hang: Hang) -> PacedConfirms {
    PacedConfirms::new(Duration::from_millis(pace_ms), hang, Arc::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_is_waited_for_and_a_stalled_one_given_up() {
    let run = start(plain_cfg("drain-slow")).await;
    let key = run.handle.stream_key().to_owned();
    let cfg = DrainerConfig {
        stall_timeout_ms: 150,
        ..drain_cfg()
    };

    // 25 ms a confirm and a window of 16: the last of a window waits
    // ~400 ms, well past the 150 ms stall timeout.
    assert_eq!(
        drain_through(&run, &cfg, 0..64, paced(25, Hang::Never)).await,
        (0..64).collect::<Vec<_>>(),
        "each entry published once, in order"
    );

    // Entry 70's confirm never comes: after 150 ms without progress the
    // pass stops and everything from 70 on is published again.
    let sent = drain_through(&run, &cfg, 64..80, paced(5, Hang::FirstOf(vec![70]))).await;
    let restart = sent.iter().rposition(|s| *s == 70).unwrap();
    assert_eq!(sent[..restart], (64..80).collect::<Vec<_>>()[..restart]);
    assert_eq!(sent[restart..], (70..80).collect::<Vec<_>>(), "{sent:?}");
    assert_eq!(run.handle.status().await.drained, 80);

    run.stop().await;
    cleanup(&key).await;
}

/// A broker that keeps stalling costs fewer duplicates each time: every
/// failed pass halves the window (what a stall can leave routed but
/// unconfirmed, to be published again), and a full window of confirms in a
/// row doubles it back. Here every 8th of the first 300 publishes hangs:
/// a pass confirms at most 7 before it stalls, with up to a window in
/// flight behind the hung one. Measured: 160 repeats for 200 entries (the
/// same every run); with the window fixed at 16, 304.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failed_pass_halves_the_window_and_confirms_grow_it_back() {
    let run = start(plain_cfg("drain-shrink")).await;
    let key = run.handle.stream_key().to_owned();
    let cfg = DrainerConfig {
        stall_timeout_ms: 50,
        ..drain_cfg()
    };
    let hang = Hang::Every {
        every: 8,
        until: 300,
    };
    let sent = drain_through(&run, &cfg, 0..200, paced(1, hang)).await;
    let status = run.handle.status().await;
    let firsts: Vec<u64> = {
        let mut seen = std::collections::HashSet::new();
        sent.iter().copied().filter(|s| seen.insert(*s)).collect()
    };
    assert_eq!(firsts, (0..200).collect::<Vec<_>>(), "first sends in order");
    assert_eq!(status.drained, 200);
    assert_eq!(status.drain.republished, sent.len() as u64);
    // Two hung publishes can fall in one pass: one pause for both.
    let hung = (1..=sent.len()).filter(|c| *c < 300 && c % 8 == 0).count();
    assert!(
        status.drain.pauses > 0 && status.drain.pauses <= hung as u64,
        "{hung} hung, {:?}",
        status.drain
    );
    let repeats = sent.len() - 200;
    assert!(repeats <= 200, "{repeats} repeats for 200 entries");
    assert_eq!(status.drain.window, 16, "grown back: {:?}", status.drain);

    run.stop().await;
    cleanup(&key).await;
}

/// While the broker blocks publishing (`connection.blocked`), no confirm
/// arrives for many stall timeouts; that is not a stall: the pass goes on
/// when the alarm clears, and nothing is published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_broker_is_waited_for() {
    let run = start(plain_cfg("drain-blocked")).await;
    let key = run.handle.stream_key().to_owned();
    let cfg = DrainerConfig {
        stall_timeout_ms: 100,
        ..drain_cfg()
    };
    let publisher = paced(1, Hang::Never);
    let blocked = publisher.blocked.clone();
    blocked.store(true, Ordering::SeqCst);
    let unblock = tokio::spawn(async move {
        // Six stall timeouts.
        tokio::time::sleep(Duration::from_millis(600)).await;
        blocked.store(false, Ordering::SeqCst);
    });
    let sent = drain_through(&run, &cfg, 0..50, publisher).await;
    unblock.await.unwrap();
    assert_eq!(sent, (0..50).collect::<Vec<_>>(), "each once, in order");
    let status = run.handle.status().await;
    assert_eq!(status.drain.pauses, 0, "{:?}", status.drain);

    run.stop().await;
    cleanup(&key).await;
}

/// Redis refusing writes for a while mid-drain (`NOREPLICAS`, as when the
/// primary's replicas lag) fails deletes and lease renewals. The drainer
/// stops sending, takes the confirms still in flight, keeps what it could
/// not delete, and deletes that before it reads again: nothing confirmed is
/// published twice. (It used to drop both and republish them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refusing_writes_mid_drain_republishes_nothing() {
    const N: u64 = 400;
    let topo = warren_it::sentinel::Topology::start().await.unwrap();
    let mut spool_cfg = SpoolConfig::sentinel(
        topo.sentinel_urls(),
        topo.master_name.clone(),
        host_id("drain-noreplicas"),
    );
    spool_cfg.status_interval_ms = 100;
    let run = start(spool_cfg).await;
    for n in 0..N {
        run.handle.append(message(n)).await.unwrap();
    }
    let primary = topo.primary_port().await.unwrap();
    let primary_url = format!("redis://127.0.0.1:{primary}");
    let key = run.handle.stream_key().to_owned();

    let publisher = paced(5, Hang::Never);
    let sent = publisher.sent.clone();
    let (drainer, _control) = Drainer::new(drain_cfg(), &run.handle, publisher).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(drainer.run(cancel.clone()));
    wait::until_true("drain under way", Duration::from_secs(20), || async {
        sent.lock().unwrap().len() >= 100
    })
    .await
    .unwrap();

    // More replicas required than exist: every write is refused.
    let mut conn = topo.conn(primary).await.unwrap();
    let before: (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("min-replicas-to-write")
        .query_async(&mut conn)
        .await
        .unwrap();
    let set = |value: String| {
        let mut conn = conn.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("min-replicas-to-write")
                .arg(value)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    set("3".to_owned()).await;
    wait::until_true("a drain pass failed", Duration::from_secs(20), || async {
        run.handle.status().await.drain.pauses > 0
    })
    .await
    .unwrap();
    set(before.1).await;

    wait::until_true("spool drained", Duration::from_secs(30), || async {
        xlen(&primary_url, &key).await == 0
    })
    .await
    .unwrap();
    cancel.cancel();
    task.await.unwrap();
    let status = run.handle.status().await;
    assert_eq!(
        *sent.lock().unwrap(),
        (0..N).collect::<Vec<_>>(),
        "each entry published once, in order: {:?}",
        status.drain
    );
    assert!(
        status
            .drain
            .last_failure
            .as_deref()
            .is_some_and(|f| f.contains("replicas")),
        "{:?}",
        status.drain
    );
    assert_eq!(status.drained, N);
    run.stop().await;
}

/// Entries Warren did not write, which do not decode, are moved aside; the
/// byte counter never goes below zero (the moved entries were never
/// counted), and a counter already below zero (left by an older version)
/// is read as empty: no refresh fails, no Redis connection is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_moved_aside_and_the_connection_kept() {
    let run = start(plain_cfg("malformed")).await;
    let key = run.handle.stream_key().to_owned();
    let client = redis::Client::open(PLAIN_URL).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    run.handle.append(message(1)).await.unwrap();
    for i in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("id")
            .arg(format!("hand-{i}"))
            .arg("m")
            .arg(format!("not json {i}"))
            .query_async(&mut c)
            .await
            .unwrap();
    }
    run.handle.append(message(2)).await.unwrap();
    let generation = run.handle.status().await.primary_generation;

    let got = Arc::new(Mutex::new(Vec::new()));
    let publisher = {
        let got = got.clone();
        FnPublisher(move |m: OutboundMessage| {
            let got = got.clone();
            async move {
                got.lock().unwrap().push(seq_of(&m));
                Ok::<(), String>(())
            }
        })
    };
    let (drainer, _control) = Drainer::new(drain_cfg(), &run.handle, publisher).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(drainer.run(cancel.clone()));
    wait::until_true("drained", Duration::from_secs(10), || async {
        xlen(PLAIN_URL, &key).await == 0
    })
    .await
    .unwrap();
    assert_eq!(*got.lock().unwrap(), vec![1, 2]);
    assert_eq!(xlen(PLAIN_URL, &format!("{key}:corrupt")).await, 3);
    let bytes: i64 = redis::cmd("GET")
        .arg(format!("{key}:bytes"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(bytes >= 0, "byte counter {bytes}");

    // A counter below zero, as a hand edit or an older version left it.
    let _: () = redis::cmd("SET")
        .arg(format!("{key}:bytes"))
        .arg(-100)
        .query_async(&mut c)
        .await
        .unwrap();
    // Twenty status refreshes (every 100 ms) without a reconnect.
    let mut refreshes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = run.handle.subscribe();
    while refreshes < 20 && tokio::time::Instant::now() < deadline {
        if tokio::time::timeout_at(deadline, last.changed())
            .await
            .is_err()
        {
            break;
        }
        let s = last.borrow_and_update().clone();
        assert_eq!(
            s.primary_generation, generation,
            "no Redis reconnect: {:?}",
            s.last_error
        );
        refreshes += 1;
    }
    assert_eq!(refreshes, 20, "the status kept refreshing");
    assert_eq!(run.handle.status().await.bytes, 0);

    cancel.cancel();
    task.await.unwrap();
    run.stop().await;
    cleanup(&key).await;
}
