//! The shipping files: the systemd unit passes `systemd-analyze verify`
//! and keeps its hardening, and the supply-chain check fails on a lockfile
//! with a known-vulnerable version.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use warren_it::plugins::repo_root;

const UNIT: &str = "deploy/systemd/warren.service";

/// `key=value` lines of a unit file (comments and sections skipped).
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not a directive: {l:?}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let path = repo_root().join(UNIT);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs (.ci/run installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The binary is not installed on a test machine; anything else said
    // (an unknown key, a value that does not parse) is a finding.
    let findings: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("Command /usr/local/bin/warren is not executable"))
        .collect();
    assert!(findings.is_empty(), "systemd-analyze verify:\n{stderr}");

    let text = std::fs::read_to_string(&path).unwrap();
    let d = directives(&text);
    let get = |k: &str| {
        d.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("DynamicUser"), ["yes"], "a dedicated user");
    assert_eq!(get("User"), ["warren"]);
    assert_eq!(get("ProtectSystem"), ["strict"]);
    assert_eq!(get("StateDirectory"), ["warren"]);
    assert_eq!(get("CacheDirectory"), ["warren"]);
    assert_eq!(get("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(get("KillSignal"), ["SIGTERM"]);
    assert_eq!(get("NoNewPrivileges"), ["yes"]);
    assert!(
        get("ExecStart")[0].starts_with("/usr/local/bin/warren run "),
        "{:?}",
        get("ExecStart")
    );
    // systemd waits longer than Warren's default drain before it kills.
    let stop: u64 = get("TimeoutStopSec")[0].parse().unwrap();
    let grace_ms = warren::config::Config::parse("", Vec::new())
        .unwrap()
        .shutdown
        .grace_period_ms;
    assert!(
        stop * 1000 > grace_ms,
        "TimeoutStopSec {stop} s vs grace {grace_ms} ms"
    );
    assert!(
        get("Environment")
            .iter()
            .any(|e| e.starts_with("WARREN_PLUGINS__RUNTIME__COMPILE_CACHE_DIR=/var/cache/warren/")),
        "the compile cache in CacheDirectory"
    );
}

/// Run `scripts/supply-chain` on the workspace in `dir`.
fn supply_chain(dir: &Path) -> (bool, String) {
    let out = Command::new(repo_root().join("scripts/supply-chain"))
        .arg(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A one-crate workspace depending on `dep` (a `Cargo.toml` dependency
/// line), its lockfile generated.
fn workspace(dep: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"probe\"\nversion = \"0.1.0\"\nedition = \"2021\"\nlicense = \"MIT\"\npublish = false\n\n[dependencies]\n{dep}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/lib.rs"), "").unwrap();
    let out = Command::new("cargo")
        .arg("generate-lockfile")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn supply_chain_check_fails_on_a_known_vulnerable_version_and_passes_a_fixed_one() {
    // smallvec 1.6.0: RUSTSEC-2021-0003 (buffer overflow), fixed in 1.6.1.
    let vulnerable = workspace(r#"smallvec = "=1.6.0""#);
    let (ok, text) = supply_chain(vulnerable.path());
    assert!(!ok, "{text}");
    assert!(text.contains("advisories: FAILED"), "{text}");
    assert!(text.contains("RUSTSEC-2021-0003"), "{text}");
    assert!(text.contains("licenses: ok"), "{text}");
    assert!(text.contains("sources: ok"), "{text}");

    let fixed = workspace(r#"smallvec = "=1.13.2""#);
    let (ok, text) = supply_chain(fixed.path());
    assert!(ok, "{text}");
    assert!(text.contains("advisories: ok"), "{text}");
}

/// `deploy/kubernetes/validate` as README runs it: every manifest passes
/// the Kubernetes schemas (strict: no unknown fields).
#[test]
fn kubernetes_manifests_validate() {
    let out = Command::new("deploy/kubernetes/validate")
        .current_dir(repo_root())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for kind in [
        "deployment/warren",
        "configmap/warren-config",
        "secret/warren-secrets",
        "poddisruptionbudget/warren",
        "service/warren",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind} ")),
            "{kind}:\n{text}"
        );
    }
    assert!(!text.contains("ERROR"), "{text}");
}

/// The recipe's numbers fit together: the pod's grace period covers the
/// preStop pause and Warren's drain, and KEDA scales on gauges Warren
/// exports (the metrics test checks they are there with HELP).
#[test]
fn kubernetes_recipe_grace_period_and_scaling_fit_warren() {
    let root = repo_root().join("deploy/kubernetes");
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
    let number = |text: &str, key: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("{key} not found"));
        line.trim_start()[key.len()..]
            .trim()
            .trim_matches('"')
            .parse()
            .unwrap_or_else(|_| panic!("{line:?}"))
    };
    let deployment = read("deployment.yaml");
    let config = read("configmap.yaml");
    let termination = number(&deployment, "terminationGracePeriodSeconds:");
    let pre_stop = number(&deployment, "seconds:");
    let grace_ms = number(&config, "grace-period-ms =");
    assert!(
        termination * 1000 > pre_stop * 1000 + grace_ms,
        "terminationGracePeriodSeconds {termination} must cover preStop {pre_stop} s + grace {grace_ms} ms"
    );
    for probe in ["path: /live", "path: /ready"] {
        assert!(deployment.contains(probe), "{probe}");
    }
    for setting in [
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "mountPath: /var/lib/warren/plugins",
        "mountPath: /var/cache/warren",
    ] {
        assert!(deployment.contains(setting), "{setting}");
    }
    // The configuration parses as Warren's, with its secret file key.
    let toml = config
        .split_once("warren.toml: |\n")
        .map(|(_, t)| t)
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    // The secret files are the pod's, mounted from the Secret's keys;
    // here stand-ins.
    let secrets = tempfile::tempdir().unwrap();
    let mut toml = toml;
    for key in ["amqp-password", "admin-token", "redis-password"] {
        assert!(
            deployment.contains(&format!("key: {key}")),
            "the Deployment mounts {key}"
        );
        let path = secrets.path().join(key);
        std::fs::write(&path, "a-stand-in-of-16-characters\n").unwrap();
        toml = toml.replace(
            &format!("/etc/warren/secrets/{key}"),
            &path.display().to_string(),
        );
    }
    let c = warren::config::Config::parse(&toml, Vec::new()).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.shutdown.grace_period_ms, grace_ms);
    assert!(c.spool.password_file.is_some());
    assert!(c.amqp.password_file.is_some());
    assert!(c.admin.token_file.is_some());
    let scaled = read("scaledobject.yaml");
    for gauge in [
        warren::admin::metric::ROUTE_READY,
        warren::admin::metric::ROUTE_UNACKED,
        "warren_spool_depth",
    ] {
        assert!(scaled.contains(gauge), "the ScaledObject scales on {gauge}");
    }
}

