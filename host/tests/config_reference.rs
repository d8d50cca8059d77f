//! docs/configuration.md's reference is `warren config` with no file
//! and no `WARREN_*` variables, verbatim: this test fails when they differ
//! (and prints what the file should say).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use warren_it::plugins::repo_root;

/// The line that precedes the reference's code block in docs/configuration.md.
const MARKER: &str =
    "<!-- The output of `warren config`; host/tests/config_reference.rs keeps it so. -->";

/// `warren config` as a user with no `warren.toml` and no overrides runs it.
fn warren_config() -> String {
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.arg("config").current_dir(empty.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn readme_reference() -> String {
    let readme = std::fs::read_to_string(repo_root().join("docs/configuration.md")).unwrap();
    let start = readme
        .find(MARKER)
        .unwrap_or_else(|| panic!("docs/configuration.md has no line {MARKER:?}"));
    let block = &readme[start + MARKER.len()..];
    let body = block
        .strip_prefix("\n```toml\n")
        .expect("the marker is followed by a ```toml block");
    let end = body.find("```").expect("the block is closed");
    body[..end].to_owned()
}

#[test]
fn the_readme_configuration_reference_is_warren_config() {
    let printed = warren_config();
    let readme = readme_reference();
    if printed != readme {
        let first = printed
            .lines()
            .zip(readme.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(printed.lines().count().min(readme.lines().count()));
        panic!(
            "docs/configuration.md differs from `warren config` from line {} of the block on; replace the block with:\n{printed}",
            first + 1
        );
    }
    // Every key the code knows is in it: each section's keys are listed.
    for key in [
        "heartbeat-secs",
        "drain-window",
        "compile-cache-max-bytes",
        "reuse-max-deliveries",
        "otlp-sample-ratio",
        "grace-period-ms",
    ] {
        assert!(
            printed.contains(&format!("{key} ")),
            "{key} missing:\n{printed}"
        );
    }
}

/// Every `key = value` of a rendered configuration, as `section.key`
/// (commented-out template sections and unset keys are not values).
fn values(rendered: &str) -> std::collections::BTreeMap<String, String> {
    let mut section = String::new();
    let mut out = std::collections::BTreeMap::new();
    for line in rendered.lines() {
        if let Some(header) = line.strip_prefix('[') {
            section = header.trim_end_matches(']').to_owned();
        } else if !line.starts_with('#')
            && let Some((key, value)) = line.split_once(" = ")
        {
            out.insert(format!("{section}.{key}"), value.to_owned());
        }
    }
    out
}

/// The defaults docs/configuration.md documents are the ones a running Warren uses:
/// `warren run` with an empty file (the admin API moved to a free port by
/// its variable, the plugins directory by `--plugins`), each section read
/// back from the subsystem that holds it (`GET /config`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_documented_default_is_the_one_warren_run_uses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("warren.toml");
    std::fs::write(&cfg, "").unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let port = warren_it::ports::free_port().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let stream = warren_it::broker::unique("defaults-spool");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--plugins")
        .arg(&plugins)
        .env("WARREN_ADMIN_BIND", admin.to_string())
        // Its own stream, and no adopting other tests' streams.
        .env("WARREN_SPOOL_STREAM_KEY", &stream)
        .env("WARREN_SPOOL_ADOPT_ORPHANS", "false")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let effective = warren_it::wait::until(
        "GET /config",
        std::time::Duration::from_secs(30),
        || async {
            let r = warren_it::http::request(admin, "GET", "/config", &[], None)
                .await
                .ok()?;
            (r.status == 200).then(|| r.text())
        },
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let effective = values(&effective.unwrap());
    let documented = values(&readme_reference());
    let overridden = std::collections::BTreeMap::from([
        ("admin.bind".to_owned(), format!("\"{admin}\"")),
        (
            "plugins.dir".to_owned(),
            format!("\"{}\"", plugins.display()),
        ),
        ("spool.stream-key".to_owned(), format!("\"{stream}\"")),
        ("spool.adopt-orphans".to_owned(), "false".to_owned()),
    ]);
    let mut wrong = Vec::new();
    for (key, want) in documented.iter().chain(&overridden) {
        let want = overridden.get(key).unwrap_or(want);
        match effective.get(key) {
            Some(got) if got == want => {}
            got => wrong.push(format!("{key}: expected {want}, running {got:?}")),
        }
    }
    for key in effective
        .keys()
        .filter(|k| !documented.contains_key(*k) && !overridden.contains_key(*k))
    {
        wrong.push(format!("{key}: running but not documented"));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(documented.len() > 50, "{documented:?}");
}
