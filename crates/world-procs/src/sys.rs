//! The few system calls that need `unsafe`: descriptor hygiene in a child between fork and exec.
//!
//! CRIU refuses to dump a process holding a descriptor it cannot resolve (say an fd some
//! parent leaked that points into another mount), and criu itself must see only the descriptors
//! it is told about. So every process this crate spawns gets, between fork and exec, every
//! descriptor above 2 marked close-on-exec except the ones the caller passes on purpose.
//!
//! Marking (rather than closing) keeps std's own exec-error pipe working: it is close-on-exec
//! already and must stay open until the exec.
#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Make `cmd`'s child start with only fds 0–2 plus `keep` open (each `keep` fd at its own number,
/// with close-on-exec cleared).
pub(crate) fn only_these_fds(cmd: &mut Command, keep: Vec<RawFd>) {
    let hook = move || -> std::io::Result<()> {
        mark_all_cloexec_from(3);
        for &fd in &keep {
            // SAFETY: fcntl on an integer fd has no memory effects and is async-signal-safe.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
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

/// Mark every descriptor `>= first` close-on-exec. Async-signal-safe.
pub(crate) fn mark_all_cloexec_from(first: RawFd) {
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
    // Kernels before 5.11: walk the descriptor table up to the soft limit.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(1 << 20) as RawFd
    } else {
        1024
    };
    for fd in first as RawFd..max {
        // SAFETY: fcntl on an integer fd; EBADF for closed ones is ignored.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}
