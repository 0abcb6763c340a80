//! Lazy thaw and fork through the `pf` binary (`pf goblin thaw|fork --lazy`): a goblin's memory
//! served from the store on demand, each page checked before CRIU hands it to the kernel. Live
//! tests need root and CRIU (`PF_HAS_CRIU=1`); every process a test starts is killed by pid
//! before it returns (restored copies are found by a marker in their command line, unique to
//! the test).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pf_core::{Digest256, FsBlobStore};
use pf_world_procs::FORMAT_ENV;
use pf_world_procs::test_support::{Deadline, KillOnDrop, live, spawn_clean};

use crate::support::{pf, text};

/// Longest any single `pf` invocation may take here.
const DEADLINE: Duration = Duration::from_secs(120);

/// A goblin holding `argv[1]` MiB: half random bytes, half distinct compressible text pages.
/// `sum` prints the SHA-256 of all of it (equal only if every page is), `ping` answers `pong`
/// touching little, `mut K` rewrites 8 bytes in every 20th page from page K. `argv[2]` becomes
/// its name (`/proc/PID/comm`, kernel state CRIU restores; its command line lives in its own
/// memory, which a lazily restored process may not have yet), a marker that tells the test's
/// processes from anyone else's.
const GOBLIN: &str = r#"
import ctypes, hashlib, os, sys
ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)
n = int(sys.argv[1]) << 20
buf = bytearray(os.urandom(n // 2)) + bytearray(b"".join(b"%4096d" % i for i in range(n // 2 // 4096)))
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "sum":
        print(hashlib.sha256(buf).hexdigest(), flush=True)
    elif words[0] == "ping":
        print("pong", flush=True)
    elif words[0] == "mut":
        for p in range(int(words[1]), n // 4096, 20):
            buf[p * 4096 : p * 4096 + 8] = os.urandom(8)
        print("ok", flush=True)
print("eof", flush=True)
"#;

/// A goblin whose memory changes shape right after a lazy thaw, before its pages are all in:
/// `shapes` forks a child that hashes buffer A (pages it inherits while they are still
/// missing), drops half of buffer B (`MADV_DONTNEED`: zeros from then on), grows buffer C
/// (`mremap`, which may move it), unmaps buffer D, and prints the hashes of A (child and
/// parent), B and C, each of which it also printed before the freeze as `expect`.
const SHAPES_GOBLIN: &str = r#"
import ctypes, hashlib, mmap, os, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
size = 16 << 20
def buffer():
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    m.write(os.urandom(size))
    return m
a, b, c, d = buffer(), buffer(), buffer(), buffer()
h = lambda m, n=size: hashlib.sha256(m[:n]).hexdigest()[:16]
b_after = hashlib.sha256(bytes(b[: size // 2]) + bytes(size // 2)).hexdigest()[:16]
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "expect":
        print(h(a), h(a), b_after, h(c), flush=True)
    elif line.strip() == "shapes":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, h(a).encode())
            os._exit(0)
        os.close(w)
        child = os.read(r, 64).decode()
        os.waitpid(pid, 0)
        b.madvise(mmap.MADV_DONTNEED, size // 2, size // 2)
        c.resize(4 * size)
        d.close()
        print(child, h(a), h(b), h(c, size), flush=True)
print("eof", flush=True)
"#;

/// A goblin of two processes, each holding 24 MiB of random bytes in its own mapping (two pages
/// files): `sum` prints the parent's hash and the child's, which it asks for through a pipe
/// (the child ends when the parent does).
const TREE_GOBLIN: &str = r#"
import ctypes, hashlib, mmap, os, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
size = 24 << 20
def buffer():
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    m.write(os.urandom(size))
    return m
ask_r, ask_w = os.pipe()
answer_r, answer_w = os.pipe()
if os.fork() == 0:
    os.close(ask_w)
    os.close(answer_r)
    mine = buffer()
    while os.read(ask_r, 1):
        os.write(answer_w, hashlib.sha256(mine).hexdigest()[:16].encode())
    os._exit(0)
os.close(ask_r)
os.close(answer_w)
mine = buffer()
print("ready", flush=True)
for line in sys.stdin:
    os.write(ask_w, b"?")
    theirs = os.read(answer_r, 16).decode()
    print(hashlib.sha256(mine).hexdigest()[:16], theirs, flush=True)
print("eof", flush=True)
"#;

/// The original goblin, started by the test in its own session with pipes.
struct Goblin {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    guard: Option<KillOnDrop>,
}

impl Goblin {
    fn start(mib: u32, marker: &str) -> Self {
        Self::start_script(GOBLIN, &[&mib.to_string(), marker])
    }

    /// Start python3 on `script` with `args`, and wait for its `ready`.
    fn start_script(script: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new("setsid");
        cmd.args(["python3", "-u", "-c", script])
            .args(args)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = spawn_clean(&mut cmd).expect("start goblin");
        let guard = Some(KillOnDrop(i32::try_from(child.id()).expect("pid")));
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut goblin = Self {
            child,
            lines,
            guard,
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

    /// Freeze it into `store` as `tag` in `format`, and stop it (so only thawed copies carry
    /// the marker from then on).
    fn freeze_and_stop(mut self, store: &Path, tag: &str, format: &str) -> Digest256 {
        let mut cmd = pf(store);
        cmd.env(FORMAT_ENV, format).args([
            "goblin",
            "freeze",
            "--pid",
            &self.child.id().to_string(),
            "--tag",
            tag,
        ]);
        let out = run(cmd, b"");
        assert!(out.status.success(), "freeze failed: {}", text(&out.stderr));
        drop(self.guard.take());
        let _ = self.child.wait();
        text(&out.stdout).trim().parse().expect("a digest")
    }
}

/// Run `cmd` with `input` on stdin, within [`DEADLINE`].
fn run(mut cmd: Command, input: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::support::finish(cmd.spawn().expect("start pf"), input, DEADLINE)
}

/// `pf goblin thaw --lazy SNAPSHOT` fed `input`, with `-v` so it says how serving ended.
fn thaw_lazy(store: &Path, snapshot: &str, input: &[u8]) -> Output {
    thaw_with(store, "--lazy", snapshot, input)
}

/// `pf -v goblin thaw MODE SNAPSHOT` fed `input` (MODE `--lazy`, `--eager` or `-v` for none).
fn thaw_with(store: &Path, mode: &str, snapshot: &str, input: &[u8]) -> Output {
    let mut cmd = pf(store);
    cmd.args(["-v", "goblin", "thaw", mode, snapshot]);
    run(cmd, input)
}

/// A process name (at most 15 bytes) unique to this test and run.
fn marker(test: char) -> String {
    format!("pfl{test}{}", std::process::id() % 10_000_000)
}

/// Pids of live processes named `name` (`/proc/PID/comm`).
fn processes_named(name: &str) -> Vec<i32> {
    processes(|dir| std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == name))
}

fn processes(matches: impl Fn(&Path) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        if !zombie && matches(&entry.path()) {
            out.push(pid);
        }
    }
    out
}

/// Wait up to `limit` until `find` finds no live process; kill (by pid) and name what is
/// still there then.
fn assert_gone_within(find: impl Fn() -> Vec<i32>, limit: Duration, what: &str) {
    let start = Instant::now();
    loop {
        let left = find();
        if left.is_empty() {
            return;
        }
        if start.elapsed() > limit {
            for pid in &left {
                drop(KillOnDrop(*pid));
            }
            panic!("{what}: processes {left:?} still run {limit:?} later");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The largest blob file in the store (a pack of random pages).
/// `VmRSS` of `pid`, in KiB.
fn resident_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn largest_blob(store: &Path) -> PathBuf {
    fn walk(dir: &Path, best: &mut Option<(u64, PathBuf)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let meta = e.metadata().expect("stat");
            if meta.is_dir() {
                walk(&e.path(), best);
            } else if best.as_ref().is_none_or(|(len, _)| meta.len() > *len) {
                *best = Some((meta.len(), e.path()));
            }
        }
    }
    let mut best = None;
    walk(&store.join("blobs"), &mut best);
    best.expect("a blob").1
}

#[test]
fn live_lazy_thaw_of_a_256_mib_goblin_answers_from_its_state_with_every_page() {
    let name = "live_lazy_thaw_of_a_256_mib_goblin_answers_from_its_state_with_every_page";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('a');
    let mut goblin = Goblin::start(256, &mark);
    let sum = goblin.ask("sum");
    goblin.freeze_and_stop(&store, "g", "v2");
    // 256 MiB stored page by page: lazy without being asked.
    let out = thaw_with(&store, "-v", "g", b"ping\nsum\n");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "lazy thaw failed: {stderr}");
    assert_eq!(text(&out.stdout), format!("pong\n{sum}\neof\n"));
    assert!(
        stderr.contains("restored lazily"),
        "pf says the memory is served on demand: {stderr}"
    );
    // A later thaw loads the pages the first touched early, and still has every page.
    let out = thaw_lazy(&store, "g", b"sum\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{sum}\neof\n"));
    let hints = store.join("index/hot");
    assert_eq!(
        std::fs::read_dir(&hints).map(|d| d.count()).unwrap_or(0),
        1,
        "one hint of early pages in {}",
        hints.display()
    );
    // --eager rebuilds it all first.
    let out = thaw_with(&store, "--eager", "g", b"sum\n");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout), format!("{sum}\neof\n"));
    assert!(!stderr.contains("restored lazily"), "{stderr}");
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "after the goblin exited",
    );
}

/// Item: a lazily thawed goblin that forks, drops memory with `madvise`, moves it with
/// `mremap` and unmaps it while its pages are still being served gets every page right: the
/// forked child sees its parent's memory, dropped pages read as zeros (never the old bytes
/// copied back in), moved pages keep their contents, and nothing hangs.
#[test]
fn live_lazy_thaw_follows_fork_madvise_mremap_and_munmap() {
    let name = "live_lazy_thaw_follows_fork_madvise_mremap_and_munmap";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('s');
    let mut goblin = Goblin::start_script(SHAPES_GOBLIN, &[&mark]);
    let expect = goblin.ask("expect");
    goblin.freeze_and_stop(&store, "g", "v2");
    for _ in 0..3 {
        let out = thaw_lazy(&store, "g", b"shapes\n");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{expect}\neof\n"));
    }
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "after the goblins exited",
    );
}

/// Item: a goblin of two processes thaws with every page of both: eagerly (both pages files
/// streamed into CRIU at once) and lazily (a userfaultfd per process).
#[test]
fn live_a_goblin_of_two_processes_thaws_eagerly_and_lazily_with_every_page() {
    let name = "live_a_goblin_of_two_processes_thaws_eagerly_and_lazily_with_every_page";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('t');
    let mut goblin = Goblin::start_script(TREE_GOBLIN, &[&mark]);
    let sums = goblin.ask("sum");
    let digest = goblin.freeze_and_stop(&store, "g", "v2");
    let store_blob = FsBlobStore::open(&store).expect("store");
    let procs = pf_world_procs::load_procs(&store_blob, &digest).expect("procs");
    let pf_world_procs::ProcsBlob::Criu(procs) = procs else {
        panic!("a criu dump");
    };
    assert!(
        procs.memory.as_ref().is_some_and(|m| m.len() >= 2),
        "a pages file per process: {:?}",
        procs.memory
    );
    for mode in ["--eager", "--lazy"] {
        let out = thaw_with(&store, mode, "g", b"sum\nsum\n");
        assert!(out.status.success(), "{mode}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            format!("{sums}\n{sums}\neof\n"),
            "{mode}"
        );
    }
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "after the goblins exited",
    );
}

#[test]
fn live_lazy_fork_of_8_answers_diverges_and_every_clone_gets_every_page() {
    let name = "live_lazy_fork_of_8_answers_diverges_and_every_clone_gets_every_page";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('f');
    let mut goblin = Goblin::start(64, &mark);
    let sum = goblin.ask("sum");
    goblin.freeze_and_stop(&store, "g", "v2");
    let mut cmd = pf(&store);
    cmd.args([
        "goblin", "fork", "--lazy", "-n", "8", "--json", "g", "--send", "sum", "--send", "mut {i}",
        "--send", "sum",
    ]);
    let out = run(cmd, b"");
    assert!(
        out.status.success(),
        "lazy fork failed: {}",
        text(&out.stderr)
    );
    let mut second = std::collections::HashSet::new();
    let stdout = text(&out.stdout);
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        let answer = v["stdout"].as_str().expect("stdout").to_owned();
        let lines: Vec<&str> = answer.lines().collect();
        assert_eq!(lines.len(), 4, "clone {}: {answer:?}", v["clone"]);
        assert_eq!(lines[0], sum, "clone {} has every page", v["clone"]);
        assert_eq!(lines[1], "ok");
        assert_ne!(lines[2], sum, "clone {} changed its memory", v["clone"]);
        second.insert(lines[2].to_owned());
    }
    assert_eq!(stdout.lines().count(), 8, "{stdout}");
    assert_eq!(second.len(), 8, "the 8 clones diverged: {second:?}");
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "after the fork",
    );
}

