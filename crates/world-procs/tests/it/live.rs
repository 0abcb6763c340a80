//! Live capture and restore of a real process tree (root + CRIU; `PF_HAS_CRIU=1`).

use std::time::Duration;

use pf_core::{BlobStore as _, FsBlobStore};
use pf_world_procs::test_support::{Deadline, KillOnDrop, live};
use pf_world_procs::{Error, Exit, ProcsBlob, capture, restore};

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Wait until every tag has counted past `n`.
fn all_counted_past(out: &std::path::Path, n: u64) -> bool {
    wait_until(Duration::from_secs(20), || {
        ["p", "t", "c"].iter().all(|t| max_count(out, t) > n)
    })
}

#[test]
fn live_tree_counts_on_after_restore() {
    if !live("live_tree_counts_on_after_restore") {
        return;
    }
    let deadline = Deadline::start("live_tree_counts_on_after_restore", LIMIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("store");
    let (mut child, out) = spawn_counter(dir.path(), Mode::Lines);
    let pid = child.id() as i32;
    deadline.watch(pid);
    let _kill = KillOnDrop(pid);
    assert!(all_counted_past(&out, 20), "the tree never counted");
    let kids = children(pid);
    assert_eq!(kids.len(), 1, "one child");
    let _kill_kid = KillOnDrop(kids[0]);
    assert_eq!(threads(pid), 2, "two threads");

    let captured = capture(&store, pid, &capture_opts(false)).expect("capture");
    let ProcsBlob::Criu(procs) = &captured.blob else {
        panic!("expected a criu dump, got {:?}", captured.blob);
    };
    assert_eq!(procs.pids, vec![pid, kids[0]]);
    assert_eq!(procs.root_pid, Some(pid));
    assert_eq!(procs.stdio, vec!["/dev/null"; 3]);
    assert!(procs.criu_version.is_some() && procs.kernel.is_some());
    assert!(store.contains(&procs.criu_dump).expect("contains"));
    // Without leave_running the tree is gone: reap our child, the counts stop.
    let status = child.wait().expect("reap");
    assert!(!status.success());
    let stopped = counts(&out);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counts(&out), stopped, "nothing counts while frozen");

    let mut restored = restore(&store, &captured.procs, restore_opts(false)).expect("restore");
    deadline.watch(restored.pid());
    assert_eq!((restored.pid(), restored.ns_pid()), (pid, pid));
    let pids = restored.pids();
    assert_eq!(pids, vec![pid, kids[0]], "same pids after restore");
    assert_eq!(threads(pid), 2);
    let resumed_from = ["p", "t", "c"].map(|t| max_count(&out, t));
    assert!(all_counted_past(
        &out,
        resumed_from.iter().max().copied().unwrap_or(0) + 20
    ));
    assert_eq!(restored.try_wait().expect("try_wait"), None);
    restored.kill().expect("kill");
    assert_eq!(restored.wait().expect("wait"), Exit::Signal(9));
    // Each counter went on from where it stopped, writing at the kept offset.
    assert_consecutive(&out);
}

