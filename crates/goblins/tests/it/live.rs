//! Freeze, thaw and fork real goblins.

use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;

use pf_core::{BlobStore as _, MemBlobStore};
use pf_goblins::{Error, FreezeOptions, FreezeTarget, Snapshot, Source, StdioKind, ThawOptions};
use pf_world_procs::test_support::live;

use crate::support::{COUNTER, SLOW_READER, Talk, gone, python, spawn};

const KEEP: FreezeOptions = FreezeOptions {
    leave_running: true,
    shell_job: false,
};
const KILL: FreezeOptions = FreezeOptions {
    leave_running: false,
    shell_job: false,
};
const NEW_NS: ThawOptions = ThawOptions {
    new_pid_namespace: true,
};

#[test]
fn live_thaw_continues_the_state_beside_the_original() {
    if !live("live_thaw_continues_the_state_beside_the_original") {
        return;
    }
    let store = MemBlobStore::default();
    let mut original = spawn(&python(COUNTER, &[]));
    let mut talk = Talk::new(&mut original);
    assert_eq!(talk.ask("inc"), "1");
    assert_eq!(talk.ask("inc"), "2");
    assert_eq!(talk.ask("set color=green"), "ok");

    let frozen =
        pf_goblins::freeze(original.pid(), FreezeTarget::Store(&store), &KEEP).expect("freeze");
    let digest = *frozen.digest().expect("stored");
    assert!(frozen.streams.pipes().is_some());
    let blob: serde_json::Value =
        serde_json::from_slice(&store.get(&digest).expect("procs blob")).expect("json");
    assert_eq!(blob["labels"]["goblin"], "v1", "{blob}");
    assert_eq!(
        blob["stdio"][0],
        format!("pipe:[{}]", pipe_ino(&frozen.streams.0[0]))
    );

    // The original runs on.
    assert_eq!(talk.ask("inc"), "3");

    let source = Source::Store {
        store: &store,
        digest: &digest,
    };
    let mut thawed = pf_goblins::thaw(&source, &NEW_NS).expect("thaw");
    assert_ne!(thawed.pid(), original.pid());
    let mut copy = Talk::new(&mut thawed);
    assert_eq!(
        copy.ask("inc"),
        "3",
        "the copy starts from the frozen state"
    );
    assert_eq!(copy.ask("get color"), "green");
    assert_eq!(copy.ask("err to-stderr"), "ok");
    assert_eq!(talk.ask("inc"), "4", "the original is unaffected");
    // The copy runs in a pid namespace of its own; it freezes all the same, from inside it.
    let refrozen = pf_goblins::freeze(thawed.pid(), FreezeTarget::Store(&store), &KEEP)
        .expect("freeze the thawed copy");
    let redigest = *refrozen.digest().expect("stored");
    assert_eq!(copy.ask("inc"), "4", "the copy runs on after its freeze");
    let resource = Source::Store {
        store: &store,
        digest: &redigest,
    };
    let mut second = pf_goblins::thaw(&resource, &NEW_NS).expect("thaw the copy's snapshot");
    let mut talk2 = Talk::new(&mut second);
    assert_eq!(
        talk2.ask("inc"),
        "4",
        "a copy of the copy starts from its state"
    );
    assert_eq!(talk2.ask("get color"), "green");
    talk2.close();
    assert_eq!(talk2.rest(), ["eof 4"]);
    assert_eq!(second.wait().expect("wait").code(), Some(0));

    copy.close();
    assert_eq!(copy.rest(), ["eof 4"]);
    let mut err = String::new();
    thawed
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert_eq!(err, "to-stderr\n");
    let pid = thawed.pid();
    assert_eq!(thawed.wait().expect("wait").code(), Some(0));
    assert!(gone(pid), "thawed goblin {pid} reaped");
    let opid = original.pid();
    drop(original);
    assert!(gone(opid));
}

