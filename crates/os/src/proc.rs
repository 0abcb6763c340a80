//! Reading `/proc`: `/proc/PID/stat`, `/proc/PID/status`, `/proc/PID/fd` links, the process tree.
//!
//! Parsing is pure (`&str` in, value out) and unit-tested on captured text; the thin readers
//! around it do the I/O.

use std::io;
use std::path::PathBuf;

/// The fields of a `/proc/PID/stat` line pf uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// The parent pid.
    pub ppid: i32,
    /// The process group.
    pub pgrp: i32,
    /// The session.
    pub session: i32,
    /// The controlling terminal's device number (0: none).
    pub tty_nr: u32,
    /// The kernel's task flags (`PF_*`).
    pub flags: u64,
}

/// The kernel's `PF_EXITING` task flag: the task has started to exit (`do_exit`).
pub const PF_EXITING: u64 = 0x4;
/// The kernel's `PF_KTHREAD` task flag: a kernel thread (kthreadd, workers), not a program.
pub const PF_KTHREAD: u64 = 0x0020_0000;

impl Stat {
    /// Whether the state is `Z` (zombie) or `X` (dead): exited, nothing left to run.
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }

    /// Whether the task has started to exit (`PF_EXITING`).
    pub fn is_exiting(&self) -> bool {
        self.flags & PF_EXITING != 0
    }

    /// Whether the task is a kernel thread (`PF_KTHREAD`).
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// Parse a `/proc/PID/stat` line. The command name may itself hold `)` and spaces, so the fields
/// are read after the *last* `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    let tty_nr = u32::try_from(fields.next()?.parse::<i64>().ok()?).ok()?;
    let _tpgid = fields.next()?;
    let flags = fields.next()?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgrp,
        session,
        tty_nr,
        flags,
    })
}

/// The start time of a `/proc/PID/stat` line (field 22), in clock ticks since boot.
pub fn parse_start_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Where the command line lies in memory, from a `/proc/PID/stat` line (fields 48 and 49,
/// `arg_start` and `arg_end`); `None` when they are not there or hidden (shown as 0).
pub fn parse_arg_area(text: &str) -> Option<(usize, usize)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(45);
    let start: usize = fields.next()?.parse().ok()?;
    let end: usize = fields.next()?.parse().ok()?;
    (start > 0 && end > start).then_some((start, end))
}