#[test]
fn live_leave_running_then_new_pidns_beside_it() {
    if !live("live_leave_running_then_new_pidns_beside_it") {
        return;
    }
    let deadline = Deadline::start("live_leave_running_then_new_pidns_beside_it", LIMIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("store");
    let (mut child, out) = spawn_counter(dir.path(), Mode::Slots);
    let pid = child.id() as i32;
    deadline.watch(pid);
    let _kill = KillOnDrop(pid);
    assert!(all_counted_past(&out, 10));
    let kid = children(pid)[0];
    let _kill_kid = KillOnDrop(kid);

    let captured = capture(&store, pid, &capture_opts(true)).expect("capture");
    assert_eq!(
        child.try_wait().expect("try_wait"),
        None,
        "original still running"
    );
    // CRIU's statistics of the dump are kept: it stood still for a while and wrote pages.
    let stats = *captured.dump_stats().expect("dump statistics");
    assert!(stats.frozen_time_us > 0, "{stats:?}");
    assert!(stats.frozen_time_us < 60_000_000, "{stats:?}");
    assert!(
        stats.pages_written > 0 && stats.pages_written <= stats.pages_scanned,
        "{stats:?}"
    );
    let before = max_count(&out, "p");
    assert!(wait_until(Duration::from_secs(10), || max_count(&out, "p")
        > before + 10));

    // A plain restore cannot get the pid back while the original holds it.
    let err = restore(&store, &captured.procs, restore_opts(false)).expect_err("pid in use");
    assert!(
        matches!(&err, Error::PidInUse { pid: p, .. } if *p == pid),
        "{err:?}"
    );
    assert!(err.to_string().contains("--new-pidns"), "{err}");
    assert_eq!(err.kind(), pf_world_procs::ErrorKind::PidInUse);

    let mut restored = restore(&store, &captured.procs, restore_opts(true)).expect("restore");
    let init = restored.init_pid().expect("an init");
    deadline.watch(init);
    assert_eq!(restored.ns_pid(), pid);
    assert_ne!(restored.pid(), pid);
    assert!(alive(restored.pid()));
    assert_eq!(threads(restored.pid()), 2);
    assert_eq!(restored.pids().len(), 2, "root and child restored");
    let w = wchar(restored.pid());
    assert!(
        wait_until(Duration::from_secs(10), || wchar(restored.pid()) > w + 100),
        "the restored copy counts"
    );
    assert!(alive(pid), "the original still runs beside it");
    let copy = restored.pid();
    restored.kill().expect("kill the copy");
    assert_eq!(restored.wait().expect("wait"), Exit::Signal(9));
    assert!(wait_until(Duration::from_secs(5), || !alive(copy)));
    let before = max_count(&out, "p");
    assert!(
        wait_until(Duration::from_secs(10), || max_count(&out, "p")
            > before + 5),
        "the original outlives the copy"
    );
}

#[test]
fn live_capture_restore_capture_restore() {
    if !live("live_capture_restore_capture_restore") {
        return;
    }
    let deadline = Deadline::start("live_capture_restore_capture_restore", LIMIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("store");
    let (mut child, out) = spawn_counter(dir.path(), Mode::Lines);
    let pid = child.id() as i32;
    deadline.watch(pid);
    let _kill = KillOnDrop(pid);
    assert!(all_counted_past(&out, 10));
    let _kill_kid = KillOnDrop(children(pid)[0]);

    let first = capture(&store, pid, &capture_opts(false)).expect("first capture");
    child.wait().expect("reap");
    let mut r1 = restore(&store, &first.procs, restore_opts(false)).expect("first restore");
    let mark = max_count(&out, "p");
    assert!(wait_until(Duration::from_secs(10), || max_count(&out, "p") > mark + 10));

    let second = capture(&store, r1.pid(), &capture_opts(false)).expect("capture of the restored");
    assert_ne!(first.procs, second.procs);
    // criu killed the restored tree; it was our child, so reap it.
    assert_eq!(r1.wait().expect("wait"), Exit::Signal(9));
    let mut r2 = restore(&store, &second.procs, restore_opts(false)).expect("second restore");
    assert_eq!(r2.pid(), pid);
    let mark = max_count(&out, "c");
    assert!(wait_until(Duration::from_secs(10), || max_count(&out, "c") > mark + 10));
    r2.kill().expect("kill");
    assert_consecutive(&out);
}

#[test]
fn live_capture_of_missing_or_dying_pid_stores_nothing() {
    if !live("live_capture_of_missing_or_dying_pid_stores_nothing") {
        return;
    }
    let deadline = Deadline::start("live_capture_of_missing_or_dying_pid_stores_nothing", LIMIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("store");

    // A pid that just exited and was reaped.
    let mut gone = std::process::Command::new("true")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn true");
    let gone_pid = gone.id() as i32;
    gone.wait().expect("reap");
    let err = capture(&store, gone_pid, &capture_opts(false)).expect_err("no such process");
    assert!(
        matches!(err, Error::NoSuchProcess { pid } if pid == gone_pid),
        "{err:?}"
    );
    assert_eq!(err.kind(), pf_world_procs::ErrorKind::NoSuchProcess);

    // A 1 GiB process killed while criu dumps it.
    let ready = dir.path().join("ready");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("-c")
        .arg(
            "import os, sys, time\nos.setsid()\nb = bytearray(1 << 30)\n\
             for i in range(0, len(b), 4096): b[i] = 1\n\
             open(sys.argv[1], 'w').close()\ntime.sleep(600)\n",
        )
        .arg(&ready)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut big = pf_world_procs::test_support::spawn_clean(&mut cmd).expect("spawn");
    let big_pid = big.id() as i32;
    deadline.watch(big_pid);
    let _kill = KillOnDrop(big_pid);
    assert!(wait_until(Duration::from_secs(30), || ready.exists()));
    let result = std::thread::scope(|s| {
        let dumping = s.spawn(|| capture(&store, big_pid, &capture_opts(false)));
        // Mid-dump: criu has seized the target (ptrace), so it is its tracer now.
        assert!(
            wait_until(Duration::from_secs(20), || tracer_pid(big_pid) > 0),
            "criu never seized pid {big_pid}"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(big_pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill mid-dump");
        dumping.join().expect("capture thread")
    });
    let err = result.expect_err("the process died mid-dump");
    let Error::ExitedDuringDump { pid, source } = &err else {
        panic!("expected ExitedDuringDump, got {err:?}");
    };
    assert_eq!(*pid, big_pid);
    let Error::Criu { log, errors, .. } = source.as_ref() else {
        panic!("expected criu's failure inside, got {source:?}");
    };
    assert!(
        !errors.is_empty() && log.is_file(),
        "{errors:?} {}",
        log.display()
    );
    assert!(err.to_string().contains("nothing was stored"), "{err}");
    assert_eq!(err.kind(), pf_world_procs::ErrorKind::NoSuchProcess);
    // The kept log is ours to remove.
    std::fs::remove_dir_all(log.parent().expect("log dir")).expect("remove kept log");
    big.wait().expect("reap");
    assert_eq!(store.list().expect("list"), vec![], "no blob was stored");
    assert_eq!(store.names().expect("names"), vec![]);
}

#[test]
fn live_a_restore_right_after_the_original_dies_waits_for_its_pids() {
    if !live("live_a_restore_right_after_the_original_dies_waits_for_its_pids") {
        return;
    }
    let deadline = Deadline::start(
        "live_a_restore_right_after_the_original_dies_waits_for_its_pids",
        LIMIT,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("store");
    let (mut child, out) = spawn_counter(dir.path(), Mode::Lines);
    let pid = child.id() as i32;
    deadline.watch(pid);
    let _kill = KillOnDrop(pid);
    assert!(all_counted_past(&out, 5), "the tree never counted");
    let kid = children(pid)[0];
    let _kill_kid = KillOnDrop(kid);
    // The dump kills the tree; its root stays a zombie of ours until we reap it, 700 ms later,
    // as a slow parent would (`Can't fork for PID: File exists` when criu runs meanwhile).
    let captured = capture(&store, pid, &capture_opts(false)).expect("capture");
    let reaper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        child.wait().expect("reap")
    });
    let start = std::time::Instant::now();
    let mut restored = restore(&store, &captured.procs, restore_opts(false))
        .expect("the restore waits for the pids to be free");
    deadline.watch(restored.pid());
    assert!(start.elapsed() >= Duration::from_millis(600), "it waited");
    assert_eq!(restored.pid(), pid, "the same pid back");
    assert!(!reaper.join().expect("reaper").success());
    restored.kill().expect("kill");
    assert_eq!(restored.wait().expect("wait"), Exit::Signal(9));
}
