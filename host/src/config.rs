//! `warren.toml`: one serde tree of the subsystems' own config sections,
//! every key optional with a working default, environment overrides, and
//! validation that reports every problem at once.
//!
//! Each subsystem owns its section and its checks (`problems()`):
//! [`AmqpSection`], [`SpoolConfig`], [`RuntimeConfig`], [`DispatchConfig`],
//! [`AdminConfig`], [`TelemetryConfig`], [`ShutdownConfig`]; this module
//! owns only the tree, `[plugins]` and `[plugin.<name>]`, and reading.
//! `main` loads it once and hands each subsystem its section by value;
//! nothing else reads files or the environment for settings.
//!
//! Environment overrides are named `WARREN_<SECTION>_<KEY>` with the key's
//! dashes written as underscores: `WARREN_AMQP_URL`, `WARREN_ADMIN_TOKEN`,
//! `WARREN_PLUGINS_DIR`, `WARREN_SPOOL_SENTINELS` (a TOML array or a
//! comma-separated list). Nested keys are separated by a double underscore,
//! each part's dashes again written as underscores:
//! `WARREN_PLUGINS__RUNTIME__MAX_INSTANCES`,
//! `WARREN_PLUGIN__PY_ROUTER__INSTANCE` (`[plugin.py-router] instance`),
//! `WARREN_PLUGIN__ECHO__LIMITS__DEADLINE_MS`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::admin::AdminConfig;
pub use crate::amqp::AmqpSection;
pub use crate::buffer::SpoolConfig;
pub use crate::dispatch::DispatchConfig;
use crate::kv::KvConfig;
pub use crate::plugins::{InstanceSetting, LimitsOverride, PluginOverride, RuntimeConfig};
pub use crate::secret::Secret;
pub use crate::shutdown::ShutdownConfig;
pub use crate::telemetry::TelemetryConfig;

/// Exit code for a configuration error (EX_CONFIG, as `vector validate`
/// and sysexits.h use it).
pub const EXIT_CONFIG: u8 = 78;

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub amqp: AmqpSection,
    pub spool: SpoolConfig,
    /// Plugins' key-value state (`[kv]`).
    pub kv: KvConfig,
    pub plugins: PluginsSection,
    /// Per-plugin overrides, by manifest name (`[plugin.<name>]`).
    pub plugin: BTreeMap<String, PluginOverride>,
    pub dispatch: DispatchConfig,
    pub admin: AdminConfig,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
}

/// `[plugins]`: where plugins come from and the engine settings.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct PluginsSection {
    /// Directory scanned for `*.wasm` components.
    pub dir: PathBuf,
    /// Engine-wide settings (`[plugins.runtime]`).
    pub runtime: RuntimeConfig,
    /// Poll the directory this often, ms, and reload when its `*.wasm`
    /// files changed and then stayed unchanged for one more poll; 0 (the
    /// default) turns watching off. `warren run --watch` sets 1000.
    pub watch_ms: u64,
}

impl Default for PluginsSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./plugins"),
            runtime: RuntimeConfig::default(),
            watch_ms: 0,
        }
    }
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration{}:\n  - {}", source_name(.source_path), .problems.join("\n  - "))]
pub struct ConfigError {
    pub source_path: Option<PathBuf>,
    pub problems: Vec<String>,
}

