//! What `warren run` logs through a broker outage, at the default level:
//! one WARN when the session is lost, a periodic INFO with the attempts
//! and the time so far, one INFO with the outage's duration when the
//! broker answers again, and no ERROR (lapin's own lines are DEBUG).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;
use warren_it::process::signal;
use warren_it::proxy::{Mode, Proxy};
use warren_it::wait;

/// Write `dir/warren.toml`: plugins from `plugins`, a spool stream of its
/// own, the admin API on `admin`, echo consuming `echo_in`, and `extra`
/// (sections of its own) merged in.
fn write_config(
    dir: &Path,
    plugins: &Path,
    admin: &str,
    echo_in: &str,
    extra: &str,
) -> std::path::PathBuf {
    WarrenToml::new()
        .plugins_dir(plugins)
        .own_spool_stream()
        .admin_bind(admin)
        .subscribe("echo", echo_in)
        .merge(extra)
        .write_in(dir)
        .unwrap()
}

/// The `warren run` process, killed if the test fails before it stops.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_logs_one_warn_periodic_info_and_its_duration_and_no_error() {
    let broker = Broker::shared().await.unwrap();
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let echo_in = unique("logs-in");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("echo").unwrap(), dir.path().join("echo.wasm")).unwrap();
    let cfg = write_config(
        dir.path(),
        dir.path(),
        "127.0.0.1:0",
        &echo_in,
        &format!(
            "[amqp]\nurl = \"{}\"\nheartbeat-secs = 2\nbackoff-max-ms = 500",
            proxy.amqp_url()
        ),
    );
    let log_path = dir.path().join("warren.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .stderr(Stdio::from(log_file))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait::until_true("warren consuming", Duration::from_secs(60), || async {
        broker.consumer_count(&echo_in).await.unwrap_or(0) == 1
    })
    .await
    .unwrap();
    let started_line = wait::until("start-up summary", Duration::from_secs(30), || async {
        log()
            .lines()
            .find(|l| l.contains("Ready: consumers registered."))
            .map(str::to_owned)
    })
    .await
    .unwrap();
    for part in ["plugins=echo@0.1.0", "spool=", "broker=", "admin="] {
        assert!(
            started_line.contains(part),
            "start-up summary without {part}: {started_line:?}"
        );
    }

    proxy.set_mode(Mode::Refuse);
    wait::until_true(
        "outage reported as continuing",
        Duration::from_secs(40),
        || async { log().contains("Broker still unreachable; retrying.") },
    )
    .await
    .unwrap();
    proxy.set_mode(Mode::Pass);
    wait::until_true("outage end reported", Duration::from_secs(40), || async {
        log().contains("Broker reachable again.")
    })
    .await
    .unwrap();
    let _ = signal(&child.0, "TERM");
    wait::until_true("warren exits", Duration::from_secs(30), || {
        let done = child.0.try_wait().unwrap().is_some();
        async move { done }
    })
    .await
    .unwrap();

    let text = log();
    let lines: Vec<&str> = text.lines().collect();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        errors.is_empty(),
        "ERROR lines on a routine outage:\n{text}"
    );
    // After start-up (whose warnings are about the shared test Redis).
    let ready = lines
        .iter()
        .position(|l| l.contains("Ready: consumers registered."))
        .unwrap();
    let warns: Vec<&&str> = lines[ready..]
        .iter()
        .filter(|l| l.contains(" WARN "))
        .collect();
    assert_eq!(warns.len(), 1, "one WARN for the outage:\n{text}");
    assert!(warns[0].contains("AMQP session lost"), "{text}");
    let periodic = lines
        .iter()
        .find(|l| l.contains("Broker still unreachable"))
        .unwrap();
    assert!(
        periodic.contains(" INFO ")
            && periodic.contains("attempts=")
            && periodic.contains("elapsed_secs="),
        "{periodic}"
    );
    let end = lines
        .iter()
        .find(|l| l.contains("Broker reachable again."))
        .unwrap();
    assert!(
        end.contains(" INFO ") && end.contains("outage_secs="),
        "{end}"
    );
    broker.delete_queue(&echo_in).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_plugins() {
    let broker = Broker::shared().await.unwrap();
    let echo_in = unique("hup-in");
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let admin =
        std::net::SocketAddr::from(([127, 0, 0, 1], warren_it::ports::free_port().unwrap()));
    let cfg = write_config(dir.path(), &plugins, &admin.to_string(), &echo_in, "");
    let child = Running(
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Started (the admin API answers) with no plugin; then echo is added:
    // nothing consumes until the reload.
    wait::until_true("warren started", Duration::from_secs(60), || async {
        warren_it::http::request(admin, "GET", "/live", &[], None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await
    .unwrap();
    std::fs::copy(wasm("echo").unwrap(), plugins.join("echo.wasm")).unwrap();
    assert_eq!(broker.consumer_count(&echo_in).await.unwrap_or(0), 0);
    signal(&child.0, "HUP").unwrap();
    wait::until_true(
        "echo consuming after SIGHUP",
        Duration::from_secs(60),
        || async { broker.consumer_count(&echo_in).await.unwrap_or(0) == 1 },
    )
    .await
    .unwrap();
    drop(child);
    broker.delete_queue(&echo_in).await.unwrap();
}
