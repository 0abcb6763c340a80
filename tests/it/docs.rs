//! The formats documented in agent_docs/ are the formats pf reads and writes: every JSON example
//! parses, the procs and pages records deserialise into pf's own types, and the doctor check ids
//! the docs list are the ones `pf doctor --json` prints, in order.

use std::path::Path;

use crate::support::pf;

/// The ```json blocks of a markdown file.
fn json_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```json") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.extend(current.take()),
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Examples shorten digests (`sha256:1c0f…`, `sha256:…`): make each a full, valid digest by
/// padding its hex with zeros.
fn expand_digests(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("sha256:") {
        out.push_str(&rest[..at + "sha256:".len()]);
        rest = &rest[at + "sha256:".len()..];
        let hex_len = rest
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(rest.len());
        let (hex, after) = rest.split_at(hex_len);
        out.push_str(hex);
        if let Some(after) = after.strip_prefix('…') {
            out.push_str(&"0".repeat(64usize.saturating_sub(hex.len())));
            rest = after;
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn agent_doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent_docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn every_json_example_in_agent_docs_parses_and_records_deserialise() {
    let mut typed = Vec::new();
    for doc in ["formats.md", "cli-json.md"] {
        let blocks = json_blocks(&agent_doc(doc));
        assert!(!blocks.is_empty(), "{doc} has no ```json examples");
        for block in blocks {
            let text = expand_digests(&block);
            let value: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("a JSON example in {doc} does not parse: {e}\n{block}"));
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if kind.starts_with("procs.") {
                let procs: pf_world_procs::ProcsBlob = serde_json::from_value(value.clone())
                    .unwrap_or_else(|e| {
                        panic!(
                            "the {kind} example in {doc} is not a procs blob pf reads: {e}\n{block}"
                        )
                    });
                let back = serde_json::to_value(&procs).expect("serialise");
                assert_eq!(
                    back["kind"], value["kind"],
                    "{doc}: {kind} read back as another kind"
                );
                typed.push(kind.to_owned());
            } else if kind == "pages.manifest.v1" {
                let _: pf_core::pages::PagesManifest = serde_json::from_value(value.clone())
                    .unwrap_or_else(|e| {
                        panic!(
                            "the {kind} example in {doc} is not a manifest pf reads: {e}\n{block}"
                        )
                    });
                typed.push(kind.to_owned());
            }
        }
    }
    typed.sort();
    typed.dedup();
    assert_eq!(
        typed,
        [
            "pages.manifest.v1",
            "procs.criu.v1",
            "procs.criu.v2",
            "procs.unsupported.v1"
        ],
        "every record kind documented with an example is read by pf's own types"
    );
}

#[test]
fn the_documented_doctor_checks_are_the_ones_doctor_prints_in_order() {
    let doc = agent_doc("formats.md");
    let start = doc
        .find("- `checks`, in this order, by `id`:")
        .expect("formats.md lists the doctor checks");
    let paragraph = &doc[start..];
    let end = paragraph[1..]
        .find("\n- ")
        .map_or(paragraph.len(), |e| e + 1);
    let documented: Vec<&str> = paragraph[..end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| {
            !t.is_empty()
                && t.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
        .filter(|t| !["checks", "id"].contains(t))
        .collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let out = pf(&dir.path().join("store"))
        .args(["doctor", "--json"])
        .output()
        .expect("run pf doctor --json");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("pf doctor --json printed no JSON ({e}): {:?}", out));
    let printed: Vec<&str> = report["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        documented, printed,
        "agent_docs/formats.md and pf doctor disagree"
    );
}

#[test]
fn expanding_digests_makes_them_whole() {
    let digest = format!("sha256:{}", "0".repeat(64));
    assert_eq!(expand_digests("\"sha256:…\""), format!("\"{digest}\""));
    assert_eq!(
        expand_digests("a sha256:1c0f… b"),
        format!("a sha256:1c0f{} b", "0".repeat(60))
    );
    let whole = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(expand_digests(&whole), whole);
    assert_eq!(
        json_blocks("x\n```json\n{}\n```\n```text\n[]\n```\n"),
        ["{}\n"]
    );
}
