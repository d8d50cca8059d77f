//! Size limits and start-up checks, on the shared plain Redis (6379, which
//! runs with `appendonly no`).

use std::time::Duration;

use bytes::Bytes;
use warren::buffer::SpoolConfig;
use warren::message::OutboundMessage;
use warren_it::wait;

use super::{PLAIN_URL, cleanup, host_id, message, start, xlen};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_over_its_limit_refuses() {
    let mut cfg = SpoolConfig::plain(PLAIN_URL, host_id("limit-entries"));
    cfg.max_entries = 5;
    let run = start(cfg).await;
    let key = run.handle.stream_key().to_owned();
    for n in 0..5 {
        run.handle.append(message(n)).await.unwrap();
    }
    let err = run.handle.append(message(5)).await.unwrap_err();
    assert!(err.is_full(), "{err}");
    assert_eq!(
        xlen(PLAIN_URL, &key).await,
        5,
        "nothing dropped, nothing added"
    );
    let status = run.handle.status().await;
    assert_eq!((status.appended, status.refused), (5, 1));
    run.stop().await;
    cleanup(&key).await;

    let mut cfg = SpoolConfig::plain(PLAIN_URL, host_id("limit-bytes"));
    cfg.max_bytes = 1000;
    let run = start(cfg).await;
    let key = run.handle.stream_key().to_owned();
    let big = || OutboundMessage::new("", "q", Bytes::from(vec![7u8; 400]));
    run.handle.append(big()).await.unwrap();
    let err = run.handle.append(big()).await.unwrap_err();
    assert!(err.is_full(), "{err}");
    assert_eq!(xlen(PLAIN_URL, &key).await, 1);
    run.stop().await;
    cleanup(&key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_checks_flag_an_unsafe_primary() {
    let run = start(SpoolConfig::plain(PLAIN_URL, host_id("checks"))).await;
    let status = wait::until("start-up findings", Duration::from_secs(5), || async {
        let s = run.handle.status().await;
        (!s.config_warnings.is_empty()).then_some(s)
    })
    .await
    .unwrap();
    assert!(
        status
            .config_warnings
            .iter()
            .any(|w| w.starts_with("appendonly is no")),
        "{:?}",
        status.config_warnings
    );
    assert!(
        status
            .config_warnings
            .iter()
            .any(|w| w.starts_with("min-replicas-to-write is 0")),
        "{:?}",
        status.config_warnings
    );
    assert!(!status.highly_available);
    assert!(status.mode.contains("not highly available"));
    assert_eq!(status.wait_for_replicas, 0);
    run.stop().await;
}
