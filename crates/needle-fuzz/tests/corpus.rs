//! Every fuzz target over its committed seeds, its reproducers (`fuzz/regressions/TARGET/`) and,
//! when present, the corpus a campaign grew (`fuzz/corpus/TARGET/`): none may panic, each target
//! must have seeds, and a seed's name says whether it must be accepted (any name) or rejected
//! (`bad-*`), so that the seeds keep reaching past the parsers' first checks.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Regular files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')))
        .filter(|p| p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    out.sort();
    out
}

/// Reproducers of hangs take as long as the hang (seconds to minutes) until it is fixed, so they
/// are replayed only with `NEEDLE_FUZZ_STRICT=1` (or by `cargo fuzz run TARGET FILE`).
fn slow(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        n.starts_with("slow-") || n.starts_with("timeout-")
    })
}

/// Runs `target` on a file, turning a panic into a message that names the file.
fn run(target: needle_fuzz::Target, path: &Path) -> Result<bool, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    catch_unwind(AssertUnwindSafe(|| target(&data))).map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        format!("{} panicked: {what}", path.display())
    })
}

fn check_target(name: &str, target: needle_fuzz::Target) -> Vec<String> {
    let root = fuzz_dir();
    let mut problems = Vec::new();
    let seeds = files(&root.join("seeds").join(name));
    if seeds.is_empty() {
        problems.push(format!("{name}: no seed in fuzz/seeds/{name}"));
    }
    let mut accepted = 0;
    for path in &seeds {
        let valid = !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("bad-"));
        match run(target, path) {
            Ok(ok) if ok == valid => accepted += usize::from(ok),
            Ok(ok) => problems.push(format!(
                "{}: expected to be {}, was {}",
                path.display(),
                if valid { "accepted" } else { "rejected" },
                if ok { "accepted" } else { "rejected" }
            )),
            Err(e) => problems.push(e),
        }
    }
    if !seeds.is_empty() && accepted == 0 {
        problems.push(format!("{name}: no seed is accepted"));
    }
    for dir in ["regressions", "corpus"] {
        for path in files(&root.join(dir).join(name)) {
            if slow(&path) && !needle_fuzz::strict() {
                continue;
            }
            if let Err(e) = run(target, &path) {
                problems.push(e);
            }
        }
    }
    problems
}

#[test]
fn every_target_has_seeds_accepts_the_valid_ones_and_survives_every_stored_input() {
    let problems: Vec<String> =
        needle_fuzz::TARGETS.iter().flat_map(|&(name, target)| check_target(name, target)).collect();
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn every_target_has_a_fuzz_binary_and_a_regressions_folder() {
    let root = fuzz_dir();
    for (name, _) in needle_fuzz::TARGETS {
        let bin = root.join("fuzz_targets").join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        assert!(text.contains(&format!("needle_fuzz::{name}(")), "{} does not call needle_fuzz::{name}", bin.display());
        assert!(root.join("regressions").join(name).is_dir(), "fuzz/regressions/{name} is missing");
    }
}

#[test]
fn empty_and_tiny_inputs_are_rejected_or_accepted_without_panicking() {
    for (_, target) in needle_fuzz::TARGETS {
        for data in [&b""[..], b"\0", b"\xff", b"\x01\x00", b"\x7f\n\n"] {
            let _ = target(data);
        }
    }
}
