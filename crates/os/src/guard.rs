//! A process that lets a stopped tree run on when this process dies without a word.
//!
//! `criu dump --leave-stopped` leaves the dumped tree stopped (`SIGSTOP`) so that its caller can
//! kill it once the snapshot is stored, or let it run on (`SIGCONT`) when storing fails. A
//! caller killed in between (SIGKILL, the OOM killer) does neither, and the tree stays stopped
//! for good: a user's process hung by a freeze that never finished. criu runs in a process group
//! of its own and finishes the dump without its caller, so this can happen while criu still
//! dumps, too.
//!
//! [`ContinueOnDeath::start`] forks a small guard before the dump. It holds the reading end of a
//! pipe whose writing end only this process holds: [`ContinueOnDeath::disarm`] writes a byte
//! and the guard exits; end of file means this process died first. The guard then waits until
//! no task of the tree is traced any more (criu has finished with it), sends each `SIGCONT`
//! through a pidfd, and exits. A tree that was dumped and whose snapshot may be stored runs on:
//! a process is never lost to a freeze that did not finish.
//!
//! `unsafe`: the guard is a fork that makes raw system calls only.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::time::Duration;

/// How long a guard whose caller died waits for criu to let go of the tree before it gives up
/// (criu's own dump deadline in pf is shorter).
const WAIT_FOR_CRIU: Duration = Duration::from_secs(30 * 60);
/// How often it looks.
const TICK: Duration = Duration::from_millis(50);
/// The guard's name in `ps`.
const NAME: &std::ffi::CStr = c"pf-guard";

/// A guard process that sends `SIGCONT` to a tree if this process dies before
/// [`ContinueOnDeath::disarm`]; see the module documentation.
#[derive(Debug)]
pub struct ContinueOnDeath {
    pid: libc::pid_t,
    lifeline: Option<OwnedFd>,
}

impl ContinueOnDeath {
    /// Fork the guard for the processes `pids` (read before the dump: criu seizes the tree as
    /// it is then). Call it before criu starts.
    pub fn start(pids: &[i32]) -> io::Result<Self> {
        // Everything the child touches is made here: after a fork of a threaded process it may
        // only make raw system calls (another thread may have held malloc's lock).
        let status: Vec<CString> = pids
            .iter()
            .map(|p| CString::new(format!("/proc/{p}/status")).map_err(io::Error::other))
            .collect::<io::Result<_>>()?;
        let mut pidfds: Vec<RawFd> = vec![-1; pids.len()];
        let (life_r, life_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let plan = Plan {
            pids,
            status: &status,
            lifeline: life_r.as_raw_fd(),
            lifeline_w: life_w.as_raw_fd(),
        };
        // The child runs only `guard_main`, which makes raw async-signal-safe system calls on
        // data built above and never returns.
        let pid = crate::fd::raw_fork();
        if pid == 0 {
            guard_main(&plan, &mut pidfds);
        }
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(life_r);
        Ok(Self {
            pid: pid as libc::pid_t,
            lifeline: Some(life_w),
        })
    }

    /// The guard's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Tell the guard this process has dealt with the tree (killed it, or let it run on): it
    /// exits without touching it, and is reaped here.
    pub fn disarm(mut self) {
        self.end();
    }

    fn end(&mut self) {
        let Some(lifeline) = self.lifeline.take() else {
            return;
        };
        // SAFETY: a one-byte write from a static buffer into a descriptor we own.
        let written = unsafe { libc::write(lifeline.as_raw_fd(), b"d".as_ptr().cast(), 1) };
        if written != 1 {
            tracing::debug!(
                error = %io::Error::last_os_error(),
                "cannot disarm the guard; it lets the tree run on"
            );
        }
        drop(lifeline);
        // Reaped here, or a library caller collects a zombie per freeze. Someone else's
        // `waitpid(-1)` may have reaped it already (ECHILD): nothing to do then.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None);
    }
}

impl Drop for ContinueOnDeath {
    fn drop(&mut self) {
        self.end();
    }
}

/// What the guard is given.
struct Plan<'a> {
    pids: &'a [i32],
    status: &'a [CString],
    lifeline: RawFd,
    lifeline_w: RawFd,
}

