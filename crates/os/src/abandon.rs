//! Ending this process at once when its work is interrupted (Ctrl-C), leaving nothing of that
//! work behind.
//!
//! A signal's default action ends a process before any destructor runs: a `pf goblin thaw`
//! stopped that way left the snapshot's unpacked images on tmpfs (the whole memory of the
//! process, for a whole-archive snapshot) and a `criu restore` still running. A command that
//! handles the signal on a thread of its own while the rest of it works can call [`exit`] from
//! that thread instead: it ends every process this one started, removes every scratch directory
//! in use, and exits with the code asked for, whatever the other threads are doing.
//!
//! It kills by pid what this process started, nothing else: its descendants, found through
//! `/proc/PID/task/TID/children` (criu, a namespace init of a restore, whose namespace goes with
//! it, and a tree criu had half restored). This process becomes a child subreaper first, so
//! the children of a process killed meanwhile come to it and are found at the next look,
//! rather than escaping to init.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Set once [`exit`] has begun.
static ENDING: AtomicBool = AtomicBool::new(false);

/// How long [`exit`] waits for what it killed to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Whether [`exit`] is under way: the process is about to end, and what its other threads
/// still say or do is moot (a caller's logging goes quiet, its `main` waits for the end).
pub fn is_ending() -> bool {
    ENDING.load(Ordering::SeqCst)
}

/// If [`exit`] is under way on another thread, wait for it to end the process (never returns
/// then); otherwise return at once. For `main`, before it prints an error that the interrupt
/// caused (a criu killed under it) and picks an exit code of its own.
pub fn wait_if_ending() {
    if is_ending() {
        // `exit` holds the list until the process ends.
        let _held = crate::scratch::live();
        loop {
            std::thread::park();
        }
    }
}

/// End this process with exit status `code`, leaving nothing behind: kill every process it
/// started (its descendants, each by pid, and reap its own children), remove every scratch
/// directory it holds ([`crate::scratch`]), then exit. Meanwhile no other thread can make,
/// keep or let go of a scratch directory. Gives what it killed up to 5 s to be gone.
pub fn exit(code: i32) -> ! {
    ENDING.store(true, Ordering::SeqCst);
    // Held to the end: a directory made from now on would not be removed.
    let live = crate::scratch::live();
    if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::debug!(%err, "cannot become a child subreaper");
    }
    end_descendants(std::process::id() as i32, KILL_WAIT, true);
    for dir in live.iter() {
        remove(dir);
    }
    std::process::exit(code)
}

/// SIGKILL every descendant of `root`, again until none is left (at most `limit`); `reap`: reap
/// every child of ours as they end (only when nothing else of ours waits for them).
fn end_descendants(root: i32, limit: Duration, reap: bool) {
    let start = Instant::now();
    loop {
        if reap {
            reap_children();
        }
        let below: Vec<i32> = crate::proc::tree(root).into_iter().skip(1).collect();
        if below.is_empty() || start.elapsed() >= limit {
            return;
        }
        for pid in below {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reap every child of ours that has ended.
fn reap_children() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
            Err(nix::errno::Errno::EINTR) | Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Remove `dir` and everything in it; another thread of ours may be removing it too, or writing
/// into it until the process ends, so try a few times.
fn remove(dir: &std::path::Path) {
    for _ in 0..10 {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => return,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

#[cfg(test)]
mod tests {
    // `exit` ends the process, so it is tested through the `pf` binary (pf-tests' live
    // interrupt tests); here, the pieces.
    use super::*;

    #[test]
    fn a_directory_being_removed_twice_is_gone() {
        let base = std::env::temp_dir().join(format!("pf-os-abandon-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a/b")).expect("mkdir");
        std::fs::write(base.join("a/b/c"), b"x").expect("write");
        let other = {
            let base = base.clone();
            std::thread::spawn(move || {
                let _ = std::fs::remove_dir_all(&base);
            })
        };
        remove(&base);
        other.join().expect("join");
        assert!(!base.exists());
        remove(&base);
    }

    #[test]
    fn every_descendant_is_ended() {
        // A shell with a child that has a child of its own; everything below the shell goes.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sh -c 'sleep 60 & echo $!; wait' & wait"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sh.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read the sleep's pid");
        let sleep: i32 = line.trim().parse().expect("a pid");
        let root = sh.id() as i32;
        let below: Vec<i32> = crate::proc::tree(root).into_iter().skip(1).collect();
        assert!(below.len() == 2 && below.contains(&sleep), "{below:?}");
        end_descendants(root, Duration::from_secs(5), false);
        for pid in below {
            assert_ne!(
                crate::proc::pid_state(pid),
                crate::proc::PidState::Alive,
                "pid {pid} was ended"
            );
        }
        // The shell itself is left to its owner; its `wait` returns once its child is gone.
        assert!(sh.wait().expect("reap sh").success());
    }
}