/// `pf goblin thaw --lazy` of `snapshot` (a goblin of 512 MiB named `mark`), answering `ping`
/// while pf's lazy-pages daemon still copies most of its memory in, in the background.
struct MidServe {
    child: Child,
    /// `pf goblin thaw`'s pid.
    pf: i32,
    guard: Option<KillOnDrop>,
    stdin: Option<std::process::ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    /// The thawed goblin's pid.
    goblin: i32,
}

impl MidServe {
    fn start(store: &Path, snapshot: &str, mark: &str) -> Self {
        let mut cmd = pf(store);
        cmd.args(["goblin", "thaw", "--lazy", snapshot])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start pf");
        let pf = i32::try_from(child.id()).expect("pid");
        let guard = Some(KillOnDrop(pf));
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut serve = Self {
            child,
            pf,
            guard,
            stdin,
            lines,
            goblin: 0,
        };
        assert_eq!(serve.ask("ping"), "pong");
        let thawed = processes_named(mark);
        assert_eq!(thawed.len(), 1, "the thawed goblin runs: {thawed:?}");
        serve.goblin = thawed[0];
        let resident = resident_kib(serve.goblin);
        assert!(
            resident < 400 << 10,
            "the goblin answered before its memory was all in: {resident} KiB resident"
        );
        serve
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin.as_mut().expect("stdin"), "{line}").expect("write");
        self.lines.next().expect("a line").expect("read")
    }

    /// SIGKILL pf (its goblin goes with it, stdin still open) and reap it.
    fn kill(mut self) {
        drop(self.guard.take());
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

#[test]
fn live_lazy_thaw_killed_mid_serve_takes_the_goblin_and_daemon_down() {
    let name = "live_lazy_thaw_killed_mid_serve_takes_the_goblin_and_daemon_down";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('k');
    let goblin = Goblin::start(512, &mark);
    goblin.freeze_and_stop(&store, "g", "v2");
    let serve = MidServe::start(&store, "g", &mark);
    let pf_pid = serve.pf;
    serve.kill();
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "the goblin after pf was killed",
    );
    // What the killed pf left on tmpfs is swept by the next thaw.
    let out = thaw_lazy(&store, "g", b"ping\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    for base in [pf_os::scratch::images_base(), std::env::temp_dir()] {
        let left: Vec<_> = std::fs::read_dir(&base)
            .expect("scratch base")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pf-") && n.contains(&format!("-{pf_pid}-")))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", base.display());
    }
}