/// A process killed (and reaped) when dropped, so a failed assertion does
/// not leave it running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The blob `digest` (`sha256:...`) of an unpacked OCI layout.
fn blob(layout: &Path, digest: &str) -> std::path::PathBuf {
    let (algo, hex) = digest.split_once(':').unwrap();
    layout.join("blobs").join(algo).join(hex)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}:\n{text}");
    text
}

/// `deploy/image/build` as README runs it; its layers unpacked into a
/// directory and run there under `chroot` as the image's user, with the
/// image's entry point and environment: `--version`, then `run` with a
/// plugin against the local broker and Redis until `/ready` answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_builds_and_its_layers_run_warren_under_chroot() {
    // Without the variables `cargo test` adds for test binaries: with
    // them the nested release build is not the one .ci/run made and cargo
    // builds it again.
    let mut build = Command::new("deploy/image/build");
    build.current_dir(repo_root());
    for (k, _) in std::env::vars() {
        let keep = ["CARGO_TARGET_DIR", "CARGO_HOME", "CARGO_TERM_COLOR"];
        if (k.starts_with("CARGO") && !keep.contains(&k.as_str())) || k == "LD_LIBRARY_PATH" {
            build.env_remove(k);
        }
    }
    let out = build.output().unwrap();
    let built = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "{built}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archive = std::path::PathBuf::from(&built);
    assert!(archive.is_file(), "{built}");

    // The OCI archive: index → manifest → config and layers.
    let layout = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(layout.path()),
    );
    let index = json(&layout.path().join("index.json"));
    let manifest = json(&blob(
        layout.path(),
        index["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let config = json(&blob(
        layout.path(),
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    let image = &config["config"];
    let rootfs = tempfile::tempdir().unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(blob(layout.path(), layer["digest"].as_str().unwrap()))
                .arg("-C")
                .arg(rootfs.path()),
        );
    }
    let user = image["User"].as_str().unwrap().to_owned();
    assert_eq!(user, "65532:65532", "a non-root user");
    let entrypoint: Vec<String> = image["Entrypoint"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let cmd: Vec<String> = image["Cmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(cmd, ["run"], "warren run is the default command");
    let env: Vec<(String, String)> = image["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let (k, v) = v.as_str().unwrap().split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    // The image as a runtime would start it: its user, its environment
    // only, its entry point.
    let in_image = |args: &[String]| {
        let mut c = Command::new("chroot");
        c.arg(format!("--userspec={user}"))
            .arg(rootfs.path())
            .args(&entrypoint)
            .args(args)
            .env_clear()
            .envs(env.iter().cloned());
        c
    };

    let version = run_ok(&mut in_image(&["--version".to_owned()]));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    // The plugins volume: a plugin placed where the image looks.
    let plugins = rootfs.path().join("var/lib/warren/plugins");
    std::fs::copy(
        warren_it::plugins::wasm("noop").unwrap(),
        plugins.join("noop.wasm"),
    )
    .unwrap();
    run_ok(
        Command::new("chown")
            .arg("-R")
            .arg("65532:65532")
            .arg(&plugins),
    );
    let port = warren_it::ports::free_port().unwrap();
    let queue = warren_it::broker::unique("image-in");
    let stream = format!("warren:spool:it-{}", uuid::Uuid::new_v4().simple());
    let mut run = in_image(&cmd);
    run.env("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        .env("WARREN_SPOOL_URL", "redis://127.0.0.1:6379")
        .env("WARREN_SPOOL_STREAM_KEY", &stream)
        .env("WARREN_ADMIN_BIND", format!("127.0.0.1:{port}"))
        .env(
            "WARREN_DISPATCH_RETRY_EXCHANGE",
            warren_it::broker::unique("retry"),
        )
        .env(
            "WARREN_DISPATCH_DEAD_LETTER_EXCHANGE",
            warren_it::broker::unique("dlx"),
        )
        .env(
            "WARREN_DISPATCH_DEAD_LETTER_QUEUE",
            warren_it::broker::unique("dlq"),
        )
        .env(
            "WARREN_PLUGIN__NOOP__SUBSCRIPTIONS",
            format!("[{{ queue = \"{queue}\" }}]"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    let child = KillOnDrop(run.spawn().unwrap());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    warren_it::wait::until_true(
        "/ready 200 from the image",
        Duration::from_secs(60),
        || async {
            warren_it::http::request(addr, "GET", "/ready", &[], None)
                .await
                .is_ok_and(|r| r.status == 200)
        },
    )
    .await
    .unwrap();
    // The compile cache went to its volume, not the read-only root.
    assert!(
        rootfs.path().join("var/cache/warren/compiled").is_dir(),
        "compile cache on its volume"
    );
    warren_it::process::signal(&child.0, "TERM").unwrap();
    drop(child);
    let broker = warren_it::broker::Broker::shared().await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
}
