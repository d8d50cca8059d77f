//! The chaos gauntlet, deduplicated: Warren runs as a process (`warren
//! run`) with `tally` on a route deduplicated by message id, against a
//! private RabbitMQ node behind the fault proxy and a Redis Sentinel
//! topology that holds the spool, the key-value state and the journal.
//! A publisher sends N messages, each with a message id of its own (a
//! chunk republished after a broker fault repeats its ids), and `tally`
//! counts each message under a key of its own and publishes one output.
//! The faults, on a schedule: forced connection closes, a blackhole of
//! several heartbeats, `kill -9` of the broker and a restart, `kill -9` of
//! the Redis primary and a manual `SENTINEL FAILOVER` while outputs are
//! spooled, a hot reload of `tally` (its component with a custom section
//! added: new bytes, so Warren compiles it and swaps it in on the live
//! route; the route's settings cannot change in a reload), and Warren
//! itself killed with `kill -9` mid-stream and started again.
//!
//! At the end every counter is exactly 1 (their sum is N), every message
//! has its output, each output's copies carry one message id and one body
//! (copies on the wire are allowed, effects twice are not), and the run
//! prints the copies and the plugin's invocations beyond N, counted over
//! both Warren processes: a delivery runs twice only when the first
//! process died between invoking `tally` and writing the journal record.
//!
//! N defaults to 5,000; `WARREN_DEDUP_GAUNTLET_N=50000` makes it a soak.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use warren_it::broker::{Broker, Got, unique};
use warren_it::config::WarrenToml;
use warren_it::gauntlet::{self, Hold, new_primary_then_pass, until_published};
use warren_it::http::{metric_sum, metrics, request};
use warren_it::plugins::wasm;
use warren_it::proxy::{Mode, Proxy};
use warren_it::rabbit::{RabbitNode, Version};
use warren_it::sentinel::Topology;
use warren_it::tally::Load;
use warren_it::wait;

/// Deliveries one Warren takes from the input queue at once: at most this
/// many are in flight when it is killed.
const PREFETCH: u64 = 200;

/// One `warren run` process. Killed when dropped; a failing test prints
/// the end of its log.
struct Warren {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl Warren {
    fn start(config: &Path, admin: SocketAddr, log: PathBuf) -> Warren {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Warren { child, admin, log }
    }

