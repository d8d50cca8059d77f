//! The drainer wakes with the session: at the shipped defaults, with the
//! spool holding entries (and the drainer deep in its backoff) when the
//! broker comes back, the first new output reaches its queue as soon as
//! the reconnect and the drain allow, not after the rest of the backoff.

use std::time::{Duration, Instant};

use warren::message::OutboundMessage;
use warren_it::broker::unique;
use warren_it::config::WarrenToml;
use warren_it::proxy::Mode;
use warren_it::rabbit::Shared;
use warren_it::wait;

use crate::outage::broker_behind_proxy;

/// Runs per version.
const RUNS: usize = 10;

each_version!(a_new_session_ends_the_drain_pause);
async fn a_new_session_ends_the_drain_pause(target: Shared) {
    let (broker, proxy) = broker_behind_proxy(&target).await;
    let (input, output, dlq) = (unique("wake-in"), unique("wake-out"), unique("wake-dlq"));
    broker.declare_queue(&output).await.unwrap();
    let dir = crate::host::plugins_dir(&[("echo", "echo")]).unwrap();
    // Shipped defaults but for where things are (and a free admin port).
    let config = crate::host::parse(
        &WarrenToml::isolated(dir.path())
            .amqp_url(&proxy.amqp_url())
            .dead_letters(&unique("wake-dlx"), &dlq)
            .admin_bind("127.0.0.1:0")
            .merge(&format!(
                r#"
                [plugin.echo]
                subscriptions = [{{ queue = "{input}" }}]
                config = {{ routing-key = "{output}" }}
                "#
            )),
    );
    let backoff_max = Duration::from_millis(config.amqp.backoff_max_ms);
    let (app, handle) = crate::host::start_ready(config).await.unwrap();
    let mut figures = Vec::new();
    for run in 0..RUNS {
        // A broker goes down after a session that ran, as a restart after
        // service does: at least the longest reconnect delay, after which a
        // lost session starts the reconnect backoff over. (A session cut
        // sooner is a flapping broker, whose reconnects the grown backoff
        // spaces on purpose.)
        wait::until_true("session has run", Duration::from_secs(30), || {
            let s = handle.amqp.status_now();
            async move {
                s.is_running()
                    && s.session_started
                        .is_some_and(|t| t.elapsed() >= backoff_max)
            }
        })
        .await
        .unwrap();
        // Down as a dead node is: its port refuses connections.
        proxy.set_mode(Mode::Closed);
        wait::until_true("connection lost", Duration::from_secs(30), || {
            let h = handle.clone();
            async move { !h.amqp.status_now().is_connected() }
        })
        .await
        .unwrap();
        // Entries in the spool, and the drainer failing on them until its
        // pause is long: three failed passes.
        let pauses = handle.spool.status().await.drain.pauses;
        for i in 0..5 {
            let m = OutboundMessage::new("", output.as_str(), format!("spooled-{run}-{i}"));
            handle.spool.append(m).await.unwrap();
        }
        wait::until_true("drainer backing off", Duration::from_secs(60), || {
            let h = handle.clone();
            async move { h.spool.status().await.drain.pauses >= pauses + 3 }
        })
        .await
        .unwrap();
        let marker = format!("new-{run}");
        broker.publish_all("", &input, [&marker]).await.unwrap();
        let accepted = proxy.accepted();
        proxy.set_mode(Mode::Pass);
        let back = Instant::now();
        // When the new session runs: the reconnect's share of the figure.
        let session = {
            let mut status = handle.amqp.status();
            tokio::spawn(async move {
                while !status.borrow_and_update().is_running() {
                    if status.changed().await.is_err() {
                        break;
                    }
                }
                back.elapsed()
            })
        };
        let want = [marker.clone().into_bytes()].into_iter().collect();
        let (connect_at, got) = tokio::join!(
            async {
                // The first connect the proxy takes once it listens again.
                while proxy.accepted() == accepted {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                back.elapsed()
            },
            broker.collect_until_complete(&output, &want, Duration::from_secs(60))
        );
        let got = got.unwrap();
        assert!(got.1.is_empty(), "run {run}: the new output never came");
        figures.push((back.elapsed(), session.await.unwrap(), connect_at));
        wait::until_true("spool drained", Duration::from_secs(30), || {
            let h = handle.clone();
            async move { h.spool.status().await.depth == 0 }
        })
        .await
        .unwrap();
        // The spooled entries came first (order), then the new output.
        let spooled = broker
            .collect(&output, 100, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(spooled.iter().all(|g| g.body.starts_with(b"spooled-")));
    }
    let ms: Vec<(u128, u128, u128)> = figures
        .iter()
        .map(|(o, s, c)| (o.as_millis(), s.as_millis(), c.as_millis()))
        .collect();
    println!(
        "{:?}: broker back → (first new output, session running, first connect), ms, {RUNS} runs: {ms:?}",
        target.version
    );
    // The issue's target, in every run: from the broker back, the first
    // reconnect comes within `refused-retry-ms` (the first delay after the
    // lost session is at most `backoff-initial-ms`, and every connect
    // refused meanwhile is retried within `refused-retry-ms`), the session
    // runs and the new session ends the drainer's pause.
    for (run, (d, _, _)) in figures.iter().enumerate() {
        assert!(*d <= Duration::from_secs(1), "run {run}: {d:?}");
    }
    app.shutdown().await;
    for q in [&input, &output, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}
