//! The few raw system calls goblins need that neither std nor nix wraps: the child-side setup of a
//! spawned goblin, and pidfds (a handle on one process that can never point at a recycled pid).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Make the child of `cmd` a goblin between fork and exec: leader of a new session (so CRIU can
/// dump it without `--shell-job`), and holding no descriptor above 2 once it runs (a stray
/// inherited fd, say one on a mount CRIU cannot see, makes the dump fail). No parent-death signal
/// is set: a restored root with one is killed when `criu restore` exits.
///
/// Descriptors above 2 are marked close-on-exec rather than closed, so std's own exec-error pipe
/// (close-on-exec already) still reports a failed exec as an error. Needs Linux ≥ 5.11
/// (`CLOSE_RANGE_CLOEXEC`); older kernels make the spawn fail with that errno.
pub(crate) fn make_goblin_child(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed. It makes exactly two raw system calls (setsid, close_range) on integers,
    // allocates nothing, takes no locks and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A pidfd for `pid` (`pidfd_open(2)`, Linux ≥ 5.3). The caller must know `pid` cannot have been
/// recycled yet: it is the caller's unreaped child, or lives in a namespace whose init is one.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd_open returned a bad fd"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Send `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`). `ESRCH` (already gone)
/// is reported as an error of kind `NotFound`, like any other errno.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
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

/// Register a pidfd with the current tokio runtime, to await the process's exit (the pidfd
/// turns readable then). Panics outside a runtime, like every tokio I/O constructor.
#[cfg(feature = "tokio")]
pub(crate) fn watch_pidfd(pidfd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: `register_with_interest` requires the descriptor to stay open and the same for
    // the AsyncFd's whole life. The AsyncFd owns the OwnedFd: nothing else can close or replace
    // it, and `as_raw_fd` of an OwnedFd always returns the same number.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;
    use std::process::Stdio;

    use super::*;

    #[test]
    fn child_leads_its_session_and_holds_no_extra_fds() {
        // A descriptor without CLOEXEC that a careless parent would leak.
        let leaked = nix::unistd::dup(io::stdout().as_raw_fd()).expect("dup");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "ls /proc/self/fd; cut -d' ' -f6 /proc/$$/stat; echo $$",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .current_dir("/");
        make_goblin_child(&mut cmd);
        let out = cmd.output().expect("run sh");
        nix::unistd::close(leaked).expect("close");
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        // ls opens the directory itself as fd 3.
        assert_eq!(lines[..4], ["0", "1", "2", "3"], "{text}");
        assert_eq!(lines[4].trim(), lines[5].trim(), "sid == pid: {text}");
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
