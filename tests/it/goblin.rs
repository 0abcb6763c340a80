//! `pf goblin`: spawn a warm goblin, freeze a running one, thaw (pf becomes the goblin: stdin,
//! stdout, stderr, exit code), fork, and the clear refusals. Live tests need root and CRIU
//! (`PF_HAS_CRIU=1`); every process a test starts is killed by pid before it returns.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pf_core::BlobStore as _;
use pf_world_procs::test_support::{Deadline, KillOnDrop, live, spawn_clean};

use crate::support::{Tmpfs, pf, text};

/// Longest any single `pf` invocation may take in these tests.
const DEADLINE: Duration = Duration::from_secs(60);

/// A mark in the environment of every process a test starts: `pf`, and through it criu, the
/// namespace inits and the goblins (a thawed copy keeps the environment it was frozen with), so
/// the test can list whatever of its own is still running.
struct Mark(String);

impl Mark {
    const VAR: &'static str = "PF_TEST_MARK";

    fn new(test: &str) -> Self {
        Self(format!("{test}-{}", std::process::id()))
    }

    fn on(&self, mut cmd: Command) -> Command {
        cmd.env(Self::VAR, &self.0);
        cmd
    }

    /// Pids of the marked processes that are running (a zombie has no environment left).
    fn running(&self) -> Vec<i32> {
        let needle = format!("{}={}", Self::VAR, self.0);
        let mut pids: Vec<i32> = std::fs::read_dir("/proc")
            .expect("list /proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
            })
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Within 10 s, exactly `want` of this test's processes are running (`[]`: none is left).
    fn assert_running(&self, want: &[i32], after: &str) {
        let mut want = want.to_vec();
        want.sort_unstable();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let running = self.running();
            if running == want {
                return;
            }
            if Instant::now() >= end {
                let what: Vec<String> = running
                    .iter()
                    .map(|p| {
                        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                        format!("{p}: {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
                    })
                    .collect();
                panic!("after {after}: want {want:?} running, found {what:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether `pid` has exited: no such process, or a zombie (within 10 s).
fn exited(pid: i32) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, s)| s.starts_with('Z')) =>
            {
                return true;
            }
            Ok(_) if Instant::now() >= end => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A stateful goblin: `inc` prints the counter, `set k=v` prints ok, `get k` the value, `exit N`
/// exits N; at end of input it prints `eof N`.
const COUNTER: &str = r#"
import sys
n = 0
d = {}
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "inc":
        n += 1
        print(n)
    elif cmd == "set":
        k, _, v = arg.partition("=")
        d[k] = v
        print("ok")
    elif cmd == "get":
        print(d.get(arg, "-"))
    elif cmd == "exit":
        sys.exit(int(arg))
print("eof", n)
"#;

/// Loads slowly, says it is ready, then answers `get KEY` from what it loaded.
const SLOW_START: &str = r#"
import sys, time
print("loading...")
time.sleep(1.5)
table = {"answer": 42, "pid": __import__("os").getpid()}
print("ready", flush=True)
for line in sys.stdin:
    print(table.get(line.strip().removeprefix("get "), "-"))
"#;

/// Sleeps before reading anything, then echoes each line as `got LINE`.
const SLOW_READER: &str = r#"
import sys, time
print("started")
time.sleep(3)
for line in sys.stdin:
    print("got", line.strip())
print("eof")
"#;

/// Run `cmd` with `input` on its stdin; kill it if it takes longer than [`DEADLINE`].
fn run(mut cmd: Command, input: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("start pf");
    finish(child, input)
}

/// Feed `input` to a started `pf`, collect its output, enforcing [`DEADLINE`].
fn finish(child: Child, input: &[u8]) -> Output {
    crate::support::finish(child, input, DEADLINE)
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn failed(out: &Output, what: &str) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what} should fail with exit 1:\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

fn py(script: &str) -> Vec<String> {
    ["python3", "-u", "-c", script]
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// `pf goblin spawn --tag TAG ARGS… -- CMD…`
fn spawn_goblin(store: &Path, tag: &str, args: &[&str], cmd: &[String]) -> Output {
    let mut pf = pf(store);
    pf.args(["goblin", "spawn", "--tag", tag])
        .args(args)
        .arg("--")
        .args(cmd);
    run(pf, b"")
}

/// `pf goblin thaw SNAPSHOT`.
fn thaw_cmd(store: &Path, snapshot: &str) -> Command {
    let mut cmd = pf(store);
    cmd.args(["goblin", "thaw", snapshot]);
    cmd
}

/// `pf goblin thaw SNAPSHOT` with `input` on stdin.
fn thaw(store: &Path, snapshot: &str, input: &[u8]) -> Output {
    run(thaw_cmd(store, snapshot), input)
}

/// A goblin started by the test itself (its own session, pipes, no stray fds): the process and
/// our line reader on its stdout.
struct Started {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    _guard: KillOnDrop,
}

fn start(script: &str) -> Started {
    let mut cmd = goblin_cmd(script);
    cmd.stderr(Stdio::piped());
    start_cmd(cmd)
}

/// The command that starts python3 on `script` in a session of its own, from `/`, its stdin and
/// stdout on pipes (the caller says where its stderr goes).
fn goblin_cmd(script: &str) -> Command {
    let mut cmd = Command::new("setsid");
    cmd.args(py(script))
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    cmd
}

/// Start the goblin `cmd` ([`goblin_cmd`]).
fn start_cmd(mut cmd: Command) -> Started {
    let mut child = spawn_clean(&mut cmd).expect("start goblin");
    let guard = KillOnDrop(i32::try_from(child.id()).expect("pid"));
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    Started {
        child,
        lines,
        _guard: guard,
    }
}

impl Started {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to goblin");
    }

    fn line(&mut self) -> String {
        self.lines.next().expect("a line").expect("read line")
    }

    /// `pf goblin freeze --kill` it into `store` as `tag`, and reap it.
    fn freeze_and_kill(mut self, store: &Path, tag: &str) {
        let mut freeze = pf(store);
        freeze.args([
            "goblin",
            "freeze",
            "--pid",
            &self.pid(),
            "--kill",
            "--tag",
            tag,
        ]);
        ok(&run(freeze, b""), "freeze");
        let _ = self.child.wait();
    }
}

#[test]
fn live_spawn_of_a_command_that_exits_says_what_it_printed() {
    if !live("live_spawn_of_a_command_that_exits_says_what_it_printed") {
        return;
    }
    let _deadline = Deadline::start(
        "live_spawn_of_a_command_that_exits_says_what_it_printed",
        Duration::from_secs(60),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let spawn = |command: &[&str]| {
        let mut spawn = pf(&store);
        spawn
            .args(["goblin", "spawn", "--tag", "t", "--"])
            .args(command);
        run(spawn, b"")
    };
    // Silent: there is no output "above" to look at.
    let err = failed(&spawn(&["true"]), "spawn of true");
    assert!(
        err.contains("before it was warm, printing nothing"),
        "{err}"
    );
    assert!(!err.contains("above"), "{err}");
    let err = failed(&spawn(&["sh", "-c", "echo oops; exit 3"]), "spawn of sh");
    assert!(err.starts_with("oops\n"), "{err}");
    assert!(err.contains("its output is above"), "{err}");
    // Warm, then gone before the freeze could take it: that is what pf says, not criu's
    // failure to seize a process that was gone.
    let mut spawn = pf(&store);
    spawn
        .args(["goblin", "spawn", "--tag", "t", "--until", "^ready$", "--"])
        .args(["sh", "-c", "echo ready; exit 3"]);
    let err = failed(&run(spawn, b""), "spawn of a goblin that exits once ready");
    assert!(
        err.contains("exited (exit status 3) right after it was warm, before it could be frozen"),
        "{err}"
    );
    assert!(!err.contains("seize"), "{err}");
}

/// A thaw of a name whose snapshot is gone from the store says so with the name and the fix
/// (`pf store untag`), before anything runs.
#[test]
fn a_thaw_of_a_name_whose_snapshot_is_gone_names_it_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = pf_core::FsBlobStore::open(&store).expect("store");
    let gone = s.put(b"a snapshot, once").expect("put");
    s.set_name("old", &gone).expect("name");
    assert!(s.remove(&gone).expect("remove"));
    let err = failed(&thaw(&store, "old", b""), "a thaw of a dangling name");
    assert!(
        err.contains(&format!(
            "the name \"old\" points at {gone}, which is not in the store"
        )) && err.contains("`pf store untag old`"),
        "{err}"
    );
}

/// A spawn into a store on a read-only mount fails before the command starts, saying why and
/// what to do: a warm-up of minutes is not run only to be lost. (It warmed the command up, then
/// failed to name the snapshot.)
#[test]
fn live_spawn_into_a_read_only_store_fails_before_the_command_starts() {
    if !live("live_spawn_into_a_read_only_store_fails_before_the_command_starts") {
        return;
    }
    let _deadline = Deadline::start(
        "live_spawn_into_a_read_only_store_fails_before_the_command_starts",
        Duration::from_secs(60),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("mkdir store");
    let started = dir.path().join("started");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o ro,mode=700 tmpfs \"$1\" && exec \"$2\" --store \"$1\" goblin \
             spawn --tag t --until ready -- sh -c 'touch \"$3\"; echo ready; exec sleep 60'",
        )
        .arg("sh")
        .arg(&store)
        .arg(crate::support::pf_bin())
        .arg(&started)
        .env_remove("PF_STORE");
    let err = failed(&run(cmd, b""), "spawn into a read-only store");
    assert!(
        err.contains("nothing was started")
            && err.contains("is on a read-only file system")
            && err.contains("remount it read-write"),
        "{err}"
    );
    assert!(!started.exists(), "the command was started: {err}");
}

#[test]
fn live_spawn_until_then_two_thaws_answer_from_the_warm_state() {
    if !live("live_spawn_until_then_two_thaws_answer_from_the_warm_state") {
        return;
    }
    let _deadline = Deadline::start(
        "live_spawn_until_then_two_thaws_answer_from_the_warm_state",
        Duration::from_secs(120),
    );
    let mark = Mark::new("spawn-until");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut spawn = pf(&store);
    spawn
        .args([
            "goblin", "spawn", "--tag", "warm", "--until", "^ready$", "--json",
        ])
        .arg("--")
        .args(py(SLOW_START));
    let out = run(mark.on(spawn), b"");
    let json: serde_json::Value = serde_json::from_str(&ok(&out, "spawn")).expect("json");
    let digest = json["digest"].as_str().expect("digest").to_owned();
    assert!(digest.starts_with("sha256:"), "{json}");
    assert_eq!(json["tag"], "warm");
    assert!(
        json["warmup_ms"].as_u64().expect("warmup_ms") >= 1500,
        "{json}"
    );
    // What the goblin said while warming up is not lost: pf echoed it on stderr.
    let err = text(&out.stderr);
    assert!(err.contains("loading...\nready\n"), "{err}");
    // Once frozen, the goblin pf started is stopped, and nothing else of ours runs (no criu).
    let goblin = i32::try_from(json["pid"].as_i64().expect("pid")).expect("pid");
    assert!(exited(goblin), "the spawned goblin {goblin} still runs");
    mark.assert_running(&[], "pf goblin spawn --until");

    // Two thaws at once, by name and by digest, each answering from the warm state.
    let mut a = mark.on(thaw_cmd(&store, "warm"));
    a.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut b = mark.on(thaw_cmd(&store, &digest));
    b.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let a = a.spawn().expect("thaw a");
    let b = b.spawn().expect("thaw b");
    let a = finish(a, b"get answer\nget pid\n");
    let b = finish(b, b"get answer\nget pid\n");
    let (a, b) = (ok(&a, "thaw by name"), ok(&b, "thaw by digest"));
    assert_eq!(
        a, b,
        "both copies run with the same pid inside their namespaces"
    );
    // No `loading...`/`ready` again: each copy starts after the slow start, with the table it
    // built then (holding the pid the goblin had while it warmed up, which it keeps).
    assert_eq!(a, format!("42\n{goblin}\n"));
    mark.assert_running(&[], "two thaws");
}

/// `pf goblin thaw --pidfile`: the copy's pid, for `pf goblin freeze` to freeze the copy as it
/// runs (from inside the pid namespace pf gave it); its snapshot goes on from the copy's state.
#[test]
// The guard kills and reaps `pf goblin thaw` by its pid.
#[allow(clippy::zombie_processes)]
fn live_a_thawed_copy_named_by_its_pidfile_freezes_and_goes_on_from_its_state() {
    if !live("live_a_thawed_copy_named_by_its_pidfile_freezes_and_goes_on_from_its_state") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    ok(
        &spawn_goblin(&store, "counter", &["--quiet-ms", "300"], &py(COUNTER)),
        "spawn",
    );
    let mut copy = PidfileThaw::start(&store, "counter", &dir.path().join("copy.pid"));
    assert_eq!(copy.ask("inc"), "1");
    let pid = copy.pid();
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/pid")).expect("its pid namespace"),
        std::fs::read_link("/proc/self/ns/pid").expect("ours"),
        "the copy runs in a pid namespace of its own"
    );
    let mut freeze = pf(&store);
    freeze.args([
        "goblin",
        "freeze",
        "--pid",
        &pid.to_string(),
        "--tag",
        "copy",
    ]);
    let out = run(freeze, b"");
    let first = ok(&out, "freeze the thawed copy");
    assert!(
        !text(&out.stderr).contains("now points at"),
        "a new name moved nothing"
    );
    assert_eq!(copy.ask("inc"), "2", "the copy runs on");
    // A second thaw given the copy's pidfile is refused before it restores anything: the
    // first copy's pidfile must stay its own.
    let taken = thaw_cmd(&store, "counter");
    let mut taken = taken;
    taken.arg("--pidfile").arg(&copy.pidfile);
    let err = failed(&run(taken, b""), "a thaw given a running copy's pidfile");
    assert!(
        err.contains(&format!("names process {pid}, which still runs"))
            && err.contains("nothing was thawed"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&copy.pidfile).expect("the pidfile is still there"),
        format!("{pid}\n")
    );
    // Frozen again under the same name: pf says the name moved, and from what.
    let mut freeze = pf(&store);
    freeze.args(["goblin", "freeze", "--pidfile"]);
    freeze.arg(&copy.pidfile).args(["--tag", "copy"]);
    let out = run(freeze, b"");
    ok(&out, "freeze the thawed copy again");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "the name \"copy\" now points at this snapshot; it pointed at {}",
            first.trim()
        )),
        "{err}"
    );
    copy.stdin = None;
    assert_eq!(copy.lines.next().expect("a line").expect("read"), "eof 2");
    assert!(copy.wait().success());
    assert!(!copy.pidfile.exists(), "the pidfile goes with the copy");
    // The copy's snapshot goes on from where the copy was frozen.
    let again = thaw(&store, "copy", b"inc\n");
    assert_eq!(ok(&again, "thaw the copy's snapshot"), "3\neof 3\n");
}