fn source_name(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

const SECTIONS: &[&str] = &[
    "amqp",
    "spool",
    "kv",
    "plugins",
    "plugin",
    "dispatch",
    "admin",
    "telemetry",
    "shutdown",
];

impl Config {
    /// Load `path` (or only defaults when `None`), apply `env` overrides
    /// (`WARREN_*` pairs), and validate.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_path: path.map(Path::to_path_buf),
            problems,
        };
        match Self::load_checked(path, env) {
            (Some(cfg), problems) if problems.is_empty() => Ok(cfg),
            (_, problems) => Err(fail(problems)),
        }
    }

    /// Like [`Config::load`], but returns what could be read alongside
    /// every problem: a key that does not parse is reported and left at
    /// its default, so the rest is still read and checked. `None` when the
    /// file cannot be read or is not TOML.
    pub fn load_checked(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Option<Config>, Vec<String>) {
        let text = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) => return (None, vec![format!("cannot read {}: {e}", p.display())]),
            },
            None => String::new(),
        };
        Self::parse_checked(&text, env)
    }

    /// Parse TOML text with env overrides; every problem in the error.
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<String>> {
        match Self::parse_checked(text, env) {
            (Some(cfg), problems) if problems.is_empty() => Ok(cfg),
            (_, problems) => Err(problems),
        }
    }

    /// [`Config::parse`] returning the configuration read so far with the
    /// problems (see [`Config::load_checked`]).
    pub fn parse_checked(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Option<Config>, Vec<String>) {
        let mut problems = Vec::new();
        let mut root: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => return (None, vec![format!("not valid TOML: {e}")]),
        };
        apply_env(&mut root, env, &mut problems);
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(format!(
                    "unknown section [{key}] (known: {})",
                    SECTIONS.join(", ")
                ));
            }
        }
        let mut cfg = Config {
            amqp: section(&root, "amqp", &mut problems),
            spool: section(&root, "spool", &mut problems),
            kv: section(&root, "kv", &mut problems),
            plugins: section(&root, "plugins", &mut problems),
            plugin: BTreeMap::new(),
            dispatch: section(&root, "dispatch", &mut problems),
            admin: section(&root, "admin", &mut problems),
            telemetry: section(&root, "telemetry", &mut problems),
            shutdown: section(&root, "shutdown", &mut problems),
        };
        match root.get("plugin") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    let what = format!("plugin.{name}");
                    match v {
                        toml::Value::Table(t) => {
                            let o = lenient::<PluginOverride>(t, &what, &mut problems);
                            cfg.plugin.insert(name.clone(), o);
                        }
                        _ => problems.push(format!("[{what}] must be a table")),
                    }
                }
            }
            Some(_) => problems.push("[plugin] must be a table of [plugin.<name>] tables".into()),
        }
        problems.extend(cfg.problems());
        (Some(cfg), problems)
    }

    /// Semantic problems (values of the right type but wrong), each
    /// section's own.
    fn problems(&self) -> Vec<String> {
        let mut out = self.amqp.problems();
        out.extend(self.spool.problems());
        out.extend(self.kv.problems());
        out.extend(self.plugins.runtime.problems());
        for (name, o) in &self.plugin {
            out.extend(o.problems(name));
        }
        out.extend(self.dispatch.problems());
        // Past the broker's consumer timeout the broker takes a delivery
        // back mid-handle: the wall budget must end first, so a slow
        // service becomes a retry and not a redelivery.
        let wall = u64::from(self.plugins.runtime.max_wall_deadline_ms);
        if wall >= self.dispatch.broker_consumer_timeout_ms {
            out.push(format!(
                "plugins.runtime.max-wall-deadline-ms ({wall}) must be below dispatch.broker-consumer-timeout-ms ({})",
                self.dispatch.broker_consumer_timeout_ms
            ));
        }
        out.extend(self.admin.problems());
        out.extend(self.telemetry.problems());
        out.extend(self.shutdown.problems());
        out
    }
}

/// Deserialize section `name` (absent: defaults), collecting type errors
/// and unknown keys.
fn section<T: DeserializeOwned + Default>(
    root: &toml::Table,
    name: &str,
    problems: &mut Vec<String>,
) -> T {
    match root.get(name) {
        None => T::default(),
        Some(toml::Value::Table(t)) => lenient(t, name, problems),
        Some(_) => {
            problems.push(format!("[{name}] must be a table"));
            T::default()
        }
    }
}

/// Deserialize `table` (the keys of `what`) key by key: a key whose value
/// does not fit is reported and left at its default, so one type error
/// does not hide the problems of the other keys (nor the semantic checks
/// of their values). Unknown keys are reported too.
fn lenient<T: DeserializeOwned + Default>(
    table: &toml::Table,
    what: &str,
    problems: &mut Vec<String>,
) -> T {
    let mut good = toml::Table::new();
    for (key, v) in table {
        let one = toml::Value::Table(toml::Table::from_iter([(key.clone(), v.clone())]));
        let mut unknown = Vec::new();
        let result: Result<T, _> =
            serde_ignored::deserialize(one, |path| unknown.push(path.to_string()));
        for path in unknown {
            problems.push(format!("unknown key {what}.{path}"));
        }
        match result {
            Ok(_) => {
                good.insert(key.clone(), v.clone());
            }
            // The first line: the rest repeats the key the prefix names.
            Err(e) => problems.push(format!(
                "{what}.{key}: {}",
                e.to_string().lines().next().unwrap_or_default().trim()
            )),
        }
    }
    match T::deserialize(toml::Value::Table(good)) {
        Ok(t) => t,
        Err(e) => {
            problems.push(format!("{what}: {}", e.to_string().trim()));
            T::default()
        }
    }
}

