//! The plugins directory: every `*.wasm` file in it, loaded and checked.
//! A broken file is reported and skipped; the others load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::plugin::{Plugin, PluginSettings};
use super::runtime::PluginRuntime;

/// What loading a directory found.
#[derive(Debug, Default)]
pub struct DirectoryLoad {
    /// Loaded plugins, by manifest name.
    pub loaded: BTreeMap<String, Plugin>,
    /// Files that are not valid plugins, with a one-line reason each.
    pub failed: Vec<(PathBuf, String)>,
}

/// Why the directory itself could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read plugins directory {path}: {source}")]
pub struct DirectoryError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The `*.wasm` files in `dir`, sorted by name.
pub fn wasm_files(dir: &Path) -> Result<Vec<PathBuf>, DirectoryError> {
    let fail = |source| DirectoryError {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(fail)? {
        let path = entry.map_err(fail)?.path();
        if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

impl PluginRuntime {
    /// Load every `*.wasm` in `dir`. `settings` are per manifest name;
    /// plugins without an entry get the defaults. Two files declaring the
    /// same plugin name: the first (by file name) wins, the second fails.
    pub async fn load_directory(
        &self,
        dir: &Path,
        settings: &BTreeMap<String, PluginSettings>,
    ) -> Result<DirectoryLoad, DirectoryError> {
        let mut out = DirectoryLoad::default();
        for path in wasm_files(dir)? {
            match self.load_file(&path, &PluginSettings::default()).await {
                Ok(plugin) => {
                    let name = plugin.name().to_string();
                    if let Some(first) = out.loaded.get(&name) {
                        out.failed.push((
                            path.clone(),
                            format!(
                                "{}: plugin name {name:?} is already loaded from {}",
                                path.display(),
                                first.path().display()
                            ),
                        ));
                        continue;
                    }
                    let plugin = match settings.get(&name) {
                        Some(s) => plugin.with_settings(s),
                        None => plugin,
                    };
                    out.loaded.insert(name, plugin);
                }
                Err(e) => out.failed.push((path, e.to_string())),
            }
        }
        Ok(out)
    }
}
