//! The workflow API against a real CRIU: warm a Python REPL up and freeze it with `warm_up`,
//! then explore branches with `fork_and_collect`; deadlines, cancels and `leave_running`.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use pf_core::{BlobStore as _, MemBlobStore};
use pf_goblins::{
    Cancel, CollectOptions, Drain, Error, FreezeOptions, FreezeTarget, Ready, Source, SpawnOptions,
    Stream, WarmFrom, WarmOptions,
};
use pf_world_procs::test_support::live;

use crate::support::{COUNTER, Talk, gone, python, spawn};

fn repl() -> Vec<OsString> {
    ["python3", "-u", "-i", "-q"].map(OsString::from).to_vec()
}

fn options(input: &[u8], ready: Ready, leave_running: bool, tag: Option<&str>) -> WarmOptions {
    WarmOptions {
        input: input.to_vec(),
        ready,
        timeout: Duration::from_secs(60),
        freeze: FreezeOptions {
            leave_running,
            shell_job: false,
        },
        tag: tag.map(str::to_owned),
        drain: Duration::from_secs(5),
    }
}

#[test]
fn live_warm_up_a_repl_then_fork_and_collect_branches_that_answer_differently() {
    if !live("live_warm_up_a_repl_then_fork_and_collect_branches_that_answer_differently") {
        return;
    }
    let store = MemBlobStore::default();
    let cancel = Cancel::new().expect("cancel");
    let mut seen: Vec<(Stream, Vec<u8>)> = Vec::new();
    let warmed = pf_goblins::warm_up(
        WarmFrom::Command {
            command: repl(),
            spawn: SpawnOptions::in_dir("/".into()),
        },
        FreezeTarget::Store(&store),
        &options(
            b"import json\nbase = 7\nprint('ready')\n",
            Ready::Matches("^ready$".into()),
            false,
            Some("repl"),
        ),
        &cancel,
        &mut |stream, bytes| seen.push((stream, bytes.to_vec())),
    )
    .expect("warm up");
    assert_eq!(warmed.stdout, b"ready\n");
    let streamed: Vec<u8> = seen
        .iter()
        .filter(|(s, _)| *s == Stream::Stdout)
        .flat_map(|(_, b)| b.clone())
        .collect();
    assert_eq!(streamed, warmed.stdout, "on_output saw what was returned");
    assert_eq!(warmed.drain, Drain::Complete);
    assert!(warmed.goblin.is_none());
    assert_eq!(
        warmed.status.and_then(|s| s.signal()),
        Some(libc::SIGKILL),
        "the dump stopped it"
    );
    assert!(gone(warmed.pid), "the warmed goblin was reaped");
    let digest = *warmed.frozen.digest().expect("stored");
    assert_eq!(store.get_name("repl").expect("tagged"), digest);

    let source = Source::Store {
        store: &store,
        digest: &digest,
    };
    let inputs = pf_goblins::inputs_from_template(
        b"print(json.dumps({'branch': {i}, 'x': base * {i}}))\n",
        3,
    );
    let collected = pf_goblins::fork_and_collect(
        &source,
        &CollectOptions {
            inputs,
            deadline: Some(Duration::from_secs(60)),
        },
        &cancel,
    )
    .expect("fork and collect");
    assert_eq!(collected.len(), 3);
    for (k, c) in collected.iter().enumerate() {
        let k = k + 1;
        assert_eq!(c.clone, k);
        assert_eq!(
            String::from_utf8_lossy(&c.stdout),
            format!("{{\"branch\": {k}, \"x\": {}}}\n", 7 * k),
            "{c:?}"
        );
        assert_eq!(c.status.code(), Some(0), "{c:?}");
        assert!(!c.timed_out && !c.cancelled, "{c:?}");
        assert!(gone(c.pid));
    }

    // A branch that overruns its deadline is killed and reported; the others are unaffected.
    let started = Instant::now();
    let collected = pf_goblins::fork_and_collect(
        &source,
        &CollectOptions {
            inputs: vec![
                b"print(base)\n".to_vec(),
                b"import time\ntime.sleep(120)\n".to_vec(),
            ],
            deadline: Some(Duration::from_secs(3)),
        },
        &cancel,
    )
    .expect("fork and collect");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(collected[0].stdout, b"7\n");
    assert!(!collected[0].timed_out);
    assert!(collected[1].timed_out, "{:?}", collected[1]);
    assert_eq!(collected[1].status.signal(), Some(libc::SIGKILL));
    assert!(gone(collected[1].pid));
}

