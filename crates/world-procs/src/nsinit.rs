//! A tiny init of ours as PID 1 of a fresh PID + mount namespace, which runs
//! `criu restore -d -S` and then waits for the restored root and exits with its status.
//!
//! Only the runner starts it (`Invocation::run_in_new_pidns` in `runner.rs`): the command line,
//! work directory, deadline and errors are the runner's; this file only execs the program the
//! runner prepared, inside the namespace.
//!
//! This is what lets a tree be restored beside its still-running original (every pid is free in
//! a new namespace) and lets the caller learn the root's real exit status (a foreground
//! `criu restore` as PID 1 exits 0 whatever the root does). CRIU needs its own `/proc` for the
//! new namespace, hence the mount namespace: without it criu fails in its vdso helper.
//!
//! The init is a `clone(CLONE_NEWPID | CLONE_NEWNS | SIGCHLD)` of this process — a fork, so the
//! child runs with a copy of our memory and only the calling thread. From then on it makes only
//! async-signal-safe system calls on data prepared before the clone (no allocation, no locks):
//!
//! 1. make every mount private (`mount --make-rprivate /`) and mount a fresh proc on `/proc`;
//! 2. fork; the child sets up fds 0–2 (null, criu.stdout, criu.stderr), clears close-on-exec on
//!    the inherited descriptors, marks every other one close-on-exec, and execs criu;
//! 3. the init points its own 0–2 at `/dev/null` and closes every other descriptor except its
//!    report pipe (it must not keep a caller's pipe or terminal open), waits for criu and reports
//!    criu's wait status;
//! 4. reads the pidfile criu wrote, reaps every child (orphans of the tree land on it) until the
//!    root exits, reports the root's wait status and exits with it (code, or 128 + signal).
//!
//! The root is the init's child because criu restores it as criu's sibling (`--restore-sibling`,
//! `CLONE_PARENT`). A `criu` that is really a wrapper forking criu (`strace -f`, a script that
//! runs criu and reaps its children) makes the root the wrapper's child: the wrapper reaps it,
//! and a wait for the init's own children alone would go on for good with only the watcher
//! below (found by hand: the copy answered and exited, and pf waited forever). So the init
//! also watches the root through a pidfd, and SIGCHLD through a signalfd, in one `poll`: a root
//! that ended without being the init's to reap is reported as gone ([`TAG_ROOT_GONE`]: its
//! status is unknown) and the init exits, taking the namespace down as usual.
//!
//! When the init exits, the kernel kills everything left in the namespace: that is how the
//! caller's `kill()` cleans up (SIGKILL to the init).
//!
//! The caller holds the write end of a *lifeline* pipe. While criu runs, the init polls it
//! beside a pidfd of criu, and ends the namespace when it closes. Once criu is done, the init
//! forks a watcher that blocks reading it: end of file (the caller died, even by SIGKILL, or dropped the
//! restore) makes the watcher exit 1, and the init then exits, taking the namespace down, so a
//! killed pf leaves no goblin behind. A detach writes `D` first: the watcher exits 0 and the
//! tree outlives the caller. (No parent-death signal: that fires when the *thread* that cloned
//! the init ends, and forks restore on worker threads.)
//!
//! Reports are fixed 12-byte records (`tag`, `a`, `b` as native-endian `i32`s) on a pipe, written
//! in one `write` each (atomic below PIPE_BUF).
#![allow(unsafe_code)]

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// The init's name in `ps` (`/proc/PID/comm`).
pub(crate) const INIT_NAME: &str = "pf-ns-init";
const INIT_NAME_C: &std::ffi::CStr = c"pf-ns-init";

