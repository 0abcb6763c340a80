//! `procs.criu.v2` snapshots through the `pf` binary (`PF_SNAPSHOT_FORMAT=v2`): memory stored
//! page by page, shared across successive snapshots, every page checked on thaw. Live tests need
//! root and CRIU (`PF_HAS_CRIU=1`); every process a test starts is killed by pid before it returns.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use pf_core::pack::{Pack, PackBuilder};
use pf_core::pages::{PagesManifest, load_manifest};
use pf_core::{BlobStore as _, Digest256, FsBlobStore};
use pf_world_procs::test_support::{Deadline, KillOnDrop, live, spawn_clean};
use pf_world_procs::{FORMAT_ENV, ProcsBlob};

use crate::support::{Tmpfs, blob_files, pf, text};

/// Longest any single `pf` invocation may take here.
const DEADLINE: Duration = Duration::from_secs(60);

/// A goblin holding 16 MiB of random bytes (4096 pages, each distinct) and 16 MiB of zeros it
/// has touched: `sum` prints the SHA-256 of all of it (equal only if every page is), `mut K`
/// rewrites 8 bytes in every 20th random page from page K (5% of them), `new` rewrites every
/// random page.
const MEMORY_GOBLIN: &str = r#"
import hashlib, os, sys
buf = bytearray(os.urandom(16 << 20)) + bytearray(16 << 20)
for i in range(16 << 20, 32 << 20, 4096):
    buf[i] = 0
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "sum":
        print(hashlib.sha256(buf).hexdigest(), flush=True)
    elif words[0] == "mut":
        for p in range(int(words[1]), 4096, 20):
            buf[p * 4096 : p * 4096 + 8] = os.urandom(8)
        print("ok", flush=True)
    elif words[0] == "new":
        buf[: 16 << 20] = os.urandom(16 << 20)
        print("ok", flush=True)
print("eof", flush=True)
"#;

/// The goblin, started by the test in its own session with pipes and no stray descriptors.
struct Goblin {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    _guard: KillOnDrop,
}

impl Goblin {
    fn start() -> Self {
        Self::start_script(MEMORY_GOBLIN)
    }

    fn start_script(script: &str) -> Self {
        let mut cmd = Command::new("setsid");
        cmd.args(["python3", "-u", "-c", script])
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_clean(&mut cmd).expect("start goblin");
        let guard = KillOnDrop(i32::try_from(child.id()).expect("pid"));
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut goblin = Self {
            child,
            lines,
            _guard: guard,
        };
        assert_eq!(goblin.line(), "ready");
        goblin
    }

    fn ask(&mut self, line: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to goblin");
        self.line()
    }

    fn line(&mut self) -> String {
        self.lines.next().expect("a line").expect("read line")
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

/// Run `cmd` with `input` on stdin, within [`DEADLINE`].
fn run(mut cmd: Command, input: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::support::finish(cmd.spawn().expect("start pf"), input, DEADLINE)
}

fn freeze_v2(store: &Path, pid: &str, tag: &str) -> Digest256 {
    freeze_v2_by(store, pid, tag, None).0
}

/// [`freeze_v2`] with `$PF_CAPTURE` set to `capture` (`dir`: criu dumps into a directory;
/// `stream`: criu streams its images through pf, even with no base in the store), and whether
/// the images were streamed, with pf's log lines about it (from its debug log).
fn freeze_v2_by(
    store: &Path,
    pid: &str,
    tag: &str,
    capture: Option<&str>,
) -> (Digest256, bool, String) {
    let mut cmd = pf(store);
    if let Some(capture) = capture {
        cmd.env("PF_CAPTURE", capture);
    }
    cmd.env(FORMAT_ENV, "v2")
        .args(["-vv", "goblin", "freeze", "--pid", pid, "--tag", tag]);
    let out = run(cmd, b"");
    assert!(out.status.success(), "freeze failed: {}", text(&out.stderr));
    let log = text(&out.stderr);
    let streamed = log.contains("pages file captured");
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("capture_stream") || l.contains("packed during the dump"))
        .collect();
    (
        text(&out.stdout).trim().parse().expect("a digest"),
        streamed,
        why.join("\n"),
    )
}

/// `pf goblin thaw SNAPSHOT` fed `input`.
fn thaw(store: &Path, snapshot: &str, input: &[u8]) -> Output {
    let mut cmd = pf(store);
    cmd.args(["goblin", "thaw", snapshot]);
    run(cmd, input)
}

/// `snapshot` thaws and answers `sum` with `sum`: every page of its memory is its own.
fn assert_thaws_with_sum(store: &Path, snapshot: &str, sum: &str) {
    let out = thaw(store, snapshot, b"sum\n");
    assert!(
        out.status.success(),
        "thaw {snapshot} failed: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), format!("{sum}\neof\n"), "{snapshot}");
}

/// Bytes the store's blob files take on disk.
fn stored_bytes(store: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| {
                let meta = e.metadata().expect("stat");
                if meta.is_dir() {
                    walk(&e.path())
                } else {
                    meta.len()
                }
            })
            .sum()
    }
    walk(&store.join("blobs"))
}