#[test]
fn live_warm_up_leaves_a_goblin_running_or_stops_it_on_cancel() {
    if !live("live_warm_up_leaves_a_goblin_running_or_stops_it_on_cancel") {
        return;
    }
    let store = MemBlobStore::default();
    let cancel = Cancel::new().expect("cancel");
    // A goblin started by the caller, warmed by quiet, left running with its pipes back.
    let goblin = spawn(&python(COUNTER, &[]));
    let warmed = pf_goblins::warm_up(
        WarmFrom::Goblin(goblin),
        FreezeTarget::Store(&store),
        &options(
            b"inc\ninc\n",
            Ready::Quiet(Duration::from_secs(2)),
            true,
            None,
        ),
        &cancel,
        &mut |_, _| {},
    )
    .expect("warm up");
    assert_eq!(warmed.stdout, b"1\n2\n");
    assert_eq!(warmed.drain, Drain::LeftRunning);
    let mut goblin = warmed.goblin.expect("left running");
    let mut talk = Talk::new(&mut goblin);
    assert_eq!(talk.ask("inc"), "3", "the original runs on with its pipes");
    let digest = *warmed.frozen.digest().expect("stored");
    let mut copy = pf_goblins::thaw(
        &Source::Store {
            store: &store,
            digest: &digest,
        },
        &pf_goblins::ThawOptions {
            new_pid_namespace: true,
        },
    )
    .expect("thaw");
    let mut copy_talk = Talk::new(&mut copy);
    assert_eq!(
        copy_talk.ask("inc"),
        "3",
        "the copy starts from the warm state"
    );
    drop(copy);
    drop(goblin);

    // A cancel while waiting to be warm stops the goblin and says which signal.
    let c = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        c.cancel_with_signal(libc::SIGINT);
    });
    let started = Instant::now();
    let err = pf_goblins::warm_up(
        WarmFrom::Command {
            command: python(COUNTER, &[]),
            spawn: SpawnOptions::in_dir("/".into()),
        },
        FreezeTarget::Store(&store),
        &options(b"", Ready::Matches("^never$".into()), false, None),
        &cancel,
        &mut |_, _| {},
    )
    .expect_err("cancelled");
    t.join().expect("join");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(err.kind(), pf_goblins::ErrorKind::Cancelled);
    let Error::Cancelled {
        pid: Some(pid),
        signal: Some(libc::SIGINT),
    } = err
    else {
        panic!("wrong error: {err:?}");
    };
    assert!(gone(pid), "the cancelled goblin was stopped and reaped");

    // Not warm by the deadline: stopped, and the error says what it waited for.
    let fresh = Cancel::new().expect("cancel");
    let mut opts = options(b"", Ready::Matches("^never$".into()), false, None);
    opts.timeout = Duration::from_millis(500);
    let err = pf_goblins::warm_up(
        WarmFrom::Command {
            command: python(COUNTER, &[]),
            spawn: SpawnOptions::in_dir("/".into()),
        },
        FreezeTarget::Store(&store),
        &opts,
        &fresh,
        &mut |_, _| {},
    )
    .expect_err("not warm");
    assert!(
        matches!(err, Error::NotWarm { quiet: false, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("never matched the ready pattern"),
        "{err}"
    );
    assert_eq!(err.kind(), pf_goblins::ErrorKind::NotWarm);

    // The pattern printed on stderr (as a REPL prints its prompt): not warm, and the error says
    // the pattern is looked for on stdout.
    let mut opts = options(b"", Ready::Matches("^ready$".into()), false, None);
    opts.timeout = Duration::from_millis(800);
    let err = pf_goblins::warm_up(
        WarmFrom::Command {
            command: python(
                "import sys, time\nsys.stderr.write('ready\\n')\nsys.stderr.flush()\ntime.sleep(60)",
                &[],
            ),
            spawn: SpawnOptions::in_dir("/".into()),
        },
        FreezeTarget::Store(&store),
        &opts,
        &fresh,
        &mut |_, _| {},
    )
    .expect_err("not warm");
    assert!(
        matches!(
            err,
            Error::NotWarm {
                quiet: false,
                on_stderr: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("matched what it printed on stderr, but it is looked for on stdout"),
        "{err}"
    );

    // Ready, but more input than it reads (a pipe holds 64 KiB): the error says how much it
    // took, not that the pattern never matched.
    let input = vec![b'a'; 300_000];
    let mut opts = options(&input, Ready::Matches("^ready$".into()), false, None);
    opts.timeout = Duration::from_millis(800);
    let err = pf_goblins::warm_up(
        WarmFrom::Command {
            command: python(
                "import time\nprint('ready', flush=True)\ntime.sleep(60)",
                &[],
            ),
            spawn: SpawnOptions::in_dir("/".into()),
        },
        FreezeTarget::Store(&store),
        &opts,
        &fresh,
        &mut |_, _| {},
    )
    .expect_err("not warm");
    let Error::NotWarm {
        input_taken: Some((taken, 300_000)),
        ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert!(taken < 300_000, "{taken}");
    assert!(
        err.to_string().contains(&format!(
            "it had taken only {taken} of the 300000 bytes of its input"
        )),
        "{err}"
    );
}