/// `pf goblin thaw SNAPSHOT --pidfile FILE`, talked to line by line.
struct PidfileThaw {
    child: Child,
    /// `None` once closed.
    stdin: Option<std::process::ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    pidfile: std::path::PathBuf,
    // Kills `pf goblin thaw` (and so its copy) if the test ends early.
    guard: KillOnDrop,
}

impl PidfileThaw {
    fn start(store: &Path, snapshot: &str, pidfile: &Path) -> Self {
        let mut cmd = thaw_cmd(store, snapshot);
        cmd.arg("--pidfile")
            .arg(pidfile)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start pf goblin thaw");
        let guard = KillOnDrop(i32::try_from(child.id()).expect("pid"));
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self {
            child,
            stdin,
            lines,
            pidfile: pidfile.to_owned(),
            guard,
        }
    }

    /// Wait for `pf goblin thaw` to end; reaped, its pid may be someone else's, so the guard
    /// is disarmed.
    fn wait(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait for pf goblin thaw");
        self.guard = KillOnDrop(0);
        status
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin.as_mut().expect("stdin open"), "{line}").expect("write");
        self.lines.next().expect("a line").expect("read")
    }

    /// The copy's pid, from the pidfile (written once the copy runs: it reads our pipe straight
    /// away, so it may answer first).
    fn pid(&self) -> i32 {
        let start = Instant::now();
        while !self.pidfile.exists() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::read_to_string(&self.pidfile)
            .expect("the pidfile")
            .trim()
            .parse()
            .expect("a pid")
    }
}

/// A thawed copy frozen with `--kill`, again and again: every snapshot is stored.
#[test]
fn live_thawed_copies_frozen_with_kill_are_each_stored_and_go_on_from_their_state() {
    if !live("live_thawed_copies_frozen_with_kill_are_each_stored_and_go_on_from_their_state") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    ok(
        &spawn_goblin(&store, "counter", &["--quiet-ms", "300"], &py(COUNTER)),
        "spawn",
    );
    // A chain: each round thaws the last round's snapshot, counts one up and freezes the copy
    // with --kill (criu inside the copy's namespace must not die with it: it once did, in a
    // third of the rounds, after writing complete images).
    let mut from = "counter".to_owned();
    for round in 1..=6 {
        let mut copy = PidfileThaw::start(&store, &from, &dir.path().join("copy.pid"));
        assert_eq!(copy.ask("inc"), round.to_string(), "round {round}");
        // Written once the copy runs; frozen by the file, which names it (not stale).
        let _ = copy.pid();
        let tag = format!("copy{round}");
        let mut freeze = pf(&store);
        freeze
            .args(["goblin", "freeze", "--kill", "--tag", &tag, "--pidfile"])
            .arg(&copy.pidfile);
        ok(&run(freeze, b""), &format!("round {round}: freeze --kill"));
        assert!(!copy.wait().success(), "round {round}: the copy was killed");
        assert!(!copy.pidfile.exists(), "round {round}: the pidfile went");
        from = tag;
    }
    let again = thaw(&store, &from, b"inc\n");
    assert_eq!(ok(&again, "thaw the last copy's snapshot"), "7\neof 7\n");
}

#[test]
fn live_thaw_is_the_goblin_exit_code_and_eof() {
    if !live("live_thaw_is_the_goblin_exit_code_and_eof") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    // Without --until: frozen once it has been quiet for a moment.
    let out = spawn_goblin(&store, "counter", &["--quiet-ms", "300"], &py(COUNTER));
    let digest = ok(&out, "spawn");
    assert!(digest.trim().starts_with("sha256:"), "{digest}");

    let seven = thaw(&store, "counter", b"inc\nexit 7\n");
    assert_eq!(text(&seven.stdout), "1\n");
    assert_eq!(
        seven.status.code(),
        Some(7),
        "pf exits with the goblin's code"
    );

    let eof = thaw(&store, "counter", b"inc\ninc\n");
    assert_eq!(
        ok(&eof, "thaw to eof"),
        "1\n2\neof 2\n",
        "end of input reaches the goblin"
    );

    let empty = thaw(&store, "counter", b"");
    assert_eq!(ok(&empty, "thaw with no input"), "eof 0\n");
}

#[test]
fn live_freeze_pid_with_unread_stdin_then_thaw_gets_all_lines_in_order() {
    if !live("live_freeze_pid_with_unread_stdin_then_thaw_gets_all_lines_in_order") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut goblin = start(SLOW_READER);
    assert_eq!(goblin.line(), "started");
    goblin.send("one");
    goblin.send("two");
    let stdin = std::fs::read_link(format!("/proc/{}/fd/0", goblin.pid())).expect("fd 0");
    let mut freeze = pf(&store);
    freeze.args([
        "goblin",
        "freeze",
        "--pid",
        &goblin.pid(),
        "--kill",
        "--tag",
        "slow",
        "--json",
    ]);
    let out = run(freeze, b"");
    let json: serde_json::Value = serde_json::from_str(&ok(&out, "freeze")).expect("json");
    assert_eq!(json["left_running"], false);
    assert_eq!(json["tag"], "slow");
    assert_eq!(json["stdio"][0], stdin.display().to_string(), "{json}");
    let status = goblin.child.wait().expect("reap");
    assert!(!status.success(), "--kill stopped the original");

    let out = thaw(&store, "slow", b"three\n");
    assert_eq!(ok(&out, "thaw"), "got one\ngot two\ngot three\neof\n");
}

/// Holds 8 MiB of random bytes, then echoes each line as `got LINE`.
const RANDOM_8M: &str = r#"
import os, sys
keep = os.urandom(8 << 20)
print("ready")
for line in sys.stdin:
    print("got", line.strip())
"#;

/// A freeze --kill whose store is full must not take the goblin with it: criu used to kill it
/// at the end of the dump, before pf stored a page, so ENOSPC lost the process (found by hand,
/// a 256 MiB goblin frozen into a 40 MiB tmpfs). Now it runs on, and a retry into a store with
/// room freezes it.
#[test]
fn live_freeze_kill_into_a_full_store_leaves_the_goblin_running() {
    if !live("live_freeze_kill_into_a_full_store_leaves_the_goblin_running") {
        return;
    }
    let _deadline = Deadline::start(
        "live_freeze_kill_into_a_full_store_leaves_the_goblin_running",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut goblin = start(RANDOM_8M);
    assert_eq!(goblin.line(), "ready");
    let small = Tmpfs::mount(&dir.path().join("small"), "size=2m,mode=700");
    let full = small.0.join("store");
    let mut freeze = pf(&full);
    freeze.args(["goblin", "freeze", "--pid", &goblin.pid(), "--kill"]);
    let err = failed(&run(freeze, b""), "freeze into a full store");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("not killed"), "{err}");
    goblin.send("still here");
    assert_eq!(goblin.line(), "got still here");
    let mut verify = pf(&full);
    verify.args(["store", "verify"]);
    ok(&run(verify, b""), "verify the full store");
    assert_eq!(
        crate::support::blob_files(&full),
        std::collections::BTreeSet::new()
    );
    drop(small);

    let store = dir.path().join("store");
    goblin.freeze_and_kill(&store, "g");
    let out = thaw(&store, "g", b"again\n");
    assert_eq!(ok(&out, "thaw"), "got again\n");
}

