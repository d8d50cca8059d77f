//! The spool against the secured Sentinel topology: refused credentials
//! are reported as such, without redialling in a loop, and never echo a
//! secret; the right ones, with a client certificate, work.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warren::buffer::{Spool, SpoolConfig, SpoolHandle};
use warren::secret::Secret;
use warren_it::sentinel::Topology;
use warren_it::wait;

use super::{host_id, init_tracing, message, spool_config, start};

/// Connections the node at `port` has accepted since it started.
async fn connections_received(topo: &Topology, port: u16) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut topo.conn(port).await.unwrap())
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_connections_received")
}

/// Run a spool on `cfg` until its status reports an authentication
/// failure; returns the handle and the spool's stop token.
async fn until_refused(cfg: SpoolConfig) -> (SpoolHandle, CancellationToken, String) {
    init_tracing();
    let (spool, handle) = Spool::new(cfg).expect("valid config");
    let cancel = CancellationToken::new();
    tokio::spawn(spool.run(cancel.clone()));
    let h = handle.clone();
    let error = wait::until(
        "an authentication failure in status",
        Duration::from_secs(15),
        || {
            let h = h.clone();
            async move {
                h.status()
                    .await
                    .last_error
                    .filter(|e| e.contains("authentication failed"))
            }
        },
    )
    .await
    .unwrap();
    (handle, cancel, error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_reported_without_a_hot_loop() {
    let topo = Topology::start_secured().await.unwrap();
    let secured = topo.secured.clone().unwrap();
    let primary = topo.primary_port().await.unwrap();

    // The ACL user with a wrong password: the sentinels answer, the primary
    // refuses.
    let mut cfg = spool_config(&topo, &host_id("wrongpass"));
    cfg.password = Some(Secret::new("not-the-password"));
    cfg.append_timeout_ms = 500;
    let (handle, cancel, error) = until_refused(cfg).await;
    assert!(error.contains(&format!("127.0.0.1:{primary}")), "{error}");
    let refused = handle.append(message(1)).await.unwrap_err();
    assert!(refused.is_auth(), "append error: {refused}");
    // An observation window, not a synchronisation: how often the refused
    // primary is dialled while appends and the status refresh keep asking.
    let before = connections_received(&topo, primary).await;
    let window = Duration::from_secs(6);
    let appends = async {
        let deadline = tokio::time::Instant::now() + window;
        while tokio::time::Instant::now() < deadline {
            let _ = handle.append(message(2)).await;
        }
    };
    appends.await;
    // One of the connections is this measurement's own.
    let dialled = connections_received(&topo, primary).await - before - 1;
    eprintln!("wrong password: {dialled} connections to the primary in {window:?}; error: {error}");
    assert!(
        dialled <= 6,
        "a refused password must not be retried in a loop: {dialled} connections in {window:?}"
    );
    let status = handle.status().await;
    let shown = serde_json::to_string(&status).unwrap();
    for secret in [
        "not-the-password",
        &secured.warren_password,
        &secured.sentinel_password,
    ] {
        assert!(!shown.contains(secret), "status shows a secret: {shown}");
    }
    cancel.cancel();

    // A wrong sentinel password: every sentinel refuses.
    let mut cfg = spool_config(&topo, &host_id("wrongsentinel"));
    cfg.sentinel_password = Some(Secret::new("not-the-sentinel-password"));
    let (_, cancel, error) = until_refused(cfg).await;
    assert!(!error.contains("not-the-sentinel-password"), "{error}");
    cancel.cancel();

    // The right credentials, a password file and a client certificate.
    let pw_file = topo.dir().join("warren-password");
    std::fs::write(&pw_file, format!("{}\n", secured.warren_password)).unwrap();
    let mut cfg = spool_config(&topo, &host_id("clientcert"));
    cfg.password = None;
    cfg.password_file = Some(pw_file);
    cfg.tls_cert_file = Some(secured.tls_dir.join("client.crt"));
    cfg.tls_key_file = Some(secured.tls_dir.join("client.key"));
    let run = start(cfg).await;
    run.handle.append(message(3)).await.unwrap();
    let status = run.handle.status().await;
    assert_eq!(status.primary, Some(format!("127.0.0.1:{primary}")));
    assert_eq!(status.last_error, None);
    run.stop().await;
}

#[tokio::test]
async fn plain_redis_over_tls_needs_rediss_and_readable_files() {
    let mut cfg = SpoolConfig::plain("redis://127.0.0.1:6379", host_id("tlsconfig"));
    cfg.tls_ca_file = Some("/nonexistent/ca.crt".into());
    cfg.password_file = Some("/nonexistent/password".into());
    let problems = match Spool::new(cfg) {
        Err(warren::buffer::SpoolError::InvalidConfig(p)) => p,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a missing CA file must be refused"),
    };
    let all = problems.join("\n");
    assert!(
        all.contains("cannot read tls_ca_file /nonexistent/ca.crt"),
        "{all}"
    );
    assert!(
        all.contains("cannot read password_file /nonexistent/password"),
        "{all}"
    );
}
