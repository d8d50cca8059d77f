//! The spool against real Redis: a Sentinel topology per failover test
//! (`warren_it::sentinel`), the shared plain Redis on 127.0.0.1:6379 with a
//! random stream key per test otherwise.

mod drain;
mod failover;
mod limits;
mod secured;

use std::collections::HashSet;
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren::buffer::{Spool, SpoolConfig, SpoolHandle};
use warren::message::{HeaderValue, OutboundMessage};
use warren_it::wait;

pub const PLAIN_URL: &str = "redis://127.0.0.1:6379";

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A message carrying `seq` in a header and the body, with a traceparent.
pub fn message(seq: u64) -> OutboundMessage {
    let mut m = OutboundMessage::new(
        "warren.test",
        "spool.rk",
        Bytes::from(format!("body-{seq}")),
    );
    m.properties.set_header("seq", HeaderValue::U64(seq));
    m.properties.set_header(
        "traceparent",
        HeaderValue::String("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    );
    m
}

pub fn seq_of(m: &OutboundMessage) -> u64 {
    match m.header("seq") {
        Some(HeaderValue::U64(n)) => *n,
        other => panic!("message without seq: {other:?}"),
    }
}

/// A spool config for `topo`: its sentinels and, when secured, the ACL
/// user `warren`, the sentinels' password and the test CA.
pub fn spool_config(topo: &warren_it::sentinel::Topology, host_id: &str) -> SpoolConfig {
    let mut cfg = SpoolConfig::sentinel(topo.sentinel_urls(), topo.master_name.clone(), host_id);
    if let Some(s) = &topo.secured {
        cfg.username = Some(warren_it::sentinel::WARREN_USER.into());
        cfg.password = Some(warren::secret::Secret::new(&s.warren_password));
        cfg.sentinel_password = Some(warren::secret::Secret::new(&s.sentinel_password));
        cfg.tls_ca_file = Some(s.tls_dir.join("ca.crt"));
    }
    cfg
}

/// A unique host id, so each test has its own stream.
pub fn host_id(test: &str) -> String {
    format!("it-{test}-{}", uuid::Uuid::new_v4().simple())
}

pub struct Running {
    pub handle: SpoolHandle,
    pub cancel: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("spool stops within 10 s")
            .expect("spool task did not panic");
    }
}

pub async fn start(cfg: SpoolConfig) -> Running {
    init_tracing();
    let (spool, handle) = Spool::new(cfg).expect("valid config");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(spool.run(cancel.clone()));
    let h = handle.clone();
    wait::until_true("spool connected", Duration::from_secs(10), || {
        let h = h.clone();
        async move { h.status().await.primary.is_some() }
    })
    .await
    .expect("spool connects");
    Running {
        handle,
        cancel,
        task,
    }
}

/// Every entry id (`id` field) in `key` on the node `c` is connected to,
/// read in pages.
pub async fn stream_ids(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
    let mut ids = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let entries: Entries = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(5000)
            .query_async(c)
            .await
            .unwrap();
        let Some((last, _)) = entries.last() else {
            return ids;
        };
        start = format!("({last}");
        ids.extend(entries.into_iter().filter_map(|(_, fields)| {
            fields
                .into_iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| String::from_utf8(v).unwrap())
        }));
    }
}

pub async fn xlen(url: &str, key: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Remove a test's keys from the shared Redis.
pub async fn cleanup(key: &str) {
    let client = redis::Client::open(PLAIN_URL).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(key)
        .arg(format!("{key}:bytes"))
        .arg(format!("{key}:drain-lock"))
        .arg(format!("{key}:corrupt"))
        .query_async(&mut c)
        .await
        .unwrap();
}

/// Which acknowledged ids are missing from `present`.
pub fn missing<'a>(acked: &'a [String], present: &[String]) -> Vec<&'a String> {
    let present: HashSet<&String> = present.iter().collect();
    acked.iter().filter(|id| !present.contains(id)).collect()
}