/// The snapshot's name removed and `gc --grace 0` run while a lazily thawed copy's memory is
/// still served: gc waits until every page is in, then removes the snapshot, and the copy has
/// every page. Before, gc swept the packs from under pf's lazy-pages daemon and the copy was
/// killed.
#[test]
fn live_gc_waits_for_a_copy_whose_memory_is_still_served_lazily() {
    let name = "live_gc_waits_for_a_copy_whose_memory_is_still_served_lazily";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('r');
    let mut goblin = Goblin::start(512, &mark);
    let sum = goblin.ask("sum");
    let digest = goblin.freeze_and_stop(&store, "g", "v2");
    let mut rm = pf(&store);
    rm.args(["store", "untag", "g"]);
    let out = run(rm, b"");
    assert!(out.status.success(), "untag: {}", text(&out.stderr));
    let mut serve = MidServe::start(&store, &digest.to_string(), &mark);
    let mut gc = pf(&store);
    gc.args(["-v", "store", "gc", "--grace", "0"]);
    let out = run(gc, b"");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "gc: {stderr}");
    assert!(
        stderr.contains("waiting for writers, and thaws reading from the store"),
        "gc started while the copy was served, and waited: {stderr}"
    );
    assert_eq!(serve.ask("sum"), sum, "the copy has every page");
    // gc removed the snapshot once the copy needed nothing more from it.
    assert!(
        !pf_core::BlobStore::contains(&FsBlobStore::open(&store).expect("store"), &digest)
            .expect("contains"),
        "the unnamed snapshot was swept"
    );
    serve.kill();
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "the thawed copy",
    );
}