/// A setup step failed: `a` = step, `b` = errno.
pub(crate) const TAG_FAILED: i32 = 1;
/// criu finished: `a` = its raw wait status.
pub(crate) const TAG_CRIU_DONE: i32 = 2;
/// The restored root exited: `a` = its raw wait status.
pub(crate) const TAG_ROOT_DONE: i32 = 3;
/// The restored root ended, but another process reaped it (it was not the init's child): its
/// status is unknown.
pub(crate) const TAG_ROOT_GONE: i32 = 4;
/// The init's exit code after [`TAG_ROOT_GONE`].
const ROOT_GONE_EXIT: i32 = 125;

/// The steps that can fail inside the init, by number.
pub(crate) const STEPS: [&str; 6] = [
    "mount --make-rprivate /",
    "mount proc on /proc",
    "fork criu",
    "exec criu",
    "read the pidfile",
    "wait for the restored root",
];

/// A report record from the init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) tag: i32,
    pub(crate) a: i32,
    pub(crate) b: i32,
}

impl Record {
    pub(crate) fn decode(bytes: &[u8; 12]) -> Self {
        let word =
            |i: usize| i32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Self {
            tag: word(0),
            a: word(4),
            b: word(8),
        }
    }
}

/// What the caller passes to the init.
#[derive(Debug)]
pub(crate) struct InitPlan<'a> {
    /// The program to exec (criu).
    pub(crate) program: &'a Path,
    /// Its arguments (without argv[0]).
    pub(crate) args: &'a [OsString],
    /// criu's stdout and stderr.
    pub(crate) stdout: &'a File,
    pub(crate) stderr: &'a File,
    /// Descriptors criu inherits (for `--inherit-fd`), at their own numbers.
    pub(crate) keep: &'a [RawFd],
    /// A descriptor the init itself holds until everything in the namespace is dead (as its
    /// stdin), and criu does not inherit: a lazy restore's socket holding copies of the tree's
    /// userfaultfds, so that they close only after the tree they serve is gone.
    pub(crate) hold: Option<RawFd>,
    /// Where criu writes the root's pid (as seen inside the namespace).
    pub(crate) pidfile: &'a Path,
    /// criu keeps our stdin (a shell job's terminal) instead of `/dev/null`.
    pub(crate) stdin_is_ours: bool,
}

/// The running init: its host pid, the read end of its report pipe and the write end of its
/// lifeline (closing it without writing [`UNTIE`] ends the namespace).
#[derive(Debug)]
pub(crate) struct Init {
    pub(crate) pid: i32,
    pub(crate) report: File,
    pub(crate) lifeline: Option<File>,
}

/// Written on the lifeline before closing it: the tree is to outlive the caller.
pub(crate) const UNTIE: u8 = b'D';

impl Init {
    /// SIGKILL the init (the kernel then kills everything in its namespace) and reap it.
    pub(crate) fn kill_and_reap(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(pid, None) {}
    }

    /// Let the tree outlive the caller: tell the watcher, then close the lifeline.
    pub(crate) fn untie(&mut self) {
        use std::io::Write as _;
        if let Some(mut lifeline) = self.lifeline.take() {
            // A gone watcher (the tree already ended) is fine.
            let _ = lifeline.write_all(&[UNTIE]);
        }
    }
}

fn cstring(bytes: &[u8]) -> std::io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "argument holds a NUL byte",
        )
    })
}

