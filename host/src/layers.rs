//! The layering the crate keeps, checked on its own source: every
//! `crate::` path outside a file's test module is an edge from the
//! top-level module it is written in to the one it names. No cycle; a
//! module imports only modules of its own layer or below; `amqp`, `buffer`
//! and `plugins` never import one another. ARCHITECTURE.md's layer
//! diagram is [`LAYERS`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom first. A module may import its own layer and those below.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaves",
        &[
            "sync",
            "backoff",
            "message",
            "secret",
            "telemetry",
            "shutdown",
            "crash",
        ],
    ),
    ("subsystems", &["amqp", "buffer", "kv", "plugins"]),
    ("dispatch", &["dispatch"]),
    ("admin", &["admin"]),
    ("settings", &["config", "config_doc"]),
    ("wiring", &["app", "validate", "cli", "new"]),
];

/// Subsystems that know nothing of each other.
const APART: &[&str] = &["amqp", "buffer", "plugins"];

/// An edge and the file it was read in.
type Edges = BTreeMap<(String, String), PathBuf>;

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `line` names through `crate::`.
fn named(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // `crate::` itself, not the tail of an identifier.
            !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// Every edge between top-level modules of `src`.
fn edges(src: &Path) -> Edges {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    let mut out = Edges::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str();
        let from = first.to_string_lossy().trim_end_matches(".rs").to_owned();
        // The crate root declares the modules; this file names paths in
        // its own tests.
        if matches!(from.as_str(), "lib" | "main" | "layers") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            // A file's own tests may reach wherever they need.
            if line.trim() == "#[cfg(test)]"
                && lines.get(n + 1).is_some_and(|l| l.starts_with("mod "))
            {
                break;
            }
            for to in named(line) {
                if to != from && !to.is_empty() {
                    out.entry((from.clone(), to))
                        .or_insert_with(|| rel.to_owned());
                }
            }
        }
    }
    out
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// A cycle through the graph, as the modules along it, if there is one.
fn cycle(edges: &Edges) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
    }
    // Depth-first, with the path so far: an edge back into the path closes
    // a cycle.
    fn visit<'a>(
        m: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            let mut c: Vec<String> = path[i..].iter().map(|s| s.to_string()).collect();
            c.push(m.to_owned());
            return Some(c);
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for to in next.get(m).into_iter().flatten() {
            if let Some(c) = visit(to, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in next.keys() {
        if let Some(c) = visit(m, &next, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// What `edges` breaks, one line each.
fn violations(edges: &Edges) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = cycle(edges) {
        out.push(format!("a cycle: {}", c.join(" -> ")));
    }
    for ((from, to), file) in edges {
        let shown = format!("{from} -> {to} ({})", file.display());
        match (layer_of(from), layer_of(to)) {
            (None, _) => out.push(format!("{from} is in no layer: {shown}")),
            (_, None) => out.push(format!("{to} is in no layer: {shown}")),
            (Some(f), Some(t)) if t > f => out.push(format!(
                "{} imports {}, a layer above: {shown}",
                LAYERS[f].0, LAYERS[t].0
            )),
            _ => {}
        }
        if APART.contains(&from.as_str()) && APART.contains(&to.as_str()) {
            out.push(format!(
                "{from} and {to} must not know of each other: {shown}"
            ));
        }
    }
    out
}

#[test]
fn the_crate_keeps_its_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = edges(&src);
    assert!(edges.len() > 20, "too few edges read: {edges:?}");
    let found = violations(&edges);
    assert!(
        found.is_empty(),
        "layering broken:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn a_cycle_or_an_edge_between_subsystems_is_found() {
    let mut edges = Edges::new();
    for (from, to) in [("app", "admin"), ("admin", "dispatch"), ("dispatch", "app")] {
        edges.insert((from.into(), to.into()), PathBuf::from("x.rs"));
    }
    let found = violations(&edges);
    assert!(
        found.iter().any(|v| v.starts_with("a cycle: ")),
        "{found:?}"
    );
    let mut edges = Edges::new();
    edges.insert(("buffer".into(), "amqp".into()), PathBuf::from("x.rs"));
    let found = violations(&edges);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("must not know of each other"),
        "{found:?}"
    );
}

#[test]
fn crate_paths_are_read_from_code_not_comments() {
    assert_eq!(
        named("use crate::amqp::{A, B}; let x = crate::buffer::f(); // crate::app"),
        ["amqp", "buffer"]
    );
    assert_eq!(named("pub(crate) use super::x;"), Vec::<String>::new());
}