/// A copy frozen right after a lazy thaw, its memory not all in yet: the freeze waits for the
/// rest (CRIU dumps only the pages present: the others would come back as zeros), and the
/// snapshot thaws with every page of the original.
#[test]
fn live_a_copy_frozen_while_its_memory_is_still_served_lazily_keeps_every_page() {
    let name = "live_a_copy_frozen_while_its_memory_is_still_served_lazily_keeps_every_page";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('w');
    let mut goblin = Goblin::start(512, &mark);
    let sum = goblin.ask("sum");
    goblin.freeze_and_stop(&store, "g", "v2");
    let mut serve = MidServe::start(&store, "g", &mark);
    let mut freeze = pf(&store);
    freeze.env(FORMAT_ENV, "v2").args([
        "goblin",
        "freeze",
        "--pid",
        &serve.goblin.to_string(),
        "--tag",
        "early",
    ]);
    let out = run(freeze, b"");
    assert!(out.status.success(), "freeze: {}", text(&out.stderr));
    // The copy runs on with every page, and so does a thaw of its snapshot.
    assert_eq!(serve.ask("sum"), sum);
    let out = thaw_with(&store, "--eager", "early", b"sum\n");
    assert!(out.status.success(), "thaw: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{sum}\neof\n"));
    serve.kill();
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "the thawed copies",
    );
}