/// Where this process's command line lies in its memory (what `/proc/self/cmdline` reads).
pub fn own_arg_area() -> Option<(usize, usize)> {
    parse_arg_area(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// When `pid` started, to within a second (the boot time is kept in whole seconds); `None`
/// when it does not exist.
pub fn started_at(pid: i32) -> Option<std::time::SystemTime> {
    let ticks = parse_start_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())?;
    Some(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(boot)
            + std::time::Duration::from_millis(ticks * 1000 / per_second.max(1)),
    )
}

/// Whether a `/proc/PID/status` text shows a SIGKILL pending for the thread group (`ShdPnd:`)
/// or the task (`SigPnd:`): it is about to exit.
pub fn status_sigkill_pending(status: &str) -> bool {
    let sigkill = 1u64 << (libc::SIGKILL - 1);
    status.lines().any(|l| {
        l.strip_prefix("ShdPnd:")
            .or_else(|| l.strip_prefix("SigPnd:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|mask| mask & sigkill != 0)
    })
}

/// The signals a `/proc/PID/status` text shows ignored (`SigIgn:`, a hex mask: bit `N - 1` for
/// signal `N`); 0 when there is no such line.
pub fn status_ignored_signals(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// Whether this process ignores `signal` (`SIG_IGN`): a shell starts a background job of a
/// script, and `nohup` its command, with SIGINT, SIGQUIT or SIGHUP ignored.
pub fn ignores_signal(signal: i32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    (1..=64).contains(&signal) && status_ignored_signals(&status) & (1u64 << (signal - 1)) != 0
}

/// The innermost pid from the `NSpid:` line of a `/proc/PID/status` text.
pub fn status_inner_pid(status: &str) -> Option<i32> {
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line["NSpid:".len()..]
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The value of a `field` (such as `RssAnon:`) of a `/proc/PID/status` text given in kB, in
/// KiB (or of `/proc/meminfo`'s, which reads the same). The memory counters there are kept by the kernel, so reading them costs nothing
/// however large the memory, where `/proc/PID/smaps` walks every page table entry.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// The pid tracing the task of a `/proc/PID/status` text (its `TracerPid:` line), when one
/// does: a debugger, `strace`, or criu while it dumps the task.
pub fn status_tracer(status: &str) -> Option<i32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()
        .filter(|&tracer| tracer != 0)
}

/// A task (thread) of `pid` that another process traces, as `(tid, tracer)`; `None` when none
/// is traced, or `pid` is gone. Only one tracer can attach to a task at a time, so criu cannot
/// seize a task that one of these holds.
pub fn traced_task(pid: i32) -> Option<(i32, i32)> {
    let leader = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    if let Some(tracer) = status_tracer(&leader) {
        return Some((pid, tracer));
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|task| {
        let tid: i32 = task.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(task.path().join("status")).ok()?;
        Some((tid, status_tracer(&status)?))
    })
}

/// Pids in a `/proc/PID/task/TID/children` file: space-separated decimal numbers.
pub fn parse_children(text: &str) -> Vec<i32> {
    text.split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The inode of an anonymous-inode `/proc/PID/fd` link of kind `kind`: `link_inode("pipe:[42]",
/// "pipe") == Some(42)`; `socket` likewise.
pub fn link_inode(link: &str, kind: &str) -> Option<u64> {
    link.strip_prefix(kind)?
        .strip_prefix(":[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// `/proc/PID/stat` of `pid`, parsed; `None` when there is no such process (or it is unreadable).
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// What `/proc/PID` says about a pid right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidState {
    /// No such process.
    Gone,
    /// Exited, waiting for its parent to reap it.
    Zombie {
        /// Its parent, which has to reap it.
        ppid: i32,
    },
    /// Running or sleeping.
    Alive,
}

/// The state of `pid`.
pub fn pid_state(pid: i32) -> PidState {
    match stat(pid) {
        None => PidState::Gone,
        Some(s) if s.is_zombie() => PidState::Zombie { ppid: s.ppid },
        Some(_) => PidState::Alive,
    }
}

/// Whether `pid` has ended or is ending: gone, a zombie, or killed and still tearing itself
/// down. A process SIGKILLed while it owns a lot of memory keeps state `R` (with `PF_EXITING`
/// set) for a while after the kill.
pub fn has_ended(pid: i32) -> bool {
    let Some(stat) = stat(pid) else {
        return true;
    };
    if stat.is_zombie() || stat.is_exiting() {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_or(true, |status| status_sigkill_pending(&status))
}

/// The inner (own namespace) pid of `pid`, from its `NSpid:` line.
pub fn inner_pid(pid: i32) -> Option<i32> {
    status_inner_pid(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `/proc/PID/comm`, trimmed; `None` when there is no such process.
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The direct children of every thread of `pid`, in ascending order.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(parse_children(&text));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `pid` and every descendant, root first then breadth-first with siblings ascending.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 100_000 {
        for k in children(out[i]) {
            if !out.contains(&k) {
                out.push(k);
            }
        }
        i += 1;
    }
    out
}

/// Where `/proc/PID/fd/FD` points (`pipe:[123]`, `/dev/pts/3`, …): `Ok(None)` when the
/// descriptor is not open, an error of kind `NotFound` when there is no process `pid`.
pub fn fd_link(pid: i32, fd: i32) -> io::Result<Option<String>> {
    let path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
    match std::fs::read_link(&path) {
        Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no process {pid}"),
                ))
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(e),
    }
}

/// Whether `pid`'s descriptor `fd` is a FIFO. An anonymous pipe is one too: ask this of a
/// descriptor whose [`fd_link`] is a path, to tell a named pipe from a file.
pub fn fd_is_fifo(pid: i32, fd: i32) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).is_ok_and(|m| m.file_type().is_fifo())
}

/// `pid`'s open descriptors, each with where its `/proc/PID/fd/N` link points, in ascending
/// order; empty when the process is gone or its descriptors cannot be read.
pub fn open_fds(pid: i32) -> Vec<(i32, String)> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<(i32, String)> = fds
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            Some((fd, link.to_string_lossy().into_owned()))
        })
        .collect();
    out.sort_unstable();
    out
}

/// The `open` flags of `pid`'s descriptor `fd` (`/proc/PID/fdinfo/FD`), `None` when it is not
/// open or cannot be read.
pub fn fd_flags(pid: i32, fd: i32) -> Option<u32> {
    parse_fdinfo_flags(&std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?)
}

/// The `flags:` line of a `/proc/PID/fdinfo/FD` text (octal, as the kernel prints it).
pub fn parse_fdinfo_flags(text: &str) -> Option<u32> {
    let value = text.lines().find_map(|l| l.strip_prefix("flags:"))?;
    u32::from_str_radix(value.trim(), 8).ok()
}

/// Whether `open` flags let the descriptor read (`O_RDONLY` or `O_RDWR`).
pub fn flags_read(flags: u32) -> bool {
    let mode = flags & libc::O_ACCMODE as u32;
    mode == libc::O_RDONLY as u32 || mode == libc::O_RDWR as u32
}

/// The link targets of `pid`'s fds 0, 1 and 2, each empty when it cannot be read.
pub fn stdio_links(pid: i32) -> Vec<String> {
    (0..3)
        .map(|fd| fd_link(pid, fd).ok().flatten().unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cat /proc/PID/stat` of a sleeping bash on this machine (Linux 6.x).
    const BASH: &str = "3021 (bash) S 3015 3021 3021 34816 3050 4194560 1170 2447 0 0 1 0 2 0 20 \
                        0 1 0 5270 8900608 1187 18446744073709551615 1 1 0 0 0 0 65536 3686404 \
                        1266761467 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn the_command_line_area_is_fields_48_and_49() {
        // `cat /proc/self/stat` on this machine (Linux 6.18), a command name with `) ` in it.
        let cat = "9917 (c) t) R 9914 9914 19173 0 -1 4194304 98 0 0 0 0 0 0 0 20 0 1 0 2247469 \
                   3133440 358 18446744073709551615 94629526441984 94629526461865 \
                   140729585785568 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 94629526477872 \
                   94629526479488 94629924614144 140729585793753 140729585793773 \
                   140729585793773 140729585795051 0";
        assert_eq!(
            parse_arg_area(cat),
            Some((140_729_585_793_753, 140_729_585_793_773))
        );
        assert_eq!(parse_arg_area(BASH), None, "a line without them");
        let (start, end) = own_arg_area().expect("our own");
        let ours = std::fs::read("/proc/self/cmdline").expect("cmdline");
        assert_eq!(end - start, ours.len(), "the area is what cmdline reads");
    }

    #[test]
    fn ignored_signals_come_from_the_sigign_mask() {
        // A `sh -c 'sleep 100 &'` job: SIGINT (2) and SIGQUIT (3) ignored.
        let status = "Name:\tsleep\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000006\n";
        assert_eq!(status_ignored_signals(status), 0b110);
        assert_eq!(status_ignored_signals("Name:\tx\n"), 0);
        assert!(
            !ignores_signal(libc::SIGTERM),
            "the test harness handles SIGTERM by default"
        );
    }

    #[test]
    fn fdinfo_flags_are_octal_and_tell_a_reader_from_a_writer() {
        let text = "pos:\t0\nflags:\t0100001\nmnt_id:\t15\nino:\t524598\n";
        let flags = parse_fdinfo_flags(text).expect("flags");
        assert_eq!(flags, 0o100001);
        assert!(!flags_read(flags), "O_WRONLY|O_LARGEFILE writes only");
        assert!(flags_read(0o100000), "O_RDONLY");
        assert!(flags_read(0o2), "O_RDWR");
        assert_eq!(parse_fdinfo_flags("pos:\t0\n"), None);
        assert_eq!(parse_fdinfo_flags("flags:\t9\n"), None, "not octal");
    }

    #[test]
    fn our_own_pipe_ends_show_their_direction() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        use std::os::fd::AsRawFd as _;
        let me = std::process::id() as i32;
        let fds = open_fds(me);
        let link = |fd: i32| fds.iter().find(|(f, _)| *f == fd).map(|(_, l)| l.clone());
        let (rl, wl) = (
            link(r.as_raw_fd()).expect("r"),
            link(w.as_raw_fd()).expect("w"),
        );
        assert_eq!(rl, wl, "both ends name one pipe");
        assert!(link_inode(&rl, "pipe").is_some(), "{rl}");
        assert!(flags_read(fd_flags(me, r.as_raw_fd()).expect("r flags")));
        assert!(!flags_read(fd_flags(me, w.as_raw_fd()).expect("w flags")));
    }

    #[test]
    fn this_process_started_a_moment_ago() {
        let now = std::time::SystemTime::now();
        let started = started_at(std::process::id() as i32).expect("our start");
        assert!(
            started <= now + std::time::Duration::from_secs(1),
            "{started:?}"
        );
        assert!(
            started + std::time::Duration::from_secs(3600) > now,
            "{started:?}"
        );
        assert_eq!(started_at(i32::MAX), None);
    }

    #[test]
    fn stat_parses_captured_and_odd_names() {
        let s = parse_stat(BASH).expect("bash");
        assert_eq!(
            s,
            Stat {
                state: 'S',
                ppid: 3015,
                pgrp: 3021,
                session: 3021,
                tty_nr: 34816,
                flags: 4_194_560
            }
        );
        assert!(!s.is_zombie() && !s.is_exiting() && !s.is_kernel_thread());
        // kthreadd, pid 2, on this machine.
        let kthreadd = parse_stat("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0")
            .expect("kthreadd");
        assert!(kthreadd.is_kernel_thread());
        let odd = parse_stat("4242 (we) i rd) Z 17 4242 4242 0 -1 4194564 7").expect("odd");
        assert_eq!((odd.state, odd.ppid), ('Z', 17));
        assert!(odd.is_zombie() && odd.is_exiting());
        assert_eq!(parse_start_ticks(BASH), Some(5270));
        assert_eq!(parse_start_ticks("1 (x) Z 0 0"), None, "too few fields");
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) Z 0 0"), None, "too few fields");
        assert_eq!(parse_stat("1 (x) S 0 1 1 -5 -1 0"), None, "negative tty");
    }

    #[test]
    fn status_fields() {
        let status = |shd: &str, sig: &str| format!("Name:\tx\nSigPnd:\t{sig}\nShdPnd:\t{shd}\n");
        assert!(status_sigkill_pending(&status(
            "0000000000000100",
            "0000000000000000"
        )));
        assert!(status_sigkill_pending(&status(
            "0000000000000000",
            "0000000000000100"
        )));
        assert!(!status_sigkill_pending(&status(
            "0000000000000002",
            "0000000000004000"
        )));
        assert!(!status_sigkill_pending("Name:\tx\n"));
        let status = "Name:\tx\nNSpid:\t5551\t3021\nNSsid:\t1\n";
        assert_eq!(status_inner_pid(status), Some(3021));
        assert_eq!(status_inner_pid("NSpid:\t77\n"), Some(77));
        assert_eq!(status_inner_pid("Name:\tx\n"), None);
        let status = "VmRSS:\t  1056972 kB\nRssAnon:\t  1050832 kB\nRssFile:\t    6140 kB\n";
        assert_eq!(status_kib(status, "RssAnon:"), Some(1_050_832));
        assert_eq!(status_kib(status, "RssShmem:"), None);
        assert_eq!(status_kib("RssAnon:\t12\n", "RssAnon:"), None, "no unit");
        // This test's own, from the kernel.
        let mine = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status_kib(&mine, "RssAnon:").is_some_and(|k| k > 0));
    }

    #[test]
    fn the_tracer_is_read_from_status() {
        // Captured from a python3 goblin while `criu dump` (pid 13075) held it.
        let traced = "Name:\tpython3\nUmask:\t0022\nState:\tt (tracing stop)\nTgid:\t12756\n\
                      Ngid:\t0\nPid:\t12756\nPPid:\t12754\nTracerPid:\t13075\nUid:\t0\t0\t0\t0\n";
        assert_eq!(status_tracer(traced), Some(13075));
        let free = traced.replace("TracerPid:\t13075", "TracerPid:\t0");
        assert_eq!(status_tracer(&free), None);
        assert_eq!(status_tracer("Name:\tx\n"), None);
        // Nobody traces this test (or a debugger does, and says so).
        let me = i32::try_from(std::process::id()).unwrap();
        let mine = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(traced_task(me).map(|(_, t)| t), status_tracer(&mine));
        assert_eq!(traced_task(i32::MAX), None);
    }

    #[test]
    fn children_and_links() {
        assert_eq!(parse_children("12 345 \n"), vec![12, 345]);
        assert_eq!(parse_children(""), Vec::<i32>::new());
        assert_eq!(link_inode("pipe:[4242]", "pipe"), Some(4242));
        assert_eq!(link_inode("socket:[7]", "socket"), Some(7));
        assert_eq!(link_inode("socket:[7]", "pipe"), None);
        assert_eq!(link_inode("pipe:[x]", "pipe"), None);
        assert_eq!(link_inode("/dev/pts/3", "pipe"), None);
    }

    #[test]
    fn own_process_is_alive_with_stdio() {
        let me = std::process::id() as i32;
        assert_eq!(pid_state(me), PidState::Alive);
        assert_eq!(tree(me)[0], me);
        let open = fd_link(me, 0).expect("fd 0").is_some() || fd_link(me, 1).expect("1").is_some();
        assert!(open);
        assert_eq!(fd_link(me, 1 << 20).expect("closed fd"), None);
        assert_eq!(stdio_links(me).len(), 3);
        assert_eq!(stdio_links(i32::MAX), ["", "", ""]);
        let err = fd_link(i32::MAX, 0).expect_err("no such process");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(pid_state(i32::MAX), PidState::Gone);
        assert!(!has_ended(me));
        assert!(has_ended(i32::MAX));
        assert!(inner_pid(me).is_some());
        assert!(comm(me).is_some());
    }
}
