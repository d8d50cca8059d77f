//! `[plugin.<name>]`: what the operator sets for one plugin, over its
//! manifest. Plain data the configuration gathers and the reloader reads.

use std::collections::BTreeMap;

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::{Deserialize, Serialize};

use super::LimitsOverride;
use super::manifest::Subscription;

/// `[plugin.<name>]`: host-side settings of one plugin; each wins over the
/// plugin's manifest.
#[derive(Debug, Clone, Default, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct PluginOverride {
    /// Limits overrides.
    pub limits: LimitsOverride,
    /// Values for the plugin's `config(key)` import and `wasi:config/store`.
    /// Numbers and booleans are passed as their text. A secret is given by
    /// where it is, never by value: `{ env = "NAME" }` (an environment
    /// variable of Warren's) or `{ file = "/run/secrets/x" }` (the file's
    /// contents, trailing newline removed, read at start and on every
    /// reload). Only the reference is shown in `/config`; the value is
    /// never printed, logged or traced by Warren.
    pub config: BTreeMap<String, toml::Value>,
    /// Replaces the manifest's subscriptions when present.
    pub subscriptions: Option<Vec<Subscription>>,
    /// Effectively-once handling for every subscription of this plugin:
    /// `{ key = "message-id" | "header:<name>" | "json:<pointer>", window
    /// = "1h", on-store-down = "pause" | "at-least-once" }`. A delivery
    /// whose key was handled within the window is acknowledged without
    /// running the plugin; a redelivery of one handled but not finished
    /// replays the recorded outputs and writes. Needs the spool's Redis
    /// (or `[kv]`'s).
    pub dedup: Option<super::manifest::Dedup>,
    /// `fresh` (default): a new instance per delivery; `reuse`: instances
    /// serve deliveries one at a time, up to `reuse-max-deliveries` each,
    /// and are dropped after any trap (see `plugins::InstancePolicy`).
    pub instance: InstanceSetting,
    /// Deliveries one reused instance serves before it is replaced
    /// (default 1000).
    pub reuse_max_deliveries: Option<u32>,
    /// Outbound HTTP grants of this plugin, on top of
    /// `plugins.runtime.allow-outbound`: origins (`https://api.example.com`,
    /// `https://*.example.com`) and address ranges (`10.1.0.0/16`). A
    /// loopback, private, link-local or metadata address is reached only
    /// through a grant of its host by name or of a range containing it.
    pub allow_outbound: Vec<String>,
}

/// `[plugin.<name>] instance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceSetting {
    #[default]
    Fresh,
    Reuse,
}

impl PluginOverride {
    /// The instance policy these settings ask for.
    pub fn instance_policy(&self) -> super::InstancePolicy {
        match self.instance {
            InstanceSetting::Fresh => super::InstancePolicy::Fresh,
            InstanceSetting::Reuse => super::InstancePolicy::Reuse {
                max_deliveries: self.reuse_max_deliveries.unwrap_or(1000),
            },
        }
    }
}

impl PluginOverride {
    /// Every problem with `[plugin.<name>]`.
    pub(crate) fn problems(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        if !super::manifest::is_valid_name(name) {
            out.push(format!(
                "[plugin.{name}]: {name:?} is not a valid plugin name"
            ));
        }
        if self.reuse_max_deliveries == Some(0) {
            out.push(format!(
                "plugin.{name}.reuse-max-deliveries must be at least 1"
            ));
        }
        for (key, v) in &self.config {
            if let Err(e) = config_value(v) {
                out.push(format!("plugin.{name}.config.{key}: {e}"));
            }
        }
        if let Err(e) = super::outbound::OperatorGrants::parse(&self.allow_outbound) {
            out.push(format!("plugin.{name}.allow-outbound: {e}"));
        }
        for s in self.subscriptions.iter().flatten() {
            out.extend(
                s.problems()
                    .into_iter()
                    .map(|p| format!("plugin.{name}: {p}")),
            );
        }
        if let Some(d) = &self.dedup {
            out.extend(
                d.problems()
                    .into_iter()
                    .map(|p| format!("plugin.{name}.{p}")),
            );
        }
        out
    }

    /// `config` as strings, the form the plugin sees, with secrets read
    /// from their environment variable or file. A secret that cannot be
    /// read is left out (validation reports it, naming the key only).
    pub fn config_strings(&self) -> BTreeMap<String, String> {
        self.config
            .iter()
            .filter_map(|(k, v)| config_value(v).ok().map(|s| (k.clone(), s)))
            .collect()
    }
}

/// The text a plugin sees for one `config` value: a `{ env }` or `{ file }`
/// reference read now, anything else as its text. Errors never contain the
/// value.
fn config_value(v: &toml::Value) -> Result<String, String> {
    let toml::Value::Table(t) = v else {
        return Ok(match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    };
    match (t.get("env"), t.get("file"), t.len()) {
        (Some(toml::Value::String(name)), None, 1) => std::env::var(name)
            .map_err(|_| format!("environment variable {name} is not set (or not UTF-8)")),
        (None, Some(toml::Value::String(path)), 1) => std::fs::read_to_string(path)
            .map(|s| s.strip_suffix('\n').map(str::to_owned).unwrap_or(s))
            .map_err(|e| format!("cannot read secret file {path}: {}", e.kind())),
        _ => Err("a table value must be { env = \"NAME\" } or { file = \"/path\" }".into()),
    }
}