    /// Wait (up to 2 minutes) until `/ready` answers 200.
    async fn until_ready(&self, what: &str) {
        let ready = wait::until_true(what, Duration::from_secs(120), || async {
            request(self.admin, "GET", "/ready", &[], None)
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
        if let Err(e) = ready {
            let last = request(self.admin, "GET", "/ready", &[], None).await;
            panic!("{e}; last /ready: {:?}", last.map(|r| r.text()));
        }
    }

    async fn metrics(&self) -> String {
        metrics(self.admin).await.unwrap()
    }

    /// `kill -9`, and reap it.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and wait (up to 60 s) until it has exited.
    async fn stop(&mut self) {
        warren_it::process::signal(&self.child, "TERM").unwrap();
        let child = &mut self.child;
        wait::until_true("warren exits", Duration::from_secs(60), || {
            let exited = child.try_wait().ok().flatten().is_some();
            async move { exited }
        })
        .await
        .unwrap();
    }
}

impl Drop for Warren {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            eprintln!("--- end of {}:\n{tail}", self.log.display());
        }
    }
}

/// `tally.wasm` with a custom section added: the same plugin as a new
/// component (other bytes), which a reload compiles and swaps in.
fn with_custom_section(wasm: &[u8], name: &str) -> Vec<u8> {
    // Section id 0, its size, the name's length and the name: both sizes
    // fit one LEB128 byte.
    assert!(name.len() < 127, "a short section name");
    let mut out = wasm.to_vec();
    out.extend([0, name.len() as u8 + 1, name.len() as u8]);
    out.extend_from_slice(name.as_bytes());
    out
}

/// The queues and names of one run.
struct Names {
    input: String,
    out: String,
    sink: String,
    load: Load,
}

impl Names {
    /// Message `i`: the body `tally` counts under key `load.key(i)`, and
    /// a message id of its own.
    fn message(&self, i: u64) -> gauntlet::Outgoing {
        let body = serde_json::json!({ "key": self.load.key(i as usize) }).to_string();
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{}-{i}", self.load.run).into());
        (self.input.clone(), body.into_bytes(), props)
    }
}

fn config(redis: &Topology, proxy: &Proxy, dir: &Path, admin: SocketAddr, n: &Names) -> PathBuf {
    WarrenToml::new()
        .amqp_url(&proxy.amqp_url())
        .set("amqp.heartbeat-secs", 1)
        .set("amqp.confirm-timeout-ms", 1000)
        .set("amqp.connect-timeout-ms", 1000)
        .set("amqp.backoff-max-ms", 500)
        .set("amqp.consumer-check-ms", 1000)
        .set("spool.sentinels", redis.sentinel_urls())
        .set("spool.master-name", redis.master_name.as_str())
        .stream_key(&unique("g-spool"))
        .plugins_dir(dir)
        .retry_exchange("g.retry")
        .dead_letters("g.dlx", "g.dlq")
        .grace_period_ms(15_000)
        .admin_bind(admin)
        .merge(&format!(
            r#"
            [plugin.tally]
            subscriptions = [{{ queue = "{}", prefetch = {PREFETCH} }}]
            config = {{ routing-key = "{}" }}
            dedup = {{ key = "message-id", window = "1h" }}
            "#,
            n.input, n.out
        ))
        .write_in(dir)
        .unwrap()
}

/// Blackhole the proxy and publish `SPOOLED` messages to `sink` through
/// Warren's `POST /publish` until each is in the spool. (Outputs alone may
/// not reach the spool: a consumer that has caught up has nothing in
/// flight when the blackhole starts.) Returns the bodies published.
async fn spool_some(proxy: &Proxy, warren: &Warren, sink: &str, round: u32) -> Vec<Vec<u8>> {
    const SPOOLED: usize = 100;
    proxy.set_mode(Mode::Blackhole);
    let mut publishes = tokio::task::JoinSet::new();
    let bodies: Vec<Vec<u8>> = (0..SPOOLED)
        .map(|i| format!("spooled-{round}-{i}").into_bytes())
        .collect();
    for body in &bodies {
        let req = serde_json::json!({
            "routing_key": sink,
            "body": String::from_utf8_lossy(body),
        })
        .to_string();
        let admin = warren.admin;
        publishes.spawn(async move {
            let headers = [("content-type", "application/json")];
            request(admin, "POST", "/publish", &headers, Some(req.as_bytes())).await
        });
    }
    while let Some(r) = publishes.join_next().await {
        let r = r.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let placement = r.json().unwrap()["placement"].clone();
        assert_eq!(placement, "spool", "the spool takes what the broker cannot");
    }
    bodies
}

/// The Redis faults: `kill -9` of the primary, then a `SENTINEL
/// FAILOVER`, each while outputs wait in the spool.
async fn redis_faults(
    (redis, proxy, warren): (&Topology, &Proxy, &Warren),
    sink: &str,
    published: &AtomicU64,
    (step, faults): (u64, &mut Vec<&str>),
) -> Vec<Vec<u8>> {
    until_published(published, 4 * step).await.unwrap();
    let mut sunk = spool_some(proxy, warren, sink, 1).await;
    let old = redis.primary_port().await.unwrap();
    redis.kill9(old).await.unwrap();
    new_primary_then_pass(redis, old, proxy).await.unwrap();
    redis.restart_node(old).await.unwrap();
    redis
        .wait_rejoined(old, Duration::from_secs(60))
        .await
        .unwrap();
    faults.push("kill -9 redis primary while spooling");
    warren.until_ready("ready after redis primary kill").await;

    until_published(published, 5 * step).await.unwrap();
    sunk.extend(spool_some(proxy, warren, sink, 2).await);
    let old = redis.primary_port().await.unwrap();
    redis.failover().await.unwrap();
    new_primary_then_pass(redis, old, proxy).await.unwrap();
    faults.push("SENTINEL FAILOVER while spooling");
    warren.until_ready("ready after sentinel failover").await;
    sunk
}

/// Replace `tally.wasm` in `dir` with the same plugin as a new component
/// and reload; returns the first process's invocations at the reload.
async fn hot_reload(dir: &Path, warren: &Warren, queue: &str) -> f64 {
    let v1 = std::fs::read(dir.join("tally.wasm")).unwrap();
    let tmp = dir.join("tally.wasm.tmp");
    std::fs::write(&tmp, with_custom_section(&v1, "warren-gauntlet-reload")).unwrap();
    std::fs::rename(&tmp, dir.join("tally.wasm")).unwrap();
    let r = request(warren.admin, "POST", "/plugins/reload", &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json().unwrap();
    let replaced = report["replaced"].as_array().cloned().unwrap_or_default();
    assert!(
        replaced.iter().any(|p| p["name"] == "tally"),
        "tally was not replaced: {report}"
    );
    invocations(&warren.metrics().await, queue)
}

/// Times the plugin ran for deliveries of `queue`, whatever the outcome.
fn invocations(metrics: &str, queue: &str) -> f64 {
    metric_sum(metrics, "warren_handle_seconds_count", &[("queue", queue)])
}

/// What one process counted on the deduplicated route.
#[derive(Debug, Default, Clone, Copy)]
struct Counted {
    invoked: f64,
    replayed: f64,
    skipped: f64,
    spooled: f64,
}

impl Counted {
    fn of(metrics: &str, queue: &str) -> Counted {
        let q = [("queue", queue)];
        Counted {
            invoked: invocations(metrics, queue),
            replayed: metric_sum(metrics, "warren_dedup_replayed_total", &q),
            skipped: metric_sum(metrics, "warren_dedup_skipped_total", &q),
            spooled: metric_sum(metrics, "warren_spool_appended_total", &[]),
        }
    }
}

/// Collect `out` until an output of every key of `load` arrived (5
/// minutes at most), then until nothing more comes for 2 s once the
/// spool is empty: every copy of every output.
async fn outputs(check: &Broker, out: &str, load: &Load, warren: &Warren) -> Vec<Got> {
    let want: BTreeSet<String> = (0..load.n).map(|i| load.key(i)).collect();
    let mut got: Vec<Got> = Vec::new();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.len() < want.len() && Instant::now() < deadline {
        let batch = check
            .collect(out, want.len() - seen.len(), Duration::from_secs(2))
            .await
            .unwrap();
        seen.extend(batch.iter().filter_map(|g| key_of(g).map(|(k, _)| k)));
        got.extend(batch);
    }
    wait::until_true("the spool drained", Duration::from_secs(120), || async {
        let m = metrics(warren.admin).await.unwrap_or_default();
        m.contains("warren_spool_depth") && metric_sum(&m, "warren_spool_depth", &[]) == 0.0
    })
    .await
    .unwrap();
    loop {
        let more = check
            .collect(out, 1000, Duration::from_secs(2))
            .await
            .unwrap();
        if more.is_empty() {
            return got;
        }
        got.extend(more);
    }
}

/// An output's key and `seen` count.
fn key_of(g: &Got) -> Option<(String, i64)> {
    let v: serde_json::Value = serde_json::from_slice(&g.body).ok()?;
    Some((v["key"].as_str()?.to_owned(), v["seen"].as_i64()?))
}

/// What the faults run against.
struct Bench {
    rabbit: RabbitNode,
    redis: Topology,
    proxy: Proxy,
    /// Warren's configuration file, for both processes.
    config: PathBuf,
    published: Arc<AtomicU64>,
    /// A ninth of the messages: fault `k` lands once `k` steps are out.
    step: u64,
    faults: Vec<&'static str>,
}

impl Bench {
    /// The broker faults: forced close, blackhole, `kill -9` + restart.
    async fn broker_faults(&mut self, warren: &Warren) {
        until_published(&self.published, self.step).await.unwrap();
        self.rabbit.close_all_connections("gauntlet").await.unwrap();
        self.faults.push("close_all_connections");
        warren.until_ready("ready after forced close").await;

        until_published(&self.published, 2 * self.step)
            .await
            .unwrap();
        self.proxy.set_mode(Mode::Blackhole);
        tokio::time::sleep(Duration::from_secs(4)).await;
        self.proxy.set_mode(Mode::Pass);
        self.faults.push("blackhole 4 s");
        warren.until_ready("ready after blackhole").await;

        until_published(&self.published, 3 * self.step)
            .await
            .unwrap();
        self.rabbit.kill9().await.unwrap();
        self.rabbit.spawn_again().unwrap();
        self.rabbit.wait_booted().await.unwrap();
        self.faults.push("kill -9 broker + restart");
        warren.until_ready("ready after broker restart").await;
    }

    /// Once the reloaded `tally` has served deliveries (more than
    /// `at_reload` invocations) and 8 steps are out, `kill -9` the first
    /// Warren mid-stream and start the second on the same configuration.
    /// Returns the second and what the first counted just before it died.
    async fn kill_warren(
        &mut self,
        mut first: Warren,
        log: PathBuf,
        (queue, at_reload): (&str, f64),
    ) -> (Warren, Counted, f64) {
        until_published(&self.published, 8 * self.step)
            .await
            .unwrap();
        let reloaded = wait::until(
            "the reloaded tally handles deliveries",
            Duration::from_secs(120),
            || async {
                let m = metrics(first.admin).await.ok()?;
                (invocations(&m, queue) > at_reload).then_some(())
            },
        )
        .await;
        reloaded.unwrap();
        // Scraped as close to the kill as the test can: an invocation
        // that ends in between is counted by neither process.
        let last = first.metrics().await;
        first.kill9();
        let counted = Counted::of(&last, queue);
        let second = Warren::start(&self.config, first.admin, log);
        drop(first);
        second.until_ready("ready after kill -9 of warren").await;
        self.faults.push("kill -9 warren + restart");
        (second, counted, counted.invoked - at_reload)
    }
}

/// A fresh broker, Sentinel topology and proxy; the first Warren ready.
async fn setup(version: Version, n: u64) -> (Bench, Arc<Names>, tempfile::TempDir, Warren) {
    let (rabbit, redis) = tokio::join!(RabbitNode::start_version(version, ""), Topology::start());
    let (rabbit, redis) = (rabbit.unwrap(), redis.unwrap());
    let proxy = Proxy::start(rabbit.addr()).await.unwrap();
    let names = Arc::new(Names {
        input: unique("g-tally-in"),
        out: unique("g-tally-out"),
        sink: unique("g-sink"),
        load: Load::new(n as usize, None),
    });
    let broker = Broker::connect(&rabbit.amqp_url()).await.unwrap();
    broker.declare_queue(&names.out).await.unwrap();
    broker.declare_queue(&names.sink).await.unwrap();
    drop(broker);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("tally").unwrap(), dir.path().join("tally.wasm")).unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], warren_it::ports::free_port().unwrap()));
    let config = config(&redis, &proxy, dir.path(), admin, &names);
    let first = Warren::start(&config, admin, dir.path().join("warren-1.log"));
    first.until_ready("warren ready").await;
    let bench = Bench {
        rabbit,
        redis,
        proxy,
        config,
        published: Arc::new(AtomicU64::new(0)),
        step: n / 9,
        faults: Vec::new(),
    };
    (bench, names, dir, first)
}

