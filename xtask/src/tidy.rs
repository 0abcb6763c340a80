//! Tidy checks over every Rust file of the repository, run by plain `cargo test --workspace`:
//! each file opens with a `//!` doc comment, and none holds a leftover debugging or unfinished-code
//! macro, or a test marked ignored or should-panic.

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, skipping build output and hidden directories.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let file_type = entry
            .file_type()
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        if file_type.is_dir() {
            if name.starts_with('.') || name == "target" {
                continue;
            }
            rust_files(&path, out);
        } else if file_type.is_file() && name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn all_rust_files() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&repo_root(), &mut files);
    assert!(files.len() > 5, "found only {files:?}");
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

#[test]
fn every_rust_file_starts_with_a_doc_comment() {
    let bad: Vec<String> = all_rust_files()
        .into_iter()
        .filter(|(_, text)| !text.starts_with("//!"))
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(
        bad.is_empty(),
        "these files must start with a `//!` comment saying what they are for:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_unfinished_or_debugging_code() {
    // Spelled in pieces so this file does not trip its own check.
    let forbidden = [
        concat!("todo", "!("),
        concat!("dbg", "!("),
        concat!("unimplemented", "!("),
        concat!("#[", "ignore"),
        concat!("#[", "should_panic"),
    ];
    let mut bad = Vec::new();
    for (path, text) in all_rust_files() {
        for (i, line) in text.lines().enumerate() {
            for word in forbidden {
                if line.contains(word) {
                    bad.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "unfinished, debugging, ignored or should-panic code (see STYLE.md):\n{}",
        bad.join("\n")
    );
}

/// The tests in `text` that call the live-test gate but are not named `live_…`: CI's first pass
/// (`--skip live_`, `CI` set) would run them, and the gate panics there by design.
fn live_gate_without_live_name(text: &str) -> Vec<String> {
    let gate = concat!("li", "ve(\"");
    let mut bad = Vec::new();
    for segment in text.split("#[test]").skip(1) {
        let Some(name) = segment
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("fn "))
            .and_then(|rest| rest.split('(').next())
        else {
            continue;
        };
        let calls_gate = segment.match_indices(gate).any(|(at, _)| {
            !segment[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        });
        if calls_gate && !name.starts_with("live_") {
            bad.push(name.to_owned());
        }
    }
    bad
}

#[test]
fn tests_that_use_the_live_gate_are_named_live() {
    let bad: Vec<String> = all_rust_files()
        .into_iter()
        .flat_map(|(p, text)| {
            live_gate_without_live_name(&text)
                .into_iter()
                .map(move |name| format!("{}: {name}", p.display()))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "these tests call the live gate but their names do not start with `live_`, so CI's \
         non-live pass would run them and the gate would fail it; rename them or split off the \
         live part:\n{}",
        bad.join("\n")
    );
}

#[test]
fn live_gate_check_finds_misnamed_tests() {
    let gate = concat!("li", "ve(\"x\")");
    let text = format!(
        "#[test]\nfn live_ok() {{ if !{gate} {{ return; }} }}\n\
         #[test]\nfn sneaky() {{ if !{gate} {{ return; }} }}\n\
         #[test]\nfn plain() {{ assert!(is_{gate}) }}\n"
    );
    assert_eq!(
        live_gate_without_live_name(&text),
        vec!["sneaky".to_owned()]
    );
}