#[test]
fn live_lazy_thaw_of_a_corrupt_page_kills_the_goblin_naming_the_snapshot() {
    let name = "live_lazy_thaw_of_a_corrupt_page_kills_the_goblin_naming_the_snapshot";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('c');
    let mut goblin = Goblin::start(64, &mark);
    let sum = goblin.ask("sum");
    let digest = goblin.freeze_and_stop(&store, "g", "v2");
    // Flip a byte in the middle of the largest pack: a page of random memory.
    let pack = largest_blob(&store);
    let mut bytes = std::fs::read(&pack).expect("read pack");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&pack, &bytes).expect("write pack");
    let out = thaw_lazy(&store, "g", b"ping\nsum\n");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a corrupt page must fail: {stderr}");
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains(&sum)
            && !stdout
                .lines()
                .any(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit())),
        "no sum computed from the bad page, nor from zeros in its place: {stdout:?}"
    );
    assert!(
        stderr.contains(&digest.to_string()),
        "names the snapshot: {stderr}"
    );
    assert!(
        stderr.contains("killed"),
        "says the goblin was killed: {stderr}"
    );
    assert!(stderr.contains("0x"), "names the page's address: {stderr}");
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "the killed goblin",
    );
}

/// A pack that is gone (`pf store rm`, a store copied in part) is said to be missing, not
/// corrupt: the user is sent to the missing blob, not told its bytes are bad.
#[test]
fn live_lazy_thaw_with_a_pack_gone_says_it_is_not_in_the_store() {
    let name = "live_lazy_thaw_with_a_pack_gone_says_it_is_not_in_the_store";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('m');
    let mut goblin = Goblin::start(64, &mark);
    let sum = goblin.ask("sum");
    let digest = goblin.freeze_and_stop(&store, "g", "v2");
    let pack = largest_blob(&store);
    std::fs::remove_file(&pack).expect("remove pack");
    let out = thaw_lazy(&store, "g", b"ping\nsum\n");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a missing pack must fail: {stderr}");
    assert!(
        !text(&out.stdout).contains(&sum),
        "no sum computed without the pack: {}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains(&digest.to_string()) && stderr.contains("is not in the store"),
        "names the snapshot and says what is missing: {stderr}"
    );
    assert!(
        !stderr.contains("corrupt") && !stderr.contains("do not match"),
        "a missing pack is not corrupt: {stderr}"
    );
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "the killed goblin",
    );
}

/// Also the format issue's "a v1 snapshot made by the previous format" still thaws with every
/// page: v2 is the default now, so this is where a v1 snapshot is thawed and checked whole.
#[test]
fn live_lazy_thaw_of_a_v1_snapshot_says_lazy_needs_the_page_format() {
    let name = "live_lazy_thaw_of_a_v1_snapshot_says_lazy_needs_the_page_format";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mark = marker('o');
    let mut goblin = Goblin::start(8, &mark);
    let sum = goblin.ask("sum");
    goblin.freeze_and_stop(&store, "g", "v1");
    let shown = pf(&store)
        .args(["procs", "show", "g"])
        .output()
        .expect("pf procs show");
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("procs json");
    assert_eq!(json["kind"], "procs.criu.v1", "{json}");
    let out = thaw_lazy(&store, "g", b"ping\n");
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("procs.criu.v1") && stderr.contains("PF_SNAPSHOT_FORMAT unset"),
        "says lazy needs the page-level format and how to get it: {stderr}"
    );
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(5),
        "nothing was thawed",
    );
    // Without --lazy it thaws (eagerly), every page as it was frozen.
    let out = thaw_with(&store, "-v", "g", b"sum\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{sum}\neof\n"));
    assert!(!text(&out.stderr).contains("restored lazily"));
    assert_gone_within(
        || processes_named(&mark),
        Duration::from_secs(10),
        "after the goblin exited",
    );
}
