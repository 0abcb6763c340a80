//! What `/proc` says about a shell before `pf shell` dumps it: finding it by pattern, and whether
//! CRIU will be able to restore its terminal.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// A process that `--pgrep` may pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) pid: i32,
    pub(crate) cmdline: String,
}

use pf_os::proc::Stat;

/// `/proc/PID/stat` of `pid` (parsed by pf-os).
pub(crate) fn read_stat(pid: i32) -> anyhow::Result<Stat> {
    pf_os::proc::stat(pid).with_context(|| format!("no process {pid} (/proc/{pid}/stat)"))
}

/// The device path of a `tty_nr`, when it is a pseudo-terminal slave (`/dev/pts/N`).
pub(crate) fn pts_path(tty_nr: u32) -> Option<PathBuf> {
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    // UNIX98_PTY_SLAVE_MAJOR is 136, with 8 majors reserved.
    (136..144)
        .contains(&major)
        .then(|| PathBuf::from(format!("/dev/pts/{}", (major - 136) * 256 + minor)))
}

/// A command line from `/proc/PID/cmdline` (NUL-separated), joined with spaces.
pub(crate) fn parse_cmdline(raw: &[u8]) -> String {
    raw.split(|b| *b == 0)
        .filter(|part| !part.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// pf itself and every ancestor: `--pgrep` must never pick them.
fn self_and_ancestors() -> Vec<i32> {
    let mut out = Vec::new();
    let mut pid = i32::try_from(std::process::id()).unwrap_or(0);
    while pid > 0 && !out.contains(&pid) {
        out.push(pid);
        pid = read_stat(pid).map(|s| s.ppid).unwrap_or(0);
    }
    out
}

/// Processes whose command line matches `pattern`, leaving out pf, its ancestors, kernel threads
/// and zombies (they have no command line).
pub(crate) fn pgrep(pattern: &regex::Regex) -> anyhow::Result<Vec<Candidate>> {
    let skip = self_and_ancestors();
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if skip.contains(&pid) {
            continue;
        }
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = parse_cmdline(&raw);
        if !cmdline.is_empty() && pattern.is_match(&cmdline) {
            out.push(Candidate { pid, cmdline });
        }
    }
    out.sort_by_key(|c| c.pid);
    Ok(out)
}

/// Exactly one match, or an error that lists what was found.
pub(crate) fn pick_one(pattern: &str, found: &[Candidate]) -> anyhow::Result<i32> {
    match found {
        [one] => Ok(one.pid),
        [] => bail!(
            "no process matches --pgrep {pattern:?} (pf and its ancestors are never matched); \
             list processes with `ps -eo pid,args` and pass --pid"
        ),
        many => {
            let list: Vec<String> = many
                .iter()
                .map(|c| format!("  {:>7}  {}", c.pid, c.cmdline))
                .collect();
            bail!(
                "{} processes match --pgrep {pattern:?}; pass --pid or a narrower pattern:\n{}",
                many.len(),
                list.join("\n")
            )
        }
    }
}

/// Why CRIU would not be able to restore this shell's terminal, if it would not.
pub(crate) fn terminal_problem(pid: i32) -> anyhow::Result<Option<String>> {
    let stat = read_stat(pid)?;
    if stat.tty_nr == 0 {
        return Ok(Some(format!(
            "process {pid} has no controlling terminal, so it is not a terminal shell session; \
             run it inside tmux or screen, or use `pf procs capture` / `pf goblin freeze` for \
             processes without a terminal"
        )));
    }
    let Some(pts) = pts_path(stat.tty_nr) else {
        return Ok(Some(format!(
            "process {pid}'s controlling terminal (device {}:{}) is not a /dev/pts pseudo-terminal; \
             CRIU restores shells only on /dev/pts: run it inside tmux or screen",
            (stat.tty_nr >> 8) & 0xfff,
            stat.tty_nr & 0xff
        )));
    };
    if is_vscode_terminal(pid) {
        return Ok(Some(format!(
            "process {pid} runs in VS Code's integrated terminal, whose pty belongs to VS Code's pty \
             proxy; CRIU's restore fails there (`tty: No task found with sid`): run the shell in \
             tmux or screen, or detach it with setsid/script"
        )));
    }
    // Its standard streams must be on that terminal: CRIU takes one terminal per shell job, and
    // a second pts fails the dump (`Only one slave external peer is allowed`, checked here).
    let links = pf_os::proc::stdio_links(pid);
    if let Some((fd, other)) = foreign_pts(&pts, &links) {
        return Ok(Some(format!(
            "process {pid}'s fd {fd} is {other}, a terminal other than its controlling terminal \
             {}; CRIU dumps a shell job with one terminal only (`tty: Only one slave external peer \
             is allowed`): run the shell in tmux or screen with its input and output on that terminal",
            pts.display()
        )));
    }
    // The session that owns the terminal must be the shell's own: its session leader must have
    // this terminal as its controlling terminal.
    match read_stat(stat.session) {
        Ok(leader) if leader.tty_nr == stat.tty_nr => Ok(None),
        _ => Ok(Some(format!(
            "{} is the controlling terminal of session {}, whose leader is not part of this \
             shell's session; CRIU would fail with `tty: No task found with sid`: run the shell \
             in tmux or screen, or detach it with setsid/script",
            pts.display(),
            stat.session
        ))),
    }
}

/// The first of fds 0–2 (as `readlink` shows them) that is a pseudo-terminal other than `ctty`.
fn foreign_pts(ctty: &Path, links: &[String]) -> Option<(usize, String)> {
    links.iter().enumerate().find_map(|(fd, link)| {
        (link.starts_with("/dev/pts/") && Path::new(link) != ctty).then(|| (fd, link.clone()))
    })
}

fn is_vscode_terminal(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|b| *b == 0)
            .any(|kv| kv == b"TERM_PROGRAM=vscode")
    })
}

