//! The project's module graph has no import circles (issue 16): no module uses another that uses
//! it back, directly or through others, in `cotal-core`, the simulator and the tokio driver.
//!
//! The graph is read from the source: every `use` tree and every `crate::…`, `super::…` and
//! `self::…` path in code (comments and test modules left out) is an edge from the file's module
//! to the deepest module the path names. A parent's `mod child;` declaration is not an edge; a
//! parent that uses its child and a child that uses its parent is a circle like any other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One crate (or binary) root: its source directory and the file of its root module.
struct Root {
    name: &'static str,
    dir: PathBuf,
    file: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn roots() -> Vec<Root> {
    let ws = workspace();
    let lib = |name, krate: &str| Root {
        name,
        dir: ws.join(krate).join("src"),
        file: ws.join(krate).join("src/lib.rs"),
    };
    let bin = |name, krate: &str, bin: &str| Root {
        name,
        dir: ws.join(krate).join("src/bin").join(bin),
        file: ws.join(krate).join("src/bin").join(format!("{bin}.rs")),
    };
    vec![
        lib("cotal_core", "core"),
        lib("cotal_driver_sim", "driver-sim"),
        lib("cotal_driver_tokio", "driver-tokio"),
        bin("cotal", "driver-tokio", "cotal"),
        bin("cotal-sim", "driver-sim", "cotal-sim"),
    ]
}

/// Every module of a crate, by path (`["delivery", "daemon"]`), with its file.
fn modules(root: &Root) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    out.insert(Vec::new(), root.file.clone());
    collect(&root.dir, &mut Vec::new(), &mut out, root);
    out
}

fn collect(
    dir: &Path,
    at: &mut Vec<String>,
    out: &mut BTreeMap<Vec<String>, PathBuf>,
    root: &Root,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            if name == "bin" && at.is_empty() || name == "snapshots" || name == "tests" {
                continue;
            }
            at.push(name);
            collect(&path, at, out, root);
            at.pop();
        } else if path.extension().is_some_and(|e| e == "rs") {
            if path == root.file || name == "tests" || at.is_empty() && name == "main" {
                continue;
            }
            let mut m = at.clone();
            if name != "mod" {
                m.push(name);
            }
            out.insert(m, path);
        }
    }
}

/// The file's code without comments, string literals and `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            // `#[cfg(test)] mod tests;` or an inline test module: the rest is tests.
            if lines
                .peek()
                .is_some_and(|l| l.trim_start().starts_with("mod "))
            {
                if lines.peek().is_some_and(|l| l.trim_end().ends_with(';')) {
                    lines.next();
                    continue;
                }
                break;
            }
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        let mut in_str = false;
        let mut prev = ' ';
        for c in line.chars() {
            if c == '"' && prev != '\\' {
                in_str = !in_str;
                prev = c;
                continue;
            }
            if !in_str {
                if c == '/' && prev == '/' {
                    out.pop();
                    break;
                }
                out.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
        }
        out.push('\n');
    }
    out
}

/// Every path the code names: expanded `use` trees and inline `crate::`/`super::`/`self::` paths
/// (a visibility such as `pub(in crate::agent)` names no import and is left out).
fn paths_in(code: &str) -> Vec<String> {
    let stripped = strip_visibility_paths(code);
    let code = stripped.as_str();
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        // `a as b` keeps `a`: mark the rename before the whitespace goes.
        let tree: String = rest[..end]
            .replace(" as ", "@")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        expand("", &tree, &mut out);
    }
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0
                && (bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b':')
            {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| at + e);
            out.push(code[at..end].trim_end_matches(':').to_owned());
        }
    }
    out
}

/// The code with every `pub(in <path>)` visibility reduced to `pub`.
fn strip_visibility_paths(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(i) = rest.find("pub(in ") {
        out.push_str(&rest[..i]);
        out.push_str("pub");
        rest = &rest[i..];
        rest = rest.find(')').map_or("", |j| &rest[j + 1..]);
    }
    out.push_str(rest);
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its leaf paths.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_owned()
        } else {
            format!("{p}::{s}")
        }
    };
    match tree.find('{') {
        None => {
            let leaf = tree.split('@').next().unwrap_or(tree);
            out.push(join(prefix, leaf.trim_end_matches("::*")));
        }
        Some(open) => {
            let head = tree[..open].trim_end_matches("::");
            let inner = &tree[open + 1..tree.len().saturating_sub(1)];
            let prefix = join(prefix, head);
            let mut depth = 0;
            let mut last = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if !inner[last..i].is_empty() {
                            expand(&prefix, &inner[last..i], out);
                        }
                        last = i + 1;
                    }
                    _ => {}
                }
            }
            if !inner[last..].is_empty() {
                expand(&prefix, &inner[last..], out);
            }
        }
    }
}

