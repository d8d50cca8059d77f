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

/// A plugin written in another language, built from `plugins/<lang>/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lang {
    /// `plugins/python/<name>/app.py` over `plugins/python/sdk`,
    /// componentize-py.
    Python,
    /// `plugins/js/<name>/plugin.js` over `plugins/js/sdk`,
    /// componentize-qjs `--sync`.
    Js,
}

impl Lang {
    /// The directory under `plugins/`, and the argument of
    /// `plugins/tools/install`.
    pub fn dir(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }
}

type Built = std::collections::HashMap<(Lang, String), Result<PathBuf, String>>;
static POLYGLOT: std::sync::Mutex<Option<Built>> = std::sync::Mutex::new(None);

/// `plugins/python/<name>` (e.g. `echo`, `router`, `fixture`) built with
/// componentize-py: the path of its `.wasm`.
pub fn python_wasm(name: &str) -> Result<PathBuf> {
    polyglot_wasm(Lang::Python, name)
}

/// `plugins/js/<name>` built with componentize-qjs `--sync`: the path of
/// its `.wasm`.
pub fn js_wasm(name: &str) -> Result<PathBuf> {
    polyglot_wasm(Lang::Js, name)
}

/// Plugin `name` of `lang`, built from source once per process, and only
/// when no build of the same sources (example, SDK, WIT, toolchain script)
/// is cached under `<target>/polyglot`: a Python build takes ~15 s of CPU.
/// Installs the pinned toolchain first (`plugins/tools/install`).
pub fn polyglot_wasm(lang: Lang, name: &str) -> Result<PathBuf> {
    // Held across the build: concurrent tests of one process wait for one
    // build instead of starting the same one (two cores).
    let mut built = POLYGLOT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(Default::default);
    built
        .entry((lang, name.to_string()))
        .or_insert_with(|| build_polyglot(lang, name).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Every file under `dir`, sorted, skipping `__pycache__` and
/// `node_modules`.
fn source_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort();
    for p in entries {
        let skip = p
            .file_name()
            .is_some_and(|n| n == "__pycache__" || n == "node_modules");
        if skip {
            continue;
        }
        if p.is_dir() {
            source_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// A hash of everything a build of `name` depends on.
fn polyglot_key(lang: Lang, name: &str) -> Result<String> {
    use sha2::Digest;
    let root = repo_root();
    let base = root.join("plugins").join(lang.dir());
    let mut files = Vec::new();
    for dir in [base.join(name), base.join("sdk"), root.join("wit")] {
        source_files(&dir, &mut files)?;
    }
    files.push(root.join("plugins/tools/install"));
    let mut h = sha2::Sha256::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap_or(f);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
        h.update([0]);
    }
    Ok(h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The build command for `lang`, with the tool installed.
fn polyglot_tool(lang: Lang) -> Result<PathBuf> {
    let script = repo_root().join("plugins/tools/install");
    let out = Command::new(&script)
        .arg(lang.dir())
        .output()
        .with_context(|| format!("failed to run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed:\n{}",
            script.display(),
            lang.dir(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(path))
}

fn build_polyglot(lang: Lang, name: &str) -> Result<PathBuf> {
    let root = repo_root();
    let src = root.join("plugins").join(lang.dir()).join(name);
    if !src.is_dir() {
        bail!(
            "no such {} plugin: {} is missing",
            lang.dir(),
            src.display()
        );
    }
    let key = polyglot_key(lang, name)?;
    let dir = plugins_target_dir().with_file_name("polyglot");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let wasm = dir.join(format!("{}-{name}-{key}.wasm", lang.dir()));
    if wasm.exists() {
        return Ok(wasm);
    }
    let tool = polyglot_tool(lang)?;
    // Written beside and renamed into place: another process may be
    // building the same key.
    let partial = dir.join(format!(
        "{}-{name}-{key}.{}.partial.wasm",
        lang.dir(),
        std::process::id()
    ));
    let mut cmd = Command::new(&tool);
    match lang {
        Lang::Python => {
            cmd.current_dir(&src)
                .arg("-d")
                .arg(root.join("wit"))
                .args(["-w", "plugin-script", "componentize", "-p", ".", "-p"])
                .arg(root.join("plugins/python/sdk"))
                .args(["app", "-o"])
                .arg(&partial);
        }
        Lang::Js => {
            cmd.current_dir(&src)
                .arg("--wit")
                .arg(root.join("wit"))
                .args(["-n", "plugin-script", "--js", "plugin.js", "--sync"])
                .arg("--module-root")
                .arg(root.join("plugins/js"))
                .arg("-o")
                .arg(&partial);
        }
    }
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {}", tool.display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "building {} plugin {name} failed:\n{}{}",
            lang.dir(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&partial, &wasm)
        .with_context(|| format!("moving the build to {}", wasm.display()))?;
    Ok(wasm)
}