/// The guard. Never returns.
///
/// SAFETY (for every block): raw system calls on integers, on strings built before the fork and
/// on stack buffers and memory allocated before it (`pidfds`); no allocation, no locks.
fn guard_main(plan: &Plan<'_>, pidfds: &mut [RawFd]) -> ! {
    unsafe {
        libc::close(plan.lifeline_w);
        libc::prctl(libc::PR_SET_NAME, NAME.as_ptr());
        // Ctrl-C at the terminal reaches the caller's whole process group: the caller decides.
        for sig in [
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Nothing of the caller's stays open here (a `$(pf …)` would wait on its stdout).
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        crate::fd::close_all_but(plan.lifeline, plan.lifeline);
        for (pid, fd) in plan.pids.iter().zip(pidfds.iter_mut()) {
            *fd = libc::syscall(libc::SYS_pidfd_open, *pid, 0u32) as RawFd;
        }
        let mut byte = 0u8;
        loop {
            match libc::read(plan.lifeline, (&raw mut byte).cast(), 1) {
                // Disarmed: the caller dealt with the tree.
                1 => libc::_exit(0),
                // The caller is gone.
                0 => break,
                _ if errno() == libc::EINTR => {}
                _ => libc::_exit(1),
            }
        }
        let ticks = WAIT_FOR_CRIU.as_millis() / TICK.as_millis();
        let mut tick = 0;
        while plan.status.iter().any(traced) {
            tick += 1;
            if tick > ticks {
                libc::_exit(2);
            }
            nap(TICK);
        }
        // Once more a moment later: criu detaches one thread after another.
        for _ in 0..3 {
            for &fd in pidfds.iter().filter(|fd| **fd >= 0) {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    libc::SIGCONT,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                );
            }
            nap(Duration::from_millis(100));
        }
        libc::_exit(0)
    }
}

/// Whether the process whose `/proc/PID/status` is at `path` is traced (`TracerPid:` other than
/// 0); `false` when it is gone. Async-signal-safe.
fn traced(path: &CString) -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: open, read into a stack buffer we own, close.
    let n = unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    let Ok(n) = usize::try_from(n) else {
        return false;
    };
    tracer_in(&buf[..n])
}

/// Whether a `/proc/PID/status` text names a tracer. Allocates nothing.
fn tracer_in(status: &[u8]) -> bool {
    const KEY: &[u8] = b"\nTracerPid:";
    let Some(at) = status.windows(KEY.len()).position(|w| w == KEY) else {
        return false;
    };
    status[at + KEY.len()..]
        .iter()
        .skip_while(|b| **b == b'\t' || **b == b' ')
        .take_while(|b| b.is_ascii_digit())
        .any(|b| *b != b'0')
}

fn nap(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    };
    // SAFETY: nanosleep on a timespec we own; an interrupted sleep is simply shorter.
    unsafe {
        libc::nanosleep(&ts, std::ptr::null_mut());
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_names_a_tracer_only_when_its_pid_is_not_zero() {
        let status = |tracer: &str| {
            format!("Name:\tsleep\nState:\tT (stopped)\nTracerPid:\t{tracer}\nUid:\t0\n")
        };
        assert!(!tracer_in(status("0").as_bytes()));
        assert!(tracer_in(status("4242").as_bytes()));
        assert!(tracer_in(status("10").as_bytes()));
        assert!(!tracer_in(b"Name:\tsleep\n"), "no TracerPid line");
    }

    /// A stopped child stays stopped while we live and disarm the guard; it runs on once a
    /// process that started a guard dies without disarming it.
    #[test]
    fn the_guard_continues_the_tree_only_when_its_caller_dies() {
        use std::process::{Command, Stdio};
        let stopped = |pid: i32| crate::proc::stat(pid).is_some_and(|s| s.state == 'T');
        let wait_for = |what: &dyn Fn() -> bool| {
            let end = std::time::Instant::now() + Duration::from_secs(10);
            while !what() {
                assert!(std::time::Instant::now() < end, "timed out");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let mut sleeper = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .expect("start sleep");
        let pid = sleeper.id() as i32;
        let stop = |p: i32| {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .expect("stop");
        };
        stop(pid);
        wait_for(&|| stopped(pid));

        // Disarmed: the tree is left as it is.
        let guard = ContinueOnDeath::start(&[pid]).expect("guard");
        guard.disarm();
        std::thread::sleep(Duration::from_millis(300));
        assert!(stopped(pid), "a disarmed guard touched the tree");

        // Its caller dies: a helper process (`sh`) starts no guard itself, so make the guard a
        // child of a fork of ours that exits at once without disarming it.
        // SAFETY: a fork; the child only starts the guard and `_exit`s (the test's threads are
        // not touched: the allocation in `start` is the one risk, and the test harness holds no
        // lock across this call).
        let child = unsafe { libc::fork() };
        if child == 0 {
            let guard = ContinueOnDeath::start(&[pid]);
            std::mem::forget(guard);
            unsafe { libc::_exit(0) };
        }
        assert!(child > 0, "fork");
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None).expect("reap");
        wait_for(&|| !stopped(pid));
        sleeper.kill().expect("kill sleep");
        sleeper.wait().expect("reap sleep");
    }
}
