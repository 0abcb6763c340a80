//! The page-level parts of `pf store`: the check of packs and page lists in `verify`, the sizes
//! `ls` and `show` tell of what each name keeps, and the dead part of the kept packs `gc` reports.
//! The work is pf-core's (`pf_core::pages_report`); this module names what it finds in a user's
//! terms: names, snapshots, pages files and addresses.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Context as _;
use indicatif::HumanBytes;
use pf_core::pages_report::{self, Fault, Graph, PageProblem, PageUse, Usage};
use pf_core::{BlobStore, Digest256};
use pf_world_procs::ProcsBlob;
use pf_world_procs::images::Pagemap;
use serde_json::{Value, json};

/// Every name, grouped by the digest it points at.
pub(super) fn names_by_digest(
    store: &dyn BlobStore,
) -> anyhow::Result<BTreeMap<Digest256, Vec<String>>> {
    let mut by_digest: BTreeMap<Digest256, Vec<String>> = BTreeMap::new();
    for (name, digest) in store.names()? {
        by_digest.entry(digest).or_default().push(name);
    }
    Ok(by_digest)
}

/// The graph of everything the names reach, plus `extra` roots.
pub(super) fn load_graph(
    store: &dyn BlobStore,
    names: &BTreeMap<Digest256, Vec<String>>,
    extra: &[Digest256],
) -> anyhow::Result<Graph> {
    let roots: Vec<Digest256> = names.keys().chain(extra).copied().collect();
    Graph::load(store, &roots).context("cannot walk what the store's names reach")
}

/// The usage of every named blob (each against the others), by digest.
pub(super) fn usage_by_root(
    store: &dyn BlobStore,
    graph: &Graph,
    names: &BTreeMap<Digest256, Vec<String>>,
) -> anyhow::Result<HashMap<Digest256, Usage>> {
    let roots: Vec<Digest256> = names.keys().copied().collect();
    Ok(pages_report::usage(store, graph, &roots)
        .context("cannot add up what the names keep")?
        .into_iter()
        .map(|u| (u.root, u))
        .collect())
}

/// `Usage` as the JSON object `ls` and `show` print.
pub(super) fn usage_json(u: &Usage) -> Value {
    json!({
        "blobs": u.blobs,
        "pages": u.pages,
        "zero_pages": u.zero_pages,
        "logical_size": u.logical_size,
        "stored_size": u.stored_size,
        "shared_size": u.shared_size,
    })
}

/// `Usage` as the words `ls` appends to a named blob's line.
pub(super) fn usage_words(u: &Usage) -> String {
    format!(
        "(keeps {} logical in {} stored, {} of it shared)",
        HumanBytes(u.logical_size),
        HumanBytes(u.stored_size),
        HumanBytes(u.shared_size)
    )
}

