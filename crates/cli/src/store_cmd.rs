//! `pf store`: put, cat, list, show, verify, name, remove and collect blobs in the
//! content-addressed store. The page-level parts (packs, page lists, what each name keeps) are in
//! `pages.rs`.

mod pages;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use pf_core::{BlobStore, Digest256, FsBlobStore, GcOptions};

use crate::common::{self, Global, progress_enabled, resolve};

/// Inputs and outputs at least this large show progress (on a terminal).
const PROGRESS_MIN: u64 = 64 << 20;

const STORE_HELP: &str = "\
Blobs are named by the SHA-256 of their raw bytes (sha256:<64 hex>), kept under
<store>/blobs/sha256/ (zstd-compressed; page packs, compressed frame by frame already, as they
are), and checked against their digest on every read. Names (tags) point at blobs;
`pf store gc` removes what no name reaches.

Every command that takes a DIGEST (here, and `pf goblin thaw|fork`, `pf procs restore|show`,
`pf shell thaw`, `pf push`) also takes a NAME or a unique prefix of a digest, as git and docker
take short ids: `sha256:` and at least 4 hex digits (sha256:3f2a9c), or at least 8 hex digits
alone (3f2a9c01). A name that exists wins over a bare prefix spelled like it (a snapshot tagged
20240601 is that snapshot); sha256:… is never a name. A prefix that several blobs start with is
refused, naming them (those with names first): give more digits.

Examples:
  pf store put dump.tar --tag before-upgrade   store a file, name it, print its digest
  tar c dir | pf store put -                   store stdin
  pf store cat before-upgrade > dump.tar       write a blob to stdout (verified at the end)
  pf store ls --json                           every blob with sizes and names
  pf store show base                           what a snapshot stands for, stores and shares
  pf store verify                              check every blob, pack and page; exit 1 naming
                                               each bad one
  pf store gc --dry-run                        what gc would remove

Store: --store DIR, else $PF_STORE, else $XDG_DATA_HOME/pf, else ~/.local/share/pf";

/// Manage the content-addressed snapshot store.
#[derive(Debug, clap::Subcommand)]
#[command(after_help = STORE_HELP)]
pub(crate) enum Command {
    /// Store a file, or stdin with `-`, and print its digest
    #[command(after_help = "\
Examples:
  pf store put image.tar                 prints sha256:…
  pf store put image.tar --tag base      also points the name `base` at it
  some-command | pf store put -          stores stdin

The blob streams through: memory stays flat whatever its size. Storing a blob that is already
there succeeds and prints the same digest; if the stored copy was corrupt, the new one replaces it
(putting the same bytes again repairs a blob `pf store verify` calls BAD).

Files whose size lies (/proc, /sys) are read to their end.")]
    Put(PutArgs),
    /// Write a blob's raw bytes to stdout, verifying them against the digest
    #[command(after_help = "\
Examples:
  pf store cat base > image.tar
  pf store cat sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 | tar t

The bytes stream out as they are decoded; the digest can only be checked at the end. If the blob
turns out corrupt, pf exits 1 with an error naming the digest after the bytes already written:
discard that output.")]
    Cat(CatArgs),
    /// List blobs: digest, raw size, stored size and the names pointing at each
    #[command(after_help = "\
Examples:
  pf store ls
  pf store ls --json | jq '.[] | select(.names == [])'

A blob that names point at also gets what it keeps: its logical size (what it stands for: the pages
of its page-level memory at 4 KiB each plus the raw size of its other blobs), the bytes all its
blobs take in the store, and how many of those other names' blobs share.

`--json` prints an array of {\"digest\", \"size\", \"stored_size\", \"names\", \"keeps\"}, sizes in
bytes; `keeps` is null for a blob no name points at, else {\"blobs\", \"pages\", \"zero_pages\",
\"logical_size\", \"stored_size\", \"shared_size\"}.")]
    Ls(LsArgs),
    /// Tell what a snapshot (or any blob) stands for, stores and shares with other names
    #[command(after_help = "\
Examples:
  pf store show base
  pf store show sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 --json

Counts every blob the snapshot reaches (its procs record, images, pages manifests, page lists and
packs): the logical size is what it stands for (pages × 4 KiB plus the raw size of its other
blobs), the stored size what those blobs take on disk, shared what of that other names' blobs
reach too, and own the rest: what removing its names frees at the next `pf store gc`.
A pack counts whole wherever one of its pages is used.")]
    Show(ShowArgs),
    /// Check blobs against their digests (all blobs and names when none are given)
    #[command(after_help = "\
Examples:
  pf store verify              every blob, and every name's target
  pf store verify base         one snapshot (or blob) and every blob it needs

Prints `<digest> ok` or `<digest> BAD: <why>` per blob on stdout, and exits 1 when any is bad.
`pf store put` of the same bytes repairs a bad blob (it writes the blob again over the bad copy).
Also BAD: a name whose ref file holds no digest (`name \"NAME\" BAD: …`; `pf store untag NAME`
removes it), a name whose blob is gone, and a blob a snapshot needs that is not in the store
(`<digest> BAD: not in the store; \"NAME\" (sha256:…) needs it as its images tar (criu_dump)`).

Then the memory of page-level snapshots (procs.criu.v2) that the names (or the blobs given) reach:
every pack decodes and every page in it hashes to the digest its index records, and every page
list entry names a slot of its pack that holds the page it says. A bad page is one line
`<pack> BAD: … slot N …; used by \"NAME\" (sha256:…) pages-1.img page 42 at address 0x…`.

`--json` prints {\"ok\", \"blobs\": [{\"digest\", \"ok\", \"error\"}], \"bad_names\",
\"missing_names\", \"missing_blobs\", \"pages\": {\"manifests\", \"packs\", \"pages\",
\"list_entries\", \"problems\"}}.")]
    Verify(VerifyArgs),
    /// Point a name at a blob (replacing what it pointed at)
    #[command(after_help = "\