/// A goblin another process traces (a debugger, or another freeze's criu) is refused before
/// criu runs, naming the tracer; it runs on, and freezes once the tracer is gone. Before, criu
/// failed with a raw `Unable to detach from N: No such process`.
#[test]
fn live_a_freeze_of_a_traced_goblin_names_the_tracer_before_criu_runs() {
    if !live("live_a_freeze_of_a_traced_goblin_names_the_tracer_before_criu_runs") {
        return;
    }
    let _deadline = Deadline::start(
        "live_a_freeze_of_a_traced_goblin_names_the_tracer_before_criu_runs",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut goblin = start(RANDOM_8M);
    assert_eq!(goblin.line(), "ready");
    let pid = goblin.pid();
    let freeze = || {
        let mut freeze = pf(&store);
        freeze.args(["goblin", "freeze", "--pid", &pid]);
        run(freeze, b"")
    };

    let gdb = pf_world_procs::test_support::trace(goblin.child.id() as i32, "gdb").expect("trace");
    let err = failed(&freeze(), "freeze of a goblin gdb traces");
    assert!(
        err.contains(&format!(
            "process {} is traced by gdb (pid {}), and criu cannot freeze a process another one \
             traces: detach it",
            goblin.pid(),
            gdb.pid
        )),
        "{err}"
    );
    assert!(!err.contains("full log kept"), "criu ran: {err}");
    drop(gdb);

    // As another freeze's criu would (named so, traced by a child of this test).
    let criu =
        pf_world_procs::test_support::trace(goblin.child.id() as i32, "criu").expect("trace");
    let err = failed(&freeze(), "freeze of a goblin criu traces");
    assert!(
        err.contains(&format!(
            "process {} is already being frozen: criu (pid {}, run by ",
            goblin.pid(),
            criu.pid
        )) && err.contains(&format!(", pid {}) traces it", std::process::id()))
            && err.contains("wait for that one to finish, then freeze again"),
        "{err}"
    );
    assert!(!err.contains("full log kept"), "criu ran: {err}");
    drop(criu);
    assert_eq!(crate::support::blob_files(&store), Default::default());

    // It ran on meanwhile, and freezes now.
    goblin.send("still here");
    assert_eq!(goblin.line(), "got still here");
    let start = Instant::now();
    while pf_os::proc::traced_task(goblin.child.id() as i32).is_some() {
        assert!(start.elapsed() < Duration::from_secs(20), "still traced");
        std::thread::sleep(Duration::from_millis(10));
    }
    let digest = ok(&freeze(), "freeze once nothing traces it");
    assert!(digest.starts_with("sha256:"), "{digest}");
}

/// Two `pf goblin freeze` of one goblin at once: criu can seize a process only once, so the one
/// whose criu comes second failed with CRIU's raw `Unable to detach from N: No such process`
/// (found by hand). Whichever way the race goes, every freeze now succeeds or says that another
/// freeze of the process is under way; the goblin runs on. (The check before criu runs is
/// tested on its own above; here both usually pass it and the loser's criu fails to seize.)
#[test]
fn live_two_freezes_of_one_goblin_at_once_succeed_or_say_the_other_is_under_way() {
    if !live("live_two_freezes_of_one_goblin_at_once_succeed_or_say_the_other_is_under_way") {
        return;
    }
    let _deadline = Deadline::start(
        "live_two_freezes_of_one_goblin_at_once_succeed_or_say_the_other_is_under_way",
        Duration::from_secs(170),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut goblin = start(RANDOM_8M);
    assert_eq!(goblin.line(), "ready");
    for round in 0..3 {
        let freezes: Vec<Child> = (0..2)
            .map(|_| {
                let mut freeze = pf(&store);
                freeze
                    .args(["goblin", "freeze", "--pid", &goblin.pid()])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                freeze.spawn().expect("start pf")
            })
            .collect();
        let outs: Vec<Output> = freezes.into_iter().map(|f| finish(f, b"")).collect();
        let won = outs.iter().filter(|o| o.status.success()).count();
        assert!(
            won >= 1,
            "round {round}: neither freeze succeeded: {outs:?}"
        );
        for out in outs.iter().filter(|o| !o.status.success()) {
            let err = text(&out.stderr);
            assert!(
                err.contains(&format!(
                    "process {} is already being frozen: criu (pid ",
                    goblin.pid()
                )) || err
                    .contains("criu could not seize the process: another process was tracing it"),
                "round {round}: {err}"
            );
            // The loser's criu log, when criu ran, is ours to remove.
            if let Some(log) = err
                .split("full log kept in ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
            {
                let kept = Path::new(log).parent().expect("log dir");
                assert!(
                    kept.to_string_lossy().contains("pf-criu-failed-dump-"),
                    "{log}"
                );
                std::fs::remove_dir_all(kept).expect("remove kept log");
            }
        }
        goblin.send(&format!("round {round}"));
        assert_eq!(goblin.line(), format!("got round {round}"));
    }
}

/// Ctrl-C while criu dumps with --kill: pf used to die and leave criu to finish the dump and
/// kill the goblin, with no snapshot stored. Now the freeze goes on to its end, and says so.
#[test]
fn live_freeze_kill_interrupted_by_ctrl_c_still_stores_the_snapshot() {
    if !live("live_freeze_kill_interrupted_by_ctrl_c_still_stores_the_snapshot") {
        return;
    }
    let _deadline = Deadline::start(
        "live_freeze_kill_interrupted_by_ctrl_c_still_stores_the_snapshot",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut goblin = start(SLOW_READER);
    assert_eq!(goblin.line(), "started");
    let mut freeze = pf(&store);
    freeze
        .args([
            "goblin",
            "freeze",
            "--pid",
            &goblin.pid(),
            "--kill",
            "--tag",
            "k",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = freeze.spawn().expect("start pf");
    let pf_pid = child.id();
    // Wait for pf's `criu dump`, then Ctrl-C pf (criu runs in a process group of its own).
    let end = Instant::now() + Duration::from_secs(30);
    while !criu_dump_child_of(pf_pid) {
        assert!(Instant::now() < end, "pf started no criu dump in 30 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    send_signal(pf_pid, "INT");
    let out = finish(child, b"");
    let digest = ok(&out, "the interrupted freeze");
    assert!(digest.starts_with("sha256:"), "{digest}");
    let err = text(&out.stderr);
    assert!(
        err.contains("interrupted by signal 2 after the snapshot was complete"),
        "{err}"
    );
    let status = goblin.child.wait().expect("reap");
    assert!(!status.success(), "--kill stopped the original");
    let out = thaw(&store, "k", b"three\n");
    assert_eq!(ok(&out, "thaw"), "got three\neof\n");
}

/// Whether a `criu dump` runs as a child of `parent`.
fn criu_dump_child_of(parent: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let dir = e.path();
        let ppid = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| {
                let after = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .to_owned();
                after.parse::<u32>().ok()
            });
        ppid == Some(parent)
            && std::fs::read(dir.join("cmdline")).is_ok_and(|cmd| {
                let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
                args.first().is_some_and(|a| a.ends_with(b"criu"))
                    && args.iter().any(|a| *a == b"dump")
            })
    })
}

#[test]
fn live_freeze_into_images_leaves_it_running_and_thaws_from_the_directory() {
    if !live("live_freeze_into_images_leaves_it_running_and_thaws_from_the_directory") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let images = dir.path().join("images");
    let mut goblin = start(COUNTER);
    goblin.send("inc");
    assert_eq!(goblin.line(), "1");
    let mut freeze = pf(&store);
    freeze
        .args(["goblin", "freeze", "--pid", &goblin.pid(), "--images"])
        .arg(&images);
    let out = run(freeze, b"");
    assert_eq!(
        ok(&out, "freeze --images").trim(),
        images.display().to_string()
    );
    assert!(images.join("goblin.json").is_file());
    assert!(images.join("pstree.img").is_file(), "plain CRIU images");
    goblin.send("inc");
    assert_eq!(goblin.line(), "2", "left running by default");

    let mut thaw = pf(&store);
    thaw.args(["goblin", "thaw", "--images"]).arg(&images);
    let out = run(thaw, b"inc\n");
    assert_eq!(ok(&out, "thaw --images"), "2\neof 2\n");
    goblin.send("inc");
    assert_eq!(goblin.line(), "3", "the original still answers");

    // A pages file cut short: refused before CRIU runs. CRIU's restorer read it forever
    // (300 s, then a kept log of gigabytes).
    let pages: Vec<_> = std::fs::read_dir(&images)
        .expect("images")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
        })
        .collect();
    assert_eq!(pages.len(), 1, "{pages:?}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages[0])
        .and_then(|f| f.set_len(4096))
        .expect("truncate");
    let mut thaw = pf(&store);
    thaw.args(["goblin", "thaw", "--images"]).arg(&images);
    let started = Instant::now();
    let err = failed(&run(thaw, b"inc\n"), "thaw of truncated images");
    assert!(
        err.contains("it ends before the pages its pagemap lists do"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "at once");
    assert!(!err.contains("log kept"), "no criu ran: {err}");
}

#[test]
fn live_fork_prints_every_copy_in_order() {
    if !live("live_fork_prints_every_copy_in_order") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut goblin = start(COUNTER);
    goblin.send("inc");
    assert_eq!(goblin.line(), "1");
    let mut freeze = pf(&store);
    freeze.args(["goblin", "freeze", "--pid", &goblin.pid(), "--tag", "c"]);
    ok(&run(freeze, b""), "freeze");

    let mut fork = pf(&store);
    fork.args([
        "goblin",
        "fork",
        "c",
        "-n",
        "3",
        "--send",
        "inc",
        "--send",
        "set x={i}",
    ])
    .args(["--send", "get x", "--json"]);
    let out = run(fork, b"");
    let lines: Vec<serde_json::Value> = ok(&out, "fork")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3);
    for (k, copy) in lines.iter().enumerate() {
        assert_eq!(copy["clone"], k + 1);
        assert_eq!(copy["exit_code"], 0);
        assert_eq!(
            copy["stdout"],
            format!("2\nok\n{}\neof 2\n", k + 1),
            "{copy}"
        );
    }

    let mut fork = pf(&store);
    fork.args(["goblin", "fork", "c", "-n", "2"]);
    let out = run(fork, b"inc\nexit 3\n");
    assert_eq!(out.status.code(), Some(1), "a copy exited 3");
    assert_eq!(text(&out.stdout), "[1] 2\n[2] 2\n");
    assert!(
        text(&out.stderr).contains("[1] exit code 3"),
        "{}",
        text(&out.stderr)
    );
    goblin.send("inc");
    assert_eq!(goblin.line(), "2", "the original still answers");
}

/// Opens `@PATH@` (a new file), writes `frozen` into it and deletes it, keeping it open: a
/// ghost file to CRIU, which dumps its contents and recreates it at a path of its own on every
/// restore. `w TEXT` rewrites the file, `r` prints what it holds and whether its path exists.
const GHOST: &str = r#"
import os, sys
f = open("@PATH@", "w+")
f.write("frozen")
f.flush()
os.unlink("@PATH@")
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "w":
        f.seek(0)
        f.truncate()
        f.write(arg)
        f.flush()
        print("ok")
    elif cmd == "r":
        f.seek(0)
        print(f.read(), os.path.exists("@PATH@"))
"#;

#[test]
fn live_fork_and_concurrent_thaws_of_a_goblin_holding_a_deleted_file_each_get_their_own() {
    let what =
        "live_fork_and_concurrent_thaws_of_a_goblin_holding_a_deleted_file_each_get_their_own";
    if !live(what) {
        return;
    }
    let deadline = Deadline::start(what, Duration::from_secs(170));
    let mark = Mark::new("ghost");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let files = dir.path().join("files");
    std::fs::create_dir(&files).expect("mkdir files");
    let ghost = files.join("ghostfile");
    let script = GHOST.replace("@PATH@", ghost.to_str().expect("utf-8 path"));

    // The goblin carries the mark, so its thawed copies (frozen with its environment) do too.
    let mut cmd = mark.on(Command::new("setsid"));
    cmd.args(py(&script))
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_clean(&mut cmd).expect("start goblin");
    let goblin = i32::try_from(child.id()).expect("pid");
    deadline.watch(goblin);
    let guard = KillOnDrop(goblin);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    let mut freeze = mark.on(pf(&store));
    freeze.args([
        "goblin",
        "freeze",
        "--pid",
        &goblin.to_string(),
        "--tag",
        "ghost",
    ]);
    ok(&run(freeze, b""), "freeze");

    // Copies restored at once each get a file of their own, with the frozen contents, that
    // they change without seeing each other's changes.
    for mode in ["--eager", "--lazy"] {
        let mut fork = mark.on(pf(&store));
        fork.args(["goblin", "fork", "ghost", "-n", "4", mode, "--json"])
            .args(["--send", "r", "--send", "w copy {i}", "--send", "r"]);
        let out = run(fork, b"");
        let copies: Vec<serde_json::Value> = ok(&out, &format!("fork {mode}"))
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(copies.len(), 4, "{mode}");
        for (k, copy) in copies.iter().enumerate() {
            assert_eq!(copy["exit_code"], 0, "{mode}: {copy}");
            assert_eq!(
                copy["stdout"],
                format!("frozen False\nok\ncopy {} False\n", k + 1),
                "{mode}: {copy}"
            );
        }
    }

    // Two `pf goblin thaw`s of the snapshot at once, in two pf processes.
    let thaws: Vec<Child> = (0..2)
        .map(|_| {
            let mut thaw = mark.on(thaw_cmd(&store, "ghost"));
            thaw.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let child = thaw.spawn().expect("start pf goblin thaw");
            deadline.watch(i32::try_from(child.id()).expect("pid"));
            child
        })
        .collect();
    for (k, thaw) in thaws.into_iter().enumerate() {
        let input = format!("r\nw thaw {k}\nr\n");
        let out = finish(thaw, input.as_bytes());
        assert_eq!(
            ok(&out, &format!("thaw {k}")),
            format!("frozen False\nok\nthaw {k} False\n")
        );
    }

    // Every restore removed the file it made, and the original still has its own.
    let left: Vec<_> = std::fs::read_dir(&files)
        .expect("list files")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "criu's ghost files were left: {left:?}");
    let stdin = child.stdin.as_mut().expect("stdin");
    writeln!(stdin, "r").expect("write to goblin");
    assert_eq!(lines.next().expect("a line").expect("read"), "frozen False");
    mark.assert_running(&[goblin], "the forks and thaws");
    child.kill().expect("kill the goblin");
    child.wait().expect("reap the goblin");
    drop(guard);
    mark.assert_running(&[], "killing the goblin");
}

#[test]
fn live_freeze_refuses_terminals_files_and_missing_pids() {
    if !live("live_freeze_refuses_terminals_files_and_missing_pids") {
        return;
    }
    let deadline = Deadline::start(
        "live_freeze_refuses_terminals_files_and_missing_pids",
        Duration::from_secs(120),
    );
    let mark = Mark::new("freeze-refuses");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");

    // A process on a terminal: `script` gives it a pty and it writes its pid down.
    let pidfile = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let mut term = mark.on(Command::new("script"));
    term.args(["-qec", &script, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut script_child = spawn_clean(&mut term).expect("start script");
    let script_pid = i32::try_from(script_child.id()).expect("pid");
    deadline.watch(script_pid);
    let _script_guard = KillOnDrop(script_pid);
    let started = Instant::now();
    let tty_pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            break pid;
        }
        assert!(started.elapsed() < DEADLINE, "script never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    deadline.watch(tty_pid);
    let tty_guard = KillOnDrop(tty_pid);
    mark.assert_running(&[script_pid, tty_pid], "starting script");
    let mut freeze = mark.on(pf(&store));
    freeze.args(["goblin", "freeze", "--pid", &tty_pid.to_string()]);
    let err = failed(&run(freeze, b""), "freeze of a terminal process");
    assert!(err.contains("stdin is a terminal (/dev/pts/"), "{err}");
    assert!(err.contains("stdout is a terminal"), "{err}");
    // A refused freeze leaves the process alone and starts nothing (no criu is left over).
    mark.assert_running(&[script_pid, tty_pid], "the refused freeze of a terminal");

    // A process writing to a file.
    let log = dir.path().join("out.log");
    let mut to_file = mark.on(Command::new("setsid"));
    to_file
        .args(["sleep", "60"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(Stdio::piped());
    let mut file_child = spawn_clean(&mut to_file).expect("start sleep");
    let file_pid = i32::try_from(file_child.id()).expect("pid");
    deadline.watch(file_pid);
    let _file_guard = KillOnDrop(file_pid);
    let mut freeze = mark.on(pf(&store));
    freeze.args(["goblin", "freeze", "--pid", &file_pid.to_string()]);
    let err = failed(&run(freeze, b""), "freeze of a process writing a file");
    assert!(
        err.contains(&format!("stdout is a file ({})", log.display())),
        "{err}"
    );
    assert!(err.contains("stdin is a pipe"), "{err}");
    mark.assert_running(
        &[script_pid, tty_pid, file_pid],
        "the refused freeze of a process writing a file",
    );
    file_child.kill().expect("kill sleep");
    file_child.wait().expect("reap sleep");
    // The terminal's sleep is in script's session: killing script hangs it up; kill both.
    script_child.kill().expect("kill script");
    script_child.wait().expect("reap script");
    drop(tty_guard);
    mark.assert_running(&[], "killing what the test started");

    // A pid that does not exist.
    let mut freeze = mark.on(pf(&store));
    freeze.args(["goblin", "freeze", "--pid", "2147483000"]);
    let err = failed(&run(freeze, b""), "freeze of a missing pid");
    assert!(err.contains("process 2147483000 does not exist"), "{err}");
    mark.assert_running(&[], "the refused freeze of a missing pid");

    // A process the kernel does not let pf look at (here: root's, to a pf run as `nobody`):
    // said so, not "Permission denied" on a /proc path.
    use std::os::unix::fs::PermissionsExt as _;
    let theirs = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(theirs.path(), Some(65534), Some(65534)).expect("chown");
    let bin = theirs.path().join("pf");
    std::fs::copy(crate::support::pf_bin(), &bin).expect("copy pf");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut root_sleep = mark.on(Command::new("setsid"));
    root_sleep
        .args(["sleep", "60"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut sleep_child = spawn_clean(&mut root_sleep).expect("start sleep");
    let sleep_pid = i32::try_from(sleep_child.id()).expect("pid");
    deadline.watch(sleep_pid);
    let _sleep_guard = KillOnDrop(sleep_pid);
    // `setsid` has exec'd `sleep` (the message names the process as it is then).
    let started = Instant::now();
    while comm(sleep_pid) != "sleep" {
        assert!(started.elapsed() < DEADLINE, "sleep never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut freeze = Command::new("setpriv");
    freeze
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .arg("--store")
        .arg(theirs.path().join("store"))
        .args(["goblin", "freeze", "--pid", &sleep_pid.to_string()])
        .env_remove("PF_STORE");
    let err = failed(
        &run(mark.on(freeze), b""),
        "freeze of root's process by nobody",
    );
    assert!(
        err.contains(&format!(
            "pf may not look into process {sleep_pid} (sleep):"
        )) && err.contains("Only a process pf may ptrace can be frozen"),
        "{err}"
    );
    mark.assert_running(&[sleep_pid], "the refused freeze of a hidden process");
    sleep_child.kill().expect("kill sleep");
    sleep_child.wait().expect("reap sleep");
}

/// A goblin whose stdout its own child reads (bash's `> >(cat > log)`): the freeze would take
/// the reader into the snapshot, and CRIU would give the reader's copy the thaw's stdout too, so
/// a thaw used to print nothing and wait while the answers went to the copy of the reader.
/// The freeze now refuses it, naming the reader; a thaw of such a snapshot made by an older pf
/// (taken here with `pf procs capture` and the goblin label) refuses it too, before CRIU runs.
#[test]
fn live_a_goblin_whose_own_child_reads_its_stdout_is_refused_at_freeze_and_thaw() {
    const NAME: &str =
        "live_a_goblin_whose_own_child_reads_its_stdout_is_refused_at_freeze_and_thaw";
    if !live(NAME) {
        return;
    }
    let deadline = Deadline::start(NAME, Duration::from_secs(180));
    let mark = Mark::new("output-read-in-tree");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let log = dir.path().join("out.log");

    // bash forks the process substitution, then becomes sleep: cat is sleep's own child.
    let script = format!("exec sleep 120 > >(exec cat > {})", log.display());
    let mut cmd = mark.on(Command::new("setsid"));
    cmd.args(["bash", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = spawn_clean(&mut cmd).expect("start the goblin");
    let goblin = i32::try_from(child.id()).expect("pid");
    deadline.watch(goblin);
    let _guard = KillOnDrop(goblin);
    let started = Instant::now();
    let cat = loop {
        let comm = std::fs::read_to_string(format!("/proc/{goblin}/comm")).unwrap_or_default();
        let kids = pf_os::proc::children(goblin);
        if comm.trim() == "sleep"
            && let [cat] = kids[..]
            && pf_os::proc::comm(cat).as_deref() == Some("cat")
        {
            break cat;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the goblin never became sleep with cat"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    deadline.watch(cat);
    let cat_guard = KillOnDrop(cat);
    mark.assert_running(&[goblin, cat], "starting the goblin");

    let mut freeze = mark.on(pf(&store));
    freeze.args([
        "goblin",
        "freeze",
        "--pid",
        &goblin.to_string(),
        "--tag",
        "g",
    ]);
    let err = failed(
        &run(freeze, b""),
        "freeze of a goblin whose child reads its stdout",
    );
    assert!(
        err.contains(&format!("is read by its own descendant {cat} (cat, fd 0)")),
        "{err}"
    );
    assert!(err.contains("process substitution"), "{err}");
    mark.assert_running(&[goblin, cat], "the refused freeze");

    // What an older pf stored: the same tree, labelled a goblin.
    let mut capture = mark.on(pf(&store));
    capture.args([
        "procs",
        "capture",
        "--pid",
        &goblin.to_string(),
        "--leave-running",
        "--label",
        "goblin=v1",
        "--tag",
        "old",
    ]);
    ok(
        &run(capture, b""),
        "capture of the tree with the goblin label",
    );
    mark.assert_running(&[goblin, cat], "the capture");
    for args in [
        &["goblin", "thaw", "old"][..],
        &["goblin", "thaw", "--eager", "old"],
        &["goblin", "thaw", "--lazy", "old"],
        &["goblin", "fork", "-n", "2", "old"],
    ] {
        let mut cmd = mark.on(pf(&store));
        cmd.args(args);
        let err = failed(&run(cmd, b"hello\n"), &args.join(" "));
        assert!(
            err.contains("its stdout (pipe:[")
                && err.contains("was read by a process of its own tree"),
            "{args:?}: {err}"
        );
        mark.assert_running(&[goblin, cat], &args.join(" "));
    }
    assert_eq!(
        std::fs::read(&log).expect("the log"),
        b"",
        "nothing reached the reader"
    );

    child.kill().expect("kill the goblin");
    child.wait().expect("reap the goblin");
    drop(cat_guard);
    mark.assert_running(&[], "killing the goblin and its reader");
}

/// pf's stdout a full disk (`/dev/full`, not a pipe, so pf copies the goblin's output into it):
/// what the goblin printed is lost, so pf fails saying so, as `cat` would; it used to exit 0
/// with the output gone.
#[test]
fn live_output_that_cannot_be_written_fails_the_thaw_and_the_fork() {
    const NAME: &str = "live_output_that_cannot_be_written_fails_the_thaw_and_the_fork";
    if !live(NAME) {
        return;
    }
    let _deadline = Deadline::start(NAME, Duration::from_secs(180));
    let mark = Mark::new("output-lost");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    ok(&spawn_goblin(&store, "c", &[], &py(COUNTER)), "spawn");
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("open /dev/full")
    };
    for (args, said) in [
        (
            &["goblin", "thaw", "c"][..],
            "cannot pass on the goblin's stdout, so what it wrote from then on is lost (the \
             goblin ended: ",
        ),
        (
            &["goblin", "fork", "-n", "2", "--send", "inc", "c"],
            "cannot write what the copies printed: No space left on device",
        ),
    ] {
        let mut cmd = mark.on(pf(&store));
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(full())
            .stderr(Stdio::piped());
        let out = finish(cmd.spawn().expect("start pf"), b"inc\n");
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.contains(said) && err.contains("No space left on device"),
            "{args:?}: {err}"
        );
        mark.assert_running(&[], &args.join(" "));
    }
}

#[test]
fn thaw_refuses_unknown_snapshots_and_blobs_that_are_not_goblins() {
    let mark = Mark::new("thaw-refuses");
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let store = pf_core::FsBlobStore::open(&store_dir).expect("store");
    let thaw = |snapshot: &str| run(mark.on(thaw_cmd(&store_dir, snapshot)), b"");

    let err = failed(&thaw("nosuchname"), "thaw of an unknown name");
    assert!(err.contains("no snapshot \"nosuchname\""), "{err}");
    mark.assert_running(&[], "the thaw of an unknown name");

    let unknown = pf_core::Digest256::of(b"never stored").to_string();
    let err = failed(&thaw(&unknown), "thaw of an unknown digest");
    assert!(err.contains(&unknown), "{err}");
    mark.assert_running(&[], "the thaw of an unknown digest");

    // A procs blob without the goblin label (a plain process tree).
    let dump = store.put(b"not really a tar").expect("put");
    let procs = format!(r#"{{"kind":"procs.criu.v1","criu_dump":"{dump}","pids":[4242]}}"#);
    let procs = store.put(procs.as_bytes()).expect("put procs");
    let err = failed(&thaw(&procs.to_string()), "thaw of a plain tree");
    assert!(err.contains("is not a goblin snapshot"), "{err}");
    assert!(err.contains("goblin=v1"), "{err}");
    mark.assert_running(&[], "the thaw of a plain tree");

    // A labelled blob whose stdio was a terminal.
    let procs = format!(
        r#"{{"kind":"procs.criu.v1","criu_dump":"{dump}","pids":[4242],
            "stdio":["/dev/pts/0","pipe:[7]","pipe:[7]"],"labels":{{"goblin":"v1"}}}}"#
    );
    let procs = store.put(procs.as_bytes()).expect("put procs");
    let mut fork = mark.on(pf(&store_dir));
    fork.args([
        "goblin",
        "fork",
        &procs.to_string(),
        "-n",
        "2",
        "--send",
        "x",
    ]);
    let err = failed(&run(fork, b""), "fork of a terminal goblin");
    assert!(err.contains("stdin is a terminal (/dev/pts/0)"), "{err}");
    mark.assert_running(&[], "the fork of a terminal goblin");

    // A blob that is not JSON at all.
    let err = failed(&thaw(&dump.to_string()), "thaw of raw bytes");
    assert!(err.contains(&dump.to_string()), "{err}");
    mark.assert_running(&[], "the thaw of raw bytes");

    let mut thaw = mark.on(pf(&store_dir));
    thaw.args(["goblin", "thaw", "--images"]).arg(dir.path());
    let err = failed(&run(thaw, b""), "thaw of a directory without goblin.json");
    assert!(err.contains("goblin.json"), "{err}");
    mark.assert_running(&[], "the thaw of a directory without goblin.json");

    let gone = dir.path().join("no-such-images");
    let mut thaw = mark.on(pf(&store_dir));
    thaw.args(["goblin", "thaw", "--images"]).arg(&gone);
    let err = failed(&run(thaw, b""), "thaw of a directory that is not there");
    assert!(
        err.contains(&format!(
            "cannot open the images directory {}: No such file",
            gone.display()
        )),
        "{err}"
    );
}

#[test]
fn a_mistyped_name_gets_the_name_it_is_a_typo_of() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let store = pf_core::FsBlobStore::open(&store_dir).expect("store");
    let blob = store.put(b"anything").expect("put");
    store.set_name("counter", &blob).expect("name");
    for args in [
        &["goblin", "thaw", "countr"][..],
        &["goblin", "fork", "countr", "--send", "x"],
        &["store", "show", "countr"],
        &["store", "cat", "countr"],
        &["push", "countr", "127.0.0.1:1/r:t"],
    ] {
        let mut cmd = pf(&store_dir);
        cmd.args(args);
        let err = failed(&run(cmd, b""), &args.join(" "));
        assert!(err.contains("did you mean \"counter\"?"), "{args:?}: {err}");
    }
    let mut cmd = pf(&store_dir);
    cmd.args(["goblin", "thaw", "nosuchname"]);
    let err = failed(&run(cmd, b""), "thaw of a stranger");
    assert!(!err.contains("did you mean"), "{err}");
}

#[test]
fn a_pidfile_that_no_longer_names_its_copy_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    // Built first (the first use may build it), so the sleeper's life covers every freeze.
    let _ = crate::support::pf_bin();
    let mut sleeper = Command::new("sleep");
    sleeper
        .arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = spawn_clean(&mut sleeper).expect("start sleep");
    let pid = i32::try_from(child.id()).expect("pid");
    let guard = KillOnDrop(pid);
    let freeze = |file: &Path| {
        let mut cmd = pf(&store);
        cmd.args(["goblin", "freeze", "--pidfile"]).arg(file);
        run(cmd, b"")
    };
    // Left by a thaw killed an hour ago: the process now at that pid started after it.
    let stale = dir.path().join("stale.pid");
    std::fs::write(&stale, format!("{pid}\n")).expect("write");
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .and_then(|f| f.set_modified(hour_ago))
        .expect("age the pidfile");
    let err = failed(&freeze(&stale), "freeze --pidfile of a stale file");
    assert!(err.contains("is stale"), "{err}");
    assert!(
        err.contains(&format!("process {pid} started after")),
        "{err}"
    );
    assert_eq!(
        pf_os::proc::pid_state(pid),
        pf_os::proc::PidState::Alive,
        "the stranger at that pid is left alone"
    );
    // Written just now for this very process: not refused as stale (it is no goblin, though).
    let fresh = dir.path().join("fresh.pid");
    std::fs::write(&fresh, format!("{pid}\n")).expect("write");
    let err = text(&freeze(&fresh).stderr);
    assert!(
        !err.contains("stale") && !err.contains("has ended"),
        "{err}"
    );
    // A copy gone, and a file that holds no pid.
    let ended = dir.path().join("ended.pid");
    let dead = pf_world_procs::test_support::dead_pid();
    std::fs::write(&ended, format!("{dead}\n")).expect("write");
    let err = failed(&freeze(&ended), "freeze --pidfile of an ended copy");
    assert!(err.contains("which has ended"), "{err}");
    let junk = dir.path().join("junk.pid");
    std::fs::write(&junk, "hello\n").expect("write");
    let err = failed(&freeze(&junk), "freeze --pidfile of a file without a pid");
    assert!(err.contains("does not hold a pid"), "{err}");
    drop(guard);
    let _ = child.try_wait();
}

#[test]
fn fork_of_an_unknown_snapshot_fails_before_it_reads_its_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    pf_core::FsBlobStore::open(&store_dir).expect("store");
    // No --send: the copies' input is pf's stdin, here a pipe that stays open (as a terminal
    // does until Ctrl-D). A mistyped name must not wait for its end.
    let mut fork = pf(&store_dir);
    fork.args(["goblin", "fork", "nosuchname", "-n", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = fork.spawn().expect("start pf");
    let stdin_open = child.stdin.take();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for pf") {
            break status;
        }
        if Instant::now() >= end {
            child.kill().expect("kill pf");
            child.wait().expect("reap pf");
            panic!("pf goblin fork of an unknown name still waits for its stdin to end");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin_open);
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert!(err.contains("no snapshot \"nosuchname\""), "{err}");
}

/// Says `ready`, then prints where its stdin, stdout and stderr lead, once per line of input.
const FDS: &str = r#"
import os, sys
print("ready")
for line in sys.stdin:
    print(" ".join(os.readlink("/proc/self/fd/%d" % fd) for fd in range(3)))
"#;

#[test]
fn live_thaw_hands_pipes_straight_to_the_goblin_and_pumps_the_rest() {
    if !live("live_thaw_hands_pipes_straight_to_the_goblin_and_pumps_the_rest") {
        return;
    }
    use std::os::fd::AsRawFd as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    ok(
        &spawn_goblin(&store, "fds", &["--until", "^ready$"], &py(FDS)),
        "spawn",
    );
    let err_file = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
    let mut cmd = pf(&store);
    cmd.args(["goblin", "thaw", "fds"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err_file);
    let mut child = cmd.spawn().expect("start pf");
    let _guard = KillOnDrop(i32::try_from(child.id()).expect("pid"));
    let ino = |fd: i32| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .expect("stat a pipe")
            .ino()
    };
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (in_ino, out_ino) = (ino(stdin.as_raw_fd()), ino(stdout.as_raw_fd()));
    writeln!(stdin, "where").expect("write");
    drop(stdin);
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next().expect("an answer").expect("read");
    let fds: Vec<&str> = line.split(' ').collect();
    assert_eq!(fds.len(), 3, "{line}");
    assert_eq!(fds[0], format!("pipe:[{in_ino}]"), "stdin passed through");
    assert_eq!(fds[1], format!("pipe:[{out_ino}]"), "stdout passed through");
    assert!(
        fds[2].starts_with("pipe:[") && !fds[2].contains("stderr"),
        "a file is pumped through a pipe of pf's: {line}"
    );
    assert!(lines.next().is_none(), "end of input ends the goblin");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// The direct children of `pid` (all its threads'), from `/proc`.
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn live_a_killed_thaw_takes_its_goblin_along() {
    if !live("live_a_killed_thaw_takes_its_goblin_along") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    ok(
        &spawn_goblin(&store, "counter", &["--quiet-ms", "300"], &py(COUNTER)),
        "spawn",
    );
    // pf's scratch (extracted images, criu's work dirs) goes here, so what the killed pf leaves
    // is ours to look at and goes with `dir`.
    let scratch = dir.path().join("tmp");
    std::fs::create_dir(&scratch).expect("mkdir");
    // Our stdin pipe goes to the goblin itself and stays open: only pf's death can end it.
    let mut cmd = pf(&store);
    cmd.env("TMPDIR", &scratch)
        .args(["goblin", "thaw", "counter"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start pf");
    let pf_pid = i32::try_from(child.id()).expect("pid");
    let _guard = KillOnDrop(pf_pid);
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    writeln!(stdin, "inc").expect("write");
    assert_eq!(lines.next().expect("an answer").expect("read"), "1");
    let init = children_of(pf_pid)
        .into_iter()
        .find(|&p| comm(p) == "pf-ns-init")
        .expect("pf's namespace init");
    let _guard_init = KillOnDrop(init);
    let tree: Vec<i32> = children_of(init);
    assert!(!tree.is_empty(), "the goblin runs under the init");

    child.kill().expect("SIGKILL pf");
    child.wait().expect("reap pf");
    for pid in std::iter::once(init).chain(tree.iter().copied()) {
        assert!(
            exited(pid),
            "{pid} ({}) outlived the pf that was killed",
            comm(pid)
        );
    }
    drop(stdin);
    // Whatever extracted images the killed pf left (it may have died before removing them) go
    // with the next pf that extracts.
    let mut again = pf(&store);
    again
        .env("TMPDIR", &scratch)
        .args(["goblin", "thaw", "counter"]);
    let again = run(again, b"inc\n");
    assert_eq!(ok(&again, "a thaw after the killed one"), "1\neof 1\n");
    let left: Vec<String> = std::fs::read_dir(&scratch)
        .expect("list the scratch directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("pf-restore-{pf_pid}-")))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "images left by the killed pf");
}

/// Issue 15 item 2: `pf goblin spawn --tag` racing `pf store gc --grace 0` in a loop left dangling
/// tags (6 of 6): gc removed the dump or the procs blob between the freeze and the name. Spawn
/// holds the store's writer lock from the freeze to the name and gc waits for it: every tag points
/// at a procs blob whose dump exists, and every snapshot still thaws.
#[test]
fn live_goblin_spawns_racing_gc_leave_no_dangling_tag() {
    if !live("live_goblin_spawns_racing_gc_leave_no_dangling_tag") {
        return;
    }
    let _deadline = Deadline::start(
        "live_goblin_spawns_racing_gc_leave_no_dangling_tag",
        Duration::from_secs(240),
    );
    let mark = Mark::new("spawn-gc-race");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    // There from the start: a gc of a store that is not there yet is an error.
    pf_core::FsBlobStore::open(&store).expect("store");
    let done = std::sync::atomic::AtomicBool::new(false);
    let spawns = 4;
    std::thread::scope(|scope| {
        let gc = scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let mut cmd = pf(&store);
                cmd.args(["store", "gc", "--grace", "0"]);
                ok(&run(cmd, b""), "gc --grace 0");
            }
        });
        let results: Vec<Output> = (0..spawns)
            .map(|i| {
                let mut cmd = pf(&store);
                cmd.args([
                    "goblin",
                    "spawn",
                    "--tag",
                    &format!("g{i}"),
                    "--until",
                    "^ready$",
                ])
                // Exits a moment after answering: a goblin that exits at once is issue 15 item 1's.
                .args([
                    "--",
                    "sh",
                    "-c",
                    "echo ready; read x; echo \"got $x\"; sleep 1",
                ]);
                run(mark.on(cmd), b"")
            })
            .collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        gc.join().expect("gc loop");
        for (i, out) in results.iter().enumerate() {
            ok(out, &format!("spawn g{i}"));
        }
    });
    let s = pf_core::FsBlobStore::open(&store).expect("open store");
    let names = s.names().expect("names");
    assert_eq!(names.len(), spawns, "{names:?}");
    let mut verify = pf(&store);
    verify.args(["store", "verify"]);
    let report = ok(&run(verify, b""), "verify");
    assert!(!report.contains("BAD"), "{report}");
    for (name, digest) in &names {
        let procs: serde_json::Value =
            serde_json::from_slice(&s.get(digest).expect("procs blob")).expect("procs JSON");
        let dump: pf_core::Digest256 = procs["criu_dump"]
            .as_str()
            .expect("criu_dump")
            .parse()
            .expect("digest");
        assert!(
            s.contains(&dump).expect("contains"),
            "{name}: dump {dump} removed"
        );
        let out = thaw(&store, name, b"still here\n");
        assert_eq!(
            text(&out.stdout),
            "got still here\n",
            "{name}: {}",
            text(&out.stderr)
        );
    }
    mark.assert_running(&[], "the thaws");
}

#[test]
fn live_a_goblin_that_exits_at_once_after_thaw_delivers_its_output() {
    if !live("live_a_goblin_that_exits_at_once_after_thaw_delivers_its_output") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let out = spawn_goblin(&store, "catg", &["--quiet-ms", "200"], &["cat".to_owned()]);
    ok(&out, "spawn cat");
    // `echo hi | pf goblin thaw catg > out`: the input is all there, so cat writes it and
    // exits at once, possibly before criu is done; that is a success with cat's status and
    // every byte it wrote (it was `RestoredDied`, rc 1, out empty).
    for (round, stdout_is_a_file) in [(0, true), (1, true), (2, false), (3, true)] {
        let out_path = dir.path().join(format!("out{round}"));
        let mut cmd = thaw_cmd(&store, "catg");
        cmd.stdin(Stdio::piped()).stderr(Stdio::piped());
        if stdout_is_a_file {
            cmd.stdout(std::fs::File::create(&out_path).expect("out file"));
        } else {
            cmd.stdout(Stdio::piped());
        }
        let got = finish(cmd.spawn().expect("pf goblin thaw"), b"hi\n");
        let printed = if stdout_is_a_file {
            std::fs::read(&out_path).expect("read out")
        } else {
            got.stdout.clone()
        };
        assert_eq!(
            (got.status.code(), text(&printed)),
            (Some(0), "hi\n".to_owned()),
            "round {round}: {}",
            text(&got.stderr)
        );
    }
}

#[test]
fn live_what_a_killed_pf_left_in_tmpdir_is_swept_by_the_next_thaw() {
    if !live("live_what_a_killed_pf_left_in_tmpdir_is_swept_by_the_next_thaw") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir tmp");
    let out = spawn_goblin(&store, "catg", &["--quiet-ms", "200"], &["cat".to_owned()]);
    ok(&out, "spawn cat");
    // What a pf SIGKILLed (or SIGTERMed) during `criu restore` leaves: criu's work dir and the
    // extracted images, named after its pid, unlocked.
    let dead_pid = pf_world_procs::test_support::dead_pid();
    let left = [
        tmp.join(format!("pf-criu-restore-{dead_pid}-abcdef")),
        tmp.join(format!("pf-restore-{dead_pid}-abcdef")),
    ];
    for d in &left {
        std::fs::create_dir(d).expect("mkdir");
        std::fs::write(d.join("criu.log"), b"x").expect("write");
    }
    let mut cmd = thaw_cmd(&store, "catg");
    cmd.env("TMPDIR", &tmp);
    let got = run(cmd, b"hi\n");
    assert_eq!(ok(&got, "thaw"), "hi\n");
    for d in &left {
        assert!(!d.exists(), "{} is swept", d.display());
    }
    let rest: Vec<_> = std::fs::read_dir(&tmp)
        .expect("ls tmp")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(rest.is_empty(), "a good thaw leaves nothing: {rest:?}");
}

/// `kill -SIG PID`, for a process this test started.
fn send_signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// Issue 15 item 3: a descendant that called setsid keeps the goblin's stdout and stderr open
/// after the freeze. `pf goblin spawn` used to wait for it (15 s, or forever) and ignore Ctrl-C;
/// now it drains for --drain-ms, names who holds the pipes, and obeys SIGINT at every stage.
#[test]
fn live_spawn_drains_with_a_deadline_names_what_holds_its_output_and_obeys_sigint() {
    if !live("live_spawn_drains_with_a_deadline_names_what_holds_its_output_and_obeys_sigint") {
        return;
    }
    let _deadline = Deadline::start(
        "live_spawn_drains_with_a_deadline_names_what_holds_its_output_and_obeys_sigint",
        Duration::from_secs(180),
    );
    let mark = Mark::new("spawn-setsid");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let detached: Vec<String> = ["bash", "-c", "(setsid sleep 120 &); echo ready; exec cat"]
        .map(String::from)
        .to_vec();
    // Kills whatever this test left running (the setsid sleeps), by pid, when it ends.
    let sweep =
        |mark: &Mark| -> Vec<KillOnDrop> { mark.running().into_iter().map(KillOnDrop).collect() };

    // 1. The drain ends after --drain-ms, and pf says who holds the pipes.
    let mut cmd = pf(&store);
    cmd.args(["goblin", "spawn", "--tag", "bg", "--until", "^ready$"])
        .args(["--drain-ms", "500", "--"])
        .args(&detached);
    let started = Instant::now();
    let out = run(mark.on(cmd), b"");
    let took = started.elapsed();
    let holders = mark.running();
    let _guards = sweep(&mark);
    let digest = ok(&out, "spawn with a setsid descendant");
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert!(took < Duration::from_secs(30), "spawn took {took:?}");
    assert_eq!(holders.len(), 1, "one setsid sleep: {holders:?}");
    assert_eq!(comm(holders[0]), "sleep");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "held open 500 ms after the freeze by pid {} (sleep)",
            holders[0]
        )),
        "{err}"
    );
    drop(_guards);

    // 2. SIGINT during the drain: pf ends at once; the snapshot is complete and named.
    let mut cmd = pf(&store);
    cmd.args(["goblin", "spawn", "--tag", "bg2", "--until", "^ready$"])
        .args(["--drain-ms", "120000", "--"])
        .args(&detached)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = mark.on(cmd).spawn().expect("start pf");
    let pf_pid = child.id();
    let fs = pf_core::FsBlobStore::open(&store).expect("store");
    let named = Instant::now();
    while fs.get_name("bg2").is_err() {
        assert!(named.elapsed() < DEADLINE, "spawn never named bg2");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The name is set before the drain starts; give pf a moment to be in it.
    std::thread::sleep(Duration::from_millis(200));
    let interrupted = Instant::now();
    send_signal(pf_pid, "INT");
    let out = finish(child, b"");
    let _guards = sweep(&mark);
    assert!(
        interrupted.elapsed() < Duration::from_secs(10),
        "pf took {:?} to obey SIGINT",
        interrupted.elapsed()
    );
    let digest = ok(&out, "spawn interrupted while draining");
    assert_eq!(
        digest.trim(),
        fs.get_name("bg2").expect("named").to_string(),
        "the snapshot was kept and printed"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("interrupted by signal 2 after the snapshot was complete"),
        "{err}"
    );
    drop(_guards);

    // 3. SIGINT while waiting to be warm: the command is stopped, pf fails saying so, with
    //    exit status 130.
    let mut cmd = pf(&store);
    cmd.args([
        "goblin", "spawn", "--tag", "bg3", "--until", "^never$", "--",
    ])
    .args(["sh", "-c", "echo waiting; exec cat"])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = mark.on(cmd).spawn().expect("start pf");
    let pf_pid = child.id();
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read");
    assert_eq!(line, "waiting\n", "the goblin is up");
    let interrupted = Instant::now();
    send_signal(pf_pid, "INT");
    let out = finish(child, b"");
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("read");
    assert!(interrupted.elapsed() < Duration::from_secs(10));
    assert_eq!(
        out.status.code(),
        Some(130),
        "128 + SIGINT, as a shell says: {rest}"
    );
    assert!(rest.contains("cancelled by signal 2; goblin"), "{rest}");
    assert!(rest.contains("has been stopped"), "{rest}");
    mark.assert_running(&[], "a spawn interrupted while warming up");
    assert!(fs.get_name("bg3").is_err(), "nothing was named");
}

/// Issue 15 item 7: `spawn` checks that criu can be used before it starts (and warms up) the
/// command.
#[test]
fn spawn_checks_criu_before_starting_the_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("started");
    let mut cmd = pf(&dir.path().join("store"));
    cmd.env("PF_CRIU", dir.path().join("no-such-criu"))
        .args(["goblin", "spawn", "--tag", "t", "--quiet-ms", "100", "--"])
        .args(["sh", "-c", &format!("touch {}; exec cat", marker.display())]);
    let err = failed(&run(cmd, b""), "spawn without a usable criu");
    assert!(
        err.contains("cannot freeze goblins on this machine"),
        "{err}"
    );
    assert!(err.contains("PF_CRIU"), "{err}");
    assert!(
        !marker.exists(),
        "the command was started before criu was checked"
    );
}

/// Issue 15 item 7: pid 2 (kthreadd) is named as a kernel thread, not described by its stdio.
#[test]
#[allow(clippy::print_stderr)]
fn freeze_names_a_kernel_thread_as_one() {
    let comm2 = std::fs::read_to_string("/proc/2/comm").unwrap_or_default();
    if comm2.trim() != "kthreadd" {
        // In a pid namespace of its own, pid 2 is an ordinary process: nothing to check here.
        eprintln!("pid 2 is not kthreadd here ({comm2:?}); skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = pf(&dir.path().join("store"));
    cmd.args(["goblin", "freeze", "--pid", "2"]);
    let err = failed(&run(cmd, b""), "freeze of pid 2");
    assert!(
        err.contains("process 2 is a kernel thread (kthreadd), not a program"),
        "{err}"
    );
    assert!(!err.contains("stdin is"), "{err}");
}

/// Issue 15 item 7: `pf procs restore` of a goblin snapshot no longer reports success while the
/// goblin exits at once; it says what happened and points at `pf goblin thaw`.
#[test]
fn live_procs_restore_of_a_goblin_snapshot_says_it_is_one() {
    if !live("live_procs_restore_of_a_goblin_snapshot_says_it_is_one") {
        return;
    }
    let _deadline = Deadline::start(
        "live_procs_restore_of_a_goblin_snapshot_says_it_is_one",
        Duration::from_secs(120),
    );
    let mark = Mark::new("procs-restore-goblin");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let cat: Vec<String> = vec!["cat".into()];
    ok(
        &run(
            mark.on({
                let mut c = pf(&store);
                c.args([
                    "goblin",
                    "spawn",
                    "--tag",
                    "catg",
                    "--quiet-ms",
                    "200",
                    "--",
                ])
                .args(&cat);
                c
            }),
            b"",
        ),
        "spawn cat",
    );
    let mut restore = pf(&store);
    restore.args(["procs", "restore", "--new-pidns", "catg"]);
    let out = run(mark.on(restore), b"");
    let err = failed(&out, "procs restore of a goblin whose stdin leads nowhere");
    assert!(err.contains("catg is a goblin snapshot"), "{err}");
    assert!(err.contains("pf goblin thaw catg"), "{err}");
    mark.assert_running(&[], "the failed restore");

    // A goblin that survives without its pipes is restored, with the same note.
    let sleeper: Vec<String> = ["sh", "-c", "sleep 120; cat"].map(String::from).to_vec();
    ok(
        &run(
            mark.on({
                let mut c = pf(&store);
                c.args(["goblin", "spawn", "--tag", "sl", "--quiet-ms", "200", "--"])
                    .args(&sleeper);
                c
            }),
            b"",
        ),
        "spawn sleeper",
    );
    let mut restore = pf(&store);
    restore.args(["procs", "restore", "--new-pidns", "--json", "sl"]);
    let out = run(mark.on(restore), b"");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&out, "procs restore of a sleeping goblin")).expect("json");
    let init = i32::try_from(json["init"].as_i64().expect("init")).expect("pid");
    let _init = KillOnDrop(init);
    let err = text(&out.stderr);
    assert!(err.contains("sl is a goblin snapshot"), "{err}");
    assert!(err.contains("pf goblin thaw sl"), "{err}");
    drop(_init);
    mark.assert_running(&[], "killing the restored namespace");
}

/// Issue 10 item 6: a goblin started as Python's
/// `subprocess.Popen(..., stdin=PIPE, stdout=PIPE, stderr=DEVNULL, start_new_session=True)`
/// freezes, thaws, and answers from its state.
#[test]
fn live_a_popen_goblin_with_stderr_on_dev_null_freezes_thaws_and_answers() {
    if !live("live_a_popen_goblin_with_stderr_on_dev_null_freezes_thaws_and_answers") {
        return;
    }
    let _deadline = Deadline::start(
        "live_a_popen_goblin_with_stderr_on_dev_null_freezes_thaws_and_answers",
        Duration::from_secs(120),
    );
    let mark = Mark::new("popen-devnull");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    // The seed's way to start a goblin, line for line; it freezes it with pf and checks that the
    // original still answers.
    let driver = r#"
import subprocess, sys
pf, store, counter = sys.argv[1], sys.argv[2], sys.argv[3]
p = subprocess.Popen([sys.executable, "-u", "-c", counter], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
def ask(line):
    p.stdin.write(line.encode() + b"\n"); p.stdin.flush()
    return p.stdout.readline().decode().strip()
print("first", ask("inc"), ask("set k=v"))
r = subprocess.run([pf, "--store", store, "goblin", "freeze", "--pid", str(p.pid), "--tag", "popen",
                    "--json"], capture_output=True, text=True)
print("freeze", r.returncode, r.stdout.strip(), r.stderr.strip().replace("\n", " | "))
print("after", ask("inc"))
p.kill(); p.wait()
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", driver])
        .arg(crate::support::pf_bin())
        .arg(&store)
        .arg(COUNTER)
        .current_dir("/");
    let out = run(mark.on(cmd), b"");
    let said = ok(&out, "the Popen driver");
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines[0], "first 1 ok", "{said}");
    let freeze = lines[1]
        .strip_prefix("freeze 0 ")
        .unwrap_or_else(|| panic!("{said}"));
    let json: serde_json::Value = serde_json::from_str(freeze).expect("freeze json");
    assert!(
        json["stdio"][0]
            .as_str()
            .is_some_and(|s| s.starts_with("pipe:[")),
        "{json}"
    );
    assert!(
        json["stdio"][1]
            .as_str()
            .is_some_and(|s| s.starts_with("pipe:[")),
        "{json}"
    );
    assert_eq!(json["stdio"][2], "/dev/null", "{json}");
    assert_eq!(
        lines[2], "after 2",
        "the original answers after the freeze: {said}"
    );
    mark.assert_running(&[], "the driver");

    let out = thaw(&store, "popen", b"inc\nget k\n");
    assert_eq!(ok(&out, "thaw of the Popen goblin"), "2\nv\neof 2\n");
    let out = thaw(&store, "popen", b"inc\ninc\ninc\n");
    assert_eq!(ok(&out, "a second thaw"), "2\n3\n4\neof 4\n");
    mark.assert_running(&[], "two thaws");
}

/// A goblin whose stderr is a log file (opened for writing, not appending: CRIU then records
/// its size and reopens it only while it still has that size). A thaw reopens the file as it
/// was while it can; once the file changed since the freeze, or is gone, a thaw gets a pipe
/// there instead (pf passes it on to its own stderr) and says so, rather than fail in CRIU with
/// "has bad size", and the log is left as it was.
#[test]
fn live_a_goblin_logging_to_a_file_thaws_after_the_file_changed_or_went() {
    let name = "live_a_goblin_logging_to_a_file_thaws_after_the_file_changed_or_went";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let log = dir.path().join("goblin.log");
    let script = r#"
import sys
print("ready", flush=True)
for line in sys.stdin:
    sys.stderr.write("log " + line)
    sys.stderr.flush()
    print("echo " + line.strip(), flush=True)
"#;
    let mut cmd = goblin_cmd(script);
    cmd.stderr(std::fs::File::create(&log).expect("log file"));
    let mut goblin = start_cmd(cmd);
    assert_eq!(goblin.line(), "ready");
    let mut freeze = pf(&store);
    freeze.args(["goblin", "freeze", "--pid", &goblin.pid(), "--tag", "g"]);
    ok(&run(freeze, b""), "freeze");
    let read_log = || std::fs::read_to_string(&log).expect("read log");

    // A fork: its copies cannot each reopen the log as it was (the first one's writes change
    // its size, which CRIU checks for the next), so each gets a pipe, passed on to pf's stderr.
    let mut fork = pf(&store);
    fork.args(["goblin", "fork", "g", "-n", "3", "--send", "f{i}"]);
    let out = run(fork, b"");
    assert_eq!(
        ok(&out, "fork onto the unchanged log"),
        "[1] echo f1\n[2] echo f2\n[3] echo f3\n"
    );
    let stderr = text(&out.stderr);
    for i in 1..=3 {
        assert!(stderr.contains(&format!("[{i}] log f{i}\n")), "{stderr}");
    }
    assert!(
        stderr.contains("which the copies of a fork cannot each reopen as it was"),
        "{stderr}"
    );
    assert_eq!(read_log(), "", "the log is left alone");

    // The file as it was at the freeze: the copy reopens it and logs into it.
    let out = thaw(&store, "g", b"a\n");
    assert_eq!(ok(&out, "thaw onto the unchanged log"), "echo a\n");
    assert!(
        !text(&out.stderr).contains("new pipe"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(read_log(), "log a\n");

    // Changed since the freeze (CRIU would refuse it): a pipe, passed on to pf's stderr.
    let out = thaw(&store, "g", b"b\n");
    assert_eq!(ok(&out, "thaw after the log changed"), "echo b\n");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("log b\n"),
        "the copy's stderr reaches pf's: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "stderr was {}, which has changed since the freeze (0 bytes then, 6 now)",
            log.display()
        )),
        "pf says why: {stderr}"
    );
    assert_eq!(read_log(), "log a\n", "the log is left alone");

    // Gone: the same.
    std::fs::remove_file(&log).expect("remove log");
    let out = thaw(&store, "g", b"c\n");
    assert_eq!(ok(&out, "thaw after the log went"), "echo c\n");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("log c\n"), "{stderr}");
    assert!(stderr.contains("which is gone"), "{stderr}");
    assert!(!log.exists(), "the thaw made no file where the log was");

    // The original runs on.
    goblin.send("x");
    assert_eq!(goblin.line(), "echo x");
}

/// A goblin that keeps a data file open and a file mapped (`mmap`, as
/// `multiprocessing.shared_memory` maps its file in /dev/shm): CRIU keeps only their names and
/// sizes and reopens them by path, refusing one that is gone or changed ("has bad size",
/// "Can't open file"). Once the data file grew, or both went, pf refuses the thaw before CRIU
/// runs and names each file and what changed; put back as they were, the thaw answers again.
#[test]
fn live_a_thaw_names_the_open_files_that_changed_or_went_since_the_freeze() {
    let name = "live_a_thaw_names_the_open_files_that_changed_or_went_since_the_freeze";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let data = dir.path().join("data.csv");
    let shared = dir.path().join("shared.bin");
    std::fs::write(&data, b"a,1\n").expect("write data");
    std::fs::write(&shared, [7u8; 4096]).expect("write shared");
    let script = format!(
        r#"
import mmap, sys
data = open({data:?})
shared_file = open({shared:?}, "r+b")
shared = mmap.mmap(shared_file.fileno(), 4096)
print("ready", flush=True)
for line in sys.stdin:
    data.seek(0)
    print(data.readline().strip(), shared[0], flush=True)
"#,
        data = data.display().to_string(),
        shared = shared.display().to_string(),
    );
    let mut cmd = goblin_cmd(&script);
    cmd.stderr(Stdio::null());
    let mut goblin = start_cmd(cmd);
    assert_eq!(goblin.line(), "ready");
    goblin.freeze_and_kill(&store, "g");

    let out = thaw(&store, "g", b"q\n");
    assert_eq!(ok(&out, "thaw onto the unchanged files"), "a,1 7\n");

    std::fs::write(&data, b"a,1\nb,2\n").expect("grow data");
    let out = thaw(&store, "g", b"q\n");
    assert!(!out.status.success(), "a thaw onto a changed file fails");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the goblin had open {}, which has changed since the freeze (4 bytes then, 8 now)",
            data.display()
        )),
        "pf names the file and what changed: {stderr}"
    );
    assert!(stderr.contains("put the files back"), "{stderr}");
    assert!(!stderr.contains("criu restore failed"), "{stderr}");

    std::fs::remove_file(&data).expect("remove data");
    std::fs::remove_file(&shared).expect("remove shared");
    let stderr = text(&thaw(&store, "g", b"q\n").stderr);
    for gone in [&data, &shared] {
        assert!(
            stderr.contains(&format!("{}, which is gone", gone.display())),
            "pf names every file that went: {stderr}"
        );
    }

    std::fs::write(&data, b"a,9\n").expect("put data back");
    std::fs::write(&shared, [8u8; 4096]).expect("put shared back");
    let out = thaw(&store, "g", b"q\n");
    assert_eq!(ok(&out, "thaw onto files of the same size"), "a,9 8\n");
}

/// A goblin listening on a localhost TCP port: CRIU restores each copy's socket bound to that
/// same address (while another listens there), and the kernel hands each connection to any one
/// of them, so a copy that connects to "its" port may wait forever on another's. One thaw says
/// nothing; a fork says which address the copies share and what to do.
#[test]
fn live_a_fork_of_a_goblin_listening_on_tcp_says_the_copies_share_its_port() {
    let name = "live_a_fork_of_a_goblin_listening_on_tcp_says_the_copies_share_its_port";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let script = r#"
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print("ready", s.getsockname()[1], flush=True)
for line in sys.stdin:
    print("port", s.getsockname()[1], flush=True)
"#;
    let mut cmd = goblin_cmd(script);
    cmd.stderr(Stdio::null());
    let mut goblin = start_cmd(cmd);
    let ready = goblin.line();
    let port = ready.strip_prefix("ready ").expect("ready PORT").to_owned();
    goblin.freeze_and_kill(&store, "g");

    let out = thaw(&store, "g", b"q\n");
    assert_eq!(ok(&out, "thaw"), format!("port {port}\n"));
    assert!(
        !text(&out.stderr).contains("listens on TCP"),
        "one copy shares nothing: {}",
        text(&out.stderr)
    );

    let mut fork = pf(&store);
    fork.args(["goblin", "fork", "g", "-n", "2", "--send", "q"]);
    let out = run(fork, b"");
    let stdout = ok(&out, "fork");
    assert_eq!(
        stdout.matches(&format!("port {port}")).count(),
        2,
        "{stdout}"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the goblin listens on TCP 127.0.0.1:{port}: every copy listens on that same address"
        )),
        "pf says the copies share the port: {stderr}"
    );
    assert_eq!(
        stderr.matches("listens on TCP").count(),
        1,
        "said once: {stderr}"
    );
}

/// A goblin mapping a file shared and writable (here one in /dev/shm, as shared-memory
/// segments are): CRIU maps that same file again in every copy, so what one copy writes the
/// others see. One thaw says nothing; a fork says which file the copies share, once.
#[test]
fn live_a_fork_of_a_goblin_mapping_a_file_shared_says_the_copies_share_it() {
    let name = "live_a_fork_of_a_goblin_mapping_a_file_shared_says_the_copies_share_it";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    // Removed with `dir`'s guard below, whatever happens.
    let shm = tempfile::Builder::new()
        .prefix("pf-test-shm-")
        .tempfile_in("/dev/shm")
        .expect("a file in /dev/shm");
    shm.as_file().set_len(4096).expect("size it");
    let path = shm.path().display().to_string();
    let script = r#"
import mmap, os, sys
m = mmap.mmap(os.open(sys.argv[1], os.O_RDWR), 4096, mmap.MAP_SHARED)
print("ready", flush=True)
for line in sys.stdin:
    m[0] += 1
    print("count", m[0], flush=True)
"#;
    let mut cmd = pf(&store);
    cmd.args(["goblin", "spawn", "--tag", "g", "--until", "^ready$", "--"])
        .args(py(script))
        .arg(&path);
    ok(&run(cmd, b""), "spawn");

    let out = thaw(&store, "g", b"q\n");
    assert_eq!(ok(&out, "thaw"), "count 1\n");
    assert!(
        !text(&out.stderr).contains("shared and writable"),
        "one copy shares nothing: {}",
        text(&out.stderr)
    );

    let mut fork = pf(&store);
    fork.args(["goblin", "fork", "g", "-n", "2", "--send", "q"]);
    let out = run(fork, b"");
    let stdout = ok(&out, "fork");
    // The first thaw wrote 1; the two copies counted on from there, in the one file (at once:
    // 2 and 3, or 2 and 2 when both read before either wrote). A copy of its own would say 1.
    let counts: Vec<&str> = stdout
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(counts.len(), 2, "{stdout}");
    assert!(counts.iter().all(|c| ["2", "3"].contains(c)), "{stdout}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the goblin maps {path} shared and writable: every copy maps that same file"
        )),
        "pf says the copies share the file: {stderr}"
    );
    assert_eq!(
        stderr.matches("shared and writable").count(),
        1,
        "said once: {stderr}"
    );
}

