//! The `warren` binary's offline commands, run as a user would: exit codes,
//! one-line errors naming the file and the problem, JSON on stdout.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use warren_it::plugins::wasm;

fn warren(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run warren")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `warren check` fails with exactly one stderr line that names `file` and
/// contains `problem`.
fn assert_check_fails(file: &Path, problem: &str) {
    let out = warren(&["check", path(file)]);
    assert!(
        !out.status.success(),
        "check of {} succeeded",
        file.display()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].contains(path(file)), "file not named: {stderr}");
    assert!(
        lines[0].contains(problem),
        "expected {problem:?} in: {stderr}"
    );
}

#[test]
fn help_lists_the_commands() {
    let out = warren(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("check"), "{text}");
    assert!(text.contains("invoke"), "{text}");
}

#[test]
fn check_prints_the_manifest_of_a_valid_plugin() {
    let file = wasm("router").unwrap();
    let out = warren(&["check", path(&file)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["manifest"]["name"], "router");
    assert_eq!(v["manifest"]["subscriptions"][0]["queue"], "orders.in");
    assert_eq!(
        v["manifest"]["outputs"]["exchanges"][0]["name"],
        "orders.routed"
    );
    assert_eq!(
        v["manifest"]["outputs"]["queues"][0]["name"],
        "orders.routed.all"
    );
    assert_eq!(v["limits"]["deadline"], 1000);
}

#[test]
fn check_refuses_every_kind_of_invalid_file() {
    let dir = tempfile::tempdir().unwrap();

    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "this is not wasm").unwrap();
    assert_check_fails(&text, "not a WebAssembly file");

    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    assert_check_fails(&core, "core WebAssembly module, not a component");

    let truncated = dir.path().join("truncated.wasm");
    let echo = std::fs::read(wasm("echo").unwrap()).unwrap();
    std::fs::write(&truncated, &echo[..echo.len() / 2]).unwrap();
    assert_check_fails(&truncated, "invalid component");

    assert_check_fails(
        &wasm("not-a-plugin").unwrap(),
        "not a warren:plugin@0.3.0 component",
    );

    let old = wasm("old-contract").unwrap();
    assert_check_fails(
        &old,
        "built for contract warren:plugin@0.1.0, but this Warren runs warren:plugin@0.3.0",
    );

    let bad = wasm("bad-manifest").unwrap();
    assert_check_fails(&bad, "invalid manifest");
    let stderr = String::from_utf8_lossy(&warren(&["check", path(&bad)]).stderr).to_string();
    assert!(stderr.contains("name \"Bad Name!\""), "{stderr}");
    assert!(stderr.contains("prefetch must be at least 1"), "{stderr}");

    assert_check_fails(&dir.path().join("missing.wasm"), "cannot read file");
}

