//! Reading `/proc`: process state, the process tree below a pid, stdio link targets.
//!
//! Parsing is pure and unit-tested; the thin readers around it do the I/O.

use std::path::PathBuf;

/// The state letter of a `/proc/<pid>/stat` line (`R`, `S`, `Z`, …). The command name may
/// itself contain `)` and spaces, so the state is found after the *last* `)`.
pub(crate) fn stat_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// The parent pid in a `/proc/<pid>/stat` line.
pub(crate) fn stat_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The kernel's `PF_EXITING` task flag: the task has started to exit (`do_exit`).
const PF_EXITING: u64 = 0x4;

/// The task flags (`PF_*`, the 9th field) of a `/proc/<pid>/stat` line.
pub(crate) fn stat_flags(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(6)?.parse().ok()
}

/// Whether a `/proc/<pid>/status` text shows a SIGKILL pending for the thread group
/// (`ShdPnd:`) or the task (`SigPnd:`): it is about to exit.
pub(crate) fn status_sigkill_pending(status: &str) -> bool {
    let sigkill = 1u64 << (libc::SIGKILL - 1);
    status.lines().any(|l| {
        l.strip_prefix("ShdPnd:")
            .or_else(|| l.strip_prefix("SigPnd:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|mask| mask & sigkill != 0)
    })
}

/// Pids in a `/proc/<pid>/task/<tid>/children` file: space-separated decimal numbers.
pub(crate) fn parse_children(text: &str) -> Vec<i32> {
    text.split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The innermost pid from the `NSpid:` line of `/proc/<pid>/status`.
pub(crate) fn status_inner_pid(status: &str) -> Option<i32> {
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line["NSpid:".len()..]
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// What `/proc/<pid>` says about a pid right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PidState {
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
pub(crate) fn pid_state(pid: i32) -> PidState {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => PidState::Gone,
        Ok(stat) => match stat_state(&stat) {
            Some('Z') | Some('X') => PidState::Zombie {
                ppid: stat_ppid(&stat).unwrap_or(0),
            },
            None => PidState::Gone,
            Some(_) => PidState::Alive,
        },
    }
}

/// Whether `pid` has ended or is ending: gone, a zombie, or killed and still tearing itself
/// down. A process SIGKILLed while it owns a lot of memory keeps state `R` (with `PF_EXITING`
/// set) for a while after the kill, and a criu that failed because of it may exit first.
pub(crate) fn has_ended(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    if !matches!(stat_state(&stat), Some(s) if s != 'Z' && s != 'X') {
        return true;
    }
    if stat_flags(&stat).is_some_and(|f| f & PF_EXITING != 0) {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_or(true, |status| status_sigkill_pending(&status))
}

/// The direct children of every thread of `pid`, in ascending order.
pub(crate) fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(&path) {
            out.extend(parse_children(&text));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `pid` and every descendant, root first then breadth-first with siblings ascending.
pub(crate) fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 100_000 {
        let kids = children(out[i]);
        for k in kids {
            if !out.contains(&k) {
                out.push(k);
            }
        }
        i += 1;
    }
    out
}

/// Where `/proc/<pid>/fd/<fd>` points (`pipe:[123]`, `/dev/pts/3`, …); `None` when closed.
pub(crate) fn fd_target(pid: i32, fd: i32) -> Option<String> {
    let link = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
    std::fs::read_link(link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_odd_names() {
        let s = "4242 (we) ird) S 17 4242 4242 0 -1 4194560 ...";
        assert_eq!(stat_state(s), Some('S'));
        assert_eq!(stat_ppid(s), Some(17));
        assert_eq!(stat_state("1 (x) Z 0 0"), Some('Z'));
        assert_eq!(stat_state("garbage"), None);
        assert_eq!(stat_flags(s), Some(4_194_560));
        assert_eq!(stat_flags("1 (x) Z 0 0"), None, "too few fields");
        let full = "4242 (py (x)) R 1 4242 4242 0 -1 4195340 7 0 0 0 0 0";
        assert_eq!(stat_flags(full), Some(4_195_340));
        assert_eq!(stat_flags(full).map(|f| f & PF_EXITING), Some(PF_EXITING));
        let sleeping = "4242 (py) S 1 4242 4242 0 -1 4194560 7 0";
        assert_eq!(stat_flags(sleeping).map(|f| f & PF_EXITING), Some(0));
    }

    #[test]
    fn sigkill_pending_is_read_from_either_mask() {
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
    }

    #[test]
    fn children_and_nspid() {
        assert_eq!(parse_children("12 345 \n"), vec![12, 345]);
        assert_eq!(parse_children(""), Vec::<i32>::new());
        let status = "Name:\tx\nNSpid:\t5551\t3021\nNSsid:\t1\n";
        assert_eq!(status_inner_pid(status), Some(3021));
        assert_eq!(status_inner_pid("NSpid:\t77\n"), Some(77));
        assert_eq!(status_inner_pid("Name:\tx\n"), None);
    }

    #[test]
    fn own_process_is_alive_with_stdio() {
        let me = std::process::id() as i32;
        assert_eq!(pid_state(me), PidState::Alive);
        assert_eq!(tree(me)[0], me);
        assert!(fd_target(me, 0).is_some() || fd_target(me, 1).is_some());
        assert_eq!(fd_target(me, 1 << 20), None);
        assert_eq!(pid_state(i32::MAX), PidState::Gone);
        assert!(!has_ended(me));
        assert!(has_ended(i32::MAX));
    }
}
