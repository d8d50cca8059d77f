//! `warren config`: the effective configuration as commented TOML, every
//! key with its value (defaults filled in, secrets redacted) under its
//! documentation.
//!
//! The comments are the doc comments of the `config` structs' fields (read
//! at run time through `documented`), so the README's configuration
//! reference, which is this output for an empty file, cannot drift from the
//! code: a test compares them. Reads nothing itself; the caller loads the
//! [`Config`].

use std::fmt::Write as _;

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::Serialize;

use crate::config::Config;
use crate::plugins::PluginOverride;

/// `config` as commented TOML. `source` says where it came from (the
/// first comment line).
pub fn render(config: &Config, source: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Warren's effective configuration: {source}, defaults filled in;\n\
         # passwords and tokens show as <redacted>. Any key can be set from the\n\
         # environment as WARREN_<SECTION>_<KEY> (dashes as underscores)."
    );
    section(&mut out, "amqp", &config.amqp);
    section(&mut out, "spool", &config.spool);
    section(&mut out, "kv", &config.kv);
    section(&mut out, "plugins", &config.plugins);
    section(&mut out, "plugins.runtime", &config.plugins.runtime);
    if config.plugin.is_empty() {
        // None configured: the keys, commented out, for reference.
        let mut template = String::new();
        section(&mut template, "plugin.<name>", &PluginOverride::default());
        for line in template.lines() {
            match line {
                "" => out.push('\n'),
                l if l.starts_with('#') => {
                    let _ = writeln!(out, "{l}");
                }
                l => {
                    let _ = writeln!(out, "# {l}");
                }
            }
        }
    } else {
        for (name, o) in &config.plugin {
            section(&mut out, &format!("plugin.{name}"), o);
        }
    }
    section(&mut out, "dispatch", &config.dispatch);
    section(&mut out, "admin", &config.admin);
    section(&mut out, "telemetry", &config.telemetry);
    section(&mut out, "shutdown", &config.shutdown);
    out
}

/// `[header]` with the section's doc, then each field under its doc.
/// Fields that are tables of their own (subsections) are left to their own
/// call; unset optional fields are shown commented out.
fn section<T: Serialize + DocumentedFieldsOpt + DocumentedOpt>(
    out: &mut String,
    header: &str,
    value: &T,
) {
    let table = match toml::Value::try_from(value) {
        Ok(toml::Value::Table(t)) => t,
        Ok(other) => {
            let _ = writeln!(out, "\n# [{header}] is not a table: {other}");
            return;
        }
        Err(e) => {
            let _ = writeln!(out, "\n# [{header}] cannot be shown: {e}");
            return;
        }
    };
    out.push('\n');
    if let Some(doc) = T::DOCS {
        comment(out, doc);
    }
    let _ = writeln!(out, "[{header}]");
    for (i, name) in T::FIELD_NAMES.iter().enumerate() {
        let key = name.replace('_', "-");
        let doc = T::FIELD_DOCS.get(i).copied().flatten();
        match table.get(&key) {
            Some(toml::Value::Table(_)) if !is_inline(&key) => continue,
            Some(v) => {
                if let Some(doc) = doc {
                    comment(out, doc);
                }
                let _ = writeln!(out, "{key} = {v}");
            }
            None => {
                if let Some(doc) = doc {
                    comment(out, doc);
                }
                let _ = writeln!(out, "# {key} is unset");
            }
        }
    }
}

/// Table-valued keys written inline (`limits = { ... }`) rather than as
/// subsections.
fn is_inline(key: &str) -> bool {
    matches!(key, "limits" | "config")
}

/// `doc` as `# ` lines (rustdoc's own indentation removed).
fn comment(out: &mut String, doc: &str) {
    for line in doc.lines() {
        let line = line.trim();
        if line.is_empty() {
            out.push_str("#\n");
        } else {
            let _ = writeln!(out, "# {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_shown_under_its_doc_and_secrets_are_redacted() {
        let env = vec![
            (
                "WARREN_AMQP_URL".to_owned(),
                "amqp://u:hunter2@h:5672/v".to_owned(),
            ),
            (
                "WARREN_ADMIN_TOKEN".to_owned(),
                "supersecrettoken1234".to_owned(),
            ),
        ];
        let c = Config::parse("[plugin.echo]\ninstance = \"reuse\"\n", env).unwrap();
        let text = render(&c, "test");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("supersecrettoken1234"), "{text}");
        assert!(
            text.contains("url = \"amqp://u:<redacted>@h:5672/v\""),
            "{text}"
        );
        assert!(text.contains("token = \"<redacted>\""), "{text}");
        assert!(text.contains("[plugins.runtime]\n"), "{text}");
        assert!(text.contains("[plugin.echo]\n"), "{text}");
        assert!(text.contains("instance = \"reuse\""), "{text}");
        assert!(text.contains("# Requested heartbeat, seconds.\nheartbeat-secs = 10\n"));
        // What it prints is a valid configuration file.
        let defaults = render(&Config::default(), "defaults");
        let again = Config::parse(&defaults, Vec::new()).unwrap();
        assert_eq!(again.dispatch.max_attempts, 5);
        assert!(defaults.contains("# [plugin.<name>]\n"), "{defaults}");
    }
}