/// The hint for CRIU's `tty: No task found with sid` error at restore.
pub(crate) const NO_SID_HINT: &str = "CRIU could not find the session that owns the shell's \
     terminal (`tty: No task found with sid`): freeze shells that run in tmux or screen, or \
     detach them with setsid/script first";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pts_device_numbers() {
        // 34816 = major 136, minor 0
        assert_eq!(pts_path(34816), Some(PathBuf::from("/dev/pts/0")));
        assert_eq!(pts_path((136 << 8) | 5), Some(PathBuf::from("/dev/pts/5")));
        // major 137 minor 1 → pts 257
        assert_eq!(
            pts_path((137 << 8) | 1),
            Some(PathBuf::from("/dev/pts/257"))
        );
        // /dev/tty1 is major 4
        assert_eq!(pts_path((4 << 8) | 1), None);
        assert_eq!(pts_path(0), None);
    }

    #[test]
    fn streams_on_another_terminal_are_found() {
        let ctty = Path::new("/dev/pts/3");
        let l = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(foreign_pts(ctty, &l(&["/dev/pts/3"; 3])), None);
        assert_eq!(
            foreign_pts(ctty, &l(&["/dev/null", "pipe:[7]", "/dev/pts/3"])),
            None
        );
        assert_eq!(
            foreign_pts(ctty, &l(&["/dev/pts/3", "/dev/pts/4", "/dev/pts/3"])),
            Some((1, "/dev/pts/4".to_owned()))
        );
        assert_eq!(foreign_pts(ctty, &l(&["", "", ""])), None);
    }

    #[test]
    fn cmdline_joins_args() {
        assert_eq!(parse_cmdline(b"bash\0--norc\0"), "bash --norc");
        assert_eq!(parse_cmdline(b""), "");
    }

    #[test]
    fn pick_one_lists_candidates() {
        let c = |pid, s: &str| Candidate {
            pid,
            cmdline: s.into(),
        };
        assert_eq!(pick_one("x", &[c(5, "x")]).unwrap(), 5);
        let none = pick_one("x", &[]).unwrap_err().to_string();
        assert!(none.contains("no process matches"), "{none}");
        let two = pick_one("x", &[c(5, "x a"), c(6, "x b")])
            .unwrap_err()
            .to_string();
        assert!(
            two.contains("2 processes") && two.contains("x a") && two.contains("x b"),
            "{two}"
        );
    }

    #[test]
    fn pgrep_never_matches_self() {
        let me = std::process::id().to_string();
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap();
        let found = pgrep(&regex::Regex::new(&regex::escape(name)).unwrap()).unwrap();
        assert!(found.iter().all(|c| c.pid.to_string() != me), "{found:?}");
    }
}
