//! The README's configuration reference is `warren config` with no file
//! and no `WARREN_*` variables, verbatim: this test fails when they differ
//! (and prints what the README should say).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use warren_it::plugins::repo_root;

/// The line that precedes the reference's code block in the README.
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
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find(MARKER)
        .unwrap_or_else(|| panic!("README.md has no line {MARKER:?}"));
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
            "README.md's configuration reference differs from `warren config` from line {} of the block on; replace the block with:\n{printed}",
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
