//! The shipping files: the systemd unit passes `systemd-analyze verify`
//! and keeps its hardening, and the supply-chain check fails on a lockfile
//! with a known-vulnerable version.

use std::path::Path;
use std::process::Command;

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
    // The secret file is the pod's; here a stand-in.
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "pw\n").unwrap();
    let toml = toml.replace(
        "/etc/warren/secrets/redis-password",
        &secret.path().display().to_string(),
    );
    let c = warren::config::Config::parse(&toml, Vec::new()).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.shutdown.grace_period_ms, grace_ms);
    assert!(c.spool.password_file.is_some());
    let scaled = read("scaledobject.yaml");
    for gauge in [
        warren::admin::metric::ROUTE_READY,
        warren::admin::metric::ROUTE_UNACKED,
        "warren_spool_depth",
    ] {
        assert!(scaled.contains(gauge), "the ScaledObject scales on {gauge}");
    }
}
