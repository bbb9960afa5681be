//! The shape of the workspace, checked: dependencies point one way along the data's flow
//! (core → data → model → run → train / serve → the CLI), serving links no training code, and
//! within a crate no two source files import each other, directly or around a loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Each crate's place along the flow: a crate may depend only on crates of a lower floor.
const FLOORS: &[(&str, u32)] = &[
    ("needle-core", 0),
    ("needle-data", 1),
    ("needle-store", 1),
    ("needle-model", 2),
    ("needle-index", 2),
    ("needle-eval", 2),
    ("needle-run", 3),
    ("needle-catalog", 3),
    ("needle-train", 4),
    ("needle-serve", 4),
    ("needle-api", 5),
    ("needle-fuzz", 5),
    ("needle", 6),
    ("needle-py", 6),
];

/// The `needle-*` crates a manifest lists under `[dependencies]` (not dev-dependencies).
fn needle_deps(manifest: &str) -> Vec<String> {
    let mut deps = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps {
            if let Some(name) = line.split(['.', ' ', '=']).next().filter(|n| n.starts_with("needle")) {
                deps.push(name.to_owned());
            }
        }
    }
    deps
}

#[test]
fn crates_depend_only_on_crates_below_them() {
    let floor: BTreeMap<&str, u32> = FLOORS.iter().copied().collect();
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else { continue };
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let own = *floor.get(name.as_str()).unwrap_or_else(|| panic!("{name} has no floor in FLOORS"));
        seen.insert(name.clone());
        for dep in needle_deps(&manifest) {
            let theirs = floor[dep.as_str()];
            assert!(theirs < own, "{name} (floor {own}) depends on {dep} (floor {theirs}), against the data's flow");
        }
    }
    assert!(seen.len() >= FLOORS.len(), "crates found: {seen:?}");
    let deps = |c: &str| needle_deps(&std::fs::read_to_string(crates_dir().join(c).join("Cargo.toml")).unwrap());
    for c in ["needle-index", "needle-eval"] {
        assert!(!deps(c).contains(&"needle-model".to_owned()), "{c} must not need the model crate");
    }
    assert!(!deps("needle-serve").contains(&"needle-train".to_owned()), "serving must not link training");
}

/// `crate::name` references of a source file to sibling modules (`use crate::{a, b::c}` too).
fn module_refs(src: &str, modules: &BTreeSet<String>, own: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut add = |name: &str| {
        if name != own && modules.contains(name) {
            out.insert(name.to_owned());
        }
    };
    for (i, _) in src.match_indices("crate::") {
        let rest = &src[i + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for part in group.split(',') {
                add(part.trim().split("::").next().unwrap_or(""));
            }
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            add(&rest[..end]);
        }
    }
    out
}

#[test]
fn no_two_source_files_import_each_other() {
    let mut loops = Vec::new();
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let src_dir = entry.unwrap().path().join("src");
        let Ok(files) = std::fs::read_dir(&src_dir) else { continue };
        let files: BTreeMap<String, PathBuf> = files
            .map(|f| f.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
            .filter(|(m, _)| m != "lib" && m != "main")
            .collect();
        let modules: BTreeSet<String> = files.keys().cloned().collect();
        let graph: BTreeMap<&str, BTreeSet<String>> = files
            .iter()
            .map(|(m, p)| (m.as_str(), module_refs(&std::fs::read_to_string(p).unwrap(), &modules, m)))
            .collect();
        // A loop exists when some module reaches itself.
        for start in graph.keys() {
            let mut stack: Vec<&str> = graph[start].iter().map(String::as_str).collect();
            let mut visited = BTreeSet::new();
            while let Some(m) = stack.pop() {
                if m == *start {
                    loops.push(format!("{}: {start}.rs imports itself through {:?}", src_dir.display(), graph[start]));
                    break;
                }
                if visited.insert(m) {
                    stack.extend(graph[m].iter().map(String::as_str));
                }
            }
        }
    }
    assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
    // The check itself sees references.
    let modules: BTreeSet<String> = ["a".to_owned(), "b".to_owned(), "c".to_owned()].into();
    let refs = module_refs("use crate::{a::X, b};\nfn f() { crate::c::g() }", &modules, "a");
    assert_eq!(refs, ["b".to_owned(), "c".to_owned()].into());
}