async fn gauntlet(version: Version) {
    let _turn = gauntlet::one_at_a_time().await.unwrap();
    let n = gauntlet::messages("WARREN_DEDUP_GAUNTLET_N", 5_000);
    let started = Instant::now();
    let (mut bench, names, dir, first) = setup(version, n).await;
    let (release, hold) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(gauntlet::publish_resilient(
        bench.rabbit.amqp_url(),
        n,
        {
            let names = names.clone();
            move |i| names.message(i)
        },
        bench.published.clone(),
        Hold {
            at: 7 * bench.step,
            release: hold,
        },
    ));
    bench.broker_faults(&first).await;
    let sunk = redis_faults(
        (&bench.redis, &bench.proxy, &first),
        &names.sink,
        &bench.published,
        (bench.step, &mut bench.faults),
    )
    .await;
    until_published(&bench.published, 6 * bench.step)
        .await
        .unwrap();
    let at_reload = hot_reload(dir.path(), &first, &names.input).await;
    bench.faults.push("hot reload of tally (a new component)");
    release.send_replace(true);
    let log = dir.path().join("warren-2.log");
    let (second, first_counted, after_reload) = bench
        .kill_warren(first, log, (&names.input, at_reload))
        .await;
    publisher.await.unwrap();
    let run = Run {
        n,
        first: first_counted,
        handled_after_reload: after_reload,
        sunk,
        publishing: started.elapsed(),
        started,
    };
    let seen = gather(&bench, &names, second, &run.sunk).await;
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        report(&bench, &run, &seen).as_bytes(),
    );
    assert_effectively_once(&names, &run, &seen);
}

