//! The plugins directory: which `*.wasm` files it holds. Loading them (and
//! reporting the broken ones) is `dispatch::reload::scan`'s job.

use std::path::{Path, PathBuf};

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
