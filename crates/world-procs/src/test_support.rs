//! Helpers for live tests (root + a working CRIU) across the workspace: the gate, a pid killer,
//! a per-test deadline, and a spawner that leaks no descriptors into the process a test will
//! dump.
//!
//! Not part of the stable API: hidden from docs, used by tests of every pf crate.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether live tests may run: true when `PF_HAS_CRIU=1`.
///
/// Otherwise prints a one-line reason on stderr and returns false — except when `CI` is set,
/// where a skipped live test is a failure, so it panics.
#[allow(clippy::print_stderr)]
pub fn live(what: &str) -> bool {
    if std::env::var("PF_HAS_CRIU").is_ok_and(|v| v == "1") {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        panic!(
            "live test {what} would be skipped in CI: PF_HAS_CRIU is not 1 (run `cargo xtask live`)"
        );
    }
    eprintln!("skipping live test {what}: set PF_HAS_CRIU=1 (cargo xtask live)");
    false
}

/// SIGKILLs the pid when dropped, and reaps it if it is our child.
///
/// When it is not our child (a restored process reparented elsewhere), waits up to 5 s for it to
/// be gone from `/proc` or be a zombie, so a following restore of the same pid does not collide.
#[derive(Debug)]
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::sys::wait::waitpid;
        use nix::unistd::Pid;
        if self.0 <= 1 {
            return;
        }
        let pid = Pid::from_raw(self.0);
        if kill(pid, Signal::SIGKILL).is_err() {
            let _ = waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            return;
        }
        if waitpid(pid, None).is_ok() {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            match pf_os::proc::pid_state(self.0) {
                pf_os::proc::PidState::Alive => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                _ => return,
            }
        }
    }
}

/// The pid of a process that ran and has been reaped: a pid no process holds right now (what
/// a killed pf's pid is to the next pf).
pub fn dead_pid() -> i32 {
    let mut dead = Command::new("true")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn true");
    let pid = dead.id() as i32;
    dead.wait().expect("reap true");
    pid
}

/// Spawn `cmd` with every descriptor above 2 closed in the child (CRIU cannot dump a process
/// holding a leaked descriptor it cannot resolve). Stdio is whatever `cmd` says.
pub fn spawn_clean(cmd: &mut Command) -> std::io::Result<Child> {
    pf_os::fd::only_these_fds(cmd, Vec::new());
    cmd.spawn()
}

/// A process that traces another with `PTRACE_SEIZE` (as a debugger, strace or criu's dump
/// does: only one tracer at a time) until it is dropped, then is killed, which detaches it.
#[derive(Debug)]
pub struct Tracer {
    /// The tracer's pid (the traced process's `TracerPid:`).
    pub pid: i32,
    _kill: KillOnDrop,
}

/// Trace `pid` from a new process named `name` (its `/proc/PID/comm`: `criu` poses as another
/// freeze's criu), returning once it holds `pid`. python3 with ctypes: no ptrace in this crate,
/// whose only `unsafe` is elsewhere.
pub fn trace(pid: i32, name: &str) -> std::io::Result<Tracer> {
    use std::io::BufRead as _;
    const SCRIPT: &str = "import ctypes, os, sys, time\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        libc.prctl(15, sys.argv[2].encode(), 0, 0, 0)\n\
        if libc.ptrace(ctypes.c_long(0x4206), ctypes.c_long(int(sys.argv[1])), None, None) != 0:\n\
        \x20   print('PTRACE_SEIZE:', os.strerror(ctypes.get_errno()), flush=True)\n\
        \x20   sys.exit(1)\n\
        print('seized', flush=True)\n\
        time.sleep(3600)\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT, &pid.to_string(), name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut child = spawn_clean(&mut cmd)?;
    let kill = KillOnDrop(i32::try_from(child.id()).unwrap_or(0));
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    if line.trim() != "seized" {
        return Err(std::io::Error::other(format!(
            "the tracer of {pid} did not seize it: {line:?}"
        )));
    }
    Ok(Tracer {
        pid: kill.0,
        _kill: kill,
    })
}

/// A test's deadline: if it is not dropped within `limit`, the watched pids are SIGKILLed and the
/// whole test process exits with status 101, so a hung CRIU call cannot hang CI.
#[derive(Debug)]
pub struct Deadline {
    done: Arc<AtomicBool>,
    pids: Arc<Mutex<Vec<i32>>>,
}

impl Deadline {
    /// Start the clock for the test `what`.
    #[allow(clippy::print_stderr)]
    pub fn start(what: &str, limit: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let pids = Arc::new(Mutex::new(Vec::new()));
        let (d, p, what) = (done.clone(), pids.clone(), what.to_owned());
        std::thread::spawn(move || {
            let end = Instant::now() + limit;
            while Instant::now() < end {
                if d.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if d.load(Ordering::SeqCst) {
                return;
            }
            eprintln!("live test {what} exceeded its deadline of {limit:?}: killing its processes");
            let pids = p.lock().map(|v| v.clone()).unwrap_or_default();
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::process::exit(101);
        });
        Self { done, pids }
    }

    /// Kill `pid` too if the deadline passes.
    pub fn watch(&self, pid: i32) {
        if let Ok(mut v) = self.pids.lock() {
            v.push(pid);
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}