#[test]
fn live_exit_code_and_eof_reach_the_caller() {
    if !live("live_exit_code_and_eof_reach_the_caller") {
        return;
    }
    let store = MemBlobStore::default();
    let mut original = spawn(&python(COUNTER, &[]));
    let mut talk = Talk::new(&mut original);
    assert_eq!(talk.ask("inc"), "1");
    let short = std::time::Duration::from_millis(50);
    assert_eq!(original.wait_timeout(short).expect("wait_timeout"), None);
    let frozen =
        pf_goblins::freeze(original.pid(), FreezeTarget::Store(&store), &KILL).expect("freeze");
    assert_eq!(
        original.wait().expect("reap original").signal(),
        Some(libc::SIGKILL),
        "criu stops the original after the dump"
    );
    let digest = *frozen.digest().expect("stored");
    let source = Source::Store {
        store: &store,
        digest: &digest,
    };

    let mut seven = pf_goblins::thaw(&source, &NEW_NS).expect("thaw");
    let mut t7 = Talk::new(&mut seven);
    assert_eq!(t7.ask("inc"), "2");
    assert_eq!(seven.wait_timeout(short).expect("wait_timeout"), None);
    t7.send("exit 7");
    let status = seven.wait_timeout(std::time::Duration::from_secs(30));
    assert_eq!(
        status.expect("wait_timeout").and_then(|s| s.code()),
        Some(7)
    );
    assert_eq!(
        seven.try_wait().expect("again").and_then(|s| s.code()),
        Some(7)
    );

    let mut eof = pf_goblins::thaw(&source, &NEW_NS).expect("thaw again");
    let mut te = Talk::new(&mut eof);
    te.close();
    assert_eq!(te.rest(), ["eof 1"]);
    assert_eq!(eof.wait().expect("wait").code(), Some(0));

    let mut killed = pf_goblins::thaw(&source, &NEW_NS).expect("thaw a third time");
    let pid = killed.pid();
    assert_eq!(killed.kill().expect("kill").signal(), Some(libc::SIGKILL));
    assert!(gone(pid));
    let dropped = pf_goblins::thaw(&source, &NEW_NS).expect("thaw a fourth time");
    let pid = dropped.pid();
    drop(dropped);
    assert!(gone(pid), "dropping a goblin kills and reaps it");
}

#[test]
fn live_fork_eight_from_one_state_then_diverge() {
    if !live("live_fork_eight_from_one_state_then_diverge") {
        return;
    }
    let store = MemBlobStore::default();
    let mut original = spawn(&python(COUNTER, &[]));
    let mut talk = Talk::new(&mut original);
    for want in ["1", "2", "3"] {
        assert_eq!(talk.ask("inc"), want);
    }
    let frozen =
        pf_goblins::freeze(original.pid(), FreezeTarget::Store(&store), &KEEP).expect("freeze");
    let digest = *frozen.digest().expect("stored");
    let source = Source::Store {
        store: &store,
        digest: &digest,
    };
    let loaded = pf_goblins::load(&source).expect("load");
    let mut clones = loaded.fork(8).expect("fork 8");
    assert_eq!(clones.len(), 8);
    let mut ninth = loaded.thaw(&NEW_NS).expect("a ninth from the same load");
    // The extracted images go with `loaded`; the goblins run on.
    drop(loaded);
    assert_eq!(Talk::new(&mut ninth).ask("inc"), "4");
    let mut pids: Vec<i32> = clones.iter().map(|g| g.pid()).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 8, "eight distinct processes");
    let mut talks: Vec<Talk> = clones.iter_mut().map(Talk::new).collect();
    for t in &mut talks {
        assert_eq!(
            t.ask("inc"),
            "4",
            "every clone starts from the frozen state"
        );
    }
    // Clone k counts k more times: they diverge independently.
    for (k, t) in talks.iter_mut().enumerate() {
        for _ in 0..k {
            t.ask("inc");
        }
        t.ask(&format!("set who=clone{k}"));
    }
    for (k, t) in talks.iter_mut().enumerate() {
        assert_eq!(t.ask("inc"), (5 + k).to_string());
        assert_eq!(t.ask("get who"), format!("clone{k}"));
    }
    assert_eq!(talk.ask("inc"), "4", "the original still answers");
    assert_eq!(talk.ask("get who"), "-");
    drop(talks);
    for mut clone in clones {
        let pid = clone.pid();
        clone.kill().expect("kill clone");
        assert!(gone(pid));
    }
}

#[test]
fn live_unread_stdin_arrives_first_and_in_order() {
    if !live("live_unread_stdin_arrives_first_and_in_order") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MemBlobStore::default();
    for target in ["store", "images"] {
        let mut original = spawn(&python(SLOW_READER, &["3"]));
        let mut talk = Talk::new(&mut original);
        assert_eq!(talk.line(), "started");
        talk.send("one");
        talk.send("two");
        // Frozen while it sleeps: both lines are still in the pipe.
        let images = dir.path().join(target);
        let target_ = if target == "store" {
            FreezeTarget::Store(&store)
        } else {
            FreezeTarget::Images(&images)
        };
        let frozen = pf_goblins::freeze(original.pid(), target_, &KILL).expect("freeze");
        original.wait().expect("reap original");
        let source = match &frozen.snapshot {
            Snapshot::Stored(digest) => Source::Store {
                store: &store,
                digest,
            },
            Snapshot::Images(dir) => {
                assert!(dir.join("goblin.json").is_file());
                assert!(dir.join("pipes-data.img").is_file());
                Source::Images(dir)
            }
        };
        let mut thawed = pf_goblins::thaw(&source, &NEW_NS).expect("thaw");
        let mut t = Talk::new(&mut thawed);
        t.send("three");
        t.close();
        assert_eq!(
            t.rest(),
            ["got one", "got two", "got three", "eof"],
            "target {target}"
        );
        assert_eq!(thawed.wait().expect("wait").code(), Some(0));
        drop(frozen);
    }
}