/// The module a path resolves to, seen from module `at` (`None` for other crates and `std`).
fn target(at: &[String], path: &str, mods: &BTreeMap<Vec<String>, PathBuf>) -> Option<Vec<String>> {
    let mut segs = path.split("::").filter(|s| !s.is_empty());
    let mut base: Vec<String> = match segs.next()? {
        "crate" => Vec::new(),
        "self" => at.to_vec(),
        "super" => {
            let mut b = at.to_vec();
            b.pop();
            b
        }
        first => {
            // A path relative to the current module (`child::Item`, 2018 edition).
            let mut b = at.to_vec();
            b.push(first.to_owned());
            if !mods.contains_key(&b) {
                return None;
            }
            b
        }
    };
    for s in segs {
        if s == "super" {
            base.pop();
            continue;
        }
        let mut next = base.clone();
        next.push(s.to_owned());
        if mods.contains_key(&next) {
            base = next;
        } else {
            break;
        }
    }
    Some(base)
}

/// The circles of a graph: its strongly connected components with more than one module.
fn circles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    // Reachability by depth-first search from each node: small graphs, clarity first.
    let reach = |from: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for m in graph.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    stack.push(m.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<_, _> = graph.keys().map(|k| (k.clone(), reach(k))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for (a, ra) in &reaches {
        if done.contains(a) {
            continue;
        }
        let comp: Vec<Vec<String>> = ra
            .iter()
            .filter(|b| *b != a && reaches.get(*b).is_some_and(|rb| rb.contains(a)))
            .cloned()
            .collect();
        if !comp.is_empty() {
            let mut names = vec![a.join("::")];
            names.extend(comp.iter().map(|m| m.join("::")));
            done.insert(a.clone());
            done.extend(comp);
            names.sort();
            out.push(names);
        }
    }
    out
}

fn graph_of(root: &Root) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mods = modules(root);
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, file) in &mods {
        let text = std::fs::read_to_string(file).expect("source file readable");
        let edges = graph.entry(m.clone()).or_default();
        for p in paths_in(&code_of(&text)) {
            if let Some(t) = target(m, &p, &mods)
                && t != *m
                && !t.is_empty()
            {
                edges.insert(t);
            }
        }
    }
    graph
}

#[test]
fn no_module_uses_a_module_that_uses_it_back() {
    let mut found = Vec::new();
    for root in roots() {
        assert!(
            root.file.exists(),
            "{} has no {}",
            root.name,
            root.file.display()
        );
        let graph = graph_of(&root);
        assert!(!graph.is_empty(), "{}: no modules found", root.name);
        for c in circles(&graph) {
            found.push(format!("{}: {}", root.name, c.join(" <-> ")));
        }
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn the_graph_reader_sees_a_circle_when_there_is_one() {
    let a = vec!["a".to_owned()];
    let b = vec!["b".to_owned()];
    let c = vec!["c".to_owned()];
    let mut g = BTreeMap::new();
    g.insert(a.clone(), BTreeSet::from([b.clone()]));
    g.insert(b.clone(), BTreeSet::from([c.clone()]));
    g.insert(c.clone(), BTreeSet::new());
    assert!(circles(&g).is_empty());
    g.get_mut(&c).unwrap().insert(a.clone());
    assert_eq!(circles(&g), vec![vec!["a", "b", "c"]]);
    let mut out = Vec::new();
    expand(
        "",
        "crate::wire::{json::{self,X@Y},keys::KvBucket}",
        &mut out,
    );
    assert_eq!(
        out,
        [
            "crate::wire::json::self",
            "crate::wire::json::X",
            "crate::wire::keys::KvBucket"
        ]
    );
    let code = code_of(
        "use super::x; // crate::y\nlet s = \"crate::z\";\n#[cfg(test)]\nmod tests {\nuse crate::w;\n}\n",
    );
    assert!(paths_in(&code).iter().all(|p| p == "super::x"));
    assert!(paths_in("pub(in crate::agent) fn f() {}\n").is_empty());
}
