//! `warren validate` as a user runs it: every problem in the file, the
//! environment and the plugins directory at once, exit 78 (EX_CONFIG).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;

fn validate(cfg: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["validate", "--config"])
        .arg(cfg)
        .envs(env.iter().copied())
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[test]
fn five_mistakes_in_five_places_are_listed_together_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-plugins");
    // A type error in [amqp] beside a bad amqp.url: both must show.
    let cfg = WarrenToml::new()
        .set("amqp.heartbeat-secs", "often")
        .amqp_url("http://not-amqp")
        .set("spool.url", "tcp://redis:6379")
        .plugins_dir(&missing)
        .set("dispatch.max-attempts", 0)
        .admin_bind("nowhere")
        .write_in(dir.path())
        .unwrap();
    let out = validate(&cfg, &[("WARREN_SHUTDOWN_GRACE_PERIOD_MS", "0")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for expected in [
        "amqp.heartbeat-secs: invalid type",
        "amqp.url \"http://not-amqp\" must start with amqp://",
        "spool address \"tcp://redis:6379\" must start with redis://",
        &format!(
            "plugins.dir: cannot read plugins directory {}",
            missing.display()
        ),
        "dispatch.max-attempts must be at least 1",
        "admin.bind \"nowhere\" is not an address",
        "shutdown.grace-period-ms must be at least 1",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(
        err.contains(cfg.to_str().unwrap()),
        "file not named:\n{err}"
    );
    assert!(err.contains("7 problems"), "{err}");
}

#[test]
fn each_plugin_load_result_is_listed_and_a_sound_setup_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(wasm("echo").unwrap(), plugins.join("echo.wasm")).unwrap();
    let cfg = WarrenToml::new()
        .plugins_dir(&plugins)
        .subscribe("echo", "orders")
        .write_in(dir.path())
        .unwrap();
    let out = validate(&cfg, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("plugin echo 0.1.0") && stdout.contains("queues: orders"),
        "{stdout}"
    );
    assert!(stdout.contains("configuration is valid"), "{stdout}");

    // A file that is not a component is a problem, and the good one is
    // still listed.
    std::fs::write(plugins.join("broken.wasm"), b"not wasm").unwrap();
    let out = validate(&cfg, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(plugins.join("broken.wasm").to_str().unwrap()),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("plugin echo 0.1.0"),
        "{err}"
    );
}