/// Apply `WARREN_*=value` pairs (the forms are in the module doc). A
/// value is parsed as a TOML value when it is one (number, boolean, array),
/// else taken as a string; `WARREN_SPOOL_SENTINELS` and `WARREN_AMQP_URLS`
/// also accept a comma-separated list.
fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<String>,
) {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("WARREN_") else {
            continue;
        };
        let Some(path) = env_path(rest) else {
            problems.push(format!(
                "environment variable {name}: unknown section (use WARREN_<SECTION>_<KEY>, or WARREN_<SECTION>__<KEY>__<KEY> for nested keys)"
            ));
            continue;
        };
        let value = parse_env_value(&path[path.len() - 1], &raw);
        if let Err(e) = insert_at(root, &path, value) {
            problems.push(format!("environment variable {name}: {e}"));
        }
    }
}

/// The key path a variable names (after `WARREN_`): its `__`-separated
/// parts, or a section and one key. Underscores in a part stand for
/// dashes. `None` when the first part is not a section.
fn env_path(rest: &str) -> Option<Vec<String>> {
    let lower = rest.to_ascii_lowercase();
    if lower.contains("__") {
        let parts: Vec<String> = lower.split("__").map(|p| p.replace('_', "-")).collect();
        let known = SECTIONS.contains(&parts[0].as_str());
        return (known && parts.len() > 1 && parts.iter().all(|p| !p.is_empty())).then_some(parts);
    }
    SECTIONS
        .iter()
        .filter(|s| **s != "plugin")
        .find_map(|s| lower.strip_prefix(&format!("{s}_")).map(|k| (*s, k)))
        .map(|(s, k)| vec![s.to_string(), k.replace('_', "-")])
}

/// Set `value` at `path`, making the tables on the way. A part matches an
/// existing key that differs only in `-` against `_` (a plugin named
/// `my_plugin` in the file is reached as `MY_PLUGIN`).
fn insert_at(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let mut table = root;
    let Some((last, parents)) = path.split_last() else {
        return Ok(());
    };
    let existing = |t: &toml::Table, part: &str| {
        t.keys()
            .find(|k| k.replace('_', "-") == part)
            .cloned()
            .unwrap_or_else(|| part.to_string())
    };
    for (depth, part) in parents.iter().enumerate() {
        let key = existing(table, part);
        let entry = table
            .entry(key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("[{}] must be a table", path[..=depth].join("."))),
        };
    }
    let key = existing(table, last);
    table.insert(key, value);
    Ok(())
}

fn parse_env_value(key: &str, raw: &str) -> toml::Value {
    if (key == "sentinels" || key == "urls") && !raw.trim_start().starts_with('[') {
        return toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        );
    }
    // A scalar like `5000`, `true` or `["a"]` parses as TOML; text does not.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// The `WARREN_*` variables of this process.