/// A goblin holding a `multiprocessing.Manager()`: its server process listens on a unix socket
/// in a `pymp-…` directory that Python removes when the server exits. The goblin frozen and
/// killed, a first thaw answers and, as it ends, removes that directory; CRIU could then bind
/// the socket in no later thaw ("Can't bind … No such file"). pf refuses before CRIU runs and
/// names the directory; made again, the thaw answers from the manager's state.
#[test]
fn live_a_thaw_names_the_gone_directory_of_a_unix_socket_the_goblin_listens_on() {
    let name = "live_a_thaw_names_the_gone_directory_of_a_unix_socket_the_goblin_listens_on";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let script = r#"
import multiprocessing as mp, os, sys
m = mp.Manager()
d = m.dict()
d["a"] = 41
print("ready", os.path.dirname(m.address), flush=True)
for line in sys.stdin:
    print(d["a"] + 1, flush=True)
"#;
    let mut cmd = goblin_cmd(script);
    cmd.env("TMPDIR", dir.path()).stderr(Stdio::null());
    let mut goblin = start_cmd(cmd);
    let ready = goblin.line();
    let pymp = std::path::PathBuf::from(ready.strip_prefix("ready ").expect("ready DIR"));
    assert!(pymp.starts_with(dir.path()), "{}", pymp.display());
    goblin.freeze_and_kill(&store, "g");

    let out = thaw(&store, "g", b"q\n");
    assert_eq!(ok(&out, "a first thaw"), "42\n");
    assert!(
        !pymp.exists(),
        "the copy's manager removed its directory as it ended"
    );

    let out = thaw(&store, "g", b"q\n");
    assert!(!out.status.success(), "no socket can be bound there");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "is a unix socket it listens on, in {} which is gone (create that directory again)",
            pymp.display()
        )),
        "pf names the directory: {stderr}"
    );
    assert!(!stderr.contains("criu restore failed"), "{stderr}");

    std::fs::create_dir(&pymp).expect("make the directory again");
    let out = thaw(&store, "g", b"q\n");
    assert_eq!(ok(&out, "a thaw once the directory is back"), "42\n");
}