/// Start the init. Needs CAP_SYS_ADMIN (root).
pub(crate) fn spawn(plan: &InitPlan<'_>) -> std::io::Result<Init> {
    // Everything the child touches is built here, before the clone.
    let program = cstring(plan.program.as_os_str().as_bytes())?;
    let mut argv_owned = vec![program.clone()];
    for a in plan.args {
        argv_owned.push(cstring(a.as_bytes())?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env_owned: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env_owned.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let pidfile = cstring(plan.pidfile.as_os_str().as_bytes())?;
    let devnull = File::open("/dev/null")?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (life_r, life_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let ctx = Ctx {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        pidfile: pidfile.as_ptr(),
        devnull: devnull.as_raw_fd(),
        stdin_is_ours: plan.stdin_is_ours,
        stdout: plan.stdout.as_raw_fd(),
        stderr: plan.stderr.as_raw_fd(),
        keep: plan.keep,
        hold: plan.hold.unwrap_or(-1),
        report: write_end.as_raw_fd(),
        lifeline: life_r.as_raw_fd(),
        lifeline_w: life_w.as_raw_fd(),
        arg_area: pf_os::proc::own_arg_area(),
    };
    let flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::SIGCHLD;
    // SAFETY: a clone without CLONE_VM and with a null stack behaves like fork: the child gets
    // a copy of our address space and continues here on its copy of the stack. The child only
    // runs `init_main`, which makes raw async-signal-safe system calls on `ctx`'s data (built
    // above, still alive in the child's copy) and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        init_main(&ctx);
    }
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop((write_end, life_r));
    drop((argv_owned, env_owned, devnull));
    Ok(Init {
        pid: pid as i32,
        report: File::from(read_end),
        lifeline: Some(File::from(life_w)),
    })
}

/// Raw pointers and numbers the child uses.
struct Ctx<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    pidfile: *const libc::c_char,
    devnull: RawFd,
    stdin_is_ours: bool,
    stdout: RawFd,
    stderr: RawFd,
    keep: &'a [RawFd],
    /// See [`InitPlan::hold`]; -1 for none.
    hold: RawFd,
    report: RawFd,
    lifeline: RawFd,
    /// The caller's end of the lifeline, which the init's copy of the fd table holds too:
    /// closed first thing, or end of file would never come.
    lifeline_w: RawFd,
    /// Where the caller's command line lies in memory (the init's copy of it is overwritten).
    arg_area: Option<(usize, usize)>,
}

fn report(fd: RawFd, tag: i32, a: i32, b: i32) {
    let mut buf = [0u8; 12];
    buf[..4].copy_from_slice(&tag.to_ne_bytes());
    buf[4..8].copy_from_slice(&a.to_ne_bytes());
    buf[8..].copy_from_slice(&b.to_ne_bytes());
    // SAFETY: write from a stack buffer we own; the result is deliberately ignored (the reader
    // may be gone after a detach).
    unsafe {
        libc::write(fd, buf.as_ptr().cast(), buf.len());
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn fail(ctx: &Ctx<'_>, step: i32) -> ! {
    report(ctx.report, TAG_FAILED, step, errno());
    // SAFETY: _exit is always safe to call.
    unsafe { libc::_exit(120) }
}

/// Raw fork (no atfork handlers: another thread of the parent may have held malloc's lock).
pub(crate) use pf_os::fd::raw_fork;

/// PID 1 of the new namespace. Never returns.
fn init_main(ctx: &Ctx<'_>) -> ! {
    // SAFETY (for every block in this function and in `exec_program`): raw system calls on
    // integers, on NUL-terminated strings and pointer arrays built before the clone, and on
    // stack buffers we own. No allocation, no locks.
    unsafe {
        libc::close(ctx.lifeline_w);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        // Shows as `pf-ns-init` in ps instead of a second `pf`: its name (`comm`), and its
        // command line, which is otherwise the caller's (`pgrep -f 'goblin thaw kb'` found pf,
        // the init and its watcher): the name written over our copy of the caller's arguments,
        // the rest of them zeroed.
        libc::prctl(libc::PR_SET_NAME, INIT_NAME_C.as_ptr());
        show_as(ctx.arg_area, INIT_NAME_C);
        // Out of the caller's process group, with criu and the watcher: a signal to that group
        // (`kill -TERM -PGID`, `timeout`, Ctrl-C) reaches the caller, who passes it on to the
        // root, and not the init too, which would pass it on a second time. A shell job stays:
        // CRIU gives the restored tree criu's own process group, the terminal's foreground one.
        if !ctx.stdin_is_ours {
            libc::setpgid(0, 0);
        }
        let none: *const libc::c_char = std::ptr::null();
        if libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(ctx, 0);
        }
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            fail(ctx, 1);
        }
    }
    let criu = raw_fork();
    if criu == 0 {
        exec_program(ctx);
    }
    if criu < 0 {
        fail(ctx, 2);
    }
    let criu = criu as libc::pid_t;
    // SAFETY: see above.
    unsafe {
        // Keep nothing of the caller's: only the report pipe, the lifeline, and what it was
        // asked to hold (as stdin).
        libc::dup2(if ctx.hold >= 0 { ctx.hold } else { ctx.devnull }, 0);
        libc::dup2(ctx.devnull, 1);
        libc::dup2(ctx.devnull, 2);
        pf_os::fd::close_all_but(ctx.report, ctx.lifeline);
        watch_lifeline_during(criu, ctx.lifeline);
        let mut status = 0;
        while libc::waitpid(criu, &mut status, 0) < 0 {
            if errno() != libc::EINTR {
                fail(ctx, 5);
            }
        }
        // Read the pidfile *before* reporting: the caller removes criu's work dir (and the
        // pidfile in it) as soon as it sees TAG_CRIU_DONE.
        let criu_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        let root = if criu_ok { read_pid(ctx.pidfile) } else { 0 };
        if criu_ok && root <= 0 {
            fail(ctx, 4);
        }
        report(ctx.report, TAG_CRIU_DONE, status, 0);
        if !criu_ok {
            libc::_exit(121);
        }
        let watcher = raw_fork() as libc::pid_t;
        if watcher == 0 {
            watch_lifeline(ctx.lifeline, ctx.arg_area);
        }
        // A watcher that could not be forked leaves the tree untied (as a detach would).
        libc::close(ctx.lifeline);
        wait_for_root(ctx, root, watcher)
    }
}

/// While criu restores, the caller's death (the lifeline closed: a SIGKILL, even one to its
/// whole process group, which no longer reaches the init) ends the namespace at once, criu
/// with it, rather than once criu is done (a criu that never finishes would stay for good).
/// Returns when criu has ended (to be reaped), or at once without a pidfd (before Linux 5.3:
/// the watcher forked after criu is the only one then).
///
/// SAFETY (for every block): raw system calls on integers and stack buffers; no allocation.
fn watch_lifeline_during(criu: libc::pid_t, lifeline: RawFd) {
    // SAFETY: see above.
    let criu_fd = unsafe { libc::syscall(libc::SYS_pidfd_open, criu, 0u32) as i32 };
    if criu_fd < 0 {
        return;
    }
    let mut watch = lifeline;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: criu_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: watch,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on a stack array we own (a negative fd is skipped).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            break;
        }
        if fds[0].revents != 0 {
            break;
        }
        let hup = fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0;
        if fds[1].revents & libc::POLLIN != 0 {
            // Bytes on the lifeline (an untie): not ours to read; the watcher forked after
            // criu reads them. Stop watching it here.
            watch = -1;
        } else if hup {
            // The caller is gone: end everything in the namespace, then ourselves.
            // SAFETY: see above.
            unsafe {
                libc::kill(-1, libc::SIGKILL);
                let mut status = 0;
                while libc::waitpid(-1, &mut status, 0) > 0 || errno() == libc::EINTR {}
                libc::_exit(137);
            }
        }
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(criu_fd) };
}

