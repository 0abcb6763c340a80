//! `pf procs`: capture, restore and show process trees. The live tests (root + CRIU,
//! `PF_HAS_CRIU=1`) run an ordinary shell loop nobody wrote for pf and bring it back.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pf_world_procs::test_support::{Deadline, KillOnDrop, live, spawn_clean};

use crate::support::{pf, pf_bin, text};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run pf")
}

/// `pf store put FILE` of `bytes`; returns the digest.
fn put(store: &Path, bytes: &[u8]) -> String {
    let file = store.with_extension("input");
    std::fs::write(&file, bytes).expect("write input");
    let out = run(pf(store).args(["store", "put"]).arg(&file));
    assert!(out.status.success(), "pf store put: {}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

#[test]
fn capture_without_criu_stores_an_honest_placeholder_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let me = std::process::id().to_string();
    let out = run(pf(&store)
        .args(["procs", "capture", "--pid", &me, "--tag", "never"])
        .env("PF_CRIU", "/nonexistent/criu"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        out.stdout.is_empty(),
        "no digest on stdout for a failed capture"
    );
    let err = text(&out.stderr);
    assert!(err.contains("$PF_CRIU is /nonexistent/criu"), "{err}");
    assert!(err.contains("nothing was dumped"), "{err}");
    let digest = err
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no placeholder digest in {err}"));
    let show = run(pf(&store).args(["procs", "show", digest]));
    assert!(show.status.success(), "{}", text(&show.stderr));
    let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(json["kind"], "procs.unsupported.v1");
    let on = if cfg!(target_os = "linux") {
        "linux-no-criu"
    } else {
        std::env::consts::OS
    };
    assert_eq!(json["unsupported_on"], on);
    assert!(
        json["note"]
            .as_str()
            .is_some_and(|n| n.contains("$PF_CRIU"))
    );
    // The name was not set, and restoring the placeholder is a clear error.
    let named = run(pf(&store).args(["procs", "show", "never"]));
    assert_eq!(named.status.code(), Some(1));
    let restore = run(pf(&store).args(["procs", "restore", digest]));
    assert_eq!(restore.status.code(), Some(1));
    assert!(
        text(&restore.stderr).contains("holds no process images"),
        "{}",
        text(&restore.stderr)
    );
}

#[test]
fn capture_of_a_missing_pid_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(pf(&dir.path().join("store")).args(["procs", "capture", "--pid", "0"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("process 0 does not exist"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn show_reads_reference_pf_world_blobs_and_rejects_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let dump = put(&store, b"not really a tar");
    let reference =
        format!(r#"{{"kind":"procs.criu.v1","criu_dump":"{dump}","pids":[1234,5678]}}"#);
    let procs = put(&store, reference.as_bytes());
    let out = run(pf(&store).args(["procs", "show", &procs]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let want: serde_json::Value = serde_json::from_str(&reference).expect("json");
    assert_eq!(shown, want);

    let other = put(&store, br#"{"kind":"something.else"}"#);
    let out = run(pf(&store).args(["procs", "show", &other]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not a snapshot: it does not read as a procs record"),
        "{}",
        text(&out.stderr)
    );
}

/// The last tick number in the ticker's file.
fn last_tick(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.split(' ').next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Every tick number in the ticker's file, in file order (complete lines only: a line being
/// appended could be read half-written).
fn ticks(file: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// Tick numbers that appear twice, ascending. One loop never repeats a number, so each of these
/// was written by a second loop: a copy counting on from an earlier tick.
fn ticks_written_twice(file: &Path) -> Vec<u64> {
    let mut seen = std::collections::BTreeMap::<u64, u32>::new();
    for t in ticks(file) {
        *seen.entry(t).or_default() += 1;
    }
    seen.into_iter()
        .filter(|&(_, n)| n >= 2)
        .map(|(t, _)| t)
        .collect()
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// An ordinary shell loop under its own session, ticking into a file.
fn start_ticker(dir: &Path) -> (std::process::Child, std::path::PathBuf) {
    let file = dir.join("ticks.log");
    let mut cmd = Command::new("setsid");
    cmd.args([
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo \"tick $i\" >> \"$1\"; sleep 0.05; done",
        "ticker",
    ])
    .arg(&file)
    .current_dir(dir)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = spawn_clean(&mut cmd).expect("spawn the ticker");
    (child, file)
}

fn pids_of(stdout: &[u8]) -> Vec<i32> {
    text(stdout)
        .lines()
        .map(|l| l.trim().parse().expect("a pid per line"))
        .collect()
}

#[test]
fn live_cli_captures_and_restores_a_shell_loop() {
    if !live("live_cli_captures_and_restores_a_shell_loop") {
        return;
    }
    let deadline = Deadline::start(
        "live_cli_captures_and_restores_a_shell_loop",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let (mut child, file) = start_ticker(dir.path());
    let pid = child.id() as i32;
    deadline.watch(pid);
    let _kill = KillOnDrop(pid);
    assert!(wait_until(Duration::from_secs(10), || last_tick(&file) >= 5));

    let out = run(pf(&store).args([
        "procs",
        "capture",
        "--pid",
        &pid.to_string(),
        "--tag",
        "ticker",
    ]));
    assert!(out.status.success(), "capture: {}", text(&out.stderr));
    let digest = text(&out.stdout).trim().to_owned();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    assert!(
        !child.wait().expect("reap").success(),
        "criu ended the original"
    );
    let stopped = last_tick(&file);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(last_tick(&file), stopped, "no ticks while captured");

    let shown = run(pf(&store).args(["procs", "show", "ticker"]));
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("show json");
    assert_eq!(json["kind"], "procs.criu.v2");
    assert_eq!(json["root_pid"], pid);

    // pf exits; the restored loop runs on.
    let out = run(pf(&store).args(["procs", "restore", "ticker"]));
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    let pids = pids_of(&out.stdout);
    let _kill_all: Vec<KillOnDrop> = pids.iter().map(|&p| KillOnDrop(p)).collect();
    pids.iter().for_each(|&p| deadline.watch(p));
    assert_eq!(pids.first(), Some(&pid), "root first, with its old pid");
    assert!(
        wait_until(Duration::from_secs(10), || last_tick(&file) >= stopped + 5),
        "the loop ticks on after pf exited"
    );
    // It went on counting from where it was: every tick exactly once, in order.
    let ticks: Vec<u64> = std::fs::read_to_string(&file)
        .expect("ticks")
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    let want: Vec<u64> = (1..=ticks.len() as u64).collect();
    assert_eq!(ticks, want);
}

#[test]
fn live_cli_restores_a_copy_beside_the_original() {
    if !live("live_cli_restores_a_copy_beside_the_original") {
        return;
    }
    let deadline = Deadline::start(
        "live_cli_restores_a_copy_beside_the_original",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let (mut child, file) = start_ticker(dir.path());
    let pid = child.id() as i32;
    deadline.watch(pid);
    let _kill = KillOnDrop(pid);
    assert!(wait_until(Duration::from_secs(10), || last_tick(&file) >= 3));

    let before = last_tick(&file);
    let out = run(pf(&store).args([
        "procs",
        "capture",
        "--pid",
        &pid.to_string(),
        "--leave-running",
        "--json",
    ]));
    assert!(out.status.success(), "capture: {}", text(&out.stderr));
    // The dump saw the loop at a tick in before..=after.
    let after = last_tick(&file);
    let captured: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let digest = captured["procs"].as_str().expect("procs digest").to_owned();
    assert_eq!(captured["pids"][0], pid);

    let plain = run(pf(&store).args(["procs", "restore", &digest]));
    assert_eq!(plain.status.code(), Some(1));
    assert!(
        text(&plain.stderr).contains("--new-pidns"),
        "{}",
        text(&plain.stderr)
    );

    assert_eq!(
        ticks_written_twice(&file),
        Vec::<u64>::new(),
        "one loop so far"
    );

    let out = run(pf(&store).args(["procs", "restore", &digest, "--new-pidns", "--json"]));
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    let restored: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let init = restored["init"].as_i64().expect("init pid") as i32;
    let copy = restored["pid"].as_i64().expect("pid") as i32;
    deadline.watch(init);
    let _kill_init = KillOnDrop(init);
    assert_eq!(restored["ns_pid"], pid);
    assert_ne!(copy, pid);
    let comm = std::fs::read_to_string(format!("/proc/{init}/comm")).expect("init comm");
    assert_eq!(comm.trim(), "pf-ns-init");
    // Both tick into the same file now, twice the pace: the copy counts on from the tick it was
    // dumped at, so every tick it writes is one the original wrote before.
    assert!(
        wait_until(Duration::from_secs(20), || ticks_written_twice(&file).len()
            >= 10),
        "the copy never ticked 10 times: {:?}",
        ticks_written_twice(&file)
    );
    let twice = ticks_written_twice(&file);
    assert!(
        (before + 1..=after + 1).contains(&twice[0]),
        "the copy went on from the dumped tick ({before}..={after}): {twice:?}"
    );
    let want: Vec<u64> = (twice[0]..twice[0] + twice.len() as u64).collect();
    assert_eq!(twice, want, "the copy ticks 1, 2, 3, … on from there");
    // The original was never behind: it had written every tick the copy writes (when the
    // restore came within one 50 ms tick of the dump they can be level, so not strictly ahead).
    assert!(
        ticks(&file).iter().max() >= twice.last(),
        "the original is not behind the copy"
    );
    let stat = std::fs::read_to_string(format!("/proc/{copy}/stat")).expect("the copy's stat");
    assert!(!stat.contains(") Z"), "the copy is running: {stat}");
    assert_eq!(
        child.try_wait().expect("try_wait"),
        None,
        "the original runs on"
    );
    // `kill INIT` (SIGTERM) takes the copy down with it, as the help says: the init passes it
    // on to the root and exits with it. (It used to ignore it: a namespace's init gets only
    // the signals it handles.)
    let ended = |pid: i32| {
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
        })
    };
    let killed = Command::new("kill")
        .args(["-TERM", &init.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -TERM {init}");
    assert!(ended(copy), "the copy died with its init");
    assert!(ended(init), "the init exited");
}

/// A tree captured with `--shell-job` (a loop started from a shell, not leading its session)
/// restores without the flag: the capture recorded it. Before, the restore failed after 10 s
/// with an error blaming an unreaped process. A snapshot of a terminal shell (`shell=v1`) is
/// pointed at `pf shell thaw` by `pf procs restore` and `pf goblin thaw` alike.
#[test]
fn live_a_shell_job_capture_restores_without_the_flag() {
    if !live("live_a_shell_job_capture_restores_without_the_flag") {
        return;
    }
    let deadline = Deadline::start(
        "live_a_shell_job_capture_restores_without_the_flag",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let file = dir.path().join("ticks.log");
    // A job of a shell's session, as a loop started from a shell is: a session leader (setsid,
    // so that it is inside this pid namespace, which the session of a test run in a container
    // need not be) with the loop in the background.
    let mut cmd = Command::new("setsid");
    cmd.args([
        "sh",
        "-c",
        "sh -c 'i=0; while :; do i=$((i+1)); echo \"tick $i\" >> \"$1\"; sleep 0.05; done' \
         ticker \"$1\" >/dev/null & echo $!; wait",
        "shell",
    ])
    .arg(&file)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut shell = spawn_clean(&mut cmd).expect("spawn the shell");
    let kill_shell = KillOnDrop(shell.id() as i32);
    deadline.watch(shell.id() as i32);
    let mut said = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(shell.stdout.take().expect("piped")),
        &mut said,
    )
    .expect("the shell says its job's pid");
    let pid: i32 = said.trim().parse().expect("a pid");
    deadline.watch(pid);
    let kill_job = KillOnDrop(pid);
    assert!(wait_until(Duration::from_secs(10), || last_tick(&file) >= 3));
    // Refused before criu runs (were it criu, its kept log would go to the test's directory).
    let plain = run(pf(&store).env("TMPDIR", dir.path()).args([
        "procs",
        "capture",
        "--pid",
        &pid.to_string(),
    ]));
    assert_eq!(plain.status.code(), Some(1), "{}", text(&plain.stderr));
    // Said by pf before criu runs: no kept log of criu's refusal.
    let said = text(&plain.stderr);
    assert!(
        said.contains(&format!("process {pid} does not lead its session"))
            && said.contains("--shell-job")
            && said.contains("nothing was dumped")
            && !said.contains("full log kept"),
        "{said}"
    );
    for (tag, label) in [("job", "kind=loop"), ("sh", "shell=v1")] {
        let out = run(pf(&store).args([
            "procs",
            "capture",
            "--pid",
            &pid.to_string(),
            "--shell-job",
            "--leave-running",
            "--label",
            label,
            "--tag",
            tag,
        ]));
        assert!(out.status.success(), "capture: {}", text(&out.stderr));
    }
    // The job ends, then its shell, which waited for it.
    drop(kill_job);
    let _ = shell.wait();
    // Reaped: its pid may be another process's from now on.
    std::mem::forget(kill_shell);
    let stopped = last_tick(&file);

    for (args, fix) in [
        (
            &["procs", "restore", "sh"][..],
            "`pf shell thaw sh` in a terminal",
        ),
        (
            &["goblin", "thaw", "sh"][..],
            "`pf shell thaw` in a terminal",
        ),
    ] {
        let out = run(pf(&store).args(args).stdin(Stdio::null()));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("is a terminal shell") && err.contains(fix),
            "{args:?}: {err}"
        );
    }

    let started = Instant::now();
    let out = run(pf(&store)
        .args(["procs", "restore", "job"])
        .stdin(Stdio::null()));
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let pids = pids_of(&out.stdout);
    let _kill_all: Vec<KillOnDrop> = pids.iter().map(|&p| KillOnDrop(p)).collect();
    pids.iter().for_each(|&p| deadline.watch(p));
    assert_eq!(pids.first(), Some(&pid));
    assert!(
        wait_until(Duration::from_secs(10), || last_tick(&file) >= stopped + 3),
        "the loop ticks on"
    );
}

/// In a pid namespace whose first process kept the session of its parent outside (as
/// `unshare --pid` and many containers start one), a process started without setsid belongs to
/// a session criu cannot see and will not dump, with --shell-job or without: the capture says
/// so and how to start the process instead, not just criu's line.
#[test]
fn live_a_session_begun_outside_the_pid_namespace_is_explained() {
    if !live("live_a_session_begun_outside_the_pid_namespace_is_explained") {
        return;
    }
    // Built (if need be) before the deadline starts.
    let pf_path = pf_bin();
    let deadline = Deadline::start(
        "live_a_session_begun_outside_the_pid_namespace_is_explained",
        Duration::from_secs(60),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    // The namespace's init (pid 1) runs pf on a loop it started; --kill-child ends the whole
    // namespace with unshare, should the test kill it.
    // The second run asks for criu's every step in its kept log.
    let script = "sh -c 'while :; do sleep 0.05; done' </dev/null >/dev/null 2>&1 & job=$!; \
                  \"$0\" --store \"$1\" procs capture --pid \"$job\"; echo \"pf-exit=$?\" >&2; \
                  PF_CRIU_LOG_LEVEL=4 \"$0\" --store \"$1\" procs capture --pid \"$job\" \
                  --shell-job; echo \"pf-exit=$?\" >&2; kill \"$job\"";
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "sh",
        "-c",
        script,
    ])
    .arg(&pf_path)
    .arg(&store)
    .env_remove("PF_STORE")
    .env_remove("RUST_LOG")
    // criu's kept logs of the refused dumps go to the test's directory, removed with it.
    .env("TMPDIR", dir.path())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let child = spawn_clean(&mut cmd).expect("spawn unshare");
    deadline.watch(child.id() as i32);
    let kill = KillOnDrop(child.id() as i32);
    let out = child.wait_with_output().expect("wait for unshare");
    std::mem::forget(kill);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("pf-exit=1").count(), 2, "{err}");
    assert_eq!(
        err.matches("session was begun outside this pid namespace")
            .count(),
        2,
        "{err}"
    );
    assert!(err.contains("start the process under `setsid`"), "{err}");
    // criu logs its errors and warnings, and every step when asked; the message says how.
    let logs: Vec<String> = err
        .split("full log kept in ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|log| std::fs::read_to_string(log).expect("kept log"))
        .collect();
    assert_eq!(logs.len(), 2, "{err}");
    assert_eq!(
        err.matches("PF_CRIU_LOG_LEVEL=4 logs every step").count(),
        1,
        "{err}"
    );
    let lines = |log: &str| log.lines().count();
    assert!(logs[0].contains("Error ("), "{}", logs[0]);
    assert!(
        lines(&logs[1]) > 5 * lines(&logs[0]),
        "default {} lines, level 4 {} lines",
        lines(&logs[0]),
        lines(&logs[1])
    );
}

/// A capture into a store on a read-only mount fails before criu runs, saying why and what to
/// do: the process was neither dumped for nothing nor stopped, and runs on untouched. (It
/// dumped the whole tree, then failed on the first page with the file system's bare error.)
#[test]
fn live_a_capture_into_a_read_only_store_fails_before_the_dump() {
    if !live("live_a_capture_into_a_read_only_store_fails_before_the_dump") {
        return;
    }
    let deadline = Deadline::start(
        "live_a_capture_into_a_read_only_store_fails_before_the_dump",
        Duration::from_secs(60),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("mkdir store");
    let (mut child, file) = start_ticker(dir.path());
    let pid = child.id() as i32;
    deadline.watch(pid);
    let kill = KillOnDrop(pid);
    assert!(wait_until(Duration::from_secs(10), || last_tick(&file) >= 3));
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o ro,mode=700 tmpfs \"$1\" && exec \"$2\" --store \"$1\" procs \
             capture --pid \"$3\"",
        )
        .arg("sh")
        .arg(&store)
        .arg(pf_bin())
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .env_remove("PF_STORE")
        .output()
        .expect("run pf in a mount namespace");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is on a read-only file system") && err.contains("remount it read-write"),
        "{err}"
    );
    assert!(!err.contains("it runs on"), "nothing was stopped: {err}");
    let before = last_tick(&file);
    assert!(
        wait_until(Duration::from_secs(10), || last_tick(&file) >= before + 3),
        "the process runs on"
    );
    let _ = child.kill();
    let _ = child.wait();
    std::mem::forget(kill);
}