/// `pf store show`: what one snapshot stands for, stores and shares.
pub(super) fn show(store: &dyn BlobStore, digest: Digest256, json_out: bool) -> anyhow::Result<()> {
    let names = names_by_digest(store)?;
    let graph = load_graph(store, &names, &[digest])?;
    let mut roots: Vec<Digest256> = names.keys().copied().collect();
    roots.push(digest);
    let usage =
        pages_report::usage(store, &graph, &roots).context("cannot add up what the names keep")?;
    let mine = usage
        .iter()
        .find(|u| u.root == digest)
        .context("the snapshot is missing from its own report")?;
    let reach = graph.reach(&digest);
    // The other names whose blobs overlap this one's.
    let mut shared_with: BTreeSet<String> = BTreeSet::new();
    for (root, root_names) in &names {
        if *root != digest && graph.reach(root).iter().any(|d| reach.contains(d)) {
            shared_with.extend(root_names.iter().cloned());
        }
    }
    let kind = store
        .get(&digest)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("kind").and_then(Value::as_str).map(str::to_owned));
    let my_names = names.get(&digest).cloned().unwrap_or_default();
    let missing_here: BTreeSet<Digest256> = reach
        .iter()
        .flat_map(|d| graph.children(d))
        .filter(|c| graph.missing().contains(c))
        .copied()
        .collect();
    let mut out = std::io::stdout().lock();
    use std::io::Write as _;
    if json_out {
        let mut v = json!({
            "digest": digest,
            "names": my_names,
            "record_kind": kind,
            "shared_with": shared_with,
            "missing": missing_here,
        });
        if let (Some(obj), Value::Object(u)) = (v.as_object_mut(), usage_json(mine)) {
            obj.extend(u);
        }
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "digest        {digest}")?;
    writeln!(out, "names         {}", my_names.join(", "))?;
    if let Some(kind) = &kind {
        writeln!(out, "kind          {kind}")?;
    }
    writeln!(out, "blobs         {}", mine.blobs)?;
    if mine.pages > 0 {
        writeln!(
            out,
            "pages         {} of 4 KiB ({} zero, stored nowhere)",
            mine.pages, mine.zero_pages
        )?;
    }
    writeln!(out, "logical size  {}", HumanBytes(mine.logical_size))?;
    writeln!(out, "stored size   {}", HumanBytes(mine.stored_size))?;
    let with = if shared_with.is_empty() {
        String::new()
    } else {
        format!(
            " with {}",
            shared_with.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    writeln!(out, "shared        {}{with}", HumanBytes(mine.shared_size))?;
    writeln!(
        out,
        "own           {} (what removing its names frees at the next gc)",
        HumanBytes(mine.stored_size - mine.shared_size)
    )?;
    for m in &missing_here {
        writeln!(out, "missing       {m} (referred to, not in the store)")?;
    }
    Ok(())
}

/// One snapshot (a named or given root that is a procs blob) that uses a pages manifest.
#[derive(Debug, Clone)]
struct SnapshotUse {
    root: Digest256,
    names: Vec<String>,
    /// The pages file the manifest rebuilds, when the root is a procs blob naming it.
    file: Option<String>,
}

/// Who uses each manifest, and the pagemaps of the snapshots, read when first needed.
struct Naming<'a> {
    store: &'a dyn BlobStore,
    by_manifest: HashMap<Digest256, Vec<SnapshotUse>>,
    pagemaps: HashMap<Digest256, Option<HashMap<String, Pagemap>>>,
}

impl<'a> Naming<'a> {
    fn new(
        store: &'a dyn BlobStore,
        graph: &Graph,
        roots: &BTreeMap<Digest256, Vec<String>>,
    ) -> Self {
        let mut by_manifest: HashMap<Digest256, Vec<SnapshotUse>> = HashMap::new();
        for (root, names) in roots {
            let files: HashMap<Digest256, String> = match pf_world_procs::load_procs(store, root) {
                Ok(ProcsBlob::Criu(c)) => c
                    .memory
                    .unwrap_or_default()
                    .into_iter()
                    .map(|m| (m.manifest, m.file))
                    .collect(),
                _ => HashMap::new(),
            };
            for d in graph.reach(root) {
                if graph.manifests().contains_key(&d) {
                    by_manifest.entry(d).or_default().push(SnapshotUse {
                        root: *root,
                        names: names.clone(),
                        file: files.get(&d).cloned(),
                    });
                }
            }
        }
        Self {
            store,
            by_manifest,
            pagemaps: HashMap::new(),
        }
    }

    /// The address of page `page` of `file` in snapshot `root`, if its pagemap says.
    fn address(&mut self, root: &Digest256, file: &str, page: u64) -> Option<u64> {
        let store = self.store;
        let maps = self.pagemaps.entry(*root).or_insert_with(|| {
            let Ok(ProcsBlob::Criu(c)) = pf_world_procs::load_procs(store, root) else {
                return None;
            };
            match pf_world_procs::memory_map::pagemaps_of(store, &c) {
                Ok(maps) => Some(maps),
                Err(err) => {
                    tracing::warn!(%root, "cannot read the pagemaps: {:#}", anyhow::Error::new(err));
                    None
                }
            }
        });
        maps.as_ref()?.get(file)?.address_of(page)
    }

    /// Every snapshot's view of one use: (names, root, file, address).
    fn resolve(&mut self, at: &PageUse) -> Vec<(SnapshotUse, Option<u64>)> {
        let users = self
            .by_manifest
            .get(&at.manifest)
            .cloned()
            .unwrap_or_default();
        users
            .into_iter()
            .map(|u| {
                let address = u
                    .file
                    .as_deref()
                    .and_then(|f| self.address(&u.root, f, at.page));
                (u, address)
            })
            .collect()
    }

    /// The snapshots that use a manifest.
    fn users(&self, manifest: &Digest256) -> Vec<SnapshotUse> {
        self.by_manifest.get(manifest).cloned().unwrap_or_default()
    }
}

/// The page-level part of `pf store verify`: the problems found, as lines and as JSON.
pub(super) struct PagesChecked {
    pub(super) lines: Vec<String>,
    pub(super) json: Value,
    pub(super) bad: usize,
}