/// What the run measured before the checks.
struct Run {
    n: u64,
    /// The first process, scraped just before its kill.
    first: Counted,
    /// Deliveries the reloaded component ran in the first process.
    handled_after_reload: f64,
    /// Bodies published through the spool.
    sunk: Vec<Vec<u8>>,
    publishing: Duration,
    started: Instant,
}

/// What the end of the run shows.
struct Seen {
    /// Every copy of every output.
    got: Vec<Got>,
    sink_missing: usize,
    /// The second process, at the end.
    second: Counted,
    unacked: u32,
    dead: u32,
    /// `tally`'s counters, by key.
    counts: BTreeMap<String, i64>,
}

impl Seen {
    /// The message ids of each key's outputs.
    fn ids_of_key(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for g in &self.got {
            if let Some((key, _)) = key_of(g) {
                out.entry(key).or_default().insert(id_of(g));
            }
        }
        out
    }

    /// The bodies of each message id's copies.
    fn bodies_of_id(&self) -> BTreeMap<String, BTreeSet<Vec<u8>>> {
        let mut out: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
        for g in &self.got {
            out.entry(id_of(g)).or_default().insert(g.body.clone());
        }
        out
    }

    /// Output copies beyond one per message id.
    fn same_id_copies(&self) -> usize {
        self.got.len() - self.bodies_of_id().len()
    }

