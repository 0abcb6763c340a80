//! Shared helpers: a counting process tree, polling with a bound, reading the counts back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tree of a parent (with a second thread) and a forked child, all counting into one file
/// through one shared descriptor (so one shared offset): lines `p N`, `t N`, `c N`.
///
/// In `slots` mode each tag instead rewrites its own fixed-width line in place, so the file's
/// size stops changing: CRIU refuses to restore a file whose size differs from the dump's, which
/// a copy restored beside a still-writing original would otherwise hit.
const COUNTER: &str = r#"
import os, sys, threading, time
os.setsid()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
slots = sys.argv[2] == "slots"
def count(tag):
    i = 0
    while True:
        if slots:
            os.pwrite(fd, ("%s %012d\n" % (tag, i)).encode(), 15 * "pct".index(tag))
        else:
            os.write(fd, ("%s %d\n" % (tag, i)).encode())
        i += 1
        time.sleep(0.005)
if os.fork() == 0:
    count("c")
threading.Thread(target=count, args=("t",), daemon=True).start()
count("p")
"#;

/// How the counting tree writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Appends a line per count (through the shared offset).
    Lines,
    /// Rewrites one line per tag in place (constant file size).
    Slots,
}

/// Start the counting tree in `dir`; returns the root and the file it counts into.
pub(crate) fn spawn_counter(dir: &Path, mode: Mode) -> (Child, PathBuf) {
    let out = dir.join("counts.txt");
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(COUNTER)
        .arg(&out)
        .arg(if mode == Mode::Slots {
            "slots"
        } else {
            "lines"
        })
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = pf_world_procs::test_support::spawn_clean(&mut cmd).expect("spawn python3");
    (child, out)
}

/// Poll `cond` every 10 ms for at most `limit`.
pub(crate) fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The counts per tag, in file order. Panics on anything that is not a well-formed line (a hole
/// of NUL bytes from a lost file offset, an overwritten line).
pub(crate) fn counts(file: &Path) -> BTreeMap<String, Vec<u64>> {
    let text = std::fs::read_to_string(file).expect("read counts");
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    for line in complete.lines() {
        let (tag, n) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("malformed line {line:?} in {}", file.display()));
        let n: u64 = n
            .parse()
            .unwrap_or_else(|_| panic!("malformed count {line:?} in {}", file.display()));
        out.entry(tag.to_owned()).or_default().push(n);
    }
    out
}

/// The highest count of `tag` (0 when none yet, or no file yet).
pub(crate) fn max_count(file: &Path, tag: &str) -> u64 {
    if !file.exists() {
        return 0;
    }
    counts(file)
        .get(tag)
        .and_then(|v| v.iter().max().copied())
        .unwrap_or(0)
}

/// Every tag counted 0, 1, 2, … with no gap, no repeat and no restart.
pub(crate) fn assert_consecutive(file: &Path) {
    let counts = counts(file);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["c", "p", "t"],
        "tags in {}",
        file.display()
    );
    for (tag, seq) in counts {
        let want: Vec<u64> = (0..seq.len() as u64).collect();
        assert_eq!(seq, want, "counts of {tag} are not 0, 1, 2, …");
    }
}

/// The direct children of `pid` (all threads).
pub(crate) fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// Number of threads of `pid`.
pub(crate) fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// Whether `pid` is running (exists and is not a zombie).
pub(crate) fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s
            .rfind(')')
            .and_then(|i| s[i + 1..].trim_start().chars().next());
        !matches!(state, Some('Z') | Some('X') | None)
    })
}

/// Bytes `pid` has written so far (`wchar` of `/proc/<pid>/io`).
pub(crate) fn wchar(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The pid tracing a task of `pid` (`TracerPid:`); 0 when none, or no such process.
pub(crate) fn tracer_pid(pid: i32) -> i32 {
    pf_os::proc::traced_task(pid).map_or(0, |(_, tracer)| tracer)
}

/// Options for a plain capture.
pub(crate) fn capture_opts(leave_running: bool) -> pf_world_procs::CaptureOptions {
    pf_world_procs::CaptureOptions {
        leave_running,
        shell_job: false,
        tcp_established: false,
        ext_unix_sk: false,
        file_locks: false,
        labels: BTreeMap::new(),
        extra_args: Vec::new(),
    }
}

/// Options for a plain restore.
pub(crate) fn restore_opts(new_pidns: bool) -> pf_world_procs::RestoreOptions {
    pf_world_procs::RestoreOptions {
        new_pidns,
        shell_job: false,
        join_session: false,
        inherit: Vec::new(),
        extra_args: Vec::new(),
    }
}