/// The init's last step: reap every child (orphans of the tree come to it) until the root ends,
/// then report and exit with its status; end the namespace when the watcher says the caller is
/// gone. Never returns.
///
/// SAFETY (for every block): raw system calls on integers and on stack buffers we own; no
/// allocation, no locks.
fn wait_for_root(ctx: &Ctx<'_>, root: libc::pid_t, mut watcher: libc::pid_t) -> ! {
    // SIGCHLD blocked and read from a signalfd: one poll waits for a child to reap and for the
    // root's pidfd. A pending SIGCHLD stays pending while blocked, and every turn reaps before
    // it polls, so nothing is missed.
    // SAFETY: see above.
    let (sigfd, rootfd, root_gone_at_start) = unsafe {
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        // A namespace's init gets no signal it has no handler for, unless it blocks it: these
        // are read from the signalfd too, and passed on to the root.
        for sig in PASSED_ON {
            libc::sigaddset(&mut chld, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &chld, std::ptr::null_mut());
        let sigfd = libc::signalfd(-1, &chld, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        let rootfd = libc::syscall(libc::SYS_pidfd_open, root, 0u32) as i32;
        // ESRCH: the root is gone already, reaped by another process (a child of ours that has
        // exited is a zombie, and still has a pidfd).
        (sigfd, rootfd, rootfd < 0 && errno() == libc::ESRCH)
    };
    let mut root_ended = root_gone_at_start;
    let mut status = 0;
    loop {
        // Reap whatever has ended.
        loop {
            // SAFETY: see above.
            let got = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if got == 0 || (got < 0 && errno() != libc::EINTR) {
                break;
            }
            if got < 0 {
                continue;
            }
            if watcher > 0 && got == watcher {
                if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                    // The caller is gone without untying: end the namespace, and only then
                    // ourselves. Everything dies while we still hold what we were asked to
                    // (a lazy restore's userfaultfds stay open: its faulting tasks die waiting
                    // for a page rather than being handed zeros).
                    // SAFETY: see above.
                    unsafe {
                        libc::kill(-1, libc::SIGKILL);
                        while libc::waitpid(-1, &mut status, 0) > 0 || errno() == libc::EINTR {}
                        libc::_exit(137);
                    }
                }
                // Untied; its pid may come back as one of the tree's.
                watcher = 0;
            }
            if got == root {
                report(ctx.report, TAG_ROOT_DONE, status, 0);
                // Plain arithmetic on the status: async-signal-safe.
                // SAFETY: _exit is always safe.
                unsafe { libc::_exit(i32::from(pf_os::Exit::from_wait_status(status).exit_code())) }
            }
        }
        let mut wait_ms = -1;
        if root_ended {
            // It ended and was not reaped above: ours but not waitable yet (a zombie another
            // process traces is that tracer's first), or not ours at all.
            // SAFETY: see above.
            let got = unsafe { libc::waitpid(root, &mut status, libc::WNOHANG) };
            if got == root {
                report(ctx.report, TAG_ROOT_DONE, status, 0);
                // SAFETY: _exit is always safe.
                unsafe { libc::_exit(i32::from(pf_os::Exit::from_wait_status(status).exit_code())) }
            }
            if got < 0 && errno() == libc::ECHILD {
                report(ctx.report, TAG_ROOT_GONE, 0, 0);
                // SAFETY: _exit is always safe.
                unsafe { libc::_exit(ROOT_GONE_EXIT) }
            }
            wait_ms = 100;
        } else if rootfd < 0 {
            // No pidfd (a kernel before 5.3): look at the root now and then.
            // SAFETY: kill with signal 0 only checks that the pid exists.
            if unsafe { libc::kill(root, 0) } < 0 && errno() == libc::ESRCH {
                root_ended = true;
                continue;
            }
            wait_ms = 1000;
        }
        if sigfd < 0 {
            wait_ms = if wait_ms < 0 { 100 } else { wait_ms.min(100) };
        }
        let mut fds = [
            libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // Once the root has ended its pidfd stays readable: no more use polling it.
                fd: if root_ended { -1 } else { rootfd },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on a stack array we own (negative fds are skipped by the kernel).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait_ms) };
        if ready < 0 && errno() != libc::EINTR {
            fail(ctx, 5);
        }
        if fds[1].revents != 0 {
            root_ended = true;
        }
        if fds[0].revents != 0 {
            let mut buf = [0u8; 8 * SIGINFO_SIZE];
            loop {
                // SAFETY: a non-blocking read into a stack buffer we own, until it is empty.
                let n = unsafe { libc::read(sigfd, buf.as_mut_ptr().cast(), buf.len()) };
                let Ok(n) = usize::try_from(n) else { break };
                if n == 0 {
                    break;
                }
                for info in buf[..n].chunks_exact(SIGINFO_SIZE) {
                    if let Some(sig) = passed_on(info)
                        && !root_ended
                    {
                        // SAFETY: a signal to the root, which is ours (or gone: ESRCH).
                        unsafe { libc::kill(root, sig) };
                    }
                }
            }
        }
    }
}