pub fn warren_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("WARREN_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(text, Vec::new())
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.plugins.dir, PathBuf::from("./plugins"));
        assert_eq!(c.admin.bind, "127.0.0.1:9090");
        assert!(c.spool.sentinels.is_empty());
        assert_eq!(c.spool.url, "redis://127.0.0.1:6379");
    }

    #[test]
    fn every_mistake_is_reported_at_once() {
        let text = r#"
            [amqp]
            url = "http://broker"
            heartbeat-secs = "ten"
            [spool]
            sentinals = ["redis://x:1"]
            [dispatch]
            max-attempts = 0
            [admin]
            bind = "nowhere"
            [bogus]
            x = 1
        "#;
        let p = parse(text).unwrap_err();
        let all = p.join("\n");
        assert!(all.contains("amqp:"), "type error in [amqp]: {all}");
        assert!(all.contains("unknown key spool.sentinals"), "{all}");
        assert!(all.contains("dispatch.max-attempts"), "{all}");
        assert!(all.contains("admin.bind \"nowhere\""), "{all}");
        assert!(all.contains("unknown section [bogus]"), "{all}");
        assert!(p.len() >= 5, "{all}");
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let env = vec![
            (
                "WARREN_AMQP_URL".to_string(),
                "amqp://u:p@h:5673/v".to_string(),
            ),
            ("WARREN_ADMIN_BIND".to_string(), "0.0.0.0:9999".to_string()),
            (
                "WARREN_ADMIN_TOKEN".to_string(),
                "0123456789abcdef-token".to_string(),
            ),
            ("WARREN_AMQP_HEARTBEAT_SECS".to_string(), "3".to_string()),
            (
                "WARREN_SPOOL_SENTINELS".to_string(),
                "redis://a:1, redis://b:2".to_string(),
            ),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let c = Config::parse("[amqp]\nurl = \"amqp://x\"\n", env).unwrap();
        assert_eq!(c.amqp.url, "amqp://u:p@h:5673/v");
        assert_eq!(c.amqp.heartbeat_secs, 3);
        assert_eq!(c.admin.bind, "0.0.0.0:9999");
        assert_eq!(c.spool.sentinels, vec!["redis://a:1", "redis://b:2"]);
    }

    #[test]
    fn unknown_env_section_is_a_problem() {
        let env = vec![("WARREN_NOPE_X".to_string(), "1".to_string())];
        let p = Config::parse("", env).unwrap_err();
        assert!(p[0].contains("WARREN_NOPE_X"), "{p:?}");
    }

    #[test]
    fn spool_security_mistakes_are_reported_together() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let all = parse(&format!(
            r#"
            [spool]
            sentinels = ["rediss://a:1", "redis://b:2"]
            password = "inline"
            password-file = "{pw}"
            sentinel-password-file = "/nonexistent/sentinel-pw"
            tls-cert-file = "{pw}"
            owner-lease-ms = 100
            "#,
            pw = pw.display()
        ))
        .unwrap_err()
        .join("\n");
        for want in [
            "spool addresses mix redis:// and rediss://",
            "set spool.password or spool.password-file, not both",
            "cannot read spool.sentinel-password-file /nonexistent/sentinel-pw",
            "spool.tls-cert-file and spool.tls-key-file go together",
            "spool.owner-lease-ms must be at least 3000",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(!all.contains("inline") && !all.contains("s3cret"), "{all}");
        let plain_tls = parse(
            r#"
            [spool]
            tls-ca-file = "/etc/hostname"
            "#,
        )
        .unwrap_err()
        .join("\n");
        assert!(
            plain_tls.contains("write rediss:// to turn TLS on"),
            "{plain_tls}"
        );
        let env = vec![(
            "WARREN_SPOOL_PASSWORD_FILE".to_owned(),
            pw.display().to_string(),
        )];
        let c = Config::parse("[spool]\nurl = \"redis://:x@127.0.0.1:6379\"", env).unwrap();
        assert_eq!(c.spool.password_file.as_deref(), Some(pw.as_path()));
    }

    #[test]
    fn instance_policy_is_set_per_plugin() {
        let c = parse(
            r#"
            [plugin.py-router]
            instance = "reuse"
            reuse-max-deliveries = 50
            [plugin.echo]
            "#,
        )
        .unwrap();
        assert_eq!(
            c.plugin["py-router"].instance_policy(),
            crate::plugins::InstancePolicy::Reuse { max_deliveries: 50 }
        );
        assert_eq!(
            c.plugin["echo"].instance_policy(),
            crate::plugins::InstancePolicy::Fresh
        );
        let all = parse("[plugin.x]\ninstance = \"sometimes\"\nreuse-max-deliveries = 0\n")
            .unwrap_err()
            .join("\n");
        assert!(all.contains("sometimes"), "{all}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let env = vec![
            (
                "WARREN_AMQP_URL".to_string(),
                "amqp://user:hunter2@h/v".to_string(),
            ),
            (
                "WARREN_ADMIN_TOKEN".to_string(),
                "supersecrettoken1234".to_string(),
            ),
        ];
        let c = Config::parse("", env).unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("supersecrettoken1234"), "{text}");
        assert!(text.contains("user:<redacted>@h/v"), "{text}");
    }

    #[test]
    fn plugin_overrides_parse_with_config_values_as_text() {
        let c = parse(
            r#"
            [plugin.echo]
            limits = { deadline-ms = 250 }
            config = { routing-key = "out", count = 3, loud = true }
            subscriptions = [ { queue = "echo.custom", prefetch = 5 } ]
        "#,
        )
        .unwrap();
        let o = &c.plugin["echo"];
        assert_eq!(o.limits.deadline_ms, Some(250));
        let cfg = o.config_strings();
        assert_eq!(cfg["routing-key"], "out");
        assert_eq!(cfg["count"], "3");
        assert_eq!(cfg["loud"], "true");
        let subs = o.subscriptions.as_ref().unwrap();
        assert_eq!(subs[0].queue, "echo.custom");
        assert_eq!(subs[0].prefetch, 5);
    }

    #[test]
    fn secrets_come_from_files_and_the_environment_and_are_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "file-secret-7f3a\n").unwrap();
        let toml = format!(
            "[plugin.echo]\nconfig = {{ token = {{ file = {:?} }}, home = {{ env = \"HOME\" }} }}\n",
            file.display()
        );
        let c = parse(&toml).unwrap();
        let cfg = c.plugin["echo"].config_strings();
        assert_eq!(cfg["token"], "file-secret-7f3a");
        assert_eq!(Some(cfg["home"].clone()), std::env::var("HOME").ok());
        // What `/config` and `warren config` print, and the debug form logs
        // would use: the reference, never the value.
        let rendered = crate::config_doc::render(&c, "test");
        assert!(rendered.contains(&file.display().to_string()), "{rendered}");
        for shown in [rendered, format!("{c:?}")] {
            assert!(!shown.contains("file-secret-7f3a"), "{shown}");
        }
        // A file read again after it changed (a reload).
        std::fs::write(&file, "rotated-secret\n").unwrap();
        assert_eq!(c.plugin["echo"].config_strings()["token"], "rotated-secret");
        // A missing file or variable is a problem naming the key, never a value.
        let bad = "[plugin.echo]\nconfig = { a = { file = \"/nonexistent/x\" }, b = { env = \"WARREN_NO_SUCH_VAR_27\" }, c = { nope = 1 } }\n";
        let all = parse(bad).unwrap_err().join("\n");
        assert!(
            all.contains("plugin.echo.config.a") && all.contains("/nonexistent/x"),
            "{all}"
        );
        assert!(all.contains("WARREN_NO_SUCH_VAR_27"), "{all}");
        assert!(all.contains("plugin.echo.config.c"), "{all}");
    }

    #[test]
    fn the_wall_budget_ends_before_the_broker_takes_a_delivery_back() {
        let all = parse(
            "[plugins.runtime]\nmax-wall-deadline-ms = 60000\n[dispatch]\nbroker-consumer-timeout-ms = 60000\n",
        )
        .unwrap_err()
        .join("\n");
        assert!(all.contains("max-wall-deadline-ms"), "{all}");
    }

    #[test]
    fn nested_keys_are_set_from_the_environment() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = Config::parse(
            "[plugin.my_plugin]\ninstance = \"fresh\"\n",
            env(&[
                ("WARREN_PLUGINS__RUNTIME__MAX_INSTANCES", "64"),
                ("WARREN_PLUGIN__PY_ROUTER__INSTANCE", "reuse"),
                ("WARREN_PLUGIN__PY_ROUTER__LIMITS__DEADLINE_MS", "250"),
                ("WARREN_PLUGIN__MY_PLUGIN__INSTANCE", "reuse"),
                ("WARREN_SPOOL__DRAIN_WINDOW", "8"),
            ]),
        )
        .unwrap();
        assert_eq!(c.plugins.runtime.max_instances, 64);
        assert_eq!(c.plugin["py-router"].instance, InstanceSetting::Reuse);
        assert_eq!(c.plugin["py-router"].limits.deadline_ms, Some(250));
        assert_eq!(c.plugin["my_plugin"].instance, InstanceSetting::Reuse);
        assert_eq!(c.spool.drain_window, 8);
        let p = Config::parse("", env(&[("WARREN_NOPE__X", "1")])).unwrap_err();
        assert!(p[0].contains("WARREN_NOPE__X"), "{p:?}");
        let p = Config::parse(
            "[plugins]\nruntime = 3\n",
            env(&[("WARREN_PLUGINS__RUNTIME__X", "1")]),
        )
        .unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.contains("[plugins.runtime] must be a table")),
            "{p:?}"
        );
    }
}