/// Check the packs and page lists of every manifest `roots` reach (by digest, with the names
/// that point at each).
pub(super) fn verify(
    store: &dyn BlobStore,
    roots: &BTreeMap<Digest256, Vec<String>>,
) -> PagesChecked {
    let all: Vec<Digest256> = roots.keys().copied().collect();
    let graph = match Graph::load(store, &all) {
        Ok(g) => g,
        Err(err) => {
            let why = format!("{:#}", anyhow::Error::new(err));
            return PagesChecked {
                lines: vec![format!("pages BAD: cannot walk the snapshots: {why}")],
                json: json!({ "error": why }),
                bad: 1,
            };
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let report = pages_report::verify_pages(store, &graph, threads);
    let mut naming = Naming::new(store, &graph, roots);
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for p in &report.problems {
        let (line, value) = describe(p, &mut naming);
        lines.push(line);
        problems.push(value);
    }
    let json = json!({
        "manifests": report.manifests,
        "packs": report.packs,
        "pages": report.pages,
        "list_entries": report.list_entries,
        "problems": problems,
    });
    PagesChecked {
        bad: report.problems.len(),
        lines,
        json,
    }
}

/// A problem as a line (`<digest> BAD: …; used by …`) and as JSON.
fn describe(p: &PageProblem, naming: &mut Naming<'_>) -> (String, Value) {
    let (subject, kind, pack, slot, list) = match &p.fault {
        Fault::BadPage { pack, slot, .. } => (*pack, "bad_page", Some(*pack), Some(*slot), None),
        Fault::BadPack { pack, .. } => (*pack, "bad_pack", Some(*pack), None, None),
        Fault::WrongSlot { pack, slot, .. } => {
            (*pack, "wrong_slot", Some(*pack), Some(*slot), None)
        }
        Fault::BadList { list, .. } => (*list, "bad_list", None, None, Some(*list)),
        Fault::Unforwarded { pack, .. } => (*pack, "unforwarded", Some(*pack), None, None),
        _ => {
            return (
                format!("pages BAD: {}", p.fault),
                json!({"error": p.fault.to_string()}),
            );
        }
    };
    let mut uses_text = Vec::new();
    let mut uses_json = Vec::new();
    for at in &p.uses {
        let mut snapshots = Vec::new();
        for (u, address) in naming.resolve(at) {
            let mut t = format!("{} ({})", quote_names(&u.names), u.root);
            if let Some(file) = &u.file {
                t.push_str(&format!(" {file}"));
            }
            t.push_str(&format!(" page {}", at.page));
            if let Some(a) = address {
                t.push_str(&format!(" at address {a:#x}"));
            }
            uses_text.push(t);
            snapshots.push(json!({
                "snapshot": u.root,
                "names": u.names,
                "file": u.file,
                "address": address,
            }));
        }
        if snapshots.is_empty() {
            uses_text.push(format!("manifest {} page {}", at.manifest, at.page));
        }
        uses_json.push(json!({
            "manifest": at.manifest,
            "page": at.page,
            "snapshots": snapshots,
        }));
    }
    let mut line = format!("{subject} BAD: {}", p.fault);
    if let Fault::BadList { manifest, .. } = &p.fault {
        let users: Vec<String> = naming
            .users(manifest)
            .iter()
            .map(|u| {
                let file = u
                    .file
                    .as_deref()
                    .map(|f| format!(" {f}"))
                    .unwrap_or_default();
                format!("{} ({}){file}", quote_names(&u.names), u.root)
            })
            .collect();
        if users.is_empty() {
            line.push_str(&format!("; manifest {manifest} cannot be rebuilt"));
        } else {
            line.push_str(&format!("; cannot be rebuilt: {}", users.join(", ")));
        }
    } else if uses_text.is_empty() {
        line.push_str("; no page list uses it");
    } else {
        line.push_str(&format!("; used by {}", uses_text.join(", ")));
        if p.use_count > p.uses.len() as u64 {
            line.push_str(&format!(
                " and {} more pages",
                p.use_count - p.uses.len() as u64
            ));
        }
    }
    let value = json!({
        "kind": kind,
        "pack": pack,
        "slot": slot,
        "list": list,
        "error": p.fault.to_string(),
        "use_count": p.use_count,
        "uses": uses_json,
    });
    (line, value)
}

/// `"a", "b"`, or `an unnamed snapshot`.
fn quote_names(names: &[String]) -> String {
    if names.is_empty() {
        return "an unnamed snapshot".to_owned();
    }
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