/// The signals the init passes on to the root: `kill INIT` (SIGTERM, as `ps` users and the
/// help of `pf procs restore --new-pidns` expect) reaches the copy. SIGKILL ends the namespace
/// by itself.
const PASSED_ON: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];
/// `sizeof(struct signalfd_siginfo)`.
const SIGINFO_SIZE: usize = 128;

/// The signal to pass on to the root for one `signalfd_siginfo` record (`ssi_signo` at 0,
/// `ssi_code` at 8), if any: one of [`PASSED_ON`] sent by a process (`kill`, `sigqueue`,
/// `tgkill`: a code of 0 or below). The kernel's own (`SI_KERNEL`: Ctrl-C at a terminal, which
/// signals its whole foreground process group, the init among it when it restores a shell job)
/// is not: pf passes those on itself.
fn passed_on(info: &[u8]) -> Option<libc::c_int> {
    let word = |at: usize| -> Option<[u8; 4]> { info.get(at..at + 4)?.try_into().ok() };
    let signo = libc::c_int::try_from(u32::from_ne_bytes(word(0)?)).ok()?;
    let code = i32::from_ne_bytes(word(8)?);
    (PASSED_ON.contains(&signo) && code <= 0).then_some(signo)
}

/// The watcher child of the init: exit 0 when the caller unties the tree, 1 when the lifeline
/// closes without that (the caller is gone). Never returns.
fn watch_lifeline(lifeline: RawFd, arg_area: Option<(usize, usize)>) -> ! {
    // SAFETY: prctl with a static NUL-terminated name; sigprocmask on a stack set we own.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"pf-ns-watch".as_ptr());
        show_as(arg_area, c"pf-ns-watch");
        // It may share pf's process group (a shell job's): a Ctrl-C on pf's terminal (which pf
        // forwards to the goblin) must not end it, or the namespace would go down with it.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: a read into a stack buffer we own; _exit is always safe.
        unsafe {
            let n = libc::read(lifeline, byte.as_mut_ptr().cast(), 1);
            if n == 1 && byte[0] == UNTIE {
                libc::_exit(0);
            }
            if n == 0 || (n < 0 && errno() != libc::EINTR) {
                libc::_exit(1);
            }
        }
    }
}

