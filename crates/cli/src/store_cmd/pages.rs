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

/// The store's names: the readable ones grouped by the digest they point at, and apart, the
/// names whose ref file does not hold a digest (with why), which listings warn about and verify
/// reports instead of failing on: one bad ref must not hide every other name.
pub(super) struct Names {
    pub(super) by_digest: BTreeMap<Digest256, Vec<String>>,
    pub(super) bad: Vec<(String, String)>,
}

impl Names {
    /// What to do about bad name `name`.
    pub(super) fn fix(name: &str) -> String {
        format!(
            "`pf store untag {name}` removes it, or `pf store tag {name} DIGEST` points it at the \
             blob it should name"
        )
    }

    /// One warning line on stderr per bad name, for the commands that list.
    pub(super) fn warn_bad(&self) {
        for (name, why) in &self.bad {
            super::say(&format!(
                "warning: name {name:?} is left out: {why}; {}",
                Self::fix(name)
            ));
        }
    }
}

/// Every name, the readable ones grouped by the digest they point at.
pub(super) fn names_by_digest(store: &dyn BlobStore) -> anyhow::Result<Names> {
    let mut by_digest: BTreeMap<Digest256, Vec<String>> = BTreeMap::new();
    let mut bad = Vec::new();
    for (name, digest) in store.names_or_errors()? {
        match digest {
            Ok(digest) => by_digest.entry(digest).or_default().push(name),
            Err(err) => bad.push((name, format!("{:#}", anyhow::Error::new(err)))),
        }
    }
    Ok(Names { by_digest, bad })
}