#[test]
fn live_shared_stdout_and_stderr_stay_shared() {
    if !live("live_shared_stdout_and_stderr_stay_shared") {
        return;
    }
    let store = MemBlobStore::default();
    let script = format!("exec python3 -u -c '{}' 2>&1", COUNTER.replace('\'', "\\'"));
    let mut original = spawn(&["sh".into(), "-c".into(), script.into()]);
    let mut talk = Talk::new(&mut original);
    assert_eq!(talk.ask("inc"), "1");
    let frozen =
        pf_goblins::freeze(original.pid(), FreezeTarget::Store(&store), &KILL).expect("freeze");
    assert_eq!(frozen.streams.0[1], frozen.streams.0[2]);
    let digest = *frozen.digest().expect("stored");
    let mut thawed = pf_goblins::thaw(
        &Source::Store {
            store: &store,
            digest: &digest,
        },
        &NEW_NS,
    )
    .expect("thaw");
    assert!(thawed.stderr.is_none(), "stderr arrives on stdout");
    let mut t = Talk::new(&mut thawed);
    t.send("err oops");
    assert_eq!(t.line(), "oops");
    assert_eq!(t.line(), "ok");
    assert_eq!(t.ask("inc"), "2");
}

#[test]
fn live_refusals_say_what_is_wrong() {
    if !live("live_refusals_say_what_is_wrong") {
        return;
    }
    let store = MemBlobStore::default();
    // stdout to a file
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    let mut child = std::process::Command::new("setsid")
        .args(["sleep", "30"])
        .stdin(std::process::Stdio::piped())
        .stdout(file.reopen().expect("reopen"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let _guard = pf_world_procs::test_support::KillOnDrop(i32::try_from(child.id()).expect("pid"));
    let pid = i32::try_from(child.id()).expect("pid");
    let err = pf_goblins::freeze(pid, FreezeTarget::Store(&store), &KEEP).expect_err("a file");
    match &err {
        Error::NotPipes { pid: p, streams } => {
            assert_eq!(*p, pid);
            assert!(
                matches!(&streams.0[1], StdioKind::File(path) if path == &file.path().display().to_string())
            );
        }
        other => panic!("wrong error: {other:?}"),
    }
    assert!(err.to_string().contains("stdout is a file"), "{err}");
    child.kill().expect("kill");
    child.wait().expect("reap");

    assert!(matches!(
        pf_goblins::freeze(i32::MAX - 1, FreezeTarget::Store(&store), &KEEP),
        Err(Error::NoSuchProcess { .. })
    ));

    // An unknown digest.
    let unknown = pf_core::Digest256::of(b"no such blob");
    let err = pf_goblins::thaw(
        &Source::Store {
            store: &store,
            digest: &unknown,
        },
        &NEW_NS,
    )
    .expect_err("unknown digest");
    assert!(matches!(err, Error::Thaw { .. }), "{err:?}");

    // A procs blob that is not a goblin's: captured as a plain tree, without the label.
    let mut plain = spawn(&python(COUNTER, &[]));
    let mut talk = Talk::new(&mut plain);
    assert_eq!(talk.ask("inc"), "1");
    let options = pf_world_procs::CaptureOptions {
        leave_running: false,
        shell_job: false,
        tcp_established: false,
        ext_unix_sk: false,
        file_locks: false,
        labels: std::collections::BTreeMap::new(),
        extra_args: Vec::new(),
    };
    let captured = pf_world_procs::capture(&store, plain.pid(), &options).expect("capture");
    plain.wait().expect("reap");
    let err = pf_goblins::thaw(
        &Source::Store {
            store: &store,
            digest: &captured.procs,
        },
        &NEW_NS,
    )
    .expect_err("not a goblin");
    assert!(matches!(err, Error::NotAGoblin { .. }), "{err:?}");
    assert!(err.to_string().contains("goblin=v1"), "{err}");
    assert_eq!(err.kind(), pf_goblins::ErrorKind::NotAGoblin);
    assert!(
        matches!(
            &err,
            Error::NotAGoblin {
                reason: pf_goblins::NotAGoblinReason::NoGoblinLabel,
                ..
            }
        ),
        "{err:?}"
    );
    let err = pf_goblins::fork(
        &Source::Store {
            store: &store,
            digest: &captured.procs,
        },
        2,
    )
    .expect_err("not a goblin either");
    assert!(matches!(err, Error::NotAGoblin { .. }), "{err:?}");

    // An images directory without goblin.json.
    let empty = tempfile::tempdir().expect("tempdir");
    let err = pf_goblins::thaw(&Source::Images(empty.path()), &NEW_NS).expect_err("no metadata");
    assert!(matches!(err, Error::Metadata { op: "read", .. }), "{err:?}");
}

/// Prints where its stdin, stdout and stderr lead, once per line of input.
const FDS: &str = r#"
import os, sys
for line in sys.stdin:
    print(" ".join(os.readlink("/proc/self/fd/%d" % fd) for fd in range(3)))
print("eof")
"#;

#[test]
fn live_wired_thaw_passes_the_callers_pipes_through() {
    if !live("live_wired_thaw_passes_the_callers_pipes_through") {
        return;
    }
    use std::io::{BufRead as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let store = MemBlobStore::default();
    let mut original = spawn(&python(FDS, &[]));
    let frozen =
        pf_goblins::freeze(original.pid(), FreezeTarget::Store(&store), &KILL).expect("freeze");
    original.wait().expect("reap original");
    let digest = *frozen.digest().expect("stored");
    let loaded = pf_goblins::load(&Source::Store {
        store: &store,
        digest: &digest,
    })
    .expect("load");
    assert!(loaded.stdin_backlog().is_empty());

    let (in_r, mut in_w) = std::io::pipe().expect("pipe");
    let (out_r, out_w) = std::io::pipe().expect("pipe");
    let ino = |fd: i32| nix::sys::stat::fstat(fd).expect("fstat").st_ino;
    let (in_ino, out_ino) = (ino(in_w.as_raw_fd()), ino(out_r.as_raw_fd()));
    let mut thawed = loaded
        .thaw_wired(
            &NEW_NS,
            pf_goblins::Wiring {
                stdin: pf_goblins::Wire::Fd(in_r.into()),
                stdout: pf_goblins::Wire::Fd(out_w.into()),
                stderr: pf_goblins::Wire::NewPipe,
            },
        )
        .expect("thaw wired");
    assert!(thawed.stdin.is_none() && thawed.stdout.is_none());
    let err_r = thawed.stderr.take().expect("stderr on a new pipe");
    let err_ino = ino(err_r.as_raw_fd());

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out_r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(crate::support::ANSWER)
            .expect("an answer on our own stdout pipe")
    };
    writeln!(in_w, "where").expect("write");
    assert_eq!(
        next(),
        format!("pipe:[{in_ino}] pipe:[{out_ino}] pipe:[{err_ino}]"),
        "the goblin holds our pipes themselves"
    );
    drop(in_w);
    assert_eq!(
        next(),
        "eof",
        "closing our pipe is the goblin's end of input"
    );
    assert_eq!(thawed.wait().expect("wait").code(), Some(0));

    // Unread input must go in first, through a pipe of pf's: a descriptor for stdin is refused.
    let mut slow = spawn(&python(SLOW_READER, &["3"]));
    let mut talk = Talk::new(&mut slow);
    assert_eq!(talk.line(), "started");
    talk.send("one");
    let frozen =
        pf_goblins::freeze(slow.pid(), FreezeTarget::Store(&store), &KILL).expect("freeze");
    slow.wait().expect("reap");
    let digest = *frozen.digest().expect("stored");
    let loaded = pf_goblins::load(&Source::Store {
        store: &store,
        digest: &digest,
    })
    .expect("load");
    assert_eq!(loaded.stdin_backlog(), b"one\n");
    let (in_r, _in_w) = std::io::pipe().expect("pipe");
    let err = loaded
        .thaw_wired(
            &NEW_NS,
            pf_goblins::Wiring {
                stdin: pf_goblins::Wire::Fd(in_r.into()),
                stdout: pf_goblins::Wire::NewPipe,
                stderr: pf_goblins::Wire::NewPipe,
            },
        )
        .expect_err("unread input first");
    assert!(
        matches!(err, Error::StdinBacklog { bytes: 4, .. }),
        "{err:?}"
    );
}

fn pipe_ino(kind: &StdioKind) -> u64 {
    match kind {
        StdioKind::Pipe(ino) => *ino,
        other => panic!("not a pipe: {other:?}"),
    }
}