/// A `criu` for `$PF_CRIU` that holds every restore once it has rebuilt the tree, before the
/// tree runs (an action script that sleeps at CRIU's `post-restore`), and runs the real criu
/// for anything else: a thaw stays mid-restore, with criu, the namespace init and the
/// half-restored copy all there, until it is interrupted, however loaded the machine is.
fn holding_criu(dir: &Path) -> std::path::PathBuf {
    criu_with_action_script(
        dir,
        "restore",
        "[ \"$CRTOOLS_SCRIPT_ACTION\" = post-restore ] && exec sleep 120\nexit 0\n",
    )
}

/// A `criu` for `$PF_CRIU` that runs the real criu with the action script `script` (the body of
/// a shell script, in `dir`) added to its `command` (`dump`, `restore`), and as it is otherwise.
fn criu_with_action_script(dir: &Path, command: &str, script: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let criu = pf_world_procs::probe()
        .criu()
        .expect("a working criu")
        .path
        .clone();
    let hold = dir.join("hold.sh");
    std::fs::write(&hold, format!("#!/bin/sh\n{script}")).expect("write the action script");
    let wrapper = dir.join("criu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n{command}) exec {criu} \"$@\" --action-script {hold} ;;\n\
             *) exec {criu} \"$@\" ;;\nesac\n",
            criu = criu.display(),
            hold = hold.display()
        ),
    )
    .expect("write the criu wrapper");
    for f in [&hold, &wrapper] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    wrapper
}