Examples:
  pf store tag base sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824
  pf store tag previous base   copy a name

Names: 1-200 bytes, no `/`, white space or control characters, not starting with `.`.")]
    Tag(TagArgs),
    /// Remove a name (the blob stays until `pf store gc`)
    Untag(UntagArgs),
    /// List names and the digests they point at
    #[command(after_help = "`--json` prints an array of {\"name\", \"digest\"}.")]
    Tags(TagsArgs),
    /// Remove blobs no name reaches, and temp files of interrupted puts
    #[command(after_help = "\
A blob is kept when a name points at it, or when a kept blob is JSON holding its digest as a
string (a procs snapshot keeps its CRIU dump that way; a pages manifest its page list and packs).
gc then reports how much of the kept packs is dead: pages that no kept page list uses any more
(a pack is kept whole while any of its pages is used). gc waits for the writers (puts, captures,
freezes) that are between their first blob and its name, so whatever the grace period it never
removes what they are about to name. It also waits for thaws still reading a snapshot, a lazy
thaw until every page of its copy is in (about a second per GiB), so removing a name and running
gc never takes memory from a copy still being served. Unreachable blobs stored within the grace
period are kept too, for writers that do not take the store's lock.

--repack then rewrites the packs whose live fraction is below --threshold (default 0.5): their
live pages are copied, checked, into new packs, and a forward record `old pack -> new pack`
(<store>/index/forward/) is written before the old pack is removed. Snapshot digests never
change (a pushed or typed digest keeps working): readers that find a pack gone follow its
forward records and find each page by its digest, still checked against the page list. It runs
under the same lock as gc from mark to removal, so freezes wait for it; killed at any point it
leaves every snapshot readable, and a rerun finishes its work. Cost: the live pages of the
rewritten packs are read, decoded, hashed and compressed again once.

Examples:
  pf store gc --dry-run                list what would go
  pf store gc --grace 0                remove every unreachable blob now
  pf store gc --repack                 also rewrite packs less than half live
  pf store gc --repack --threshold 0.9 --dry-run
                                       which packs less than 90% live would be rewritten
  pf store gc --json")]
    Gc(GcArgs),
    /// Remove a blob now, and the names given for it
    #[command(after_help = "\
Examples:
  pf store rm base                      removes the blob `base` points at, and the name `base`
  pf store rm sha256:…                  refuses if names point at the blob, or if named
                                        snapshots are made of it (a pack, a page list, an image)
  pf store rm sha256:… --force          also removes those names; removes it anyway

