//! Dumping a process that runs in a pid namespace below ours, such as a thawed copy: pf restores
//! copies into a pid + mount namespace of their own (`nsinit.rs`), where they have their
//! original pids.
//!
//! CRIU dumps a tree as the tree's own pid namespace sees it: its pids, its `/proc`. So criu
//! runs inside the target's pid and mount namespaces (the mount namespace holds the `/proc` of
//! that pid namespace): the forked child `setns`es into both, forks again (a pid namespace
//! applies to the children of whoever entered it), and that grandchild execs criu with
//! `--tree <the pid inside>`. Its images then say what a dump of the original would have said,
//! so a re-frozen copy thaws like any snapshot and shares its unchanged pages with its parent.
//!
//! The child in between stays outside, closes every descriptor above 2 (it never execs, so
//! close-on-exec does not apply to it), waits for criu and exits as criu did: the runner's
//! deadline, target watch and SIGKILL work on it as on criu, and criu holds a parent-death
//! SIGKILL, so it never outlives the child the runner kills.
//!
//! The mount namespace is a copy of the one pf restored it from, so criu finds its own binary,
//! its work directory and the images directory (or the image streamer's socket) at the same
//! paths, as long as they are on filesystems mounted before the thaw; each is checked before
//! criu runs (`Enter::check_sees`), and one that is not there is named.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// The pid and mount namespaces of a process in a pid namespace below ours.
#[derive(Debug)]
pub(crate) struct Enter {
    /// The process, as we see it.
    pid: i32,
    pid_ns: OwnedFd,
    mnt_ns: OwnedFd,
    /// The pid criu must dump: the process as its own namespace sees it.
    pub(crate) inner_pid: i32,
}

impl Enter {
    /// `None` when `pid` runs in our pid namespace; otherwise its namespaces, opened now (so
    /// criu enters the very ones `pid` was in, even if the pid is reused).
    pub(crate) fn of(pid: i32) -> Result<Option<Self>> {
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid"));
        let theirs = ns(&pid.to_string()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
                Error::NoSuchProcess { pid }
            } else {
                Error::io("read", pid_ns_path(pid), e)
            }
        })?;
        let ours = ns("self").map_err(|e| Error::io("read", "/proc/self/ns/pid", e))?;
        if theirs == ours || !restored_by_pf(pid) {
            // Ours, or a namespace pf did not make: criu dumps it from here (and says so if it
            // cannot).
            return Ok(None);
        }
        let open = |kind: &str| {
            let path = format!("/proc/{pid}/ns/{kind}");
            std::fs::File::open(&path)
                .map(OwnedFd::from)
                .map_err(|e| Error::io("open", path, e))
        };
        let pid_ns = open("pid")?;
        let mnt_ns = open("mnt")?;
        // A process we can see in another pid namespace is in one below ours: its last NSpid
        // is its pid in there.
        let inner_pid = pf_os::proc::inner_pid(pid).ok_or(Error::NoSuchProcess { pid })?;
        Ok(Some(Self {
            pid,
            pid_ns,
            mnt_ns,
            inner_pid,
        }))
    }

    /// Whether `path` is the same file in the process's mount namespace as in ours: criu,
    /// run in there, is handed our paths (its binary, its work and images directories). The
    /// copy's mount namespace is the one of the pf that thawed it, as it was then: a filesystem
    /// mounted since, or a private `/tmp` of either pf, is not in it.
    pub(crate) fn check_sees(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let ours = std::fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
        let mut inside = std::path::PathBuf::from(format!("/proc/{}/root", self.pid));
        inside.push(path.strip_prefix("/").unwrap_or(path));
        match std::fs::metadata(&inside) {
            Ok(theirs) if theirs.dev() == ours.dev() && theirs.ino() == ours.ino() => Ok(()),
            _ => Err(Error::NotInCopyNamespace {
                pid: self.pid,
                path: path.to_owned(),
            }),
        }
    }

    /// Make `cmd`'s child enter the namespaces, fork, and exec in the grandchild (see the
    /// module's doc), with `cwd` as its working directory. Call after every other `pre_exec`
    /// hook that must also run in the child in between (their effects are inherited).
    pub(crate) fn hook(&self, cmd: &mut Command, cwd: &Path) -> Result<()> {
        let pid_ns = self.pid_ns.as_raw_fd();
        let mnt_ns = self.mnt_ns.as_raw_fd();
        let cwd = CString::new(cwd.as_os_str().as_bytes())
            .map_err(|e| Error::io("use", cwd, std::io::Error::other(e)))?;
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe system calls (setns, chdir, a raw fork-like clone without glibc's
        // atfork handlers, prctl, getppid, close_range or close, waitpid, setrlimit, signal,
        // kill, _exit) on integers and on `cwd`, built before the fork and only read. The branch
        // that does not exec never returns: it exits with `_exit`.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(mnt_ns, libc::CLONE_NEWNS) < 0
                    || libc::setns(pid_ns, libc::CLONE_NEWPID) < 0
                    || libc::chdir(cwd.as_ptr()) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                match crate::nsinit::raw_fork() as libc::pid_t {
                    -1 => Err(std::io::Error::last_os_error()),
                    0 => {
                        // Inside: the parent is outside the namespace, so getppid() is 0 until
                        // it dies; then this one goes too.
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        if libc::getppid() != 0 {
                            libc::_exit(127);
                        }
                        Ok(())
                    }
                    criu => relay(criu),
                }
            });
        }
        Ok(())
    }
}