/// The graph of everything the names reach, plus `extra` roots. A blob it cannot read is left
/// in [`Graph::unreadable`] rather than failing: this graph only reports, never decides what is
/// dead.
pub(super) fn load_graph(
    store: &dyn BlobStore,
    names: &BTreeMap<Digest256, Vec<String>>,
    extra: &[Digest256],
) -> anyhow::Result<Graph> {
    let roots: Vec<Digest256> = names.keys().chain(extra).copied().collect();
    Graph::load_partial(store, &roots).context("cannot walk what the store's names reach")
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
    names.warn_bad();
    let names = names.by_digest;
    let graph = load_graph(store, &names, &[digest])?;
    // The snapshot's own blob unreadable (corrupt, cut short): nothing true can be shown.
    if let Some(why) = graph.unreadable().get(&digest) {
        anyhow::bail!(
            "cannot show {digest}: {why} (`pf store verify` says more; a thaw of it fails \
             too)"
        );
    }
    for (blob, why) in graph.unreadable() {
        super::say(&format!(
            "warning: blob {blob} cannot be read, so the sizes leave out what it refers to: \
             {why} (`pf store verify` tells which names reach it)"
        ));
    }
    // The snapshot's page lists, read whole (checked against their digests): the walk reads a
    // blob that is not JSON only as far as its first bytes, so a damaged list is found here.
    let reach = graph.reach(&digest);
    let mut bad_lists: BTreeMap<Digest256, String> = BTreeMap::new();
    for m in reach.iter().filter_map(|d| graph.manifests().get(d)) {
        if graph.missing().contains(&m.list) || bad_lists.contains_key(&m.list) {
            continue;
        }
        if let Err(err) = store.copy_to(&m.list, &mut std::io::sink()) {
            super::say(&format!(
                "warning: page list {} cannot be read, so the sizes leave out its pages and a \
                 thaw of this snapshot fails: {err} (`pf store verify` says more)",
                m.list
            ));
            bad_lists.insert(m.list, err.to_string());
        }
    }
    let mut roots: Vec<Digest256> = names.keys().copied().collect();
    roots.push(digest);
    let usage =
        pages_report::usage(store, &graph, &roots).context("cannot add up what the names keep")?;
    let mine = usage
        .iter()
        .find(|u| u.root == digest)
        .context("the snapshot is missing from its own report")?;
    // The other names whose blobs overlap this one's.
    let mut shared_with: BTreeSet<String> = BTreeSet::new();
    for (root, root_names) in &names {
        if *root != digest && graph.reach(root).iter().any(|d| reach.contains(d)) {
            shared_with.extend(root_names.iter().cloned());
        }
    }
    // Read whole, so its bytes are checked against its digest (the graph reads only as far as
    // it needs to find what a blob refers to); a large one (not a record) streamed, unkept.
    let cannot = |why: pf_core::Error| {
        anyhow::anyhow!(
            "cannot show {digest}: {why} (`pf store verify` says more; a thaw of it fails too)"
        )
    };
    let own = if store.raw_size(&digest).map_err(cannot)? <= 16 << 20 {
        store.get(&digest).map_err(cannot)?
    } else {
        store
            .copy_to(&digest, &mut std::io::sink())
            .map_err(cannot)?;
        Vec::new()
    };
    let kind = serde_json::from_slice::<Value>(&own)
        .ok()
        .and_then(|v| v.get("kind").and_then(Value::as_str).map(str::to_owned));
    // What a blob that is no record is to the snapshots that use it (a thaw of one sends the
    // user here: "`pf store show` says what it holds").
    let what = kind.is_none().then(|| {
        let manifests = graph.manifests();
        let in_manifest =
            |pick: &dyn Fn(&pf_core::pages::PagesManifest) -> bool| manifests.values().any(pick);
        if in_manifest(&|m| m.packs.contains(&digest)) {
            match pf_core::pack::Pack::parse(digest, &own) {
                Ok(pack) => format!(
                    "a pack of {} pages of a snapshot's memory (not a snapshot: thaw a snapshot \
                     that uses it)",
                    pack.pages()
                ),
                Err(_) => "a pack of pages of a snapshot's memory (not a snapshot: thaw a \
                           snapshot that uses it)"
                    .to_owned(),
            }
        } else if in_manifest(&|m| m.list == digest || m.bases.contains(&digest)) {
            "the page list of a snapshot's memory (not a snapshot: thaw a snapshot that uses it)"
                .to_owned()
        } else if serde_json::from_slice::<Value>(&own).is_ok() {
            "JSON without a `kind`: no snapshot record of pf's".to_owned()
        } else {
            "bytes that are no snapshot (`pf store cat` gives them back)".to_owned()
        }
    });
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
            "what": what,
            "shared_with": shared_with,
            "missing": missing_here,
            // Blobs it reaches that cannot be read: the sizes leave out what they refer to.
            "unreadable": reach
                .iter()
                .filter_map(|d| graph.unreadable().get(d).map(|why| json!({"digest": d, "why": why})))
                .chain(bad_lists.iter().map(|(d, why)| json!({"digest": d, "why": why})))
                .collect::<Vec<_>>(),
        });
        if let (Some(obj), Value::Object(u)) = (v.as_object_mut(), usage_json(mine)) {
            obj.extend(u);
        }
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "digest        {digest}")?;
    if my_names.is_empty() {
        writeln!(out, "names         none")?;
    } else {
        writeln!(out, "names         {}", my_names.join(", "))?;
    }
    if let Some(kind) = &kind {
        writeln!(out, "kind          {kind}")?;
    }
    if let Some(what) = &what {
        writeln!(out, "what          {what}")?;
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

/// Pages named per snapshot in a verify line; the rest are counted.
const PAGES_NAMED: usize = 4;

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

/// Check the packs and page lists of every manifest in `graph` (loaded from `roots`: by digest,
/// with the names that point at each).
pub(super) fn verify(
    store: &dyn BlobStore,
    graph: &Graph,
    roots: &BTreeMap<Digest256, Vec<String>>,
) -> PagesChecked {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let report = pages_report::verify_pages(store, graph, threads);
    let mut naming = Naming::new(store, graph, roots);
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
    // The listed uses grouped by (manifest, snapshot), in order of first use: a pack that every
    // page of a file uses names that file's snapshot once, with a count, not once a page.
    let mut groups: Vec<UseGroup> = Vec::new();
    let mut uses_json = Vec::new();
    for at in &p.uses {
        let mut snapshots = Vec::new();
        let mut placed = Vec::new();
        for (u, address) in naming.resolve(at) {
            let mut t = format!("page {}", at.page);
            if let Some(a) = address {
                t.push_str(&format!(" at address {a:#x}"));
            }
            snapshots.push(json!({
                "snapshot": u.root,
                "names": u.names,
                "file": u.file,
                "address": address,
            }));
            placed.push(((at.manifest, Some(u.root)), Some(u), t));
        }
        if placed.is_empty() {
            placed.push(((at.manifest, None), None, format!("page {}", at.page)));
        }
        for (key, user, page) in placed {
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.2.push(page),
                None => groups.push((key, user, vec![page])),
            }
        }
        uses_json.push(json!({
            "manifest": at.manifest,
            "page": at.page,
            "snapshots": snapshots,
        }));
    }
    let mut uses_text = Vec::new();
    for ((manifest, _), user, pages) in &groups {
        let mut t = match user {
            Some(u) => {
                let mut t = format!("{} ({})", quote_names(&u.names), u.root);
                if let Some(file) = &u.file {
                    t.push_str(&format!(" {file}"));
                }
                t
            }
            None => format!("manifest {manifest}"),
        };
        t.push(' ');
        t.push_str(&pages[..pages.len().min(PAGES_NAMED)].join(", "));
        let total = p
            .use_counts
            .get(manifest)
            .copied()
            .unwrap_or(pages.len() as u64);
        let more = total.saturating_sub(pages.len().min(PAGES_NAMED) as u64);
        if more > 0 {
            t.push_str(&format!(" and {more} more of its pages"));
        }
        uses_text.push(t);
    }
    let told: BTreeSet<Digest256> = groups.iter().map(|((m, _), _, _)| *m).collect();
    let told_uses: u64 = told
        .iter()
        .map(|m| p.use_counts.get(m).copied().unwrap_or(0))
        .sum();
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
        line.push_str(&format!("; used by {}", uses_text.join("; ")));
        if p.use_count > told_uses {
            line.push_str(&format!(
                "; and {} more pages of other files",
                p.use_count - told_uses
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
        "use_counts": p
            .use_counts
            .iter()
            .map(|(m, n)| (m.to_string(), json!(n)))
            .collect::<serde_json::Map<String, Value>>(),
        "uses": uses_json,
    });
    (line, value)
}

/// The listed uses of a bad thing by one file of one snapshot: (manifest, snapshot) as the key,
/// the snapshot, and each page as words (`page N at address A`).
type UseGroup = (
    (Digest256, Option<Digest256>),
    Option<SnapshotUse>,
    Vec<String>,
);

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

/// What missing blob `missing` is to snapshot `root`, which reaches it through `parent`: its
/// images tar, the pages manifest of one of its pages files, or a blob `parent` refers to.
pub(super) fn missing_role(
    store: &dyn BlobStore,
    root: &Digest256,
    missing: &Digest256,
    parent: &Digest256,
) -> String {
    if let Ok(ProcsBlob::Criu(c)) = pf_world_procs::load_procs(store, root) {
        if c.criu_dump == *missing {
            return "its images tar (criu_dump)".to_owned();
        }
        if let Some(m) = c.memory.iter().flatten().find(|m| m.manifest == *missing) {
            return format!("the pages manifest of its {}", m.file);
        }
    }
    if parent == root {
        "a blob it refers to".to_owned()
    } else {
        format!("a blob that {parent} refers to")
    }
}

/// Whether missing blob `d` is a page list or pack of a manifest in `graph`: the page check
/// reports those, with the pages that use them.
pub(super) fn told_by_page_check(graph: &Graph, d: &Digest256) -> bool {
    graph
        .manifests()
        .values()
        .any(|m| m.list == *d || m.packs.contains(d) || m.bases.contains(d))
}

/// `"a", "b" (sha256:…)` for a root and its names.
pub(super) fn snapshot_words(root: &Digest256, names: &[String]) -> String {
    format!("{} ({root})", quote_names(names))
}
