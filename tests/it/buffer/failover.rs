//! Following the primary through failures, without losing an acknowledged
//! append: `kill -9` of the primary, a manual `SENTINEL FAILOVER`, and both
//! replicas gone. The kill, manual-failover and no-replica tests run on the
//! plain topology and on the secured one (TLS, passwords, an ACL user).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warren::buffer::{SpoolConfig, SpoolHandle};
use warren_it::sentinel::Topology;
use warren_it::wait;

use super::{host_id, message, missing, spool_config, start, stream_ids};

/// Appenders running flat out, recording what was acknowledged and when.
struct Load {
    acked: Arc<Mutex<Vec<(Instant, String)>>>,
    failed: Arc<AtomicU64>,
    first_error: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(handle: &SpoolHandle, concurrency: usize) -> Load {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let first_error = Arc::new(Mutex::new(None));
        let stop = CancellationToken::new();
        let seq = Arc::new(AtomicU64::new(0));
        let tasks = (0..concurrency)
            .map(|_| {
                let (h, acked, failed, first_error, stop, seq) = (
                    handle.clone(),
                    acked.clone(),
                    failed.clone(),
                    first_error.clone(),
                    stop.clone(),
                    seq.clone(),
                );
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let n = seq.fetch_add(1, Ordering::Relaxed);
                        match h.append(message(n)).await {
                            Ok(id) => acked
                                .lock()
                                .unwrap()
                                .push((Instant::now(), id.id.to_string())),
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                first_error.lock().unwrap().get_or_insert(e.to_string());
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            acked,
            failed,
            first_error,
            stop,
            tasks,
        }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn wait_acked(&self, n: usize, what: &str) {
        wait::until_true(what, Duration::from_secs(40), || async {
            self.acked_count() >= n
        })
        .await
        .unwrap();
    }

    /// Stop; return acknowledged ids and the longest gap between acks.
    async fn finish(self) -> (Vec<String>, Duration, u64, Option<String>) {
        self.stop.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .unwrap()
                .unwrap();
        }
        let mut acked = self.acked.lock().unwrap().clone();
        acked.sort_by_key(|(t, _)| *t);
        let gap = acked
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default();
        (
            acked.into_iter().map(|(_, id)| id).collect(),
            gap,
            self.failed.load(Ordering::Relaxed),
            self.first_error.lock().unwrap().clone(),
        )
    }
}

/// `name::plain` and `name::secured`, each calling `async fn name(topo)`
/// with a topology of that variant.
macro_rules! each_topology {
    ($name:ident) => {
        mod $name {
            use warren_it::sentinel::Topology;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn plain() {
                super::$name(Topology::start().await.unwrap()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn secured() {
                super::$name(Topology::start_secured().await.unwrap()).await
            }
        }
    };
}

each_topology!(kill9_primary_is_followed_and_loses_no_acknowledged_append);
each_topology!(manual_failover_loses_no_acknowledged_append);
each_topology!(both_replicas_stopped_appends_are_refused);

fn sentinel_cfg(topo: &Topology, test: &str) -> SpoolConfig {
    let mut cfg = spool_config(topo, &host_id(test));
    cfg.append_timeout_ms = 500;
    cfg.status_interval_ms = 200;
    cfg
}

async fn kill9_primary_is_followed_and_loses_no_acknowledged_append(topo: Topology) {
    let run = start(sentinel_cfg(&topo, "kill9")).await;
    let key = run.handle.stream_key().to_owned();
    let load = Load::start(&run.handle, 8);
    load.wait_acked(300, "appends before the kill").await;

    let old = topo.primary_port().await.unwrap();
    let killed_at = Instant::now();
    topo.kill9(old).await.unwrap();
    let new = topo
        .wait_new_primary(old, Duration::from_secs(20))
        .await
        .unwrap();
    let promoted_after = killed_at.elapsed();
    let before = load.acked_count();
    load.wait_acked(before + 300, "appends on the new primary")
        .await;
    let recovered_after = killed_at.elapsed();

    let (acked, gap, failed, first_error) = load.finish().await;
    eprintln!(
        "kill -9: promoted after {promoted_after:?}, appends flowing again after <= {recovered_after:?}, \
         longest gap between acks {gap:?}, {} acked, {failed} refused (first: {first_error:?})",
        acked.len()
    );
    assert!(
        failed > 0,
        "appends during the failover gap must fail, not succeed silently"
    );
    assert_none_lost(&topo, new, &key, &acked).await;
    let status = run.handle.status().await;
    assert_eq!(status.primary, Some(format!("127.0.0.1:{new}")));

    // The killed node comes back, Sentinel turns it into a replica, and the
    // spool starts waiting for it too.
    let restarted = Instant::now();
    topo.restart_node(old).await.unwrap();
    topo.wait_rejoined(old, Duration::from_secs(40))
        .await
        .unwrap();
    wait::until_true(
        "spool waits for both replicas",
        Duration::from_secs(10),
        || async { run.handle.status().await.wait_for_replicas == 2 },
    )
    .await
    .unwrap();
    eprintln!(
        "kill -9: restarted node rejoined as a replica after {:?}",
        restarted.elapsed()
    );
    run.handle.append(message(u64::MAX)).await.unwrap();
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_primary_is_followed_and_loses_no_acknowledged_append() {
    let topo = Topology::start().await.unwrap();
    let run = start(sentinel_cfg(&topo, "sigstop")).await;
    let key = run.handle.stream_key().to_owned();
    let load = Load::start(&run.handle, 8);
    load.wait_acked(300, "appends before the freeze").await;

    let old = topo.primary_port().await.unwrap();
    let frozen_at = Instant::now();
    topo.freeze(old).unwrap();
    let new = topo
        .wait_new_primary(old, Duration::from_secs(20))
        .await
        .unwrap();
    let promoted_after = frozen_at.elapsed();
    let before = load.acked_count();
    load.wait_acked(before + 300, "appends on the new primary")
        .await;
    let recovered_after = frozen_at.elapsed();
    // The old primary wakes up still believing it is the primary; Sentinel
    // converts it, discarding anything only it had.
    topo.thaw(old).unwrap();
    wait::until_true(
        "thawed primary converted",
        Duration::from_secs(40),
        || async { topo.role(old).await.ok().as_deref() == Some("slave") },
    )
    .await
    .unwrap();
    let before = load.acked_count();
    load.wait_acked(before + 300, "appends after the conversion")
        .await;

    let (acked, gap, failed, first_error) = load.finish().await;
    eprintln!(
        "SIGSTOP: promoted after {promoted_after:?}, appends flowing again after <= {recovered_after:?}, \
         longest gap between acks {gap:?}, {} acked, {failed} refused (first: {first_error:?})",
        acked.len()
    );
    assert!(
        failed > 0,
        "appends while the primary hangs must fail, not succeed silently"
    );
    let primary = topo.primary_port().await.unwrap();
    assert_none_lost(&topo, primary, &key, &acked).await;
    let _ = new;
    run.stop().await;
}

async fn manual_failover_loses_no_acknowledged_append(topo: Topology) {
    let run = start(sentinel_cfg(&topo, "manual")).await;
    let key = run.handle.stream_key().to_owned();
    let load = Load::start(&run.handle, 8);
    load.wait_acked(300, "appends before the failover").await;

    let old = topo.primary_port().await.unwrap();
    let started = Instant::now();
    topo.failover().await.unwrap();
    let new = topo
        .wait_new_primary(old, Duration::from_secs(20))
        .await
        .unwrap();
    let switched_after = started.elapsed();
    // Keep appending until Sentinel has converted the old primary into a
    // replica of the new one and it has resynchronised: only then would
    // writes that reached it alone be gone.
    topo.wait_rejoined(old, Duration::from_secs(40))
        .await
        .unwrap();
    let converted_after = started.elapsed();
    let before = load.acked_count();
    load.wait_acked(before + 300, "appends after the conversion")
        .await;

    let (acked, gap, failed, first_error) = load.finish().await;
    eprintln!(
        "SENTINEL FAILOVER: sentinel switched after {switched_after:?}, old primary converted after \
         {converted_after:?}, longest gap between acks {gap:?}, {} acked, {failed} refused (first: {first_error:?})",
        acked.len()
    );
    assert_none_lost(&topo, new, &key, &acked).await;
    let status = run.handle.status().await;
    assert_eq!(status.primary, Some(format!("127.0.0.1:{new}")));
    run.stop().await;
}

async fn both_replicas_stopped_appends_are_refused(topo: Topology) {
    let run = start(sentinel_cfg(&topo, "noreplicas")).await;
    let key = run.handle.stream_key().to_owned();
    run.handle.append(message(0)).await.unwrap();

    let primary = topo.primary_port().await.unwrap();
    for port in topo.data_ports.into_iter().filter(|p| *p != primary) {
        topo.stop_node(port).await.unwrap();
    }
    wait::until_true(
        "primary sees no replica",
        Duration::from_secs(10),
        || async { topo.online_replicas(primary).await.unwrap_or(1) == 0 },
    )
    .await
    .unwrap();

    for n in 1..=5 {
        match run.handle.append(message(n)).await {
            Ok(id) => panic!("append {n} reported durable with no replica: {id:?}"),
            Err(e) => assert!(e.is_not_replicated(), "append {n}: wrong error {e}"),
        }
    }
    let status = run.handle.status().await;
    assert_eq!(status.appended, 1);
    assert!(status.refused >= 5);
    // Nothing beyond the first entry was written durably; at most the
    // refused ones exist on the primary unconfirmed (NOREPLICAS writes none).
    let present = stream_ids(&mut topo.conn(primary).await.unwrap(), &key).await;
    assert_eq!(
        present.len(),
        1,
        "refused appends must not be written: {present:?}"
    );
    run.stop().await;
}

/// Every append that was acknowledged is in the stream on the node at
/// `port` (the primary now).
async fn assert_none_lost(topo: &Topology, port: u16, key: &str, acked: &[String]) {
    let present = stream_ids(&mut topo.conn(port).await.unwrap(), key).await;
    let lost = missing(acked, &present);
    assert!(
        lost.is_empty(),
        "{} acknowledged appends lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