/// Whether `pid` runs in a pid namespace pf restored it into: the namespace's init (its pid 1,
/// found up the line of parents) is pf's. Such a process is dumped from inside its namespaces;
/// one in a namespace pf did not make (a container's) is not: criu's binary and pf's paths need
/// not exist in there, and what runs as criu in there is that namespace's to choose.
///
/// A name is anyone's to take, so the init must also be what only pf makes: in our user
/// namespace (pf never makes one; anyone can make a mount namespace inside one of their own),
/// run by our user, with our root directory (a container's is its image).
pub fn restored_by_pf(pid: i32) -> bool {
    let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let Some(theirs) = ns(pid) else {
        return false;
    };
    let mut at = pid;
    // A tree deeper than this is not one pf restored.
    for _ in 0..256 {
        if pf_os::proc::inner_pid(at) == Some(1) {
            return pf_os::proc::comm(at).is_some_and(|name| name == crate::nsinit::INIT_NAME)
                && made_by_us(at);
        }
        match pf_os::proc::stat(at) {
            Some(s) if s.ppid > 0 && ns(s.ppid).as_ref() == Some(&theirs) => at = s.ppid,
            _ => return false,
        }
    }
    false
}

/// Whether `init` shares our user namespace and root directory and runs as our user.
fn made_by_us(init: i32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let user_ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
    let same_user_ns = user_ns(&init.to_string()).is_some_and(|t| Some(t) == user_ns("self"));
    // `/proc/PID` belongs to the process's effective uid.
    let ours = rustix::process::geteuid().as_raw();
    let same_user = std::fs::metadata(format!("/proc/{init}")).is_ok_and(|m| m.uid() == ours);
    let same_root = match (
        std::fs::metadata(format!("/proc/{init}/root/")),
        std::fs::metadata("/"),
    ) {
        (Ok(theirs), Ok(ours)) => theirs.dev() == ours.dev() && theirs.ino() == ours.ino(),
        _ => false,
    };
    same_user_ns && same_user && same_root
}

fn pid_ns_path(pid: i32) -> String {
    format!("/proc/{pid}/ns/pid")
}