    fn invoked(&self, run: &Run) -> f64 {
        run.first.invoked + self.second.invoked
    }
}

fn id_of(g: &Got) -> String {
    g.properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// Outputs, counters and queues once the stream is over; stops the second
/// Warren.
async fn gather(bench: &Bench, names: &Names, mut second: Warren, sunk: &[Vec<u8>]) -> Seen {
    let check = Broker::connect(&bench.rabbit.amqp_url()).await.unwrap();
    let got = outputs(&check, &names.out, &names.load, &second).await;
    let (_, sink_missing) = check
        .collect_until_complete(
            &names.sink,
            &sunk.iter().cloned().collect(),
            Duration::from_secs(120),
        )
        .await
        .unwrap();
    let second_counted = Counted::of(&second.metrics().await, &names.input);
    second.stop().await;
    let primary = bench.redis.primary_port().await.unwrap();
    let counts = names
        .load
        .counts(&format!("redis://127.0.0.1:{primary}"))
        .await
        .unwrap();
    Seen {
        got,
        sink_missing: sink_missing.len(),
        second: second_counted,
        unacked: check.message_count(&names.input).await.unwrap(),
        dead: check.message_count("g.dlq").await.unwrap_or(0),
        counts,
    }
}

/// The summary lines (for stderr, not `println!`: the harness captures
/// the print macros of passing tests, and CI's log must show them).
fn report(bench: &Bench, run: &Run, seen: &Seen) -> String {
    let extra = seen.invoked(run) - run.n as f64;
    format!(
        "dedup gauntlet: messages={} faults={} counter_sum={} counters={} outputs={} output_copies={} same_id_copies={} invocations={} (first {} + second {}) invocations_minus_messages={extra} replayed={} skipped={} spooled={} unacked={} dead_lettered={} sink_missing={} handled_by_reloaded={} took={:.0}s (publishing {:.0}s)\n\
         dedup gauntlet faults: {}\n\
         dedup gauntlet: invocations - messages = {extra}: deliveries the first Warren had run but not yet journalled when it was killed (at most {PREFETCH} in flight), which the second ran again; the {} it had journalled but not finished were replayed without running tally; an invocation that ended between the last scrape and the kill is counted by neither\n",
        run.n,
        bench.faults.len(),
        seen.counts.values().sum::<i64>(),
        seen.counts.len(),
        seen.ids_of_key().len(),
        seen.got.len(),
        seen.same_id_copies(),
        seen.invoked(run),
        run.first.invoked,
        seen.second.invoked,
        run.first.replayed + seen.second.replayed,
        run.first.skipped + seen.second.skipped,
        run.first.spooled + seen.second.spooled,
        seen.unacked,
        seen.dead,
        seen.sink_missing,
        run.handled_after_reload,
        run.started.elapsed().as_secs_f64(),
        run.publishing.as_secs_f64(),
        bench.faults.join(", "),
        seen.second.replayed,
    )
}

/// Effects once, outputs at least once, nothing left behind.
fn assert_effectively_once(names: &Names, run: &Run, seen: &Seen) {
    let n = run.n;
    let ids_of_key = seen.ids_of_key();
    let missing: Vec<String> = (0..names.load.n)
        .map(|i| names.load.key(i))
        .filter(|k| !ids_of_key.contains_key(k))
        .take(3)
        .collect();
    assert!(missing.is_empty(), "outputs missing, e.g. {missing:?}");
    assert_eq!(
        seen.counts.values().sum::<i64>(),
        n as i64,
        "the counters sum to the messages"
    );
    assert_eq!(seen.counts.len() as u64, n, "a counter per message");
    assert!(
        seen.counts.values().all(|c| *c == 1),
        "a message counted twice"
    );
    let split: Vec<_> = ids_of_key
        .iter()
        .filter(|(_, ids)| ids.len() != 1)
        .take(3)
        .collect();
    assert!(
        split.is_empty(),
        "an output under two message ids: {split:?}"
    );
    let bodies = seen.bodies_of_id();
    let differing: Vec<_> = bodies
        .iter()
        .filter(|(_, b)| b.len() != 1)
        .take(3)
        .collect();
    assert!(
        differing.is_empty(),
        "copies of one id differ: {differing:?}"
    );
    assert!(
        seen.got
            .iter()
            .filter_map(key_of)
            .all(|(_, count)| count == 1),
        "an output saw its own increment applied before it ran"
    );
    assert_eq!(seen.unacked, 0, "inputs left unacked");
    assert_eq!(seen.dead, 0, "nothing should be dead-lettered");
    assert_eq!(seen.sink_missing, 0, "spooled messages lost");
    assert!(run.first.spooled > 0.0, "nothing went through the spool");
    let extra = seen.invoked(run) - n as f64;
    assert!(
        extra <= PREFETCH as f64,
        "more invocations beyond the messages than one kill explains: {extra}"
    );
}

mod dedup_gauntlet {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rabbitmq_3_10() {
        super::gauntlet(Version::V3_10).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rabbitmq_4_0() {
        super::gauntlet(Version::V4_0).await
    }
}