Blobs that refer to the removed one (JSON holding its digest) are not changed: a snapshot one
of whose blobs is removed cannot be restored, and `pf store verify` names it. Prefer
`pf store untag` and `pf store gc`.")]
    Rm(RmArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct PutArgs {
    /// File to store, or `-` for stdin
    #[arg(value_name = "FILE|-")]
    input: OsString,
    /// Also point NAME at the stored blob
    #[arg(long, value_name = "NAME")]
    tag: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CatArgs {
    /// The blob: its digest (sha256:…), a unique prefix of it, or a name pointing at it
    #[arg(value_name = "DIGEST|NAME")]
    blob: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct LsArgs {
    /// Print JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// The snapshot: a digest (sha256:…), a unique prefix of one, or a name
    #[arg(value_name = "DIGEST|NAME")]
    blob: String,
    /// Print JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// Blobs to check, by digest, unique prefix or name [default: every blob and every name]
    #[arg(value_name = "DIGEST|NAME")]
    blobs: Vec<String>,
    /// Print one JSON object on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct TagArgs {
    /// The name to set
    name: String,
    /// The blob it points at: a digest, a unique prefix of one, or another name
    #[arg(value_name = "DIGEST|NAME")]
    target: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct UntagArgs {
    /// The name to remove
    name: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct TagsArgs {
    /// Print JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct GcArgs {
    /// List what would be removed, remove nothing
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,
    /// Keep unreachable blobs stored less than this long ago (e.g. 0, 90s, 10m, 2h, 1d)
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    grace: Duration,
    /// Then rewrite packs whose live fraction is below --threshold, keeping every digest
    #[arg(long)]
    repack: bool,
    /// With --repack: rewrite a pack when less than this fraction of its pages is live (0 to 1)
    #[arg(long, value_name = "F", default_value = "0.5", requires = "repack", value_parser = parse_fraction)]
    threshold: f64,
}

/// A fraction from 0 to 1.
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction from 0 to 1 (e.g. 0.5)")),
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct RmArgs {
    /// The blob to remove: a digest, a unique prefix of one, or a name (the name is removed too)
    #[arg(value_name = "DIGEST|NAME")]
    blob: String,
    /// Also remove the other names that point at the blob, and remove it even when named
    /// snapshots need it (one of their packs, page lists or images: they will no longer thaw)
    #[arg(long)]
    force: bool,
}

pub(crate) fn run(global: &Global, command: Command) -> anyhow::Result<ExitCode> {
    // Only a put makes a store; every other command needs one that is there.
    let store = match command {
        Command::Put(_) => common::open_store(global)?,
        _ => common::open_existing_store(global)?,
    };
    match command {
        Command::Put(args) => put(&store, &args),
        Command::Cat(args) => cat(&store, &args),
        Command::Ls(args) => ls(&store, &args),
        Command::Show(args) => {
            let digest = resolve(&store, &args.blob)?;
            if !store.contains(&digest)? {
                bail!("blob {digest} is not in the store");
            }
            pages::show(&store, digest, args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => verify(&store, &args),
        Command::Tag(args) => {
            let digest = resolve(&store, &args.target)?;
            store
                .set_name(&args.name, &digest)
                .with_context(|| format!("cannot point {:?} at {digest}", args.name))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Untag(args) => {
            if !store.remove_name(&args.name)? {
                bail!("no name {:?} in the store (see `pf store tags`)", args.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tags(args) => tags(&store, &args),
        Command::Gc(args) => gc(&store, &args),
        Command::Rm(args) => rm(&store, &args),
    }
}

fn put(store: &FsBlobStore, args: &PutArgs) -> anyhow::Result<ExitCode> {
    if let Some(name) = &args.tag {
        // Refuse a bad name before storing a GiB.
        pf_core::validate_name(name)?;
    }
    // Held from the blob to its name: a gc running meanwhile waits instead of removing the blob
    // in between (see agent_docs/formats.md).
    let _writing = store
        .writer_lock()
        .context("cannot lock the store for writing")?;
    let result = if args.input == "-" {
        let mut stdin = io::stdin().lock();
        let bar = progress_bar(None);
        let mut reader = bar.wrap_read(&mut stdin);
        let result = store.put_reader(&mut reader).context("cannot store stdin");
        bar.finish_and_clear();
        result?
    } else {
        let path = PathBuf::from(&args.input);
        let mut file =
            File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot read metadata of {}", path.display()))?;
        // The size is announced (and checked: a file that changes while it is read is an error)
        // only for a regular file with data on disk. Files of procfs, sysfs and the like have no
        // blocks and a size that lies (0 or 4096): they are read to their end.
        let len = (meta.is_file() && meta.blocks() > 0).then_some(meta.len());
        let bar = progress_bar(len);
        let mut reader = bar.wrap_read(&mut file);
        let result = match len {
            Some(len) => store.put_reader_with_len(&mut reader, len),
            None => store.put_reader(&mut reader),
        }
        .with_context(|| format!("cannot store {}", path.display()));
        bar.finish_and_clear();
        result?
    };
    if let Some(name) = &args.tag {
        store
            .set_name(name, &result.digest)
            .with_context(|| format!("stored {}, but cannot name it {name:?}", result.digest))?;
    }
    writeln!(io::stdout().lock(), "{}", result.digest)?;
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on stderr for `len` bytes (`None`: unknown), hidden unless stderr is a
/// terminal and the transfer is long.
fn progress_bar(len: Option<u64>) -> ProgressBar {
    if !progress_enabled() || len.is_some_and(|n| n < PROGRESS_MIN) {
        return ProgressBar::hidden();
    }
    match len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template(
                "{bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {binary_bytes} {binary_bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    }
}

fn cat(store: &FsBlobStore, args: &CatArgs) -> anyhow::Result<ExitCode> {
    let digest = resolve(store, &args.blob)?;
    // An unbuffered handle on stdout: the store writes large chunks already.
    let stdout = File::from(
        io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate stdout")?,
    );
    // The raw size may be unknown without decoding: judge by the stored size, show no total.
    let long = store
        .stored_size(&digest)
        .is_ok_and(|n| n >= PROGRESS_MIN / 4);
    let bar = if long {
        progress_bar(None)
    } else {
        ProgressBar::hidden()
    };
    let mut out = CountingWriter {
        inner: stdout,
        written: 0,
        bar: &bar,
    };
    let result = store.copy_to(&digest, &mut out);
    bar.finish_and_clear();
    match result {
        Ok(_) => Ok(ExitCode::SUCCESS),
        // The reader of our output went away (`pf store cat x | head`): not our failure.
        Err(pf_core::Error::Output { source, .. })
            if source.kind() == io::ErrorKind::BrokenPipe =>
        {
            Ok(ExitCode::SUCCESS)
        }
        Err(err @ pf_core::Error::Output { .. }) => Err(err).context("cannot write to stdout"),
        Err(err) if out.written == 0 => Err(err.into()),
        Err(err) => Err(anyhow::Error::new(err).context(format!(
            "blob {digest} failed after {} bytes of it were written to stdout: discard that output",
            out.written
        ))),
    }
}

/// Counts what goes through to stdout, for the progress bar and for error messages.
struct CountingWriter<'a> {
    inner: File,
    written: u64,
    bar: &'a ProgressBar,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        self.bar.set_position(self.written);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn ls(store: &FsBlobStore, args: &LsArgs) -> anyhow::Result<ExitCode> {
    let names = pages::names_by_digest(store)?;
    names.warn_bad();
    let names = names.by_digest;
    // What each name keeps needs every JSON blob they reach. A blob that cannot be read leaves
    // only the names that reach it without their sizes (`keeps` unknown); the others are told.
    let usage = match pages::load_graph(store, &names, &[]).and_then(|graph| {
        let mut usage = pages::usage_by_root(store, &graph, &names)?;
        for (blob, why) in graph.unreadable() {
            let mut left_out = Vec::new();
            for (root, of) in &names {
                if graph.reach(root).contains(blob) {
                    usage.remove(root);
                    left_out.extend(of.iter().map(|n| format!("{n:?}")));
                }
            }
            say(&format!(
                "warning: cannot tell what the names {} keep: blob {blob} cannot be read: {why} \
                 (`pf store verify` tells more)",
                left_out.join(", ")
            ));
        }
        Ok(usage)
    }) {
        Ok(usage) => usage,
        Err(err) => {
            say(&format!(
                "warning: cannot tell what the names keep: {err:#} (run `pf store verify`)"
            ));
            std::collections::HashMap::new()
        }
    };
    let mut rows = Vec::new();
    for digest in store.list()? {
        let stored = match store.stored_size(&digest) {
            Ok(n) => n,
            // Removed while we listed.
            Err(pf_core::Error::NotFound { .. }) => continue,
            Err(err) => return Err(err.into()),
        };
        let size = match store.raw_size(&digest) {
            Ok(n) => Some(n),
            Err(pf_core::Error::NotFound { .. }) => continue,
            Err(err) => {
                tracing::warn!("{:#}", anyhow::Error::new(err));
                None
            }
        };
        let names = names.get(&digest).cloned().unwrap_or_default();
        rows.push((digest, size, stored, names));
    }
    let mut out = io::stdout().lock();
    if args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|(digest, size, stored, names)| {
                serde_json::json!({
                    "digest": digest,
                    "size": size,
                    "stored_size": stored,
                    "names": names,
                    "keeps": usage.get(digest).map(pages::usage_json),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &json)?;
        writeln!(out)?;
    } else {
        if !rows.is_empty() {
            // The digest column is as wide as a digest: `sha256:` and 64 hex digits.
            writeln!(
                out,
                "{:<71}  {:>10}  {:>10}  NAMES",
                "DIGEST", "RAW", "STORED"
            )?;
        }
        for (digest, size, stored, names) in &rows {
            let size = size.map_or_else(|| "?".to_owned(), |n| HumanBytes(n).to_string());
            let keeps = usage
                .get(digest)
                .map(|u| format!("  {}", pages::usage_words(u)))
                .unwrap_or_default();
            let line = format!(
                "{digest}  {size:>10}  {:>10}  {}{keeps}",
                HumanBytes(*stored).to_string(),
                names.join(",")
            );
            writeln!(out, "{}", line.trim_end())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(store: &FsBlobStore, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let names = pages::names_by_digest(store)?;
    let bad_names = if args.blobs.is_empty() {
        names.bad.clone()
    } else {
        Vec::new()
    };
    let names = names.by_digest;
    let mut missing_names = Vec::new();
    // The blobs to check, and the roots whose graph to check (with their names).
    let (digests, roots) = if args.blobs.is_empty() {
        for (digest, of) in &names {
            if !store.contains(digest)? {
                missing_names.extend(of.iter().map(|name| (name.clone(), *digest)));
            }
        }
        (store.list()?, names.clone())
    } else {
        let mut digests = Vec::new();
        let mut roots = BTreeMap::new();
        for arg in &args.blobs {
            let digest = resolve(store, arg)?;
            digests.push(digest);
            roots.insert(digest, names.get(&digest).cloned().unwrap_or_default());
        }
        (digests, roots)
    };
    // What the roots reach. A blob that cannot be read is recorded and the walk goes on, so one
    // broken blob neither hides the others' pages nor is blamed on page-level snapshots.
    let graph = pages::load_graph(store, &roots, &[])?;
    // A blob asked about is checked whole: every blob it reaches (a snapshot's images archive,
    // its manifest, lists and packs) is read through the verifying reader too.
    let digests = if args.blobs.is_empty() {
        digests
    } else {
        let mut all = digests.clone();
        for root in roots.keys() {
            for d in graph.reach(root) {
                if !all.contains(&d) && store.contains(&d)? {
                    all.push(d);
                }
            }
        }
        all
    };
    // The snapshots (roots) that reach each blob, to say whose a bad or missing blob is.
    let reached_by = |d: &Digest256| -> Vec<String> {
        roots
            .iter()
            .filter(|(root, _)| *root != d && graph.reach(root).contains(d))
            .map(|(root, of)| pages::snapshot_words(root, of))
            .collect()
    };
    let mut out = io::stdout().lock();
    let mut bad_blobs = 0usize;
    let mut blob_rows = Vec::with_capacity(digests.len());
    for (name, why) in &bad_names {
        if !args.json {
            writeln!(out, "name {name:?} BAD: {why}; {}", pages::Names::fix(name))?;
        }
    }
    for (name, digest) in &missing_names {
        if !args.json {
            writeln!(
                out,
                "{digest} BAD: name {name:?} points at it but it is missing; `pf store untag \
                 {name}` removes the name"
            )?;
        }
    }
    // Every blob checked, plus reached blobs the walk could not read that were not asked about.
    let mut checked_blobs: BTreeSet<Digest256> = BTreeSet::new();
    let unasked = graph
        .unreadable()
        .keys()
        .filter(|d| !digests.contains(d))
        .copied()
        .collect::<Vec<_>>();
    for digest in digests.iter().chain(&unasked) {
        if !checked_blobs.insert(*digest) {
            continue;
        }
        let mut error = check(store, digest).err().map(|e| format!("{e:#}"));
        if error.is_none()
            && let Some(why) = graph.unreadable().get(digest)
        {
            error = Some(why.clone());
        }
        if let Some(why) = &mut error {
            bad_blobs += 1;
            let users = reached_by(digest);
            if !users.is_empty() {
                why.push_str(&format!("; needed by {}", users.join(", ")));
            }
        }
        if !args.json {
            match &error {
                None => writeln!(out, "{digest} ok")?,
                Some(why) => writeln!(out, "{digest} BAD: {why}")?,
            }
        }
        blob_rows.push(serde_json::json!({
            "digest": digest,
            "ok": error.is_none(),
            "error": error,
        }));
    }
    // Blobs the roots reach that are not in the store (a root itself missing is told above; a
    // page list or pack, by the page check below with the pages that use it).
    let mut missing_blobs: BTreeMap<Digest256, Vec<(Digest256, Digest256)>> = BTreeMap::new();
    for root in roots.keys() {
        for (missing, parent) in graph.missing_from(root) {
            let Some(parent) = parent else { continue };
            if pages::told_by_page_check(&graph, &missing) {
                continue;
            }
            missing_blobs
                .entry(missing)
                .or_default()
                .push((*root, parent));
        }
    }
    let mut missing_rows = Vec::new();
    for (missing, users) in &missing_blobs {
        let mut words = Vec::new();
        for (root, parent) in users {
            let of = roots.get(root).cloned().unwrap_or_default();
            let role = pages::missing_role(store, root, missing, parent);
            words.push(format!(
                "{} needs it as {role}",
                pages::snapshot_words(root, &of)
            ));
            missing_rows.push(serde_json::json!({
                "digest": missing,
                "snapshot": root,
                "names": of,
                "referred_by": parent,
                "role": role,
            }));
        }
        if !args.json {
            writeln!(out, "{missing} BAD: not in the store; {}", words.join("; "))?;
        }
    }
    let checked = pages::verify(store, &graph, &roots);
    let bad = bad_names.len() + bad_blobs + missing_names.len() + missing_blobs.len() + checked.bad;
    if args.json {
        let json = serde_json::json!({
            "ok": bad == 0,
            "blobs": blob_rows,
            "bad_names": bad_names
                .iter()
                .map(|(name, why)| serde_json::json!({
                    "name": name,
                    "error": why,
                    "fix": pages::Names::fix(name),
                }))
                .collect::<Vec<_>>(),
            "missing_names": missing_names
                .iter()
                .map(|(name, digest)| serde_json::json!({"name": name, "digest": digest}))
                .collect::<Vec<_>>(),
            "missing_blobs": missing_rows,
            "pages": checked.json,
        });
        serde_json::to_writer(&mut out, &json)?;
        writeln!(out)?;
    } else {
        for line in &checked.lines {
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    drop(out);
    if !bad_names.is_empty() {
        say(&format!(
            "error: {} names do not hold a digest (the lines with `name … BAD` above); `pf store \
             untag NAME` removes one, or `pf store tag NAME DIGEST` points it at the blob it \
             should name; `pf store gc` refuses to run until then",
            bad_names.len()
        ));
    }
    if !missing_names.is_empty() {
        say(&format!(
            "error: {} names point at blobs that are not in the store; `pf store untag NAME` \
             removes each (or `pf store put FILE` of the blob's bytes brings it back)",
            missing_names.len()
        ));
    }
    if bad_blobs > 0 {
        say(&format!(
            "error: {bad_blobs} of {} checked blobs are bad; if you have their bytes, `pf store \
             put FILE` repairs each (it writes the blob again over the bad copy), else `pf store \
             untag` the names that need them and `pf store gc` (or `pf store rm --force DIGEST`)",
            checked_blobs.len()
        ));
    }
    if !missing_blobs.is_empty() {
        say(&format!(
            "error: {} blobs that snapshots need are not in the store (the lines with `BAD: not \
             in the store` above name the snapshots); those snapshots cannot be thawed: `pf store \
             put FILE` of a blob's bytes brings it back, else freeze the goblin again if it still \
             runs, or `pf store untag` their names and `pf store gc`",
            missing_blobs.len()
        ));
    }
    if checked.bad > 0 {
        say(&format!(
            "error: {} bad pages, packs or page lists in the memory of page-level snapshots (the \
             lines with BAD above name the snapshots, pages files and pages); those snapshots \
             cannot be thawed: freeze the goblin again if it still runs, else `pf store untag` \
             their names and `pf store gc`",
            checked.bad
        ));
    }
    if bad > 0 {
        return Ok(ExitCode::FAILURE);
    }
    if !args.json {
        say(&verified_summary(checked_blobs.len(), &checked.json));
    }
    Ok(ExitCode::SUCCESS)
}

/// What a clean `pf store verify` checked, for stderr: the page-level checks leave no line of
/// their own on stdout when all is well.
fn verified_summary(blobs: usize, pages: &serde_json::Value) -> String {
    let count = |key: &str| pages[key].as_u64().unwrap_or(0);
    let mut line = format!("ok: {blobs} blobs match their digests");
    if count("manifests") > 0 {
        line.push_str(&format!(
            "; the memory of page-level snapshots: {} packs decoded, {} pages hashed, {} page \
             list entries found in their packs",
            count("packs"),
            count("pages"),
            count("list_entries")
        ));
    }
    line
}

/// Read a blob to its end through the verifying reader.
fn check(store: &dyn BlobStore, digest: &Digest256) -> anyhow::Result<()> {
    let mut reader = store.open(digest)?;
    io::copy(&mut reader, &mut io::sink())?;
    Ok(())
}

fn tags(store: &FsBlobStore, args: &TagsArgs) -> anyhow::Result<ExitCode> {
    let all = pages::names_by_digest(store)?;
    all.warn_bad();
    let mut names: Vec<(String, Digest256)> = all
        .by_digest
        .into_iter()
        .flat_map(|(digest, of)| of.into_iter().map(move |name| (name, digest)))
        .collect();
    names.sort();
    let mut out = io::stdout().lock();
    if args.json {
        let json: Vec<_> = names
            .iter()
            .map(|(name, digest)| serde_json::json!({ "name": name, "digest": digest }))
            .collect();
        serde_json::to_writer_pretty(&mut out, &json)?;
        writeln!(out)?;
    } else {
        for (name, digest) in &names {
            writeln!(out, "{name}  {digest}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(store: &FsBlobStore, args: &GcArgs) -> anyhow::Result<ExitCode> {
    let options = GcOptions {
        dry_run: args.dry_run,
        grace: args.grace,
    };
    let (report, repacked) = if args.repack {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let repacked = pf_core::repack(
            store,
            &pf_core::RepackOptions {
                dry_run: args.dry_run,
                grace: args.grace,
                threshold: args.threshold,
                threads,
            },
        )
        .map_err(|err| match err {
            // Refused before it started: the same refusal as plain gc's.
            err @ pf_core::Error::CorruptName { .. } => gc_refused(err),
            err => anyhow::Error::new(err).context(
                "repack stopped; every snapshot is still readable (old packs go only after their \
                 pages' new pack and forward record are on disk): run it again, and check with \
                 `pf store verify`",
            ),
        })?;
        (repacked.gc.clone(), Some(repacked))
    } else {
        (pf_core::gc(store, &options).map_err(gc_refused)?, None)
    };
    // gc has done its work: a failure to report on the packs is a warning, not gc's failure.
    let packs = pack_report(store).unwrap_or_else(|err| {
        say(&format!(
            "warning: cannot tell how much of the kept packs is dead: {err:#} (run `pf store verify`)"
        ));
        pf_core::pages_report::PackUsage::default()
    });
    if packs.unknown_packs > 0 {
        say(&format!(
            "warning: {} of the kept packs are used by a page list that cannot be read: all \
             their pages count as live (which ones it uses is unknown); `pf store verify` names \
             the list and the snapshots that need it",
            packs.unknown_packs
        ));
    }
    let mut out = io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "dry_run": report.dry_run,
            "removed": report.removed.iter().map(|b| serde_json::json!({
                "digest": b.digest,
                "stored_size": b.stored_size,
            })).collect::<Vec<_>>(),
            "freed_bytes": report.freed_bytes(),
            "reachable": report.reachable,
            "recent": report.recent,
            "missing": report.missing,
            "temp_files": report.temp_files,
            "packs": serde_json::json!({
                "count": packs.packs,
                "pages": packs.pages,
                "live_pages": packs.live_pages,
                "dead_pages": packs.dead_pages(),
                "stored_size": packs.stored_size,
                "dead_stored_size": packs.dead_stored_size,
                "unknown_packs": packs.unknown_packs,
            }),
            "forwards_kept": report.forwards_kept,
            "forwards_removed": report.forwards_removed.len(),
            "hints_removed": report.hints_removed,
            "repack": repacked.as_ref().map(|r| serde_json::json!({
                "threshold": args.threshold,
                "packs_before": r.packs_before,
                "pack_bytes_before": r.pack_bytes_before,
                "pack_bytes_after": pack_bytes_after(r),
                "rewritten": r.rewritten.iter().map(|p| serde_json::json!({
                    "pack": p.pack,
                    "pages": p.pages,
                    "live_pages": p.live_pages,
                    "stored_size": p.stored_size,
                    "to": p.to,
                })).collect::<Vec<_>>(),
                "rewritten_bytes": r.rewritten_bytes(),
                "new_packs": r.new_packs.iter().map(|(d, n)| serde_json::json!({
                    "digest": d,
                    "stored_size": n,
                })).collect::<Vec<_>>(),
                "new_bytes": r.new_bytes(),
                "leftovers_removed": r.leftovers_removed,
                "forwards_written": r.forwards_written,
                "forwards_removed": r.forwards_removed,
                "index_moved": r.index_moved,
                "index_dropped": r.index_dropped,
            })),
        });
        serde_json::to_writer_pretty(&mut out, &json)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for blob in &report.removed {
        writeln!(
            out,
            "{verb} {} ({})",
            blob.digest,
            HumanBytes(blob.stored_size)
        )?;
    }
    for path in &report.temp_files {
        writeln!(out, "{verb} temp file {}", path.display())?;
    }
    out.flush()?;
    drop(out);
    for digest in &report.missing {
        say(&format!(
            "warning: {digest} is referred to but not in the store"
        ));
    }
    let mut summary = format!(
        "{verb} {} blobs ({}) and {} temp files; kept {} reachable",
        report.removed.len(),
        HumanBytes(report.freed_bytes()),
        report.temp_files.len(),
        report.reachable.len(),
    );
    if !report.recent.is_empty() {
        summary.push_str(&format!(
            " and {} unreachable but stored within {} (--grace 0 removes them)",
            report.recent.len(),
            format_duration(args.grace)
        ));
    }
    if !report.forwards_removed.is_empty() {
        summary.push_str(&format!(
            "; {verb} {} forward records no snapshot needs",
            report.forwards_removed.len()
        ));
    }
    say(&summary);
    if let Some(r) = &repacked {
        let rewrite = if r.gc.dry_run {
            "would rewrite"
        } else {
            "rewrote"
        };
        say(&format!(
            "repack: {rewrite} {} of {} packs less than {:.0}% live ({} holding {} live pages) \
             into {} new packs ({}); packs {} -> {}; {} forward records written, {} leftover \
             packs of a killed repack removed",
            r.rewritten.len(),
            r.packs_before,
            args.threshold * 100.0,
            HumanBytes(r.rewritten_bytes()),
            r.rewritten
                .iter()
                .map(|p| u64::from(p.live_pages))
                .sum::<u64>(),
            r.new_packs.len(),
            HumanBytes(r.new_bytes()),
            HumanBytes(r.pack_bytes_before),
            HumanBytes(pack_bytes_after(r)),
            r.forwards_written,
            r.leftovers_removed.len(),
        ));
    }
    if packs.packs > 0 {
        // After a repack, what is left dead is in packs above its threshold: a lower one is
        // not the hint; without one, the hint is the default's.
        let hint = if let Some(r) = &repacked {
            format!(
                "packs at least {:.0}% live {} kept as they are (a higher --threshold \
                 rewrites more of them)",
                args.threshold * 100.0,
                if r.gc.dry_run { "would be" } else { "were" }
            )
        } else {
            "`pf store gc --repack` rewrites the packs less than half live".to_owned()
        };
        say(&format!(
            "kept {} packs ({}): {} of their {} pages ({:.1}%, about {}) are dead, used by no \
             kept snapshot; a pack stays whole while any of its pages is used ({hint})",
            packs.packs,
            HumanBytes(packs.stored_size),
            packs.dead_pages(),
            packs.pages,
            percent(packs.dead_pages(), packs.pages),
            HumanBytes(packs.dead_stored_size),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// gc's error, with what to do about it. gc refuses to run while it cannot read a name or a blob
/// a name reaches: it cannot know what that name or blob keeps alive, and removing anything then
/// could lose a snapshot.
fn gc_refused(err: pf_core::Error) -> anyhow::Error {
    let fix = match &err {
        pf_core::Error::CorruptName { name, .. } => format!(
            "gc removed nothing: it cannot tell which blob name {name:?} keeps; \
             {} (`pf store verify` lists every such name)",
            pages::Names::fix(name)
        ),
        pf_core::Error::NotFound { .. } => "gc stopped without removing anything it had not \
             removed yet: a blob went missing while it ran; run it again"
            .to_owned(),
        _ => "gc stopped without removing anything it had not removed yet: it cannot read a blob \
              the names reach, so it cannot tell what that blob keeps alive; if you have the \
              blob's bytes `pf store put FILE` repairs it, else `pf store untag` the names that \
              need it (`pf store verify` names them) and run gc again"
            .to_owned(),
    };
    anyhow::Error::new(err).context(fix)
}

/// Stored bytes of the packs in use after a repack (an estimate in a dry run: the rewritten
/// packs' live share).
fn pack_bytes_after(r: &pf_core::RepackReport) -> u64 {
    let gone: u64 = r.rewritten_bytes();
    let new = if r.gc.dry_run {
        r.rewritten
            .iter()
            .map(|p| p.stored_size * u64::from(p.live_pages) / u64::from(p.pages.max(1)))
            .sum()
    } else {
        r.new_bytes()
    };
    r.pack_bytes_before.saturating_sub(gone) + new
}

/// How much of the packs the names keep is dead.
fn pack_report(store: &FsBlobStore) -> anyhow::Result<pf_core::pages_report::PackUsage> {
    let names = pages::names_by_digest(store)?.by_digest;
    let graph = pages::load_graph(store, &names, &[])?;
    pf_core::pages_report::pack_usage(store, &graph)
        .context("cannot tell how much of the kept packs is used")
}

/// `part` of `whole` in percent (0 when `whole` is 0).
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    part as f64 * 100.0 / whole as f64
}

fn rm(store: &FsBlobStore, args: &RmArgs) -> anyhow::Result<ExitCode> {
    let digest = resolve(store, &args.blob)?;
    // What names point at it or need it is checked under the gc lock, held until it is removed:
    // no freeze, pull or tag can meanwhile name it or reuse it in a snapshot it names.
    let _exclusive = store.gc_lock()?;
    // The argument was a name when a name of its spelling points at the blob (a name wins over
    // a prefix spelled like it); a digest or a prefix removes no name of its own.
    let given_name = store
        .get_name(&args.blob)
        .is_ok_and(|named| named == digest)
        .then_some(args.blob.as_str());
    // A name whose ref does not hold a digest points at nothing this could remove.
    let others: Vec<String> = pages::names_by_digest(store)?
        .by_digest
        .remove(&digest)
        .unwrap_or_default()
        .into_iter()
        .filter(|name| Some(name.as_str()) != given_name)
        .collect();
    if !others.is_empty() && !args.force {
        bail!(
            "names point at {digest}: {}; untag them first, or pass --force to remove them too",
            others.join(", ")
        );
    }
    if !store.contains(&digest)? {
        bail!("blob {digest} is not in the store");
    }
    // A pack, page list or image blob of named snapshots: removing it breaks them.
    let needed_by = pf_core::names_reaching(store, &digest)?;
    if !needed_by.is_empty() && !args.force {
        bail!(
            "{digest} is part of {} ({}): removed, {} would no longer thaw; `pf store rm NAME` \
             removes a snapshot and `pf store gc` then what only it used; --force removes this \
             blob anyway",
            if needed_by.len() == 1 {
                "a named snapshot"
            } else {
                "named snapshots"
            },
            needed_by.join(", "),
            if needed_by.len() == 1 { "it" } else { "they" },
        );
    }
    let names: Vec<&str> = given_name
        .into_iter()
        .chain(others.iter().map(String::as_str))
        .collect();
    for name in &names {
        store.remove_name(name)?;
    }
    store.remove(&digest)?;
    // On stderr, as a note: what a script reads (stdout) stays empty.
    say(&format!(
        "removed {digest}{}; `pf store gc` removes what only it used (a snapshot's pages and \
         images)",
        match names.len() {
            0 => String::new(),
            1 => format!(" and its name {}", names[0]),
            _ => format!(" and its names {}", names.join(", ")),
        }
    ));
    if !needed_by.is_empty() {
        say(&format!(
            "{} no longer thaw{}: `pf store verify` names what is missing",
            needed_by.join(", "),
            if needed_by.len() == 1 { "s" } else { "" },
        ));
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stderr)]
fn say(line: &str) {
    eprintln!("{line}");
}

/// `0`, `90`, `90s`, `10m`, `2h`, `1d`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 0, 90s, 10m, 2h or 1d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s > 0 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_verify_says_what_it_checked() {
        let none = serde_json::json!({"manifests": 0, "packs": 0, "pages": 0, "list_entries": 0});
        assert_eq!(
            verified_summary(3, &none),
            "ok: 3 blobs match their digests"
        );
        let pages =
            serde_json::json!({"manifests": 2, "packs": 5, "pages": 900, "list_entries": 1200});
        assert_eq!(
            verified_summary(12, &pages),
            "ok: 12 blobs match their digests; the memory of page-level snapshots: 5 packs \
             decoded, 900 pages hashed, 1200 page list entries found in their packs"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        for bad in ["", "m", "10x", "-1", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
