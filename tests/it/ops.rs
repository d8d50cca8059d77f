//! The operator's files in `ops/`: the Prometheus alert rules pass
//! `promtool check rules`, and every metric they and the Grafana dashboard
//! name is one a running Warren exports (checked by the metrics test in
//! `admin`, which scrapes a Warren that has done each kind of work).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use warren_it::plugins::repo_root;

pub(crate) const RULES: &str = "ops/prometheus/warren-rules.yml";
pub(crate) const DASHBOARD: &str = "ops/grafana/warren.json";

/// `promtool` from PATH, else where `.ci/run` unpacks Debian's
/// `prometheus` package.
fn promtool() -> PathBuf {
    let on_path = Command::new("promtool").arg("--version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return PathBuf::from("promtool");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cached = home.join(".cache/warren/prometheus/usr/bin/promtool");
    assert!(
        cached.is_file(),
        "promtool is not on PATH nor at {} (.ci/run installs it from Debian's prometheus package)",
        cached.display()
    );
    cached
}

#[test]
fn alert_rules_pass_promtool() {
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(repo_root().join(RULES))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// The metric names (`warren_*`) an ops file mentions, histogram series
/// suffixes removed.
pub(crate) fn metric_names(file: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("warren_") {
        // Only whole names: not the tail of another identifier.
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_owned());
        }
        rest = &tail[end..];
    }
    assert!(!names.is_empty(), "{file} names no warren_ metric");
    names
}

/// Check a `/metrics` text: it parses as the Prometheus text format, every
/// family has HELP and TYPE, and every metric the dashboard and the rules
/// name is there.
pub(crate) fn check_exposition(text: &str) {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let histograms: BTreeSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| matches!(s.value, prometheus_parse::Value::Histogram(_)))
        .map(|s| s.metric.as_str())
        .collect();
    let mut families = BTreeSet::new();
    for s in &scrape.samples {
        // The parser reads a histogram's `_sum` and `_count` as samples of
        // their own, untyped: they belong to the histogram's family.
        let of_histogram = ["_sum", "_count"]
            .iter()
            .filter_map(|suffix| s.metric.strip_suffix(suffix))
            .any(|base| histograms.contains(base));
        if of_histogram {
            continue;
        }
        assert!(
            scrape.docs.contains_key(&s.metric),
            "{} has no HELP:\n{text}",
            s.metric
        );
        assert!(
            !matches!(s.value, prometheus_parse::Value::Untyped(_)),
            "{} has no TYPE:\n{text}",
            s.metric
        );
        families.insert(s.metric.clone());
    }
    for file in [RULES, DASHBOARD] {
        let missing: Vec<String> = metric_names(file)
            .into_iter()
            .filter(|n| !families.contains(n))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics Warren does not export: {missing:?}\nexported: {families:?}"
        );
    }
    assert!(
        text.lines().any(|l| l.starts_with("warren_build_info{")
            && l.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))),
        "no warren_build_info with the version:\n{text}"
    );
}