fn memory_of(store: &FsBlobStore, procs: &Digest256) -> pf_world_procs::CriuProcs {
    let blob: ProcsBlob =
        serde_json::from_slice(&store.get(procs).expect("procs blob")).expect("procs json");
    let json: serde_json::Value =
        serde_json::from_slice(&store.get(procs).expect("procs blob")).expect("json");
    assert_eq!(json["kind"], "procs.criu.v2", "{json}");
    match blob {
        ProcsBlob::Criu(c) => {
            assert!(c.memory.as_ref().is_some_and(|m| !m.is_empty()), "{json}");
            c
        }
        other => panic!("expected a criu dump, got {other:?}"),
    }
}

#[test]
fn live_v2_snapshots_thaw_page_for_page_and_share_unchanged_pages() {
    if !live("live_v2_snapshots_thaw_page_for_page_and_share_unchanged_pages") {
        return;
    }
    let deadline = Deadline::start(
        "live_v2_snapshots_thaw_page_for_page_and_share_unchanged_pages",
        Duration::from_secs(300),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut goblin = Goblin::start();
    deadline.watch(goblin.child.id() as i32);
    let mut sums = vec![goblin.ask("sum")];
    let before = stored_bytes(&store_dir);
    let mut digests = vec![freeze_v2(&store_dir, &goblin.pid(), "s0")];
    let first = stored_bytes(&store_dir) - before;
    assert!(
        first > 16 << 20,
        "16 MiB of random pages are stored: {first}"
    );
    assert!(first < 24 << 20, "and the zero pages are not: {first}");
    // Three more snapshots, 5% of the random pages (0.8 MiB) rewritten before each.
    for k in 1..=3 {
        assert_eq!(goblin.ask(&format!("mut {k}")), "ok");
        sums.push(goblin.ask("sum"));
        let size = stored_bytes(&store_dir);
        digests.push(freeze_v2(&store_dir, &goblin.pid(), &format!("s{k}")));
        let grown = stored_bytes(&store_dir) - size;
        assert!(
            grown < first / 6,
            "snapshot {k} stored {grown} bytes; the first took {first}: unchanged pages must be shared"
        );
    }
    let store = FsBlobStore::open(&store_dir).expect("store");
    for d in &digests {
        memory_of(&store, d);
    }
    // Each snapshot thaws with its own memory, every page equal (the sum covers all of it).
    for (k, sum) in sums.iter().enumerate() {
        let out = thaw(&store_dir, &format!("s{k}"), b"sum\n");
        assert!(
            out.status.success(),
            "thaw s{k} failed: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), format!("{sum}\neof\n"), "snapshot s{k}");
    }
    assert_eq!(goblin.ask("sum"), sums[3], "the original runs on unchanged");
}

#[test]
fn live_v2_dumped_into_a_directory_or_streamed_thaw_the_same() {
    // By default criu dumps into a directory that pf follows (it has the room); streamed
    // (`PF_CAPTURE=stream`, or a directory without the room), criu's images go through pf.
    // Snapshots of either kind, interleaved and sharing pages, thaw with their own memory; so
    // does one whose new pages were packed during the dump.
    if !live("live_v2_dumped_into_a_directory_or_streamed_thaw_the_same") {
        return;
    }
    let deadline = Deadline::start(
        "live_v2_dumped_into_a_directory_or_streamed_thaw_the_same",
        Duration::from_secs(300),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut goblin = Goblin::start();
    deadline.watch(goblin.child.id() as i32);
    let mut sums = Vec::new();
    // A first freeze streamed on request, then into a directory, a re-freeze streamed against
    // its base, and one by default (into the directory).
    let captures = [Some("stream"), Some("dir"), Some("stream"), None];
    for (k, capture) in captures.into_iter().enumerate() {
        assert_eq!(goblin.ask(&format!("mut {k}")), "ok");
        sums.push(goblin.ask("sum"));
        let before = stored_bytes(&store_dir);
        let (_, streamed, why) = freeze_v2_by(&store_dir, &goblin.pid(), &format!("s{k}"), capture);
        assert_eq!(
            streamed,
            capture == Some("stream"),
            "snapshot {k} ({capture:?}): streamed on request only (the directory has room)\n{why}"
        );
        // Streamed into a store that has none of its memory: the pages kept once the base was
        // looked for are packed during the dump (pages-*.img of the random pages, at least).
        let packed_at_once: u64 = why
            .lines()
            .filter(|l| l.contains("pages packed during the dump"))
            .filter_map(|l| {
                l.split("pages=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert_eq!(
            packed_at_once > 0,
            k == 0,
            "snapshot {k} ({capture:?}): packed during the dump only when new\n{why}"
        );
        let grown = stored_bytes(&store_dir) - before;
        if k > 0 {
            assert!(
                grown < 4 << 20,
                "snapshot {k} ({capture:?}) stored {grown} bytes: unchanged pages are shared"
            );
        }
    }
    // Scratch space without the room for the goblin's memory (a 32 MiB tmpfs, less than its
    // memory and the margin): streamed without being asked.
    let small = dir.path().join("small");
    let mounted = Tmpfs::mount(&small, "size=32m,mode=700");
    let k = captures.len();
    assert_eq!(goblin.ask(&format!("mut {k}")), "ok");
    sums.push(goblin.ask("sum"));
    let mut cmd = pf(&store_dir);
    cmd.env("TMPDIR", &small)
        .env_remove("PF_CAPTURE")
        .env(FORMAT_ENV, "v2")
        .args(["-vv", "goblin", "freeze", "--pid", &goblin.pid(), "--tag"])
        .arg(format!("s{k}"));
    let out = run(cmd, b"");
    assert!(out.status.success(), "freeze failed: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("pages file captured"),
        "streamed for want of room: {}",
        text(&out.stderr)
    );
    // Made to dump into it all the same, criu runs out of room: pf says where and what to do,
    // and the goblin runs on.
    let mut cmd = pf(&store_dir);
    cmd.env("TMPDIR", &small)
        .env("PF_CAPTURE", "dir")
        .env(FORMAT_ENV, "v2")
        .args(["goblin", "freeze", "--pid", &goblin.pid(), "--tag", "full"]);
    let out = run(cmd, b"");
    let said = text(&out.stderr);
    assert!(!out.status.success(), "a dump into a full tmpfs: {said}");
    assert!(
        said.contains("No space left on device") && said.contains("set TMPDIR to a directory"),
        "{said}"
    );
    assert_eq!(goblin.ask("sum"), sums[k], "the goblin runs on");
    drop(mounted);
    for (k, sum) in sums.iter().enumerate() {
        let out = thaw(&store_dir, &format!("s{k}"), b"sum\n");
        assert!(out.status.success(), "thaw s{k}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{sum}\neof\n"), "snapshot s{k}");
    }
}

#[test]
fn live_v2_corrupt_page_fails_the_thaw_naming_the_snapshot() {
    if !live("live_v2_corrupt_page_fails_the_thaw_naming_the_snapshot") {
        return;
    }
    let deadline = Deadline::start(
        "live_v2_corrupt_page_fails_the_thaw_naming_the_snapshot",
        Duration::from_secs(300),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut goblin = Goblin::start();
    deadline.watch(goblin.child.id() as i32);
    let sum = goblin.ask("sum");
    let good = freeze_v2(&store_dir, &goblin.pid(), "good");
    let store = FsBlobStore::open(&store_dir).expect("store");
    let procs = memory_of(&store, &good);
    let memory = procs.memory.clone().expect("memory");
    // The largest pages file; its first pack rewritten with one page's bytes changed but the
    // page's digest kept: a pack that is a valid blob but holds a wrong page.
    let (at, image) = memory
        .iter()
        .enumerate()
        .max_by_key(|(_, m)| m.pages)
        .expect("a pages file");
    let manifest = load_manifest(&store, &image.manifest).expect("manifest");
    let pack_digest = manifest.packs[0];
    let bytes = store.get(&pack_digest).expect("pack");
    let pack = Pack::parse(pack_digest, &bytes).expect("parse");
    let entries: Vec<_> = pack.entries().collect();
    let victim = entries.len() as u32 / 2;
    let mut forged = PackBuilder::new(1);
    let mut page = [0u8; pf_core::pack::PAGE_SIZE];
    for (digest, slot) in &entries {
        pack.read_page(*slot, digest, &mut page).expect("page");
        if *slot == victim {
            page[100] ^= 0x5a;
        }
        forged.push(&page, *digest);
    }
    let forged = store
        .put(&forged.finish().expect("pack"))
        .expect("put pack");
    let mut packs = manifest.packs.clone();
    packs[0] = forged;
    let bad_manifest = PagesManifest { packs, ..manifest };
    let bad_manifest = store
        .put(&serde_json::to_vec(&bad_manifest).expect("json"))
        .expect("put manifest");
    let mut bad_memory = memory.clone();
    bad_memory[at].manifest = bad_manifest;
    let bad = ProcsBlob::Criu(pf_world_procs::CriuProcs {
        memory: Some(bad_memory),
        ..procs
    });
    let bad = store.put(&bad.to_json()).expect("put procs");
    store.set_name("bad", &bad).expect("tag");

    // Its own $TMPDIR: criu's log of a restore the bad page failed is not kept, as the error
    // never names it.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let mut cmd = pf(&store_dir);
    cmd.env("TMPDIR", &tmp).args(["goblin", "thaw", "bad"]);
    let out = run(cmd, b"sum\n");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing ran: {}", text(&out.stdout));
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in $TMPDIR: {left:?}");
    assert!(
        stderr.contains(&bad.to_string()) && stderr.contains("is corrupt"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("of {} (address 0x", image.file)),
        "{stderr}"
    );
    // pf store verify names the same page: the name, the snapshot, the pages file, the address.
    let address = stderr
        .split("(address ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the thaw's error names the address")
        .to_owned();
    let verify = store_cmd(&store_dir, &["verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify.stderr));
    let report = text(&verify.stdout);
    let line = report
        .lines()
        .find(|l| l.starts_with(&format!("{forged} BAD:")))
        .unwrap_or_else(|| panic!("no line for the forged pack:\n{report}"));
    assert!(
        line.contains(&format!("slot {victim}"))
            && line.contains(&format!("\"bad\" ({bad}) {}", image.file))
            && line.contains(&format!("at address {address}")),
        "{line}"
    );
    assert!(
        !report.contains(&format!("{pack_digest} BAD")),
        "the good pack is fine: {report}"
    );
    let verify = store_cmd(&store_dir, &["verify", "--json", "bad"]);
    let json: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("json");
    let problem = &json["pages"]["problems"][0];
    assert_eq!(problem["kind"], "bad_page", "{json}");
    assert_eq!(problem["slot"], victim, "{json}");
    let snapshot = &problem["uses"][0]["snapshots"][0];
    assert_eq!(snapshot["names"], serde_json::json!(["bad"]), "{json}");
    assert_eq!(snapshot["file"], image.file.as_str(), "{json}");
    assert_eq!(
        format!("{:#x}", snapshot["address"].as_u64().expect("address")),
        address,
        "{json}"
    );
    let clean = store_cmd(&store_dir, &["verify", "good"]);
    assert!(clean.status.success(), "{}", text(&clean.stdout));
    // The good snapshot still thaws.
    let out = thaw(&store_dir, "good", b"sum\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{sum}\neof\n"));
}

/// Packs are stored as they are (`.raw`) and a thaw reads them frame by frame, unverified by the
/// store: a byte of page data rotting on disk must still fail the thaw (naming the snapshot and
/// the page's address, before anything runs), and `pf store verify` must name the pack.
#[test]
fn live_v2_a_rotten_byte_in_a_raw_pack_file_fails_the_thaw_and_verify() {
    if !live("live_v2_a_rotten_byte_in_a_raw_pack_file_fails_the_thaw_and_verify") {
        return;
    }
    let deadline = Deadline::start(
        "live_v2_a_rotten_byte_in_a_raw_pack_file_fails_the_thaw_and_verify",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut goblin = Goblin::start();
    deadline.watch(goblin.child.id() as i32);
    let sum = goblin.ask("sum");
    let snap = freeze_v2(&store_dir, &goblin.pid(), "snap");
    drop(goblin);
    let store = FsBlobStore::open(&store_dir).expect("store");
    let procs = memory_of(&store, &snap);
    let image = procs
        .memory
        .as_ref()
        .and_then(|m| m.iter().max_by_key(|m| m.pages))
        .expect("a pages file")
        .clone();
    let manifest = load_manifest(&store, &image.manifest).expect("manifest");
    let pack = manifest.packs[0];
    let path = store.blob_path(&pack);
    assert!(
        path.to_string_lossy().ends_with(".raw"),
        "packs are stored raw: {}",
        path.display()
    );
    // The goblin's random pages are stored nearly verbatim: flip a byte in the middle of the
    // pack's frames (well before its index), which lands in some page's bytes.
    let mut bytes = std::fs::read(&path).expect("read pack");
    let parsed = Pack::parse(pack, &bytes).expect("parse");
    assert!(parsed.pages() > 64, "{}", parsed.pages());
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).expect("rot a byte");

    let out = thaw(&store_dir, "snap", b"sum\n");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing ran: {}", text(&out.stdout));
    assert!(
        stderr.contains(&snap.to_string()) && stderr.contains("is corrupt"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("of {} (address 0x", image.file)),
        "{stderr}"
    );
    let mut cmd = pf(&store_dir);
    cmd.args(["store", "verify"]);
    let out = run(cmd, b"");
    assert!(!out.status.success(), "verify passed a rotten pack");
    assert!(
        text(&out.stdout).contains(&format!("{pack} BAD")),
        "{}",
        text(&out.stdout)
    );
    // Putting the pack's bytes back (a repair) makes the snapshot whole again.
    bytes[at] ^= 0x40;
    assert_eq!(store.put_raw(&bytes).expect("repair"), pack);
    let out = thaw(&store_dir, "snap", b"sum\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{sum}\neof\n"));

    // A page list rotten on disk: `pf store show` says its sizes leave its pages out (the walk
    // of the snapshot's blobs reads a list only as far as its first bytes).
    let list_path = store.blob_path(&manifest.list);
    let mut list = std::fs::read(&list_path).expect("read list");
    let at = list.len() / 2;
    list[at] ^= 0x40;
    std::fs::write(&list_path, &list).expect("rot a byte of the list");
    let show = store_cmd(&store_dir, &["show", "snap", "--json"]);
    let err = text(&show.stderr);
    assert!(
        err.contains(&format!("page list {} cannot be read", manifest.list)),
        "{err}"
    );
    let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert!(
        json["unreadable"]
            .as_array()
            .expect("unreadable")
            .iter()
            .any(|u| u["digest"] == manifest.list.to_string()),
        "{json}"
    );
    // gc cannot tell which of the packs' pages that list uses: they count as live, not dead.
    let gc = store_cmd(&store_dir, &["gc", "--dry-run", "--json"]);
    let err = text(&gc.stderr);
    assert!(gc.status.success(), "{err}");
    let json: serde_json::Value = serde_json::from_slice(&gc.stdout).expect("json");
    let packs = &json["packs"];
    assert_eq!(packs["unknown_packs"], packs["count"], "{json}");
    assert!(packs["count"].as_u64().expect("count") > 0, "{json}");
    assert_eq!(packs["dead_pages"], 0, "{json}");
    assert_eq!(packs["live_pages"], packs["pages"], "{json}");
    assert!(
        err.contains("used by a page list that cannot be read"),
        "{err}"
    );
}

/// `pf store ARGS…` within [`DEADLINE`].
fn store_cmd(store: &Path, args: &[&str]) -> Output {
    let mut cmd = pf(store);
    cmd.arg("store").args(args);
    run(cmd, b"")
}

#[test]
// What it measured goes to stderr (shown with --nocapture), for the record.
#[allow(clippy::print_stderr)]
fn live_v2_a_freeze_killed_while_it_writes_packs_leaves_nothing_gc_would_keep() {
    if !live("live_v2_a_freeze_killed_while_it_writes_packs_leaves_nothing_gc_would_keep") {
        return;
    }
    let deadline = Deadline::start(
        "live_v2_a_freeze_killed_while_it_writes_packs_leaves_nothing_gc_would_keep",
        Duration::from_secs(300),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut goblin = Goblin::start();
    deadline.watch(goblin.child.id() as i32);
    let sum = goblin.ask("sum");
    freeze_v2(&store_dir, &goblin.pid(), "base");
    let before = stored_bytes(&store_dir);
    let files_before = blob_files(&store_dir);
    let tags_before = store_cmd(&store_dir, &["tags"]);
    // 16 MiB of new pages: the next freeze writes two packs, a page list, a manifest, the images
    // and the record, in that order, before the name.
    assert_eq!(goblin.ask("new"), "ok");
    let mut cmd = pf(&store_dir);
    cmd.env(FORMAT_ENV, "v2")
        .args([
            "goblin",
            "freeze",
            "--pid",
            &goblin.pid(),
            "--tag",
            "killed",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut freeze = cmd.spawn().expect("start pf");
    let guard = KillOnDrop(freeze.id() as i32);
    // Kill it as soon as its first pack (or the temp file it streams into) appears.
    let started = std::time::Instant::now();
    let new_file = loop {
        if let Some(status) = freeze.try_wait().expect("try_wait") {
            std::mem::forget(guard);
            panic!("the freeze finished ({status}) before it wrote a pack");
        }
        if let Some(f) = blob_files(&store_dir).difference(&files_before).next() {
            break f.clone();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the freeze wrote nothing within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    freeze.kill().expect("SIGKILL pf");
    freeze.wait().expect("reap pf");
    std::mem::forget(guard);
    eprintln!("killed the freeze once {} appeared", new_file.display());
    assert!(
        blob_files(&store_dir).len() > files_before.len(),
        "it left something for gc to take"
    );

    // No new name, and what is named verifies clean.
    let tags = store_cmd(&store_dir, &["tags"]);
    assert_eq!(text(&tags.stdout), text(&tags_before.stdout));
    let verify = store_cmd(&store_dir, &["verify"]);
    assert!(
        verify.status.success(),
        "verify: {}\n{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );
    assert!(
        !text(&verify.stdout).contains("BAD"),
        "{}",
        text(&verify.stdout)
    );

    // gc takes every leftover: the store is back to what it was.
    let gc = store_cmd(&store_dir, &["gc", "--grace", "0"]);
    assert!(gc.status.success(), "{}", text(&gc.stderr));
    let after = stored_bytes(&store_dir);
    assert_eq!(
        blob_files(&store_dir),
        files_before,
        "gc left files: {}",
        text(&gc.stderr)
    );
    assert_eq!(after, before);

    // The store still works: the base thaws, and the goblin freezes again.
    let out = thaw(&store_dir, "base", b"sum\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{sum}\neof\n"));
    freeze_v2(&store_dir, &goblin.pid(), "again");
}

/// A copy of a snapshot thawed by `pf goblin thaw` (in a pid namespace of its own), the test
/// holding its stdin and stdout.
struct Thawed {
    /// The goblin's pid here (not in its namespace).
    pid: i32,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    /// Killing `pf goblin thaw` takes its goblin along.
    _guard: KillOnDrop,
}

impl Thawed {
    // The guard kills and reaps `pf goblin thaw` by its pid.
    #[allow(clippy::zombie_processes)]
    fn start(store: &Path, snapshot: &str) -> Self {
        let mut cmd = pf(store);
        cmd.args(["goblin", "thaw", snapshot])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start pf goblin thaw");
        let thaw = i32::try_from(child.id()).expect("pid");
        let guard = KillOnDrop(thaw);
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut thawed = Self {
            pid: 0,
            stdin,
            lines,
            _guard: guard,
        };
        // Once it answers, it runs under pf's namespace init, the child of `pf goblin thaw`.
        let _ = thawed.ask("sum");
        let goblin = pf_os::proc::children(thaw)
            .into_iter()
            .flat_map(pf_os::proc::children)
            .find(|&p| pf_os::proc::comm(p).as_deref() == Some("python3"))
            .expect("the thawed goblin under pf's namespace init");
        thawed.pid = goblin;
        thawed
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to the thawed copy");
        self.lines.next().expect("a line").expect("read line")
    }
}

#[test]
// What it measured goes to stderr (shown with --nocapture), for the record.
#[allow(clippy::print_stderr)]
fn live_v2_four_forks_frozen_again_store_only_their_changes_and_thaw_with_their_own_state() {
    if !live(
        "live_v2_four_forks_frozen_again_store_only_their_changes_and_thaw_with_their_own_state",
    ) {
        return;
    }
    let deadline = Deadline::start(
        "live_v2_four_forks_frozen_again_store_only_their_changes_and_thaw_with_their_own_state",
        Duration::from_secs(400),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut goblin = Goblin::start();
    deadline.watch(goblin.child.id() as i32);
    let base_sum = goblin.ask("sum");
    freeze_v2(&store_dir, &goblin.pid(), "base");
    drop(goblin);
    let base = stored_bytes(&store_dir);
    let store = FsBlobStore::open(&store_dir).expect("store");
    // Four copies thawed from the base, each in a pid namespace of its own, each rewriting its
    // own 5% of the random pages (every 20th page from k, so no two rewrite the same page),
    // each frozen again while it runs.
    let mut sums = Vec::new();
    let mut bound = 0u64;
    let mut grown = Vec::new();
    for k in 1..=4u32 {
        let mut copy = Thawed::start(&store_dir, "base");
        deadline.watch(copy.pid);
        assert_eq!(copy.ask(&format!("mut {k}")), "ok");
        sums.push(copy.ask("sum"));
        let size = stored_bytes(&store_dir);
        let digest = freeze_v2(&store_dir, &copy.pid.to_string(), &format!("fork{k}"));
        grown.push(stored_bytes(&store_dir) - size);
        // What this snapshot must store: its changed pages (205 incompressible ones), its page
        // lists (40 bytes per page), its images tar and its small JSON blobs.
        let procs = memory_of(&store, &digest);
        let list_bytes: u64 = procs
            .memory
            .as_ref()
            .expect("memory")
            .iter()
            .map(|m| 16 + 40 * m.pages)
            .sum();
        let images = store.stored_size(&procs.criu_dump).expect("images size");
        let changed = 205 * 4096;
        bound += changed + list_bytes + images;
        eprintln!(
            "fork{k}: grew the store by {} bytes; changed pages {changed}, page lists {list_bytes}, images {images}",
            grown[grown.len() - 1]
        );
    }
    let total: u64 = grown.iter().sum();
    eprintln!("base {base} bytes; four forks {total} bytes; bound {bound} × 1.5");
    assert!(
        total < bound * 3 / 2,
        "four forks stored {total} bytes ({grown:?}), more than 1.5 × their changes ({bound}): the base must be shared"
    );
    assert!(
        total < base / 2,
        "four forks stored {total} bytes, the base alone took {base}"
    );
    // Each thaws with its own memory (the sum covers every page of it), and the base with its.
    for (k, sum) in sums.iter().enumerate() {
        assert_thaws_with_sum(&store_dir, &format!("fork{}", k + 1), sum);
    }
    assert_thaws_with_sum(&store_dir, "base", &base_sum);
    // And pf store show says what each shares.
    let show = store_cmd(&store_dir, &["show", "fork1", "--json"]);
    assert!(show.status.success(), "{}", text(&show.stderr));
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    let shared = show["shared_size"].as_u64().expect("shared");
    let stored = show["stored_size"].as_u64().expect("stored");
    assert!(
        shared > stored / 2,
        "fork1 shares most of what it keeps with the base: {show}"
    );
    assert!(
        show["logical_size"].as_u64().expect("logical") > 32 << 20,
        "{show}"
    );
}

#[test]
// What it measured goes to stderr (shown with --nocapture), for the record.
#[allow(clippy::print_stderr)]
fn live_v2_four_copies_frozen_at_once_beside_gc_each_thaw_with_their_own_state() {
    let name = "live_v2_four_copies_frozen_at_once_beside_gc_each_thaw_with_their_own_state";
    if !live(name) {
        return;
    }
    let deadline = Deadline::start(name, Duration::from_secs(400));
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut goblin = Goblin::start();
    deadline.watch(goblin.child.id() as i32);
    let base_sum = goblin.ask("sum");
    freeze_v2(&store_dir, &goblin.pid(), "base");
    drop(goblin);
    // Four copies of the base, each with its own 5% of pages rewritten and one with every page
    // new, so the four freezes look up and write pages in the one store at the same time.
    let mut copies = Vec::new();
    let mut sums = Vec::new();
    for k in 1..=4u32 {
        let mut copy = Thawed::start(&store_dir, "base");
        deadline.watch(copy.pid);
        let change = if k == 4 {
            "new".to_owned()
        } else {
            format!("mut {k}")
        };
        assert_eq!(copy.ask(&change), "ok");
        sums.push(copy.ask("sum"));
        copies.push(copy);
    }
    // Frozen at once, with `pf store gc --grace 0` (and `--repack`) run over and over until they
    // are done: gc must neither take a pack a freeze has written but not yet named, nor a base
    // page a freeze has placed but not yet named (it waits on the store's lock while a writer
    // holds it).
    let running = std::sync::atomic::AtomicUsize::new(copies.len());
    let mut gcs = 0;
    let outputs: Vec<Output> = std::thread::scope(|scope| {
        let freezes: Vec<_> = copies
            .iter()
            .enumerate()
            .map(|(i, copy)| {
                let mut cmd = pf(&store_dir);
                cmd.env(FORMAT_ENV, "v2").args([
                    "goblin",
                    "freeze",
                    "--pid",
                    &copy.pid.to_string(),
                    "--tag",
                    &format!("copy{}", i + 1),
                ]);
                let running = &running;
                scope.spawn(move || {
                    // Counted down even if `run` panics, so the gc loop below ends.
                    struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
                    impl Drop for Done<'_> {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    let _done = Done(running);
                    run(cmd, b"")
                })
            })
            .collect();
        // At least one of each (a gc waits for every writer, so the last may come after them).
        while running.load(std::sync::atomic::Ordering::SeqCst) > 0 || gcs < 2 {
            // Plain and repacking in turn: a repack rewrites the packs the freezes place their
            // unchanged pages in.
            let args: &[&str] = if gcs % 2 == 0 {
                &["gc", "--grace", "0"]
            } else {
                &["gc", "--grace", "0", "--repack"]
            };
            let gc = store_cmd(&store_dir, args);
            assert!(gc.status.success(), "{args:?}: {}", text(&gc.stderr));
            gcs += 1;
        }
        freezes
            .into_iter()
            .map(|f| f.join().expect("freeze thread"))
            .collect()
    });
    eprintln!("four freezes at once beside {gcs} gc runs");
    for (i, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "freeze of copy{} failed: {}",
            i + 1,
            text(&out.stderr)
        );
    }
    assert!(gcs > 0, "gc never ran beside the freezes");
    drop(copies);
    let gc = store_cmd(&store_dir, &["gc", "--grace", "0"]);
    assert!(gc.status.success(), "gc: {}", text(&gc.stderr));
    let verify = store_cmd(&store_dir, &["verify"]);
    assert!(
        verify.status.success(),
        "verify after concurrent freezes: {}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );
    for (k, sum) in sums.iter().enumerate() {
        assert_thaws_with_sum(&store_dir, &format!("copy{}", k + 1), sum);
    }
    assert_thaws_with_sum(&store_dir, "base", &base_sum);
}

/// [`MEMORY_GOBLIN`] whose `mut K` rewrites 8 bytes in every 10th random page from page K (10%
/// of them), so nine rounds with K = 1…9 leave only a tenth of the first snapshot's pages live.
const TENTH_GOBLIN: &str = r#"
import hashlib, os, sys
buf = bytearray(os.urandom(16 << 20)) + bytearray(16 << 20)
for i in range(16 << 20, 32 << 20, 4096):
    buf[i] = 0
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "sum":
        print(hashlib.sha256(buf).hexdigest(), flush=True)
    elif words[0] == "mut":
        for p in range(int(words[1]), 4096, 10):
            buf[p * 4096 : p * 4096 + 8] = os.urandom(8)
        print("ok", flush=True)
print("eof", flush=True)
"#;

#[test]
// What it measured goes to stderr (shown with --nocapture), for the record.
#[allow(clippy::print_stderr)]
fn live_v2_gc_repack_after_deleting_9_of_10_snapshots_shrinks_the_store_and_the_last_thaws() {
    let name =
        "live_v2_gc_repack_after_deleting_9_of_10_snapshots_shrinks_the_store_and_the_last_thaws";
    if !live(name) {
        return;
    }
    let deadline = Deadline::start(name, Duration::from_secs(400));
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut goblin = Goblin::start_script(TENTH_GOBLIN);
    deadline.watch(goblin.child.id() as i32);
    let mut digests = vec![freeze_v2(&store_dir, &goblin.pid(), "s0")];
    let one = stored_bytes(&store_dir);
    // Nine more snapshots, a different tenth of the random pages rewritten before each.
    for k in 1..=9 {
        assert_eq!(goblin.ask(&format!("mut {k}")), "ok");
        digests.push(freeze_v2(&store_dir, &goblin.pid(), &format!("s{k}")));
    }
    let sum = goblin.ask("sum");
    let ten = stored_bytes(&store_dir);
    for k in 0..9 {
        let out = store_cmd(&store_dir, &["untag", &format!("s{k}")]);
        assert!(out.status.success(), "untag: {}", text(&out.stderr));
    }
    // Plain gc keeps s0's packs: a tenth of their pages is still s9's.
    let out = store_cmd(&store_dir, &["gc", "--grace", "0"]);
    assert!(out.status.success(), "gc: {}", text(&out.stderr));
    let after_gc = stored_bytes(&store_dir);
    assert!(
        after_gc > one * 3 / 2,
        "plain gc leaves the mostly dead packs of s0: {after_gc} bytes, one snapshot {one}"
    );
    // A dry run tells what would be rewritten and changes nothing.
    let out = store_cmd(
        &store_dir,
        &["gc", "--grace", "0", "--repack", "--dry-run", "--json"],
    );
    assert!(out.status.success(), "dry run: {}", text(&out.stderr));
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        !dry["repack"]["rewritten"]
            .as_array()
            .expect("rewritten")
            .is_empty(),
        "{dry}"
    );
    assert_eq!(stored_bytes(&store_dir), after_gc);
    let out = store_cmd(&store_dir, &["gc", "--grace", "0", "--repack", "--json"]);
    assert!(out.status.success(), "repack: {}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let repacked = &report["repack"];
    assert!(
        repacked["forwards_written"].as_u64().expect("forwards") >= 1,
        "{report}"
    );
    assert!(
        repacked["pack_bytes_after"].as_u64() < repacked["pack_bytes_before"].as_u64(),
        "{report}"
    );
    let after = stored_bytes(&store_dir);
    eprintln!(
        "one snapshot {one} B, ten {ten} B, after untagging 9 and gc {after_gc} B, after \
         gc --repack {after} B"
    );
    assert!(
        after < one * 6 / 5,
        "gc --repack shrinks the store to about one snapshot: {after} bytes, one snapshot {one}"
    );
    // The kept snapshot's digest did not change; it verifies and thaws page for page, eagerly
    // and lazily (pages served one by one through the forward records).
    let store = FsBlobStore::open(&store_dir).expect("store");
    assert_eq!(store.get_name("s9").expect("s9"), digests[9]);
    let out = store_cmd(&store_dir, &["verify"]);
    assert!(out.status.success(), "verify: {}", text(&out.stderr));
    for how in ["--eager", "--lazy"] {
        let mut cmd = pf(&store_dir);
        cmd.args(["goblin", "thaw", how, "s9"]);
        let out = run(cmd, b"sum\n");
        assert!(out.status.success(), "thaw {how}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{sum}\neof\n"), "thaw {how}");
    }
    // Once s9 goes too, gc takes the forward records and every pack.
    let out = store_cmd(&store_dir, &["untag", "s9"]);
    assert!(out.status.success(), "untag: {}", text(&out.stderr));
    let out = store_cmd(&store_dir, &["gc", "--grace", "0"]);
    assert!(out.status.success(), "gc: {}", text(&out.stderr));
    assert!(store.forwards().expect("forwards").is_empty());
    assert_eq!(stored_bytes(&store_dir), 0);
}
