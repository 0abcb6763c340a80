//! Handing this terminal's foreground to a restored shell, and taking it back.

use std::os::fd::AsFd as _;

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{Pid, getpgid, tcgetpgrp, tcsetpgrp};

/// While alive, the restored process's group owns the terminal on stdin; on drop pf's own
/// group gets it back.
#[derive(Debug)]
pub(crate) struct Foreground {
    previous: Option<Pid>,
}

impl Foreground {
    /// Make `pid`'s process group the foreground group of the terminal on stdin (the restore has
    /// put the shell in pf's session, so it may have it). Best effort: if it cannot, pf says so
    /// and nothing changes.
    pub(crate) fn give(pid: i32) -> Self {
        // A background group that sets the foreground gets SIGTTOU unless it is blocked; pf is in
        // the background when it takes the terminal back.
        let mut ttou = SigSet::empty();
        ttou.add(Signal::SIGTTOU);
        if let Err(err) = ttou.thread_block() {
            tracing::debug!(%err, "cannot block SIGTTOU");
        }
        let stdin = std::io::stdin();
        let previous = tcgetpgrp(stdin.as_fd()).ok();
        match getpgid(Some(Pid::from_raw(pid))) {
            Ok(group) => {
                if let Err(err) = tcsetpgrp(stdin.as_fd(), group) {
                    tracing::warn!(
                        %err,
                        pid,
                        "cannot give this terminal to the restored shell: it has no job \
                         control, and Ctrl-C typed at it reaches pf"
                    );
                }
            }
            Err(err) => tracing::debug!(%err, pid, "cannot read the restored shell's group"),
        }
        Self { previous }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Some(group) = self.previous
            && let Err(err) = tcsetpgrp(std::io::stdin().as_fd(), group)
        {
            tracing::debug!(%err, "cannot take the terminal back");
        }
    }
}
