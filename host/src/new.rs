//! `warren new NAME --lang rust|python|js`: a plugin project that builds
//! with one command and needs nothing but a language toolchain and the
//! package registries. The binary carries the WIT of its own contract
//! version and each SDK's sources, written into the project.

use std::path::{Path, PathBuf};

/// The languages `warren new` writes projects for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate over the Rust SDK, `cargo build --release`.
    Rust,
    /// A Python app over the Python SDK, built with componentize-py.
    Python,
    /// A JavaScript module over the JS SDK, built with componentize-qjs.
    Js,
}

/// The contract the binary implements (`package warren:plugin@...`).
pub const CONTRACT: &str = "0.3.0";
/// componentize-py version the Python SDK is tested with; the same as
/// `plugins/tools/install` (a test compares them).
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// componentize-qjs version the JS SDK is tested with.
pub const COMPONENTIZE_QJS: &str = "0.4.5";

const WIT: &str = include_str!("../../wit/plugin.wit");
const RUST_SDK: &str = include_str!("../../plugins/sdk/src/lib.rs");
const RUST_SDK_HTTP: &str = include_str!("../../plugins/sdk/src/http.rs");
const RUST_SDK_KV: &str = include_str!("../../plugins/sdk/src/kv.rs");
/// The standard WASI packages the contract imports, beside `plugin.wit`.
const WIT_DEPS: &[(&str, &str)] = &[
    ("cli.wit", include_str!("../../wit/deps/cli.wit")),
    ("clocks.wit", include_str!("../../wit/deps/clocks.wit")),
    (
        "filesystem.wit",
        include_str!("../../wit/deps/filesystem.wit"),
    ),
    ("http.wit", include_str!("../../wit/deps/http.wit")),
    ("io.wit", include_str!("../../wit/deps/io.wit")),
    ("random.wit", include_str!("../../wit/deps/random.wit")),
    ("sockets.wit", include_str!("../../wit/deps/sockets.wit")),
    (
        "config/store.wit",
        include_str!("../../wit/deps/config/store.wit"),
    ),
    (
        "config/world.wit",
        include_str!("../../wit/deps/config/world.wit"),
    ),
    (
        "keyvalue/atomic.wit",
        include_str!("../../wit/deps/keyvalue/atomic.wit"),
    ),
    (
        "keyvalue/batch.wit",
        include_str!("../../wit/deps/keyvalue/batch.wit"),
    ),
    (
        "keyvalue/store.wit",
        include_str!("../../wit/deps/keyvalue/store.wit"),
    ),
    (
        "keyvalue/watch.wit",
        include_str!("../../wit/deps/keyvalue/watch.wit"),
    ),
    (
        "keyvalue/world.wit",
        include_str!("../../wit/deps/keyvalue/world.wit"),
    ),
];
const RUST_CARGO_CONFIG: &str = include_str!("../../plugins/.cargo/config.toml");
const PYTHON_SDK: &str = include_str!("../../plugins/python/sdk/warren/__init__.py");
const JS_SDK: &str = include_str!("../../plugins/js/sdk/warren.js");

/// Why a project was not written.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    #[error(
        "{0:?} is not a valid plugin name: 1 to 64 lowercase letters, digits, `-` and `_`, starting with a letter"
    )]
    Name(String),
    #[error("{0} already exists; choose a new directory")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a project file is written.
