//! Descriptor hygiene between fork and exec, and pidfds: the few system calls that need
//! `unsafe` because neither std nor nix wraps them (`close_range`, `pidfd_open`,
//! `pidfd_send_signal`) or because they run in a forked child before exec.
//!
//! A child pf starts must see only the descriptors it is told about: CRIU refuses to dump a
//! process holding a descriptor it cannot resolve (say an fd a parent leaked that points into
//! another mount), and criu itself must get only its `--inherit-fd` descriptors. So every
//! descriptor above 2 is marked close-on-exec in the child, except the ones passed on purpose.
//! Marking (rather than closing) keeps std's own exec-error pipe working: it is close-on-exec
//! already and must stay open until the exec.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Make `cmd`'s child start with only fds 0–2 plus `keep` open (each `keep` fd at its own number,
/// with close-on-exec cleared).
pub fn only_these_fds(cmd: &mut Command, keep: Vec<RawFd>) {
    let hook = move || -> io::Result<()> {
        mark_all_cloexec_from(3);
        for &fd in &keep {
            keep_across_exec(fd)?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
    // system calls (close_range, fcntl, getrlimit) on integers; it allocates nothing (`keep` was
    // built before the fork and is only read).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Make `cmd`'s child the leader of a new session holding no descriptor above 2 and blocking no
/// signal once it runs: what a goblin needs (CRIU dumps a session leader without `--shell-job`,
/// and a stray inherited fd makes the dump fail). The signal mask is cleared because the caller
/// may block signals to handle them on a thread of its own (pf does, for Ctrl-C): a goblin that
/// inherited that mask would never see SIGINT or SIGTERM, nor would anything it starts. No
/// parent-death signal is set: a restored root with one is killed when `criu restore` exits.
/// SIGINT and SIGQUIT get their default action back: a shell ignores them in every command it
/// starts in the background (`pf … &` in a script), and a goblin that inherited that would
/// ignore the Ctrl-C pf passes on to it.
pub fn new_session_only_stdio(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec. It makes only
    // async-signal-safe system calls (sigemptyset/sigprocmask on a set on its own stack, signal,
    // setsid, close_range or fcntl, getrlimit) on integers, allocates nothing, takes no locks and
    // touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
            for sig in [libc::SIGINT, libc::SIGQUIT] {
                if libc::signal(sig, libc::SIG_DFL) == libc::SIG_ERR {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            mark_all_cloexec_from(3);
            Ok(())
        });
    }
}

/// Clear close-on-exec on `fd`, so that an exec keeps it. Async-signal-safe.
pub fn keep_across_exec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an integer fd has no memory effects and is async-signal-safe.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mark every descriptor `>= first` close-on-exec (`close_range(CLOSE_RANGE_CLOEXEC)`, Linux ≥
/// 5.11; older kernels: `fcntl` on each number up to the soft `RLIMIT_NOFILE`).
/// Async-signal-safe.
pub fn mark_all_cloexec_from(first: RawFd) {
    let first = first.max(0) as libc::c_uint;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes descriptor flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    for fd in first as RawFd..fd_limit() {
        // SAFETY: fcntl on an integer fd; EBADF for closed ones is ignored.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// One past the highest descriptor number that can be open: the soft `RLIMIT_NOFILE` (at most
/// 2^20), or 1024 when it cannot be read. Async-signal-safe.
fn fd_limit() -> RawFd {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(1 << 20) as RawFd
    } else {
        1024
    }
}

/// Fork this process with a raw `clone` system call (no atfork handlers: another thread may
/// have held malloc's lock, so the child must make raw, async-signal-safe system calls only, and
/// exec or `_exit`). Returns what `clone` does: 0 in the child, the child's pid in the parent,
/// -1 (with errno set) when it failed.
pub fn raw_fork() -> libc::c_long {
    // SAFETY: a clone without CLONE_VM and with a null stack behaves like fork: the child gets a
    // copy of our address space and continues on its copy of the stack. What the child may do
    // is the caller's to keep to (see above).
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    }
}

/// Close every descriptor `>= 3` except `a` and `b` (`close_range`; older kernels: `close` on
/// each number up to the soft `RLIMIT_NOFILE`). Async-signal-safe.
pub fn close_all_but(a: RawFd, b: RawFd) {
    let (lo, hi) = (a.min(b), a.max(b));
    let close = |first: RawFd, last: RawFd| {
        if first > last {
            return;
        }
        // SAFETY: closing descriptors by number in our own process.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first as libc::c_uint,
                last as libc::c_uint,
                0,
            )
        };
        if rc == 0 {
            return;
        }
        for fd in first..=last.min(fd_limit()) {
            // SAFETY: as above; EBADF for closed ones is ignored.
            unsafe {
                libc::close(fd);
            }
        }
    };
    close(3, lo - 1);
    close(lo + 1, hi - 1);
    close(hi + 1, libc::c_int::MAX);
}

/// Whether this process may create a userfaultfd (`userfaultfd(2)`): the kernel has it, no
/// seccomp filter (a container's default profile, say) forbids it, and the caller is allowed
/// (root, or `vm.unprivileged_userfaultfd=1`). The descriptor made to find out is closed at
/// once.
pub fn userfaultfd_usable() -> bool {
    // SAFETY: userfaultfd takes only flags and returns a new descriptor (or -1), which we close;
    // no memory of ours is read or written.
    unsafe {
        let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK);
        if fd < 0 {
            return false;
        }
        libc::close(fd as RawFd);
    }
    true
}

