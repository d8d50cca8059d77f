//! `warren new` for every language, as a newcomer uses it: write the
//! project, build it with the one command its README gives, then `warren
//! check` and `warren invoke` the result.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use warren::new::{Lang, build_command, output};

fn warren(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "error")
        .output()
        .expect("run warren")
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn new_project_builds_checks_and_invokes(lang: Lang, flag: &str) {
    let tmp = tempfile::tempdir().unwrap();
    // The README's example name: its commands are run as it shows them.
    let name = "my-plugin".to_string();
    let out = warren(&["new", &name, "--lang", flag], tmp.path());
    let said = ok(&out, "warren new");
    let dir = tmp.path().join(&name);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let command = build_command(lang);
    assert!(said.contains(command), "{said}");
    assert!(readme.contains(&format!("    {command}\n")), "{readme}");

    // The command exactly as the README gives it. The Rust build keeps its
    // compiled dependencies between runs in a target dir of its own.
    let mut build = Command::new("sh");
    build.arg("-c").arg(command).current_dir(&dir);
    build
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("warren-new");
    let wasm = match lang {
        Lang::Rust => {
            build.env("CARGO_TARGET_DIR", &target_dir);
            target_dir.join(output(lang, &name).strip_prefix("target").unwrap())
        }
        _ => {
            build.env_remove("CARGO_TARGET_DIR");
            dir.join(output(lang, &name))
        }
    };
    ok(&build.output().unwrap(), command);
    let table_row = format!(
        "| `warren new my-plugin --lang {flag}` | `{command}` | `{}` |",
        output(lang, &name).display()
    );
    let top_readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    assert!(top_readme.contains(&table_row), "README lacks {table_row}");
    assert!(wasm.exists(), "{} was not built", wasm.display());

    let wasm = wasm.to_str().unwrap();
    let check: serde_json::Value =
        serde_json::from_str(&ok(&warren(&["check", wasm], &dir), "warren check")).unwrap();
    assert_eq!(check["manifest"]["name"], name.as_str());
    assert_eq!(
        check["manifest"]["subscriptions"][0]["queue"],
        format!("{name}.in")
    );
    let invoked: serde_json::Value = serde_json::from_str(&ok(
        &warren(&["invoke", wasm, "--body", "hello"], &dir),
        "warren invoke",
    ))
    .unwrap();
    assert_eq!(invoked["outcome"], "ack", "{invoked}");
    assert_eq!(
        invoked["outputs"][0]["routing_key"],
        format!("{name}.out"),
        "{invoked}"
    );
    assert_eq!(invoked["outputs"][0]["body"], "hello", "{invoked}");

    // The template's call, once configured and granted.
    let api = warren_it::http::pong_server().unwrap();
    let invoked: serde_json::Value = serde_json::from_str(&ok(
        &warren(
            &[
                "invoke",
                wasm,
                "--body",
                "hello",
                "--config",
                &format!("api-url={api}/orders"),
                "--allow-outbound",
                &api,
            ],
            &dir,
        ),
        "warren invoke with api-url",
    ))
    .unwrap();
    assert_eq!(invoked["outcome"], "ack", "{invoked}");
    assert_eq!(invoked["calls"][0]["method"], "POST", "{invoked}");
    assert_eq!(invoked["calls"][0]["status"], 200, "{invoked}");

    // A second `warren new` into the same directory is refused.
    let again = warren(&["new", &name, "--lang", flag], tmp.path());
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn a_new_rust_plugin_builds_checks_and_invokes() {
    new_project_builds_checks_and_invokes(Lang::Rust, "rust");
}

#[test]
fn a_new_python_plugin_builds_checks_and_invokes() {
    new_project_builds_checks_and_invokes(Lang::Python, "python");
}

#[test]
fn a_new_js_plugin_builds_checks_and_invokes() {
    new_project_builds_checks_and_invokes(Lang::Js, "js");
}
