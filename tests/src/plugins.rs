//! Builds `plugins/` for `wasm32-wasip2` from source, once per process, so
//! tests never depend on a `.wasm` left lying around.
//!
//! The build runs `cargo build --release` in `plugins/` (its own workspace
//! and `.cargo/config.toml`) into `<target>/wasm-plugins`, a target dir of
//! its own so it never waits on the lock of the cargo that runs the tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The repository root: the parent of the package whose test or bench is
/// running (every package is a child of the root). Read at run time first:
/// several clones sharing one `CARGO_TARGET_DIR` (CI's cache) can reuse this
/// crate compiled in another clone, whose path `env!` would have baked in.
pub fn repo_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The target dir used for the plugin build.
fn plugins_target_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    base.join("wasm-plugins")
}

static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Build every plugin (once per process) and return the directory holding
/// the `.wasm` files.
pub fn build_all() -> Result<PathBuf> {
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// `cargo` in `plugins/`, without the settings of the cargo running the
/// tests (they must not leak into the plugins' build).
fn plugins_cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root().join("plugins"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

fn build() -> Result<PathBuf> {
    let target_dir = plugins_target_dir();
    let out = plugins_cargo()
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target_dir)
        .output()
        .context("failed to run cargo to build the plugins")?;
    if !out.status.success() {
        bail!(
            "building plugins/ for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(target_dir.join("wasm32-wasip2").join("release"))
}

/// The path of plugin `name` (crate name, e.g. `spin-loop`), built.
pub fn wasm(name: &str) -> Result<PathBuf> {
    let dir = build_all()?;
    // Libraries are named with underscores, binaries keep their dashes.
    let lib = dir.join(format!("{}.wasm", name.replace('-', "_")));
    let bin = dir.join(format!("{name}.wasm"));
    match (lib.exists(), bin.exists()) {
        (true, _) => Ok(lib),
        (false, true) => Ok(bin),
        _ => bail!("plugin {name} was not built: {} is missing", lib.display()),
    }
}

/// Run the SDK's unit tests (`cargo test -p warren-sdk`) natively, where
/// wit-bindgen stubs the host imports, into a target dir of their own;
/// returns their output, or fails with it.
pub fn sdk_tests() -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = Command::new(rustc)
        .arg("-vV")
        .output()
        .context("failed to run rustc -vV")?;
    let host = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV names no host")?;
    let target_dir = plugins_target_dir().with_file_name("sdk-native");
    let out = plugins_cargo()
        .args([
            "test",
            "-p",
            "warren-sdk",
            "--target",
            &host,
            "--target-dir",
        ])
        .arg(&target_dir)
        .output()
        .context("failed to run cargo test for the SDK")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("the SDK's tests failed:\n{text}");
    }
    Ok(text)
}
