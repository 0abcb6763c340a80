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

use crate::support::{pf, text};

/// Longest any single `pf` invocation may take here.
const DEADLINE: Duration = Duration::from_secs(60);

/// A goblin holding 16 MiB of random bytes (4096 pages, each distinct) and 16 MiB of zeros it
/// has touched: `sum` prints the SHA-256 of all of it (equal only if every page is), `mut K`
/// rewrites 8 bytes in every 20th random page from page K (5% of them).
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
        let mut cmd = Command::new("setsid");
        cmd.args(["python3", "-u", "-c", MEMORY_GOBLIN])
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
    let mut cmd = pf(store);
    cmd.env(FORMAT_ENV, "v2")
        .args(["goblin", "freeze", "--pid", pid, "--tag", tag]);
    let out = run(cmd, b"");
    assert!(out.status.success(), "freeze failed: {}", text(&out.stderr));
    text(&out.stdout).trim().parse().expect("a digest")
}

/// `pf goblin thaw SNAPSHOT` fed `input`.
fn thaw(store: &Path, snapshot: &str, input: &[u8]) -> Output {
    let mut cmd = pf(store);
    cmd.args(["goblin", "thaw", snapshot]);
    run(cmd, input)
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
fn live_v2_corrupt_page_fails_the_thaw_naming_the_snapshot() {
    if !live("live_v2_corrupt_page_fails_the_thaw_naming_the_snapshot") {
        return;
    }
    let deadline = Deadline::start(
        "live_v2_corrupt_page_fails_the_thaw_naming_the_snapshot",
        Duration::from_secs(120),
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

    let out = thaw(&store_dir, "bad", b"sum\n");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing ran: {}", text(&out.stdout));
    assert!(
        stderr.contains(&bad.to_string()) && stderr.contains("is corrupt"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("of {} (address 0x", image.file)),
        "{stderr}"
    );
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
}