/// The child of the init that becomes the runner's program (criu): stdio, descriptors, signals,
/// exec. Never returns.
fn exec_program(ctx: &Ctx<'_>) -> ! {
    // SAFETY: see `init_main`.
    unsafe {
        if !ctx.stdin_is_ours {
            libc::dup2(ctx.devnull, 0);
        }
        libc::dup2(ctx.stdout, 1);
        libc::dup2(ctx.stderr, 2);
        pf_os::fd::mark_all_cloexec_from(3);
        for &fd in ctx.keep {
            let _ = pf_os::fd::keep_across_exec(fd);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::execve(ctx.program, ctx.argv, ctx.envp);
        // The report pipe is still open (close-on-exec only fires on success).
        report(ctx.report, TAG_FAILED, 3, errno());
        libc::_exit(127);
    }
}

/// Write `name` over this process's copy of the caller's command line (`area`, from
/// [`pf_os::proc::own_arg_area`] before the fork), the rest of it zeroed: `ps` and `pgrep -f`
/// then show `name`. Written through `process_vm_writev` on ourselves, which fails with EFAULT
/// where plain stores would crash the init (an area a program made read-only): then the
/// caller's command line shows, and nothing else changes.
///
/// Only in a forked child: raw system calls on integers and on a stack buffer we own; no
/// allocation, no locks.
fn show_as(area: Option<(usize, usize)>, name: &std::ffi::CStr) {
    let Some((start, end)) = area else { return };
    let mut chunk = [0u8; 4096];
    let name = name.to_bytes();
    let len = name.len().min(end - start - 1).min(chunk.len());
    chunk[..len].copy_from_slice(&name[..len]);
    let mut at = start;
    while at < end {
        let n = (end - at).min(chunk.len());
        let local = libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: n,
        };
        let remote = libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: n,
        };
        // SAFETY: reads `n` bytes of our stack buffer; the kernel checks the area it writes
        // (ours) and fails rather than faulting.
        // The raw getpid: a libc that caches the pid would give the caller's after a raw clone.
        let written = unsafe {
            let me = libc::syscall(libc::SYS_getpid) as libc::pid_t;
            libc::process_vm_writev(me, &local, 1, &remote, 1, 0)
        };
        if written != n as isize {
            return;
        }
        if at == start {
            chunk[..len].fill(0);
        }
        at += n;
    }
}

