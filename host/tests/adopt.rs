//! Spool adoption with real processes: host A spools during a broker
//! outage and is killed with `kill -9`; host B, on the same Redis under
//! another host id, leaves A's stream alone while A is restarted before its
//! claim expires, and drains it, in order and complete, once A is gone.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::private_redis::PrivateRedis;
use warren_it::{http, ports, wait};

const SPOOLED: usize = 5_000;
/// Short, so the test does not wait out the 10 s default.
const OWNER_LEASE_MS: u64 = 3_000;

struct Host {
    child: Child,
    admin: SocketAddr,
}

impl Host {
    /// `warren run` with the spool on `redis` under `host_id`, the broker at
    /// `amqp_url`, no plugins.
    async fn start(
        dir: &std::path::Path,
        host_id: &str,
        amqp_url: &str,
        redis: &PrivateRedis,
    ) -> Host {
        let admin: SocketAddr = format!("127.0.0.1:{}", ports::free_port().unwrap())
            .parse()
            .unwrap();
        let plugins = dir.join(format!("plugins-{host_id}"));
        std::fs::create_dir_all(&plugins).unwrap();
        let cfg = WarrenToml::new()
            .amqp_url(amqp_url)
            .set("spool.url", redis.url())
            .set("spool.host-id", host_id)
            .set("spool.owner-lease-ms", OWNER_LEASE_MS as i64)
            .plugins_dir(&plugins)
            .retry_exchange(&unique("adopt-retry"))
            .dead_letters_to(&unique("adopt-dlq"))
            .admin_bind(admin)
            .write(&dir.join(format!("{host_id}.toml")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn,warren::buffer=info")
            .spawn()
            .unwrap();
        let host = Host { child, admin };
        wait::until_true("admin API up", Duration::from_secs(30), || async {
            host.status().await.is_some()
        })
        .await
        .unwrap();
        host
    }

    async fn status(&self) -> Option<serde_json::Value> {
        let r = http::request(self.admin, "GET", "/status", &[], None)
            .await
            .ok()?;
        r.json().ok()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn xlen(redis: &PrivateRedis, key: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut redis.conn().await.unwrap())
        .await
        .unwrap()
}

fn adopted_entries(status: &serde_json::Value) -> u64 {
    status["spool"]["adoption"]["entries"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_spool_is_adopted_in_order_and_an_owner_that_returns_is_left_alone() {
    let redis = PrivateRedis::start().await.unwrap();
    let broker = Broker::shared().await.unwrap();
    let sink = unique("adopt-sink");
    broker.declare_queue(&sink).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on A's broker port: the outage.
    let down = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        ports::free_port().unwrap()
    );
    let a_id = format!("it-adopt-a-{}", uuid::Uuid::new_v4().simple());
    let a_stream = format!("warren:spool:{a_id}");

    // A spools SPOOLED outputs, in order, and dies.
    let a = Host::start(dir.path(), &a_id, &down, &redis).await;
    for seq in 0..SPOOLED {
        let body = serde_json::json!({ "routing_key": sink, "body": seq.to_string() }).to_string();
        let r = http::request(
            a.admin,
            "POST",
            "/publish",
            &[("content-type", "application/json")],
            Some(body.as_bytes()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "publish {seq}: {}", r.text());
        assert!(
            r.text().contains("spool"),
            "publish {seq} not spooled: {}",
            r.text()
        );
    }
    a.kill9();
    assert_eq!(xlen(&redis, &a_stream).await, SPOOLED as u64);

    // B is up with the broker; A comes back at once, before its claim
    // expires, still without a broker: B must not touch A's stream.
    let b_id = format!("it-adopt-b-{}", uuid::Uuid::new_v4().simple());
    let b = Host::start(dir.path(), &b_id, &broker_url(), &redis).await;
    let a = Host::start(dir.path(), &a_id, &down, &redis).await;
    let watch_until = Instant::now() + Duration::from_millis(OWNER_LEASE_MS * 3);
    while Instant::now() < watch_until {
        assert_eq!(
            xlen(&redis, &a_stream).await,
            SPOOLED as u64,
            "B touched the stream of a live owner"
        );
        tokio::time::sleep(wait::POLL).await;
    }
    assert_eq!(adopted_entries(&b.status().await.unwrap()), 0);
    assert_eq!(broker.message_count(&sink).await.unwrap(), 0);

    // A dies for good: once its claim lapses, B drains its stream.
    let killed = Instant::now();
    a.kill9();
    let got = broker
        .collect(&sink, SPOOLED, Duration::from_secs(90))
        .await
        .unwrap();
    let drained_after = killed.elapsed();
    let bodies: Vec<usize> = got
        .iter()
        .map(|g| String::from_utf8_lossy(&g.body).parse().unwrap())
        .collect();
    eprintln!(
        "adoption: {} of {SPOOLED} received {drained_after:?} after A's kill (claim lease {OWNER_LEASE_MS} ms)",
        bodies.len()
    );
    assert_eq!(
        bodies,
        (0..SPOOLED).collect::<Vec<_>>(),
        "adopted stream out of order or incomplete"
    );
    wait::until_true("A's stream emptied", Duration::from_secs(10), || async {
        xlen(&redis, &a_stream).await == 0
    })
    .await
    .unwrap();
    let status = wait::until(
        "B reports the adoption",
        Duration::from_secs(10),
        || async {
            let s = b.status().await?;
            (s["spool"]["adoption"]["streams"].as_u64() == Some(1)).then_some(s)
        },
    )
    .await
    .unwrap();
    assert_eq!(adopted_entries(&status), SPOOLED as u64, "{status}");
    assert_eq!(
        broker.message_count(&sink).await.unwrap(),
        0,
        "duplicates after the drain"
    );
    drop(b);
    broker.delete_queue(&sink).await.unwrap();
}

fn broker_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