/// A `pf goblin freeze --kill` SIGKILLed while criu dumps (held at CRIU's `post-dump` by an
/// action script, so the kill lands there however loaded the machine is): criu finishes without
/// pf and leaves the goblin stopped (`--leave-stopped`, for pf to kill once the snapshot is
/// stored). pf's guard process lets it run on: it used to stay stopped for good.
#[test]
fn live_a_freeze_killed_mid_dump_lets_the_goblin_run_on() {
    const NAME: &str = "live_a_freeze_killed_mid_dump_lets_the_goblin_run_on";
    if !live(NAME) {
        return;
    }
    let deadline = Deadline::start(NAME, Duration::from_secs(120));
    let mark = Mark::new("freeze-killed");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let held = dir.path().join("held");
    let wrapper = criu_with_action_script(
        dir.path(),
        "dump",
        &format!(
            "[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] && {{ touch {}; sleep 2; }}\nexit 0\n",
            held.display()
        ),
    );

    let mut cmd = mark.on(Command::new("setsid"));
    cmd.args(py(COUNTER))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_clean(&mut cmd).expect("start the goblin");
    let goblin = i32::try_from(child.id()).expect("pid");
    deadline.watch(goblin);
    let guard = KillOnDrop(goblin);
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    writeln!(stdin, "inc").expect("write to the goblin");
    assert_eq!(lines.next().expect("a line").expect("read"), "1");

    let mut freeze = mark.on(pf(&store));
    freeze
        .env("PF_CRIU", &wrapper)
        .args(["goblin", "freeze", "--kill", "--pid", &goblin.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut pf_child = freeze.spawn().expect("start pf");
    deadline.watch(i32::try_from(pf_child.id()).expect("pid"));
    let started = Instant::now();
    while !held.exists() {
        assert!(started.elapsed() < DEADLINE, "criu never reached post-dump");
        if let Some(status) = pf_child.try_wait().expect("poll pf") {
            panic!("pf ended before criu's post-dump: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    pf_child.kill().expect("SIGKILL pf");
    pf_child.wait().expect("reap pf");

    // criu finishes (the hold sleeps 2 s), the guard lets the goblin go and every process pf
    // started ends: criu, the hold script, the guard.
    let stopped = || pf_os::proc::stat(goblin).is_some_and(|s| s.state == 'T');
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) || stopped() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the goblin stayed stopped after pf was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    mark.assert_running(&[goblin], "pf was killed mid-dump");
    writeln!(stdin, "inc").expect("write to the goblin");
    assert_eq!(
        lines.next().expect("a line").expect("read"),
        "2",
        "the goblin runs on where it was"
    );
    drop(stdin);
    assert_eq!(lines.next().expect("a line").expect("read"), "eof 2");
    child.wait().expect("reap the goblin");
    drop(guard);
    mark.assert_running(&[], "the goblin ended");
}

/// The scratch directories named after `pid` (`pf-…-PID-…`, kept failure logs included) in the
/// places pf makes them.
fn scratch_of(pid: u32) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for base in [pf_os::scratch::images_base(), std::env::temp_dir()] {
        for entry in std::fs::read_dir(&base)
            .expect("list a scratch base")
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("pf-") && name.contains(&format!("-{pid}-")) {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A goblin holding 64 MiB of random bytes: `sum` prints their SHA-256.
const BIG: &str = r#"
import hashlib, os, sys
buf = os.urandom(64 << 20)
print("ready", flush=True)
for line in sys.stdin:
    print(hashlib.sha256(buf).hexdigest(), flush=True)
"#;

/// Ctrl-C (or SIGTERM) while `pf goblin thaw` or `fork` unpacks the images or while CRIU
/// restores: pf exits 128 + the signal, and leaves nothing behind, neither the unpacked
/// images (the whole memory, for a whole-archive snapshot) nor criu, the namespace init or the
/// half-restored copy. Before, the signal's default action ended pf with its destructors
/// unrun: the images stayed on tmpfs until the next thaw, and the restore went on.
#[test]
fn live_a_thaw_or_fork_interrupted_before_the_copy_runs_leaves_nothing_behind() {
    let name = "live_a_thaw_or_fork_interrupted_before_the_copy_runs_leaves_nothing_behind";
    if !live(name) {
        return;
    }
    let deadline = Deadline::start(name, Duration::from_secs(240));
    let mark = Mark::new("thaw-interrupted");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let criu = holding_criu(dir.path());
    for (tag, format) in [("v1", "v1"), ("v2", "v2")] {
        let mut cmd = pf(&store);
        cmd.env(pf_world_procs::FORMAT_ENV, format)
            .args(["goblin", "spawn", "--tag", tag, "--until", "^ready$", "--"])
            .args(py(BIG));
        ok(&run(mark.on(cmd), b""), "spawn");
    }
    mark.assert_running(&[], "the spawns");

    const SIGHUP: i32 = 1;
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    // (what, pf's arguments, the signal, the stage at which it is sent)
    #[derive(Clone, Copy)]
    enum Stage {
        /// pf has made its directory for the unpacked images.
        Unpacking,
        /// criu has rebuilt the tree (`copies` of it), which waits to run.
        Restored { copies: usize },
    }
    let cases: [(&str, &[&str], i32, Stage); 4] = [
        (
            "a thaw of a whole-archive snapshot, while it unpacks",
            &["goblin", "thaw", "v1"],
            SIGINT,
            Stage::Unpacking,
        ),
        (
            "a lazy thaw, its copy rebuilt",
            &["goblin", "thaw", "--lazy", "v2"],
            SIGINT,
            Stage::Restored { copies: 1 },
        ),
        (
            "an eager (streamed) thaw, its copy rebuilt",
            &["goblin", "thaw", "--eager", "v2"],
            SIGHUP,
            Stage::Restored { copies: 1 },
        ),
        (
            "a fork of 2, both copies rebuilt",
            &["goblin", "fork", "-n", "2", "--send", "sum", "v2"],
            SIGTERM,
            Stage::Restored { copies: 2 },
        ),
    ];
    for (what, args, signal, stage) in cases {
        let mut cmd = pf(&store);
        cmd.env("PF_CRIU", &criu)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Our stdin stays open: only the signal can end the thaw.
        let mut child = mark.on(cmd).spawn().expect("start pf");
        let pf_pid = child.id();
        deadline.watch(i32::try_from(pf_pid).expect("pid"));
        let stdin = child.stdin.take();
        let started = Instant::now();
        let below = loop {
            let below: Vec<i32> = pf_os::proc::tree(i32::try_from(pf_pid).expect("pid"))
                .into_iter()
                .skip(1)
                .collect();
            let there = match stage {
                Stage::Unpacking => scratch_of(pf_pid)
                    .iter()
                    .any(|d| d.to_string_lossy().contains("/pf-restore-")),
                Stage::Restored { copies } => {
                    below.iter().filter(|&&p| comm(p) == "sleep").count() == copies
                }
            };
            if there {
                break below;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let out = finish(child, b"");
                panic!("{what}: pf ended ({status}) first: {}", text(&out.stderr));
            }
            assert!(started.elapsed() < DEADLINE, "{what}: never got there");
            std::thread::sleep(Duration::from_millis(2));
        };
        if let Stage::Restored { copies } = stage {
            let inits = below.iter().filter(|&&p| comm(p) == "pf-ns-init").count();
            let restored = below.iter().filter(|&&p| comm(p) == "python3").count();
            assert_eq!(
                (inits, restored),
                (copies, copies),
                "{what}: the copies are rebuilt under their inits: {below:?}"
            );
        }
        let sent = Instant::now();
        send_signal(pf_pid, &signal.to_string());
        drop(stdin);
        let out = finish(child, b"");
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "{what}: pf took {:?} to stop",
            sent.elapsed()
        );
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(128 + signal),
            "{what}: 128 + the signal: {stderr}"
        );
        assert!(
            stderr.contains(&format!("interrupted by signal {signal}: the "))
                && stderr.contains("is stopped and leaves nothing behind"),
            "{what}: pf says so: {stderr}"
        );
        assert!(!stderr.contains("error"), "{what}: no error: {stderr}");
        for pid in &below {
            assert!(exited(*pid), "{what}: {pid} ({}) outlived pf", comm(*pid));
        }
        mark.assert_running(&[], what);
        assert_eq!(
            scratch_of(pf_pid),
            Vec::<std::path::PathBuf>::new(),
            "{what}: scratch left"
        );
    }

    // SIGKILL to pf's whole process group while criu restores (held at post-restore): the
    // init, in a group of its own, does not get it, but sees pf's lifeline close and ends the
    // namespace, criu and the half-restored copy with it, at once.
    {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = pf(&store);
        cmd.env("PF_CRIU", &criu)
            .args(["goblin", "thaw", "--eager", "v2"])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = mark.on(cmd).spawn().expect("start pf");
        let pf_pid = i32::try_from(child.id()).expect("pid");
        deadline.watch(pf_pid);
        let started = Instant::now();
        let below = loop {
            let below: Vec<i32> = pf_os::proc::tree(pf_pid).into_iter().skip(1).collect();
            if below.iter().any(|&p| comm(p) == "sleep") {
                break below;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "the held restore never got there"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let status = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pf_pid}")])
            .status()
            .expect("run kill");
        assert!(status.success());
        let _ = child.wait();
        let killed = Instant::now();
        for pid in &below {
            while !exited(*pid) {
                assert!(
                    killed.elapsed() < Duration::from_secs(20),
                    "{pid} ({}) outlived pf's group SIGKILL",
                    comm(*pid)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        mark.assert_running(&[], "a thaw whose group was SIGKILLed");
    }

    // Once the copy runs, a signal is the goblin's again: SIGINT ends it, pf exits as it did.
    let mut cmd = pf(&store);
    cmd.args(["goblin", "thaw", "v2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = mark.on(cmd).spawn().expect("start pf");
    let pf_pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    writeln!(stdin, "sum").expect("write");
    let sum = lines.next().expect("an answer").expect("read");
    assert_eq!(sum.len(), 64, "{sum}");
    send_signal(pf_pid, "INT");
    let out = finish(child, b"");
    assert_eq!(
        out.status.code(),
        Some(130),
        "the goblin died of SIGINT: {}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("leaves nothing behind"),
        "{}",
        text(&out.stderr)
    );
    drop(stdin);
    mark.assert_running(&[], "a thaw whose goblin got SIGINT");
    assert_eq!(scratch_of(pf_pid), Vec::<std::path::PathBuf>::new());

    // Ctrl-C while a fork's copies run is passed on to them; pf still prints what they wrote
    // and ends killed by SIGINT, as a shell expects of a program Ctrl-C ended (a loop around it
    // stops).
    // It used to exit 1, which a `while pf goblin fork …` loop took for a copy that failed.
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).expect("mkdir");
    let mut cmd = pf(&store);
    cmd.args([
        "goblin", "spawn", "--tag", "waits", "--until", "^ready$", "--",
    ])
    .args(py(WAITS));
    ok(&run(mark.on(cmd), b""), "spawn the waiting goblin");
    let mut cmd = pf(&store);
    cmd.args(["goblin", "fork", "-n", "2", "--send"])
        .arg(format!("{}/{{i}}", marks.display()))
        .arg("waits")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = mark.on(cmd).spawn().expect("start pf");
    let pf_pid = child.id();
    deadline.watch(i32::try_from(pf_pid).expect("pid"));
    let started = Instant::now();
    while !(marks.join("1").exists() && marks.join("2").exists()) {
        assert!(started.elapsed() < DEADLINE, "the copies never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    send_signal(pf_pid, "INT");
    let out = finish(child, b"");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    // Killed by SIGINT (not an exit with 130, which bash takes for a handled signal and goes on).
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(2),
        "{}: {stdout}{stderr}",
        out.status
    );
    for k in 1..=2 {
        assert!(stdout.contains(&format!("[{k}] waiting")), "{stdout}");
        assert!(
            stderr.contains(&format!("[{k}] killed by signal 2")),
            "{stderr}"
        );
    }
    mark.assert_running(&[], "a fork whose copies got SIGINT");
    assert_eq!(scratch_of(pf_pid), Vec::<std::path::PathBuf>::new());

    // A pf started with SIGINT ignored (a script's background job, `trap '' INT`) keeps
    // ignoring it: it neither passes it on nor abandons the thaw.
    let mut cmd = Command::new("sh");
    cmd.env_remove("RUST_LOG")
        .args(["-c", "trap '' INT; exec \"$0\" \"$@\""])
        .arg(crate::support::pf_bin())
        .args(["--store"])
        .arg(&store)
        .args(["goblin", "thaw", "v2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = mark.on(cmd).spawn().expect("start pf");
    let pf_pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    writeln!(stdin, "sum").expect("write");
    assert_eq!(lines.next().expect("an answer").expect("read"), sum);
    send_signal(pf_pid, "INT");
    std::thread::sleep(Duration::from_millis(300));
    writeln!(stdin, "sum").expect("write");
    assert_eq!(
        lines.next().expect("an answer after SIGINT").expect("read"),
        sum,
        "an ignored SIGINT reached the goblin"
    );
    drop(stdin);
    let mut rest = String::new();
    for line in lines {
        rest.push_str(&line.expect("read"));
    }
    assert_eq!(rest, "", "nothing more");
    let out = finish(child, b"");
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        text(&out.stderr)
    );
    mark.assert_running(&[], "a thaw that ignored SIGINT");
}

/// A goblin that, given a path, says `waiting`, creates the file and waits for good.
const WAITS: &str = r#"import signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_DFL)
print("ready", flush=True)
for line in sys.stdin:
    print("waiting", flush=True)
    open(line.strip(), "w").close()
    time.sleep(3600)
"#;

/// A goblin that counts the SIGTERMs it gets and answers each line with the count.
const COUNTS_TERMS: &str = r#"import signal, sys
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
print("ready", flush=True)
for line in sys.stdin:
    print(len(got), flush=True)
"#;

/// A signal to pf's whole process group (`kill -TERM -PGID`, what `timeout` and many
/// supervisors send) reaches the thawed goblin once. pf's namespace init used to be in that
/// group too and passed the signal on as well: the goblin got it twice. And the init shows as
/// `pf-ns-init` in ps, not as a second `pf goblin thaw …`.
#[test]
fn live_a_signal_to_the_thaws_process_group_reaches_the_goblin_once() {
    use std::os::unix::process::CommandExt as _;
    let name = "live_a_signal_to_the_thaws_process_group_reaches_the_goblin_once";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(120));
    let mark = Mark::new("thaw-group-signal");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    ok(
        &spawn_goblin(&store, "terms", &["--until", "^ready$"], &py(COUNTS_TERMS)),
        "spawn",
    );
    for mode in ["--lazy", "--eager"] {
        // Its pidfile says when pf has handed the signals to the goblin (before that, a signal
        // stops the thaw).
        let pidfile = dir.path().join(format!("terms{mode}.pid"));
        let mut cmd = pf(&store);
        cmd.args(["goblin", "thaw", mode, "--pidfile"])
            .arg(&pidfile)
            .arg("terms")
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = mark.on(cmd).spawn().expect("start pf");
        let pgid = child.id();
        let mut stdin = child.stdin.take().expect("stdin");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut ask = || {
            writeln!(stdin, "n").ok()?;
            lines.next()?.ok()
        };
        let first = ask();
        if first.is_none() {
            let out = finish(child, b"");
            panic!("{mode}: no answer ({}): {}", out.status, text(&out.stderr));
        }
        assert_eq!(first.as_deref(), Some("0"), "{mode}: no SIGTERM yet");
        let started = Instant::now();
        while !pidfile.exists() {
            assert!(started.elapsed() < DEADLINE, "{mode}: no pidfile");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Nothing below pf shows pf's command line in ps (`pgrep -f 'goblin thaw'` finds pf
        // alone): the init is `pf-ns-init`.
        let below: Vec<i32> = pf_os::proc::tree(i32::try_from(pgid).expect("pid"))
            .into_iter()
            .skip(1)
            .collect();
        let cmdline = |pid: i32| {
            String::from_utf8_lossy(
                &std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
            )
            .replace('\0', " ")
        };
        assert!(
            below
                .iter()
                .any(|&p| comm(p) == "pf-ns-init" && cmdline(p).trim_end() == "pf-ns-init"),
            "{mode}: {below:?}"
        );
        // The init leads a process group of its own (two SIGTERMs pending at once merge into
        // one, so the count below alone may not tell).
        for &p in below.iter().filter(|&&p| comm(p) == "pf-ns-init") {
            let group = pf_os::proc::stat(p).expect("the init's stat").pgrp;
            assert_eq!(group, p, "{mode}: the init leads its own group");
        }
        for &p in &below {
            assert!(
                !cmdline(p).contains("goblin thaw"),
                "{mode}: {p} ({}) shows pf's command line",
                comm(p)
            );
        }
        let status = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pgid}")])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM -{pgid}");
        let started = Instant::now();
        let mut answer = ask();
        while answer.as_deref() == Some("0") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{mode}: the SIGTERM never reached the goblin"
            );
            std::thread::sleep(Duration::from_millis(20));
            answer = ask();
        }
        // A second one, had it been sent, is there by now.
        if answer.is_some() {
            std::thread::sleep(Duration::from_millis(500));
            answer = ask();
        }
        drop(stdin);
        if answer.is_none() {
            let out = finish(child, b"");
            panic!(
                "{mode}: no answer after the SIGTERM ({}): {}",
                out.status,
                text(&out.stderr)
            );
        }
        assert_eq!(
            answer.as_deref(),
            Some("1"),
            "{mode}: the goblin got the group's SIGTERM once"
        );
        let out = finish(child, b"");
        assert!(
            out.status.success(),
            "{mode}: {}: {}",
            out.status,
            text(&out.stderr)
        );
        mark.assert_running(&[], mode);
    }
}

/// A `criu` wrapper that runs criu as its child and reaps every child it gets until none is
/// left, as `strace -f` does: the restored root (criu's sibling, `--restore-sibling`) is the
/// wrapper's child, and the wrapper reaps it. pf's namespace init used to wait for it forever
/// (only its lifeline watcher left below it), and pf with it, a SIGTERM to pf going to a goblin
/// already gone. Now the init watches the root through a pidfd: pf finishes, saying the root's
/// status is unknown and why.
#[test]
fn live_a_copy_reaped_by_a_criu_wrapper_still_ends_the_thaw() {
    use std::os::unix::fs::PermissionsExt as _;
    let name = "live_a_copy_reaped_by_a_criu_wrapper_still_ends_the_thaw";
    if !live(name) {
        return;
    }
    let _deadline = Deadline::start(name, Duration::from_secs(120));
    let mark = Mark::new("thaw-reaping-wrapper");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    ok(
        &spawn_goblin(&store, "counter", &["--quiet-ms", "300"], &py(COUNTER)),
        "spawn",
    );
    let criu = pf_world_procs::probe()
        .criu()
        .expect("a working criu")
        .path
        .clone();
    let wrapper = dir.path().join("criu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/usr/bin/env python3\nimport os, sys\ncriu = {criu:?}\npid = os.fork()\n\
             if pid == 0:\n    os.execv(criu, [criu] + sys.argv[1:])\nstatus = 0\n\
             while True:\n    try:\n        p, s = os.wait()\n    except ChildProcessError:\n\
             \x20       break\n    if p == pid:\n        status = s\n\
             sys.exit(os.waitstatus_to_exitcode(status))\n",
            criu = criu.display().to_string()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cmd = thaw_cmd(&store, "counter");
    cmd.env("PF_CRIU", &wrapper);
    let out = run(mark.on(cmd), b"inc\ninc\n");
    assert_eq!(text(&out.stdout), "1\n2\neof 2\n", "the copy answered");
    let stderr = failed(&out, "a thaw whose copy another process reaped");
    assert!(
        stderr.contains("another process reaped it, so its exit status is unknown"),
        "{stderr}"
    );
    mark.assert_running(&[], "the thaw");
}