/// A pidfd for `pid` (`pidfd_open(2)`, Linux ≥ 5.3). The caller must know `pid` cannot have been
/// recycled yet: it is the caller's unreaped child, or lives in a namespace whose init is one.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd_open returned a bad fd"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Send `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`). A process that is gone
/// gives `ESRCH`, like any other errno.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: a valid descriptor, a signal number, a null siginfo (allowed: the kernel fills in
    // a default one) and zero flags; no memory of ours is read or written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;
    use std::process::Stdio;

    use super::*;

    #[test]
    fn a_goblin_gets_sigint_and_sigquit_back_even_if_ours_are_ignored() {
        // As a background job of a script would be started: SIGINT and SIGQUIT ignored (set in
        // the child only, before the goblin's own hook runs, so this process is untouched).
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "grep '^SigIgn' /proc/self/status"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // SAFETY: signal() is async-signal-safe and touches only the child's dispositions.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                libc::signal(libc::SIGQUIT, libc::SIG_IGN);
                Ok(())
            });
        }
        new_session_only_stdio(&mut cmd);
        let out = cmd.output().expect("run sh");
        let line = String::from_utf8(out.stdout).expect("utf-8");
        let mask = u64::from_str_radix(line.trim().trim_start_matches("SigIgn:").trim(), 16)
            .expect("a hex mask");
        let bit = |sig: i32| 1u64 << (sig - 1);
        assert_eq!(mask & (bit(libc::SIGINT) | bit(libc::SIGQUIT)), 0, "{line}");
    }

    fn fds_of(cmd: &mut Command) -> Vec<String> {
        let out = cmd.output().expect("run sh");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn children_get_only_stdio_and_what_they_keep() {
        // Descriptors without CLOEXEC that a careless parent would leak.
        // High numbers, so that ls's own directory fd cannot take one of theirs.
        let leaked = nix::unistd::dup2(io::stdout().as_raw_fd(), 301).expect("dup2");
        let kept = nix::unistd::dup2(io::stdout().as_raw_fd(), 302).expect("dup2");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ls /proc/self/fd"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        only_these_fds(&mut cmd, vec![kept]);
        let fds = fds_of(&mut cmd);
        // ls opens the directory itself as one more fd.
        assert!(fds.contains(&kept.to_string()), "{fds:?}");
        assert!(!fds.contains(&leaked.to_string()), "{fds:?}");
        assert_eq!(fds.len(), 5, "0-2, the kept one, ls's own: {fds:?}");

        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "ls /proc/self/fd; cut -d' ' -f6 /proc/$$/stat; echo $$",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .current_dir("/");
        new_session_only_stdio(&mut cmd);
        let lines = fds_of(&mut cmd);
        nix::unistd::close(leaked).expect("close");
        nix::unistd::close(kept).expect("close");
        assert_eq!(lines[..4], ["0", "1", "2", "3"], "{lines:?}");
        assert_eq!(lines[4].trim(), lines[5].trim(), "sid == pid: {lines:?}");
    }

    #[test]
    fn a_new_session_child_starts_with_no_signal_blocked() {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block().expect("block");
        let mut cmd = Command::new("grep");
        cmd.args(["^SigBlk", "/proc/self/status"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .current_dir("/");
        new_session_only_stdio(&mut cmd);
        let out = cmd.output();
        set.thread_unblock().expect("unblock");
        let text = String::from_utf8(out.expect("run grep").stdout).expect("utf-8");
        assert_eq!(text.trim(), "SigBlk:\t0000000000000000", "{text}");
    }

    #[test]
    fn pidfd_signals_exactly_its_process() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid fits");
        let fd = pidfd_open(pid).expect("pidfd_open");
        pidfd_send_signal(fd.as_fd(), libc::SIGKILL).expect("signal");
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        let err = pidfd_send_signal(fd.as_fd(), libc::SIGKILL).expect_err("gone");
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }
}