/// Read a decimal pid from a file; 0 on any failure.
fn read_pid(path: *const libc::c_char) -> libc::pid_t {
    let mut buf = [0u8; 32];
    // SAFETY: open/read/close into a stack buffer we own.
    let n = unsafe {
        let fd = libc::open(path, libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return 0;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    parse_pid(&buf[..n.max(0) as usize])
}

/// A decimal pid, optionally followed by white space; 0 when malformed.
pub(crate) fn parse_pid(bytes: &[u8]) -> libc::pid_t {
    let mut pid: libc::pid_t = 0;
    let mut digits = 0;
    for &b in bytes {
        match b {
            b'0'..=b'9' if digits < 9 => {
                pid = pid * 10 + libc::pid_t::from(b - b'0');
                digits += 1;
            }
            b'\n' | b' ' | b'\r' | b'\t' if digits > 0 => break,
            _ => return 0,
        }
    }
    pid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_as_writes_the_name_then_zeros_and_leaves_a_read_only_area_alone() {
        let mut area = vec![0xffu8; 5000];
        let start = area.as_mut_ptr() as usize;
        show_as(Some((start, start + area.len())), c"pf-ns-init");
        assert_eq!(&area[..10], b"pf-ns-init");
        assert!(
            area[10..].iter().all(|&b| b == 0),
            "the rest zeroed, past 4 KiB too"
        );
        // A name longer than the area: cut, with its last byte NUL.
        let mut small = [0xffu8; 4];
        let at = small.as_mut_ptr() as usize;
        show_as(Some((at, at + 4)), c"pf-ns-init");
        assert_eq!(&small, b"pf-\0");
        // SAFETY: a fresh anonymous page of our own, unmapped at the end.
        unsafe {
            let page = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(page, libc::MAP_FAILED);
            std::ptr::write_bytes(page.cast::<u8>(), 0xff, 4096);
            assert_eq!(libc::mprotect(page, 4096, libc::PROT_READ), 0);
            show_as(Some((page as usize, page as usize + 100)), c"pf-ns-init");
            let bytes = std::slice::from_raw_parts(page.cast::<u8>(), 100);
            assert!(bytes.iter().all(|&b| b == 0xff), "unchanged, and no crash");
            libc::munmap(page, 4096);
        }
    }

    #[test]
    fn only_signals_a_process_sent_are_passed_on() {
        let info = |signo: u32, code: i32| {
            let mut b = [0u8; SIGINFO_SIZE];
            b[..4].copy_from_slice(&signo.to_ne_bytes());
            b[8..12].copy_from_slice(&code.to_ne_bytes());
            b
        };
        let term = libc::SIGTERM as u32;
        assert_eq!(passed_on(&info(term, libc::SI_USER)), Some(libc::SIGTERM));
        assert_eq!(passed_on(&info(term, libc::SI_TKILL)), Some(libc::SIGTERM));
        assert_eq!(
            passed_on(&info(libc::SIGINT as u32, libc::SI_KERNEL)),
            None,
            "Ctrl-C"
        );
        assert_eq!(passed_on(&info(libc::SIGCHLD as u32, libc::SI_USER)), None);
        assert_eq!(passed_on(&info(term, libc::SI_USER)[..8]), None, "short");
    }

    #[test]
    fn pids_parse() {
        assert_eq!(parse_pid(b"1234\n"), 1234);
        assert_eq!(parse_pid(b"77"), 77);
        assert_eq!(parse_pid(b""), 0);
        assert_eq!(parse_pid(b"12a"), 0);
        assert_eq!(parse_pid(b"\n"), 0);
        assert_eq!(parse_pid(b"9999999999"), 0);
    }

    /// Start an init whose "criu" is `sh -c SCRIPT` (`$0` is the pidfile); the records it
    /// reports until it exits, and how it exited.
    fn init_running(script: &str) -> (Vec<i32>, i32) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("root.pid");
        let out = File::create(dir.path().join("out")).expect("out");
        let args: Vec<OsString> = vec!["-c".into(), script.into(), pidfile.clone().into()];
        let mut init = spawn(&InitPlan {
            program: Path::new("/bin/sh"),
            args: &args,
            stdout: &out,
            stderr: &out,
            keep: &[],
            hold: None,
            pidfile: &pidfile,
            stdin_is_ours: false,
        })
        .expect("start an init (needs root)");
        let mut tags = Vec::new();
        while let Ok(record) =
            crate::runner::read_record(&mut init.report, std::time::Duration::from_secs(20))
        {
            tags.push(record.tag);
        }
        // Not ended within 5 s more: the init waits on, and is killed.
        let pid = nix::unistd::Pid::from_raw(init.pid);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let status = loop {
            let status = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            if !matches!(status, Ok(nix::sys::wait::WaitStatus::StillAlive))
                || std::time::Instant::now() >= end
            {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let code = match status {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => code,
            other => {
                init.kill_and_reap();
                panic!("the init had not ended ({other:?}) after reporting {tags:?}");
            }
        };
        (tags, code)
    }

    #[test]
    fn live_an_init_whose_root_another_process_reaps_ends_and_says_so() {
        if !crate::test_support::live(
            "live_an_init_whose_root_another_process_reaps_ends_and_says_so",
        ) {
            return;
        }
        // A "criu" that waits for the root it started, as a wrapper running criu as its child
        // does (strace -f): the root is never the init's to reap.
        let (tags, code) = init_running("sleep 0.3 & echo $! > \"$0\"; wait");
        assert_eq!(tags, [TAG_CRIU_DONE, TAG_ROOT_GONE]);
        assert_eq!(code, ROOT_GONE_EXIT);
        // The same root still running when "criu" exits comes to the init and is reaped there
        // with its status.
        let (tags, code) = init_running("sh -c 'sleep 0.3; exit 7' & echo $! > \"$0\"");
        assert_eq!(tags, [TAG_CRIU_DONE, TAG_ROOT_DONE]);
        assert_eq!(code, 7);
    }

    #[test]
    fn records_decode() {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&TAG_CRIU_DONE.to_ne_bytes());
        b[4..8].copy_from_slice(&256i32.to_ne_bytes());
        assert_eq!(
            Record::decode(&b),
            Record {
                tag: TAG_CRIU_DONE,
                a: 256,
                b: 0
            }
        );
        let (r, w) = nix::unistd::pipe().expect("pipe");
        report(w.as_raw_fd(), TAG_FAILED, 3, 2);
        let mut got = [0u8; 12];
        use std::io::Read as _;
        File::from(r).read_exact(&mut got).expect("read");
        assert_eq!(
            Record::decode(&got),
            Record {
                tag: TAG_FAILED,
                a: 3,
                b: 2
            }
        );
    }
}