/// The child in between: hold no descriptor of pf's (nor the one its spawner waits on to see
/// the exec), wait for `criu`, and end as it did.
///
/// # Safety
/// Only between fork and exec, in the child; never returns.
unsafe fn relay(criu: libc::pid_t) -> ! {
    // SAFETY: async-signal-safe system calls on integers (see `Enter::hook`).
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            // A kernel before 5.9: one by one. Left open, std's exec-error pipe would hold
            // `spawn` until criu ends, and the runner's deadline with it.
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur.min(1 << 20) as libc::c_int
            } else {
                1 << 16
            };
            for fd in 3..max {
                libc::close(fd);
            }
        }
        let mut status = 0;
        loop {
            let got = libc::waitpid(criu, &mut status, 0);
            if got == criu {
                break;
            }
            if got < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        let sig = libc::WTERMSIG(status);
        // End by the same signal, so the runner reads criu's end; but without a core dump,
        // which would be of a copy of pf's memory, not criu's.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_init_that_only_takes_pf_s_name_is_not_pf_s() {
        // What anyone may build: a user namespace of their own, pid and mount namespaces in
        // it, pid 1 named pf-ns-init, and a process under it to freeze.
        let mut fake = std::process::Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--pid",
                "--mount",
                "--fork",
                "--kill-child",
                "bash",
                "-c",
            ])
            .arg(format!(
                "printf %s {} > /proc/self/comm; sleep 60 & wait",
                crate::nsinit::INIT_NAME
            ))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("unshare (util-linux)");
        let unshare = fake.id() as i32;
        let start = std::time::Instant::now();
        let target = loop {
            let sleep = pf_os::proc::children(unshare)
                .into_iter()
                .flat_map(pf_os::proc::children)
                .find(|&p| pf_os::proc::comm(p).as_deref() == Some("sleep"));
            if let Some(p) = sleep {
                break p;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the fake namespace never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let init = pf_os::proc::children(unshare)[0];
        let named = pf_os::proc::comm(init);
        let restored = restored_by_pf(target);
        let enter = Enter::of(target).map(|e| e.is_some());
        // `unshare --kill-child` takes its namespace down with it.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(unshare),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = fake.wait();
        assert_eq!(named.as_deref(), Some(crate::nsinit::INIT_NAME));
        assert!(
            !restored,
            "a look-alike init in a user namespace of its own"
        );
        assert!(matches!(enter, Ok(false)), "{enter:?}");
    }

    #[test]
    fn a_path_hidden_in_the_other_mount_namespace_is_named() {
        // A mount namespace where a tmpfs covers a directory we see bare.
        let dir = tempfile::tempdir().expect("tempdir");
        let covered = dir.path().join("covered");
        std::fs::create_dir(&covered).expect("mkdir");
        let mut other = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash", "-c"])
            .arg(format!(
                "mount -t tmpfs pf-test '{}' && touch '{}/ready' && exec sleep 60",
                covered.display(),
                covered.display()
            ))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("unshare (util-linux; needs root, as criu does)");
        let pid = other.id() as i32;
        let start = std::time::Instant::now();
        while !std::path::Path::new(&format!("/proc/{pid}/root{}/ready", covered.display()))
            .exists()
        {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the mount never came"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let open = |kind: &str| {
            OwnedFd::from(std::fs::File::open(format!("/proc/{pid}/ns/{kind}")).expect("ns"))
        };
        let enter = Enter {
            pid,
            pid_ns: open("pid"),
            mnt_ns: open("mnt"),
            inner_pid: pid,
        };
        let hidden = enter.check_sees(&covered);
        let seen = enter.check_sees(dir.path());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = other.wait();
        assert!(seen.is_ok(), "{seen:?}");
        let err = hidden.expect_err("covered by a mount only they see");
        assert!(
            matches!(&err, Error::NotInCopyNamespace { path, .. } if *path == covered),
            "{err:?}"
        );
        assert!(err.to_string().contains("set TMPDIR"), "{err}");
    }

    #[test]
    fn our_own_processes_are_not_restored_by_pf_and_are_dumped_from_here() {
        let me = std::process::id() as i32;
        assert!(!restored_by_pf(me));
        assert!(Enter::of(me).expect("our pid").is_none());
        assert!(!restored_by_pf(crate::test_support::dead_pid()));
    }
}