enum Source {
    /// A template: `{{name}}`, `{{file}}`, `{{contract}}` and the tool
    /// versions filled in.
    Template(&'static str),
    /// Copied as it is (the SDKs, the WIT).
    Verbatim(&'static str),
    /// A template written executable.
    Script(&'static str),
}

const RUST_FILES: &[(&str, Source)] = &[
    (
        "Cargo.toml",
        Source::Template(include_str!("../templates/rust/Cargo.toml")),
    ),
    (".cargo/config.toml", Source::Verbatim(RUST_CARGO_CONFIG)),
    (
        "src/lib.rs",
        Source::Template(include_str!("../templates/rust/lib.rs")),
    ),
    (
        "warren-sdk/Cargo.toml",
        Source::Template(include_str!("../templates/rust/sdk.Cargo.toml")),
    ),
    ("warren-sdk/src/lib.rs", Source::Verbatim(RUST_SDK)),
    ("warren-sdk/src/http.rs", Source::Verbatim(RUST_SDK_HTTP)),
    ("warren-sdk/src/kv.rs", Source::Verbatim(RUST_SDK_KV)),
    ("warren-sdk/wit/plugin.wit", Source::Verbatim(WIT)),
    (
        "README.md",
        Source::Template(include_str!("../templates/rust/README.md")),
    ),
    (
        ".gitignore",
        Source::Verbatim(include_str!("../templates/rust/gitignore")),
    ),
];

const PYTHON_FILES: &[(&str, Source)] = &[
    (
        "src/app.py",
        Source::Template(include_str!("../templates/python/app.py")),
    ),
    ("src/warren/__init__.py", Source::Verbatim(PYTHON_SDK)),
    ("wit/plugin.wit", Source::Verbatim(WIT)),
    (
        "build.sh",
        Source::Script(include_str!("../templates/python/build.sh")),
    ),
    (
        "README.md",
        Source::Template(include_str!("../templates/python/README.md")),
    ),
    (
        ".gitignore",
        Source::Verbatim(include_str!("../templates/python/gitignore")),
    ),
];

const JS_FILES: &[(&str, Source)] = &[
    (
        "package.json",
        Source::Template(include_str!("../templates/js/package.json")),
    ),
    (
        "src/plugin.js",
        Source::Template(include_str!("../templates/js/plugin.js")),
    ),
    ("src/warren.js", Source::Verbatim(JS_SDK)),
    ("wit/plugin.wit", Source::Verbatim(WIT)),
    (
        "README.md",
        Source::Template(include_str!("../templates/js/README.md")),
    ),
    (
        ".gitignore",
        Source::Verbatim(include_str!("../templates/js/gitignore")),
    ),
];

/// Files of a project, relative to its directory, and whether each is
/// executable.
fn files(lang: Lang, name: &str) -> Vec<(String, String, bool)> {
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{file}}", &name.replace('-', "_"))
            .replace("{{contract}}", CONTRACT)
            .replace("{{componentize_py}}", COMPONENTIZE_PY)
            .replace("{{componentize_qjs}}", COMPONENTIZE_QJS)
    };
    let table = match lang {
        Lang::Rust => RUST_FILES,
        Lang::Python => PYTHON_FILES,
        Lang::Js => JS_FILES,
    };
    let wit_dir = match lang {
        Lang::Rust => "warren-sdk/wit",
        Lang::Python | Lang::Js => "wit",
    };
    let mut out: Vec<(String, String, bool)> = table
        .iter()
        .map(|(path, source)| match source {
            Source::Template(t) => (path.to_string(), fill(t), false),
            Source::Verbatim(t) => (path.to_string(), (*t).to_string(), false),
            Source::Script(t) => (path.to_string(), fill(t), true),
        })
        .collect();
    out.extend(
        WIT_DEPS
            .iter()
            .map(|(rel, text)| (format!("{wit_dir}/deps/{rel}"), (*text).to_string(), false)),
    );
    out
}

/// The command that builds a project of `lang`, as its README says.
pub fn build_command(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => "cargo build --release",
        Lang::Python => "sh build.sh",
        Lang::Js => "npm install && npm run build",
    }
}

/// Where the build of plugin `name` lands, relative to its project.
pub fn output(lang: Lang, name: &str) -> PathBuf {
    match lang {
        Lang::Rust => Path::new("target/wasm32-wasip2/release")
            .join(format!("{}.wasm", name.replace('-', "_"))),
        Lang::Python | Lang::Js => PathBuf::from(format!("{name}.wasm")),
    }
}

/// Write a project for plugin `dir`'s last component into `dir`, which
/// must not exist. Returns the plugin's name.
pub fn create(dir: &Path, lang: Lang) -> Result<String, NewError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let starts_with_letter = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
    if !crate::plugins::manifest::is_valid_name(&name) || !starts_with_letter {
        return Err(NewError::Name(name));
    }
    if dir.exists() {
        return Err(NewError::Exists(dir.to_path_buf()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NewError::Io { path, source }
    };
    for (rel, text, executable) in files(lang, &name) {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
        if executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(io(&path))?;
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_existing_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["Upper", "9lives", "has space", ""] {
            let e = create(&tmp.path().join(bad), Lang::Rust).unwrap_err();
            assert!(e.to_string().contains("not a valid plugin name"), "{e}");
        }
        let e = create(tmp.path(), Lang::Python).unwrap_err();
        assert!(
            e.to_string().contains("not a valid plugin name")
                || e.to_string().contains("already exists"),
            "{e}"
        );
        std::fs::create_dir(tmp.path().join("taken")).unwrap();
        let e = create(&tmp.path().join("taken"), Lang::Js).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }

    #[test]
    fn every_template_is_filled_and_versions_match_the_tool_installer() {
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            for (rel, text, _) in files(lang, "my-plugin") {
                for field in [
                    "name",
                    "file",
                    "contract",
                    "componentize_py",
                    "componentize_qjs",
                ] {
                    let unfilled = format!("{{{{{field}}}}}");
                    assert!(!text.contains(&unfilled), "{lang:?} {rel}: {unfilled}");
                }
            }
        }
        let install = include_str!("../../plugins/tools/install");
        assert!(install.contains(&format!("COMPONENTIZE_PY={COMPONENTIZE_PY}\n")));
        assert!(install.contains(&format!("COMPONENTIZE_QJS={COMPONENTIZE_QJS}\n")));
        assert!(WIT.contains(&format!("package warren:plugin@{CONTRACT};")));
    }
}
