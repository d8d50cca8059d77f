//! `warren validate`: everything `warren run` would refuse or fail to load,
//! found without connecting to anything and reported at once.
//!
//! Checks the file and the `WARREN_*` environment ([`Config::load_checked`]:
//! a key that does not parse is reported and the rest still checked), the
//! plugins directory, and each plugin file's load result under its
//! `[plugin.<name>]` settings. Does not contact the broker or Redis: their
//! availability is not configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::dispatch::reload::{self, subscriptions_for};
use crate::plugins::PluginRuntime;

/// A plugin that loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidPlugin {
    pub name: String,
    pub version: String,
    pub file: PathBuf,
    /// The queues it would consume.
    pub queues: Vec<String>,
}

/// What `warren validate` found.
#[derive(Debug, Default)]
pub struct Validation {
    /// Every problem, in file order, then the plugins directory's.
    pub problems: Vec<String>,
    pub plugins: Vec<ValidPlugin>,
}

impl Validation {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check the configuration at `path` (none: defaults) with `env`
/// overrides, and the plugins it names.
pub async fn validate(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    plugins_dir: Option<PathBuf>,
) -> Validation {
    let (config, problems) = Config::load_checked(path, env);
    let mut out = Validation {
        problems,
        plugins: Vec::new(),
    };
    // A file that is not TOML at all says nothing about the plugins.
    let Some(mut config) = config else {
        return out;
    };
    if let Some(dir) = plugins_dir {
        config.plugins.dir = dir;
    }
    // What `warren run` checks when it builds its clients (URLs lapin or
    // redis cannot parse), once the settings themselves are sound: before,
    // it would repeat their problems.
    if out.problems.is_empty() {
        if let Err(e) = crate::amqp::Amqp::new(config.amqp.supervisor("main")) {
            out.problems.push(e.to_string());
        }
        if let Err(e) = crate::buffer::Spool::new(config.spool.clone()) {
            out.problems.push(format!("spool: {e}"));
        }
    }
    let runtime = match PluginRuntime::new(config.plugins.runtime.clone()) {
        Ok(rt) => rt,
        Err(e) => {
            out.problems.push(format!("plugins.runtime: {e}"));
            return out;
        }
    };
    let scan = match reload::scan(
        &runtime,
        &config.plugins.dir,
        &config.plugin,
        &BTreeMap::new(),
        &[],
    )
    .await
    {
        Ok(scan) => scan,
        Err(e) => {
            out.problems.push(format!("plugins.dir: {e}"));
            return out;
        }
    };
    out.problems.extend(
        scan.failed
            .into_iter()
            .map(|f| format!("plugin file {}", f.error)),
    );
    for candidate in scan.plugins.values() {
        let p = &candidate.plugin;
        let subscriptions = subscriptions_for(&config.plugin, p);
        out.plugins.push(ValidPlugin {
            name: p.name().to_string(),
            version: p.version().to_string(),
            file: p.path().to_path_buf(),
            queues: subscriptions.into_iter().map(|s| s.queue).collect(),
        });
    }
    out
}