#[test]
fn check_of_several_files_reports_each_bad_one_and_fails() {
    let good = wasm("echo").unwrap();
    let bad = wasm("not-a-plugin").unwrap();
    let out = warren(&["check", path(&good), path(&bad)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(path(&bad)), "{stderr}");
    assert!(!stderr.contains(path(&good)), "{stderr}");
}

#[test]
fn invoke_runs_one_delivery_and_prints_outcome_and_outputs() {
    let file = wasm("echo").unwrap();
    let out = warren(&[
        "invoke",
        path(&file),
        "--body",
        "{\"hello\":1}",
        "--header",
        "x-tenant=acme",
        "--config",
        "routing-key=replies",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["outcome"], "ack");
    assert_eq!(v["plugin"], "echo");
    let o = &v["outputs"][0];
    assert_eq!(o["body"], "{\"hello\":1}");
    assert_eq!(o["routing_key"], "replies");
    assert_eq!(o["properties"]["headers"][0][0], "x-tenant");
}

#[test]
fn invoke_runs_against_seeded_state_and_prints_the_writes() {
    let file = wasm("tally").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("state.json");
    std::fs::write(&seed, r#"{"count:a": 41, "note": "kept"}"#).unwrap();
    let out = warren(&[
        "invoke",
        path(&file),
        "--kv-seed",
        path(&seed),
        "--body",
        r#"{"key":"a"}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["outcome"], "ack");
    assert_eq!(v["outputs"][0]["body"], r#"{"key":"a","seen":42}"#);
    assert_eq!(v["writes"]["count:a"]["op"], "increment");
    assert_eq!(v["writes"]["count:a"]["delta"], 1);
    assert!(v["writes"].get("note").is_none(), "{v}");

    // A failed delivery has no writes to show.
    let out = warren(&[
        "invoke",
        path(&file),
        "--body",
        r#"{"key":"a","fail":"trap"}"#,
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["outcome"], "trapped");
    assert!(v.get("writes").is_none(), "{v}");

    // A seed that is not an object, and a plugin without state, are named.
    std::fs::write(&seed, "[1]").unwrap();
    let out = warren(&["invoke", path(&file), "--kv-seed", path(&seed)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must be a JSON object"), "{stderr}");
    std::fs::write(&seed, "{}").unwrap();
    let echo = wasm("echo").unwrap();
    let out = warren(&["invoke", path(&echo), "--kv-seed", path(&seed)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("does not declare `state`"), "{stderr}");
}

#[test]
fn invoke_reports_a_trap_and_exits_non_zero() {
    let file = wasm("spin-loop").unwrap();
    let out = warren(&["invoke", path(&file), "--deadline-ms", "100"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["outcome"], "trapped");
    assert_eq!(v["trap"], "deadline");
}

#[test]
fn invoke_rejects_a_malformed_pair() {
    let file = wasm("echo").unwrap();
    let out = warren(&["invoke", path(&file), "--header", "no-equals-sign"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected KEY=VALUE"));
}

#[test]
fn invoke_takes_every_property_and_typed_headers_and_prints_them_on_outputs() {
    let file = wasm("echo").unwrap();
    let out = warren(&[
        "invoke",
        path(&file),
        "--body",
        "x",
        "--property",
        "reply-to=replies",
        "--property",
        "priority=3",
        "--property",
        "type=order.created",
        "--property",
        "content-encoding=gzip",
        "--header",
        "x-n=int16:-3",
        "--header",
        r#"x-t=table:{"a":1,"b":{"c":"x"}}"#,
        "--header",
        "x-url=http://example",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let p = &v["outputs"][0]["properties"];
    assert_eq!(p["reply_to"], "replies");
    assert_eq!(p["priority"], 3);
    assert_eq!(p["kind"], "order.created");
    assert_eq!(p["content_encoding"], "gzip");
    let header = |k: &str| {
        p["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == k)
            .map(|h| h[1].clone())
            .unwrap_or_else(|| panic!("no header {k} in {p}"))
    };
    assert_eq!(header("x-n"), serde_json::json!({"t": "i16", "v": -3}));
    assert_eq!(header("x-t")["t"], "table");
    assert_eq!(
        header("x-url"),
        serde_json::json!({"t": "string", "v": "http://example"})
    );

    let bad = warren(&["invoke", path(&file), "--property", "colour=red"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown property \"colour\""));
}

#[test]
fn check_refuses_a_plugin_whose_memory_floor_exceeds_its_limit() {
    let file = wasm("big-floor").unwrap();
    assert_check_fails(
        &file,
        "needs at least 3.1 MiB of memory to start; its limit is 2.0 MiB",
    );
}

/// `warren invoke` makes real calls under the same grants as `warren run`:
/// refused without `--allow-outbound`, made with it.
#[test]
fn invoke_calls_out_only_under_allow_outbound() {
    let origin = warren_it::http::pong_server().unwrap();
    let file = wasm("caller").unwrap();
    let url = format!("{origin}/");
    let refused = warren(&["invoke", path(&file), "--body", &url]);
    let v: serde_json::Value = serde_json::from_slice(&refused.stdout).expect("json");
    assert_eq!(v["outcome"], "reject", "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("origin-not-granted"),
        "{v}"
    );
    // Each call is printed beside the outputs, refused ones too.
    assert_eq!(v["calls"][0]["method"], "GET", "{v}");
    assert_eq!(v["calls"][0]["url"], url, "{v}");
    assert!(
        v["calls"][0]["error"]
            .as_str()
            .unwrap()
            .contains("origin-not-granted"),
        "{v}"
    );
    let out = warren(&[
        "invoke",
        path(&file),
        "--body",
        &url,
        "--allow-outbound",
        &origin,
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["outcome"], "ack", "{v}");
    assert_eq!(v["outputs"][0]["body"], "pong", "{v}");
    assert_eq!(v["calls"][0]["status"], 200, "{v}");
    assert!(v["calls"][0]["elapsed_ms"].is_u64(), "{v}");
}
