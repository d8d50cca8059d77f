//! Warren itself, in-process: a plugins folder with example plugins, and
//! starting the app and waiting until it reports ready.

use std::time::Duration;

use anyhow::{Context, Result};
use warren::app::{App, AppHandle};
use warren::config::Config;

use warren_it::config::WarrenToml;
use warren_it::{plugins, wait};

/// A temporary plugins folder holding copies of example plugins, each as
/// `(file stem, plugin crate)`: `("stamp", "stamp-v2")` puts the `stamp-v2`
/// build at `stamp.wasm`.
pub(crate) fn plugins_dir(plugins: &[(&str, &str)]) -> Result<tempfile::TempDir> {
    let builds = plugins
        .iter()
        .map(|(file, krate)| Ok((*file, plugins::wasm(krate)?)))
        .collect::<Result<Vec<_>>>()?;
    plugins_dir_of(&builds)
}

/// A temporary plugins folder holding copies of `(file stem, build)`.
pub(crate) fn plugins_dir_of(builds: &[(&str, std::path::PathBuf)]) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for (file, path) in builds {
        std::fs::copy(path, dir.path().join(format!("{file}.wasm")))
            .with_context(|| format!("copying plugin {}", path.display()))?;
    }
    Ok(dir)
}

/// `toml` as Warren reads it, without environment overrides; a
/// configuration Warren refuses fails the test.
pub(crate) fn parse(toml: &WarrenToml) -> Config {
    let text = toml.render().unwrap();
    Config::parse(&text, Vec::new()).unwrap_or_else(|p| panic!("test config: {p:?}\n{text}"))
}

/// Wait until `handle` reports ready; the error names `what` and carries
/// the last readiness report.
pub(crate) async fn until_ready(handle: &AppHandle, what: &str, timeout: Duration) -> Result<()> {
    wait::until_true(what, timeout, || {
        let h = handle.clone();
        async move { h.readiness().ready }
    })
    .await
    .with_context(|| format!("{:?}", handle.readiness()))
}

/// Start Warren with `config` and wait (up to 30 s) until it is ready.
pub(crate) async fn start_ready(config: Config) -> Result<(App, AppHandle)> {
    let app = App::start(config).await.context("warren starts")?;
    let handle = app.handle();
    until_ready(&handle, "warren ready", Duration::from_secs(30)).await?;
    Ok((app, handle))
}
